"""benchmarks/bench_generation.py on the CPU: the sampling loop is the repository's reference sampler with CFG, rows
record what they executed, and the Pareto join of a speed and a fidelity run (no timing asserts: CPU times are not
performance figures)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_generation.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_generation", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    sys.modules.pop("bench_e2e", None)


def test_loop_is_the_reference_sampler_with_guidance(bench):
    """WanPipeline's loop under cache_context, with the Euler flow scheduler, gives the repository's reference sampler's
    videos (testing/reference_model.sample_videos, which has CFG as separate calls) bit for bit."""
    from qsparse_compiler.eval.reference_model import TINY_MODEL_CONFIG, build_reference_model, initial_noise
    from qsparse_compiler.eval.reference_model import sample_videos

    model = build_reference_model(TINY_MODEL_CONFIG).eval()
    prompts = torch.randn(1, 8, TINY_MODEL_CONFIG["text_dim"], generator=torch.Generator().manual_seed(3))
    shape = (3, 2, 8, 8)
    expected = sample_videos(model, prompts, [5], frames=2, height=8, width=8, num_steps=4, guidance_scale=4.0)
    calls = [0]
    latents = bench.generate(model, bench.make_scheduler("euler", 3.0), initial_noise([5], shape), prompts,
                             torch.zeros_like(prompts), steps=4, guidance=4.0, calls=calls)
    assert calls == [8]
    assert torch.equal(latents.clamp(-1, 1), expected)


def test_row_names_are_checked(bench):
    assert bench.parse_row("flex-fp8+mag") == ("flex-fp8", "mag")
    assert bench.parse_row("cache-dit") == ("cache-dit", None)


@pytest.mark.parametrize("bad, match", [
    ("flex-fp8+teacache", "BASE\\[\\+CACHE\\]"), ("tensorrt", "BASE\\[\\+CACHE\\]"), ("qsparse+", "BASE\\[\\+CACHE\\]"),
    ("qsparse[rank=4]", "KEY=VALUE"), ("qsparse[every=ten]", "every='ten' must be int"),
    ("qsparse[every=10", "write qsparse\\["), ("qsparse[graphs=yes]", "graphs='yes' must be 0 or 1"),
    ("qsparse[steps=0,11]", "KEY=VALUE"), ("qsparse[steps=0:x]", "steps='0:x' must be steps joined by ':'"),
    ("flex[pattern=radial]", "pattern='radial' must be one of"), ("flex[every=10]", "KEY=VALUE"),
    ("flex[density=2]", "density=2.0 must be in \\(0, 1\\]"), ("inductor[pattern=local3d]", "BASE\\[\\+CACHE\\]"),
    ("qsparse+mag[skips=3]", "KEY=VALUE with KEY in \\['max_skip', 'retention', 'threshold'\\]"),
    ("flex+fbc[threshold=high]", "threshold='high' must be float"),
    ("flex+teacache[threshold=0.1]", "BASE\\[\\+CACHE\\]"),
])
def test_bad_rows_are_refused_by_name(bench, bad, match):
    with pytest.raises(ValueError, match=match):
        bench.parse_row(bad)


def test_qsparse_row_settings(bench):
    assert bench.parse_row("qsparse[every=10,attn=int8_fp8]+fbc") == ("qsparse[every=10,attn=int8_fp8]", "fbc")
    assert bench.qsparse_settings("qsparse[first=1,every=10,order=1,attn=int8_fp8,graphs=1]") == {
        "sparsity": {"attention_precision": "int8_fp8"}, "cache": {"refresh_first": 1, "refresh_every": 10, "order": 1},
        "optimize": {"cuda_graphs": True}}
    assert bench.qsparse_settings("qsparse") == {"sparsity": {}, "cache": {}, "optimize": {}}
    assert bench.qsparse_settings("qsparse[density=0.08]")["sparsity"] == {"density": 0.08}
    assert bench.qsparse_settings("qsparse[steps=0:11:32,order=1]")["cache"] == {"refresh_steps": (0, 11, 32),
                                                                               "order": 1}
    assert bench.split_rows("inductor,qsparse[first=1,every=10]+mag,,qsparse") == [
        "inductor", "qsparse[first=1,every=10]+mag", "qsparse"]


def test_flex_row_pattern(bench):
    assert bench.parse_row("flex-fp8[pattern=local3d]+mag") == ("flex-fp8[pattern=local3d]", "mag")
    assert bench.flex_settings("flex[pattern=local3d]") == ("local3d", None)
    assert bench.flex_settings("flex-fp8") == ("random", None)
    assert bench.flex_settings("flex[density=0.5,pattern=local3d]") == ("local3d", 0.5)
    assert bench.split_rows("flex[pattern=local3d],qsparse[first=1,every=10]") == [
        "flex[pattern=local3d]", "qsparse[first=1,every=10]"]


def test_step_cache_settings(bench):
    pytest.importorskip("diffusers")
    assert bench.parse_row("qsparse[every=10]+mag[threshold=0.12,max_skip=5]") == (
        "qsparse[every=10]", "mag[threshold=0.12,max_skip=5]")
    assert bench.split_rows("flex+mag[threshold=0.2,retention=0.1],qsparse+fbc[threshold=0.1]") == [
        "flex+mag[threshold=0.2,retention=0.1]", "qsparse+fbc[threshold=0.1]"]
    mag = bench.step_cache_config("mag[threshold=0.12,max_skip=5,retention=0.1]", steps=50, mag_ratios=[1.0] * 50)
    assert (mag.threshold, mag.max_skip_steps, mag.retention_ratio, mag.num_inference_steps) == (0.12, 5, 0.1, 50)
    assert bench.step_cache_config("mag", steps=50).calibrate  # no ratios yet: the calibration video's config
    assert bench.step_cache_config("mag", steps=50, mag_ratios=[1.0] * 50).threshold == 0.06  # diffusers' default
    assert bench.step_cache_config("fbc[threshold=0.1]", steps=50).threshold == 0.1
    taylor = bench.step_cache_config("taylorseer[interval=3,warmup=5]", steps=50)
    assert (taylor.cache_interval, taylor.disable_cache_before_step, taylor.use_lite_mode) == (3, 5, True)


def test_pareto_front_and_join(tmp_path):
    from qsparse_compiler.eval.pareto import pareto_plot

    speed = {"meta": {"mode": "speed", "workload": "wan-1.3b-480p", "device": "H200"}, "rows": [
        {"system": "inductor", "seconds_per_video": 52.0},
        {"system": "flex-fp8", "seconds_per_video": 21.0},
        {"system": "flex-fp8+mag", "seconds_per_video": 10.0},
        {"system": "qsparse", "seconds_per_video": 20.0},
        {"system": "cache-dit", "seconds_per_video": math.nan, "error": "ImportError: x"},
    ]}
    fidelity = {"meta": {"mode": "fidelity"}, "rows": [
        {"system": "eager", "psnr_mean": None},
        {"system": "inductor", "psnr_mean": 45.0, "ssim_mean": 0.99},
        {"system": "flex-fp8", "psnr_mean": 22.0, "ssim_mean": 0.8},
        {"system": "flex-fp8+mag", "psnr_mean": 18.0, "ssim_mean": 0.7},
        {"system": "qsparse", "psnr_mean": 30.0, "ssim_mean": 0.9},
    ]}
    (tmp_path / "gen.json").write_text(json.dumps(speed))
    (tmp_path / "fid.json").write_text(json.dumps(fidelity))
    path, summary = pareto_plot(tmp_path / "gen.json", tmp_path / "fid.json", tmp_path / "pareto.png")
    # flex-fp8 (21 s, 22 dB) is beaten by qsparse (20 s, 30 dB); the others each win on one axis.
    assert summary["front"] == ["flex-fp8+mag", "qsparse", "inductor"]
    assert [line.split(":")[0] for line in summary["skipped"]] == ["cache-dit"]
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="expected a 'fidelity' run"):
        pareto_plot(tmp_path / "gen.json", tmp_path / "gen.json", tmp_path / "x.png")


def test_pareto_joins_fidelity_runs_and_takes_named_stand_ins(tmp_path):
    """A CPU fidelity run has ``flex`` (bf16 linears) where the GPU speed run has ``flex-fp8``: the point takes
    flex's PSNR only when asked, and says so; runs of other settings are refused, naming what differs."""
    from qsparse_compiler.cli import app
    from qsparse_compiler.eval.pareto import pareto_points

    meta = {"mode": "fidelity", "steps": 50, "seeds": "0,1", "latents": [1, 3, 2, 64, 64], "workload": "reference DiT"}
    speed = {"meta": {"mode": "speed", "workload": "wan-1.3b-480p", "device": "H100"}, "rows": [
        {"system": "flex-fp8", "seconds_per_video": 21.0}, {"system": "qsparse", "seconds_per_video": 20.0},
        {"system": "qsparse+mag", "seconds_per_video": 12.0}]}
    first = {"meta": meta, "rows": [{"system": "qsparse", "psnr_mean": 21.0, "ssim_mean": 0.9},
                                    {"system": "qsparse+mag", "psnr_mean": 1.0, "ssim_mean": 0.1}]}
    second = {"meta": meta, "rows": [{"system": "flex", "psnr_mean": 8.0, "ssim_mean": 0.2},
                                     {"system": "qsparse+mag", "psnr_mean": 19.0, "ssim_mean": 0.8}]}
    for name, data in (("gen", speed), ("a", first), ("b", second)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    points, skipped = pareto_points(tmp_path / "gen.json", files)
    assert [p.system for p in points] == ["qsparse", "qsparse+mag"] and points[1].psnr_db == 19.0  # later file wins
    assert skipped == ["flex-fp8: not in the fidelity run"]
    points, skipped = pareto_points(tmp_path / "gen.json", files, {"flex-fp8": "flex"})
    assert (points[0].system, points[0].psnr_db) == ("flex-fp8 [PSNR of flex]", 8.0) and not skipped
    with pytest.raises(ValueError, match="'flexx' is not a row of the fidelity run"):
        pareto_points(tmp_path / "gen.json", files, {"flex-fp8": "flexx"})
    (tmp_path / "c.json").write_text(json.dumps({**second, "meta": {**meta, "steps": 16}}))
    with pytest.raises(ValueError, match=r"other settings .*'steps': \(50, 16\)"):
        pareto_points(tmp_path / "gen.json", [tmp_path / "a.json", tmp_path / "c.json"])
    result = CliRunner().invoke(app, ["eval", "--pareto", str(tmp_path / "gen.json"), "--fidelity-json",
                                      str(files[0]), "--fidelity-json", str(files[1]), "--stand-in",
                                      "flex-fp8=flex", "--out", str(tmp_path / "plot")])
    assert result.exit_code == 0, result.output
    assert "flex-fp8 [PSNR of flex]: 21.00 s per video, 8.00 dB" in result.output
    assert (tmp_path / "plot" / "pareto.png").stat().st_size > 1000
    result = CliRunner().invoke(app, ["eval", "--pareto", str(tmp_path / "gen.json"), "--fidelity-json",
                                      str(files[0]), "--stand-in", "flex-fp8", "--out", str(tmp_path / "plot")])
    assert result.exit_code != 0 and "SPEED_ROW=FIDELITY_ROW" in result.output


@pytest.mark.slow
def test_reference_workload_video_rows(tmp_path):
    """Three rows through whole 3-step videos on the tiny workload: a calibrated MagCache on eager blocks, qsparse
    (compiled regionally, its step clock on the loop's scheduler) and qsparse through its two-graph CUDA-graph path
    (each block picks its refresh or reuse graph; on the CPU Inductor runs them without capturing)."""
    out = tmp_path / "gen.json"
    command = [sys.executable, str(BENCH), "--workload", "reference", "--device", "cpu", "--steps", "3",
               "--rows", "eager+mag,qsparse,qsparse[graphs=1]", "--out", str(out)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=600)
    data = json.loads(out.read_text())
    assert data["meta"]["mode"] == "speed" and data["meta"]["steps"] == 3
    rows = {row["system"]: row for row in data["rows"]}
    assert list(rows) == ["eager+mag", "qsparse", "qsparse[graphs=1]"]
    for row in rows.values():
        assert row["error"] is None, row["error"]
        assert row["finite"] is True and row["seconds_per_video"] > 0 and row["first_video_s"] > 0
        assert row["transformer_calls"] == 6  # 3 steps x (cond + uncond)
    # qsparse skips no blocks: 6 calls x 2 blocks, each block's attention through the residual cache; steps 0 and 1
    # refresh (refresh_first=2), step 2 reuses, per CFG branch.
    qsparse = rows["qsparse"]
    assert qsparse["block_calls"] == 12 and qsparse["forwards_executed"] == 6.0
    assert qsparse["residual_cache"]["refreshes"] == 8 and qsparse["residual_cache"]["reuses"] == 4
    # The CUDA-graph path follows the same schedule through its refresh and reuse graphs.
    graphs = rows["qsparse[graphs=1]"]
    assert graphs["residual_cache"] == qsparse["residual_cache"] and "CUDA graphs" in graphs["note"]
    # The per-step profile classes the same steps: two refresh steps, one reuse step, summing to the video.
    profile = qsparse["step_profile"]
    assert profile["refresh"]["steps"] == 2 and profile["reuse"]["steps"] == 1
    accounted = profile["refresh"]["seconds"] + profile["reuse"]["seconds"]
    assert abs(accounted + profile["unaccounted_s"] - qsparse["seconds_per_video"]) < 1e-6
    # MagCache: calibrated from a full first video (a ratio per step and CFG branch), then skips at most all blocks.
    mag = rows["eager+mag"]
    assert len(mag["calibration"]["cond"]) == 3 and len(mag["calibration"]["uncond"]) == 3
    assert mag["calibration"]["cond"][0] == 1.0  # the first step has no previous residual
    assert 0 < mag["block_calls"] <= 12 and mag["forwards_executed"] == mag["block_calls"] / 2
    assert out.with_suffix(".md").read_text().count("\n| ") == 4  # the separator and three rows
    assert out.with_suffix(".png").stat().st_size > 1000


def test_mag_ratios_from_a_fidelity_run_fix_the_skipped_steps(bench, tmp_path):
    """--mag-ratios: a MagCache row takes the ratios of its row in a fidelity JSON (an fp8 row those of its bf16 form)
    instead of calibrating, so it skips the steps whose PSNR was measured. Ratios of 1.0 with no retention and at
    most one skip in a row: each CFG branch computes steps 0 and 2 of 4 and skips 1 and 3."""
    fidelity = tmp_path / "fid.json"
    ratios = [1.0, 1.0, 1.0, 1.0]
    fidelity.write_text(json.dumps({"meta": {}, "rows": [
        {"system": "eager+mag[max_skip=1,retention=0]", "calibration": {"mag_ratios": ratios}},
        {"system": "flex+mag", "calibration": {"mag_ratios": [0.5] * 4}}]}))
    assert bench.mag_ratios_of("flex-fp8+mag", [fidelity]) == ([0.5] * 4, "fid.json: flex+mag")
    # calibration never skips: a row with other MagCache settings takes the ratios of the same model's row
    assert bench.mag_ratios_of("flex+mag[threshold=0.5]", [fidelity]) == ([0.5] * 4, "fid.json: flex+mag")
    with pytest.raises(ValueError, match="no MagCache calibration for it .*'qsparse\\+mag'"):
        bench.mag_ratios_of("qsparse+mag", [fidelity])
    # CUDA graphs replay the same kernels: a graphs=1 row takes the ratios of its row without them
    fidelity_qsparse = tmp_path / "fid_qsparse.json"
    fidelity_qsparse.write_text(json.dumps({"meta": {}, "rows": [
        {"system": "qsparse[every=25,order=1]+mag", "calibration": {"mag_ratios": [0.25] * 4}}]}))
    assert bench.mag_ratios_of("qsparse[every=25,graphs=1,order=1]+mag[threshold=1.0]", [fidelity_qsparse]) == (
        [0.25] * 4, "fid_qsparse.json: qsparse[every=25,order=1]+mag")
    out = tmp_path / "gen.json"
    bench.main(["--workload", "reference", "--device", "cpu", "--steps", "4", "--rows",
                "eager+mag[max_skip=1,retention=0]", "--mag-ratios", str(fidelity), "--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["error"] is None, row["error"]
    assert row["calibration"] == {"mag_ratios": ratios, "from": "fid.json: eager+mag[max_skip=1,retention=0]"}
    assert row["transformer_calls"] == 8 and row["block_calls"] == 2 * 2 * 2  # 2 steps x 2 branches x 2 blocks
    with pytest.raises(SystemExit):  # a MagCache row missing from the file is refused before any row runs
        bench.main(["--workload", "reference", "--device", "cpu", "--steps", "4", "--rows", "eager+mag",
                    "--mag-ratios", str(fidelity), "--out", str(out)])


def test_explicit_refresh_steps_row(bench, tmp_path):
    """qsparse[steps=0:2]: exactly steps 0 and 2 of 4 refresh (CacheConfig.refresh_steps, made for the run's 4 steps),
    per CFG branch and block of the reference workload's two. Such a schedule refuses a video of another length, so
    its cold run is the whole video, not --warmup-steps."""
    out = tmp_path / "gen.json"
    bench.main(["--workload", "reference", "--device", "cpu", "--steps", "4", "--warmup-steps", "2", "--rows",
                "qsparse[steps=0:2]", "--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["error"] is None, row["error"]
    assert "cold run: the whole 4-step video" in row["note"]
    assert row["residual_cache"]["refreshes"] == 2 * 2 * 2 and row["residual_cache"]["reuses"] == 2 * 2 * 2
    assert row["step_profile"]["refresh"]["steps"] == 2 and row["step_profile"]["reuse"]["steps"] == 2
