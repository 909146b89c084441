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
