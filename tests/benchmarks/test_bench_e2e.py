"""benchmarks/bench_e2e.py on the small reference workload, CPU: every row builds, compiles, runs and is recorded
(the CPU smoke test of issue #9's benchmark; no timing asserts - CPU times are not performance figures)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_reference_workload_rows_and_chart(tmp_path):
    out = tmp_path / "e2e.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--workload", "reference", "--device", "cpu",
               "--rows", "eager,qsparse", "--out", str(out)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=600)
    data = json.loads(out.read_text())
    rows = {row["system"]: row for row in data["rows"]}
    assert set(rows) == {"eager", "qsparse (refresh step)", "qsparse (reuse step)", "qsparse (50-step average)"}
    assert all(row["ms"] > 0 for row in rows.values()), "a row failed: " + str([r["note"] for r in rows.values()])
    reuse = rows["qsparse (reuse step)"]
    # int4 weights + 15% attention + the residual cache: a small, nonzero error vs eager, also on the reuse step.
    assert 0 < reuse["rel_error_vs_eager"] < 0.05
    assert reuse["block_weight_bytes"] < rows["eager"]["block_weight_bytes"] / 3
    assert "residual cache" in reuse["note"] and "11 refresh + 39 reuse" in rows["qsparse (50-step average)"]["note"]
    subprocess.run([*command[:2], "--plot", str(out)], check=True, cwd=ROOT, capture_output=True, timeout=120)
    assert out.with_suffix(".png").stat().st_size > 1000
