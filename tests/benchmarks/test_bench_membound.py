"""benchmarks/bench_membound.py on the CPU at a few tokens: every row runs (Inductor's CPU compile of the unfused
subgraphs, the ops, each launch config under the interpreter) and is recorded, and the fused ops agree with the eager
unfused graph (no timing asserts: CPU times are not performance figures)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_smoke_run_records_every_row(tmp_path):
    out = tmp_path / "membound.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_membound.py"), "--device", "cpu", "--tokens", "24",
               "--out", str(out)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=600)
    results = json.loads(out.read_text())
    assert not [row for row in results["rows"] if "error" in row]
    methods = {(row["short"], row["method"].split("[")[0]) for row in results["rows"]}
    for short in ("qk", "ln1 fp8", "ln2 fp8", "ln1 int8", "gelu fp8"):
        assert {(short, "inductor"), (short, "ours_op")} <= methods
    assert ("qk", "ours_kernel") in methods and ("ln1 fp8", "ours_kernel") in methods
    for row in results["rows"]:
        assert row["gb"] > 0 and row["ms"] > 0
        if row["method"] == "ours_op" and row["short"].startswith("ln"):  # on CPU the op is the reference
            assert row["vs_eager"] == {"codes_equal": 1.0, "max_scale_rel_diff": 0.0}
        if row["method"] == "ours_op" and row["short"] == "gelu fp8":  # the kernel, interpreted: GELU a few ulps off
            assert row["vs_eager_fp32"]["codes_equal"] >= 0.99 and row["vs_eager_fp32"]["max_scale_rel_diff"] < 1e-5
        if row["method"] == "ours_op" and row["short"] == "qk":
            assert row["rel_err_vs_fp64"] < 1e-2
    assert (tmp_path / "membound.md").read_text().count("| ours_op |") == 5
    assert (tmp_path / "membound.png").stat().st_size > 0
