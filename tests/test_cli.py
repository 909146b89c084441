"""The qsparse command line: commands exist, and say what they cannot do on this machine."""

import torch
from typer.testing import CliRunner

from qsparse_compiler.cli import app


def test_help_lists_the_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("compile", "calibrate", "eval", "bench", "inspect"):
        assert command in result.output


def test_bench_kernels_without_cuda_says_so(tmp_path):
    if torch.cuda.is_available():
        return
    result = CliRunner().invoke(app, ["bench", "--kernels", "--out", str(tmp_path / "costs.json")])
    assert result.exit_code == 1 and "FLOP proxy" in result.output
    assert not (tmp_path / "costs.json").exists()


def test_compile_rejects_unknown_models():
    result = CliRunner().invoke(app, ["compile", "resnet"])
    assert result.exit_code != 0 and "is not one of" in result.output


def test_calibrate_reference_records_every_nth_step(tmp_path, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qsparse_compiler.calibration import driver, load_samples
    from qsparse_compiler.eval.reference_model import DEFAULT_SHIFT

    recorded = []
    monkeypatch.setattr(driver, "calibrate_cli_main",
                        lambda module, samples, out, config, resume: recorded.append(load_samples(samples)))
    args = ["calibrate", "reference", "--out", str(tmp_path / "plan"), "--frames", "1", "--steps", "4", "--seeds", "0,1"]
    result = CliRunner().invoke(app, [*args, "--every", "2"])
    assert result.exit_code == 0, result.output
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=DEFAULT_SHIFT)
    scheduler.set_timesteps(4)
    # steps 0 and 2 of 4; each candidate holds both seeds' videos at its step
    assert [s["timestep"].tolist() for s in recorded[0]] == [[t, t] for t in scheduler.timesteps[::2].tolist()]
    assert recorded[0][0]["hidden_states"].shape[0] == 2
    result = CliRunner().invoke(app, [*args, "--every", "0"])
    assert result.exit_code != 0 and "--every" in result.output and len(recorded) == 1


def test_tiny_plans_compile_the_model_they_were_calibrated_on(tmp_path):
    """`qsparse calibrate hunyuan-tiny` then `qsparse compile hunyuan-tiny` with that plan: the same (seeded) random
    model both times, so the plan's distilled weights belong to the model that gets them; the summary counts the
    conditioning linears calibrated as int4 weight-only apart from the W4A8 ones."""
    config = tmp_path / "config.json"
    config.write_text('{"conditioning_linears": "int4_weight_only", "block_q": 16, "block_kv": 16, "group_size": 32, '
                      '"num_samples": 1, "msad_steps": 2, "ssar_steps": 3, "progress": false}')
    result = CliRunner().invoke(app, ["calibrate", "hunyuan-tiny", "--out", str(tmp_path / "plan"), "--config",
                                      str(config)])
    assert result.exit_code == 0, result.output
    assert "17 W4A8 linears, 3 int4 weight-only (conditioning)" in " ".join(result.output.split())
    from qsparse_compiler.cli import _load_model
    from qsparse_compiler.plan import ModelFingerprint, load_plan

    (first, _), (second, _) = _load_model("hunyuan-tiny"), _load_model("hunyuan-tiny")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    plan = load_plan(tmp_path / "plan")
    ModelFingerprint.of(second).check(plan.fingerprint)
    result = CliRunner().invoke(app, ["compile", "hunyuan-tiny", "--options", f'{{"plan": "{tmp_path / "plan"}"}}'])
    assert result.exit_code == 0, result.output
