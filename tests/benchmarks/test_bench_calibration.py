"""benchmarks/bench_calibration.py on the CPU at bench_e2e's tiny Wan: a stage subset runs, every stage is recorded
with its seconds (the JSON is rewritten after each), the stage it needs but was not asked for runs at its cheapest
settings, and --msad-blocks stops MSAD early with a fit that extrapolates to every block."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_calibration  # noqa: E402


@pytest.mark.slow
def test_cpu_smoke_run_records_each_stage(tmp_path):
    out = tmp_path / "calibration.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_calibration.py"), "--workload", "reference",
               "--device", "cpu", "--setting", "smoke", "--stages", "selection,statistics,search,msad",
               "--msad-blocks", "1", "--out", str(out)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=600)
    record = json.loads(out.read_text())
    assert record["finished"] and record["error"] is None
    names = [s["stage"] for s in record["stages"]]
    assert names == ["selection", "statistics", "search", "ssar", "msad/blocks.0"]
    assert [s["stage"] for s in record["stages"] if s["prerequisite"]] == ["ssar"]
    assert record["config"]["ssar_steps"] == 2 and record["config"]["selection"] == "salient"
    assert all(s["status"] == "computed" and s["seconds"] > 0 for s in record["stages"])
    summary = record["summary"]
    assert set(summary["seconds"]) == {"selection", "statistics", "search", "ssar", "msad"}
    assert summary["msad_fit"]["blocks_done"] == 1 and summary["msad_fit"]["of_blocks"] == 2


def test_msad_fit_is_the_least_squares_line_summed_over_all_blocks():
    fit = bench_calibration.msad_fit([(0, 2.0), (1, 3.0), (2, 4.0)], total_blocks=5)
    assert fit["seconds_per_block"] == [2.0, 1.0] and fit["all_blocks_s"] == 2.0 * 5 + (0 + 1 + 2 + 3 + 4)
    assert bench_calibration.msad_fit([], 30) is None
