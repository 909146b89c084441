"""CPU smoke runs of the reference-model scripts, so the GPU commands that produced the committed artefacts keep
working (the GPU run is the same code at full size)."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

from qsparse_compiler.eval.reference_model import load_reference_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(script: str, args: list[str], monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location(script.replace(".py", ""), EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [script, *args])
    module.main()


def test_train_script_tiny_run_writes_loadable_weights(tmp_path, monkeypatch):
    _run("train_reference_model.py", ["--out", str(tmp_path), "--tiny", "--max-steps", "3", "--log-every", "1", "--batch", "2",
                                      "--eval-every", "2", "--samples", "1", "--sample-steps", "1", "--device", "cpu"],
         monkeypatch)
    log = json.loads((tmp_path / "loss.json").read_text())
    assert log["step"] == [1, 2, 3] and all(v > 0 for v in log["loss"])
    assert log["eval_step"] == [0, 2, 3]
    meta = json.loads((tmp_path / "reference_dit.json").read_text())
    assert meta["training"]["steps"] == 3 and "checksum_cpu_fp32" in meta["training"]
    model = load_reference_model("cpu", torch.float32, assets_dir=tmp_path)
    assert model.config.num_layers == 2
    for name in ("loss.png", "samples.png", "samples_cfg.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_fidelity_demo_small_run(tmp_path, monkeypatch):
    _run("fidelity_demo.py", ["--out", str(tmp_path), "--small", "--seeds", "1", "--device", "cpu"], monkeypatch)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["variants"]) == {"w4_rtn", "w4a8_rtn", "sparse_local3d_15", "w4a8+sparse_15"}
    # Weight quantization perturbs the videos but far less than dropping 3/4 of the attention tiles.
    v = results["variants"]
    assert v["w4_rtn"]["psnr_mean"] > v["sparse_local3d_15"]["psnr_mean"] > 0
    recall = json.loads((tmp_path / "recall.json").read_text())
    assert len(recall["recall_per_head"]) == 8 and all(0 < r <= 1 for h in recall["recall_per_head"].values() for r in h)
