"""benchmarks/bench_ablation.py on the CPU at the smoke size (the reference DiT at 2 frames, seed 0, 3 steps, a tiny
calibration): the same code path as the device parts ablation-calib and ablation - both plans are made through
`qsparse calibrate reference`, every row runs with and without guidance, and each is recorded with its metrics and
its share of dense layer-steps. Several minutes on the CPU (11 rows, most compiled): marked extended."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_ablation  # noqa: E402


def _run(*arguments: str) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_ablation.py"), "--smoke", "--device", "cpu",
               *arguments]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=3000)


@pytest.mark.extended
def test_cpu_smoke_calibrates_both_plans_and_records_every_row(tmp_path):
    plans, calibration, out = tmp_path / "plans", tmp_path / "calibration.json", tmp_path / "ablation.json"
    _run("--calibrate", "--plans", str(plans), "--out", str(calibration))
    made = json.loads(calibration.read_text())["rows"]
    assert [r["row"] for r in made] == ["calibrate plan", "calibrate plan_talora"]
    assert not any("error" in r for r in made)
    # plan_talora resumed plan/'s stages: only MSAD ran again, now with TALoRA
    talora = made[1]["stages"]
    assert all(talora[s] == "resumed" for s in ("selection", "statistics", "search", "ssar"))
    assert (plans / "plan_talora" / "plan.json").is_file()
    assert "lora" in json.loads((plans / "plan_talora" / "plan.json").read_text())["metadata"]

    rows = [r for r in bench_ablation.ROWS if r != "local"]
    _run("--rows", ",".join(rows), "--plans", str(plans), "--out", str(out))
    recorded = json.loads(out.read_text())["rows"]
    assert not [r for r in recorded if "error" in r]
    assert [(r["row"], r["guidance"]) for r in recorded] == [
        (name, g) for name in ["dense", *rows] for g in (1.0, bench_ablation.GUIDANCE)]
    for r in recorded[2:]:
        assert r["finite"] and math.isfinite(r["psnr_mean"]) and 0 < r["ssim_mean"] <= 1, r["row"]
        assert r["dense_share"] is not None and 0 <= r["dense_share"] <= 1, r["row"]
    # every compressed row differs from dense (a sparse row at dense-level PSNR would mean its layout was not used)
    assert all(r["psnr_mean"] < 60 for r in recorded[2:]), [(r["row"], r["psnr_mean"]) for r in recorded]
    share = {r["row"]: r["dense_share"] for r in recorded}
    assert share["w4a8"] == 1.0 and share["naive"] == 0.0 and share["topk"] == 0.0
    # steps 0, 1 refresh of 3 (the fixed schedule: first 2, then every 5th)
    assert share["ssar1"] == pytest.approx(2 / 3)
    assert (out.with_suffix(".md")).read_text().count("\n") == len(recorded) + 2


def test_a_row_without_its_plan_is_a_clear_error(tmp_path):
    args = bench_ablation.argparse.Namespace(device="cpu", frames=2, seeds="0", steps=3)
    setup = bench_ablation.Setup(args)
    with pytest.raises(FileNotFoundError, match="plan.json is missing: run bench_ablation.py --calibrate"):
        bench_ablation.make_row("ssar1", setup, tmp_path, 0.15)
    with pytest.raises(ValueError, match="unknown row 'fast'"):
        bench_ablation.make_row("fast", setup, tmp_path, 0.15)
