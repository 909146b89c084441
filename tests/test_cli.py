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


def test_compile_coverage_prints_the_matrix_rows_asked_for():
    """`qsparse compile --coverage` (docs/coverage.md): one class, on the op references; without a model and without
    --coverage, or with an unknown class, the error names what to pass."""
    result = CliRunner().invoke(app, ["compile", "--coverage", "--no-inductor", "--only", "cosmos"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("| CosmosTransformer3DModel"))
    assert "| 10/10 (100%) | 1/1 (100%) | latent shape |" in row, row
    assert "LTXVideo" not in result.output
    missing = CliRunner().invoke(app, ["compile"])
    assert missing.exit_code != 0 and "--coverage" in missing.output
    unknown = CliRunner().invoke(app, ["compile", "--coverage", "--only", "cosmos,sora"])
    assert unknown.exit_code != 0 and "sora" in unknown.output


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


def test_version_and_python_dash_m():
    """Scenario 6: no ``--version`` and no ``python -m qsparse_compiler``."""
    import subprocess
    import sys

    from qsparse_compiler import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"qsparse_compiler {__version__}"
    run = subprocess.run([sys.executable, "-m", "qsparse_compiler", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "inspect" in run.stdout and "Usage: qsparse" in run.stdout


def test_bad_options_are_one_line_errors_with_the_fix():
    """Scenario 6: a bad --options JSON or value printed a 46- to 191-line traceback. Now typer's one error box
    naming the cause and the fix; ``--debug`` gives the traceback."""
    cases = [('{"sparsity": {"density": 0.2}', "not valid JSON", "quote it for the shell"),
             ('{"sparsity": {"density": true}}', "density=True must be a number, not a bool", "--debug"),
             ('{"sparsity": {"densty": 0.2}}', "unknown sparsity option", "valid:")]
    for options, cause, fix in cases:
        result = CliRunner().invoke(app, ["compile", "wan-tiny", "--options", options])
        text = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert cause in text and fix in text and len(result.output.splitlines()) <= 8, result.output
    result = CliRunner().invoke(app, ["--debug", "compile", "wan-tiny", "--options", cases[1][0]])
    from qsparse_compiler.config import ConfigError

    assert isinstance(result.exception, ConfigError)


def test_eval_and_calibrate_default_to_the_available_device(monkeypatch, tmp_path):
    """Scenario 6: ``qsparse eval`` as the README writes it crashed on a machine without CUDA (--device cuda)."""
    from qsparse_compiler import cli
    from qsparse_compiler.eval import fidelity, reference_model

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    devices = []

    class Result:
        def markdown(self):
            return "| table |"

    monkeypatch.setattr(fidelity, "evaluate", lambda *args, device, **kwargs: devices.append(device) or Result())
    monkeypatch.setattr(cli, "_recall_report", lambda plan, density, frames, device, dtype: {})
    result = CliRunner().invoke(app, ["eval", "--out", str(tmp_path), "--variants", "w4a8"])
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(reference_model, "load_reference_model", lambda device, dtype: devices.append(device) or 1 / 0)
    CliRunner().invoke(app, ["calibrate", "reference", "--out", str(tmp_path / "plan"), "--samples", "x"])
    assert devices == [expected, expected]


def test_inspect_fits_80_columns(tmp_path, monkeypatch):
    """Scenario 6: ``qsparse inspect`` cut every module name at 80 columns. The block families are abbreviated once
    (a legend) and every name is shown whole."""
    from rich.console import Console

    from qsparse_compiler import cli
    from qsparse_compiler.plan import AttentionPlan, LinearPlan, ModelFingerprint, Plan, save_plan
    from qsparse_compiler.eval.models import tiny_hunyuan

    model = tiny_hunyuan(num_layers=2, num_single_layers=2).model
    linears = [name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and "transformer_blocks." in name]
    plan = Plan(fingerprint=ModelFingerprint.of(model), linears={name: LinearPlan(group_size=32) for name in linears},
                attentions={"single_transformer_blocks.1.attn": AttentionPlan(head_patterns=["local3d:0.3", "dense"],
                                                                              cache={"order": 2},
                                                                              precision="int8_fp8")},
                tensors={}, metadata={"made_by": "test"})
    save_plan(plan, tmp_path)
    monkeypatch.setattr(cli, "console", Console(width=80, force_terminal=False))
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "FQNs: stb = single_transformer_blocks, tb = transformer_blocks" in result.output
    assert any("tb.1.ff_context.net.2" in line for line in lines), result.output  # whole, not cut
    assert any("stb.1.attn " in line and "local3d:0.3;dense" in line for line in lines), result.output
    assert any("stb.1.attn " in line and "int8_fp8" in line for line in lines), result.output  # the plan's precision


def test_cli_models_quantize_every_block_linear_with_the_defaults():
    """Scenario 6: ``qsparse compile wan-tiny`` quantized 2 of 20 block linears (widths below the default group
    size of 128), so it demonstrated the wrong thing. The built-in models are now wide enough: every block linear
    becomes W4A8 and every video attention sparse with the default options."""
    from qsparse_compiler.cli import TINY, _load_model
    from qsparse_compiler.eval.capture import rewrite_with_default_passes
    from qsparse_compiler.eval.models import TINY_MODELS

    for name in TINY:
        module, inputs = _load_model(name)
        expected = TINY_MODELS[name.removesuffix("-tiny")]()
        _, _, ctx = rewrite_with_default_passes(module, inputs, {})
        assert ctx.report.counters.get("w4a8_linear") == expected.block_linears, (name, ctx.report.summary())
        assert ctx.report.counters.get("sparse_attention") == expected.video_attentions, (name, ctx.report.summary())
