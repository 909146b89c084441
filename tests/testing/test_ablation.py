"""The ablation rows run through the real backend on a tiny reference-style model (what `qsparse eval` runs)."""

import math

import pytest
import torch

from qsparse_compiler.eval.ablation import ablation_variants
from qsparse_compiler.eval.fidelity import evaluate
from qsparse_compiler.eval.reference_model import TINY_MODEL_CONFIG, build_reference_model
from qsparse_compiler.eval.synthetic_video import SyntheticVideoConfig

pytestmark = pytest.mark.slow


def test_ablation_rows_through_the_backend(tmp_path):
    data = SyntheticVideoConfig(frames=4, height=16, width=16)  # 4 x 8 x 8 = 256 tokens: 16 blocks of 16
    # Tiny model: blocks of 16 tokens and quantization groups of 16 so that every site is rewritten.
    small = {"quant": {"group_size": 16}, "sparsity": {"block_q": 16, "block_kv": 16}}
    variants = ablation_variants(density=0.25, names=("naive", "ssar2"), base_options=small)
    with torch.no_grad():
        result = evaluate(
            variants, out_dir=tmp_path, seeds=[0], num_steps=4, data=data,
            model_factory=lambda: build_reference_model(TINY_MODEL_CONFIG, seed=0).eval(),
        )
    naive, ssar = result.variants["naive"], result.variants["ssar2 (RTN weights)"]
    for row in (naive, ssar):
        assert math.isfinite(row.psnr_mean) and 0 < row.ssim_mean < 1
    from qsparse_compiler.compiler.backend import reports

    # Regional graphs (qs.optimize): one graph per block structure, 10 linears and one cached attention each.
    assert any(r.counters.get("residual_attention") == 1 and r.counters.get("w4a8_linear") == 10 for r in reports())
    assert (tmp_path / "results.md").read_text().count("|") > 10


def test_unknown_and_planless_rows_are_clear_errors():
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        ablation_variants(names=("fast",))
    with pytest.raises(ValueError, match="needs a calibrated plan"):
        ablation_variants(names=("msad",))
    with pytest.raises(ValueError, match="needs a calibrated plan"):
        ablation_variants(names=("ssar_plan_int8",))
    assert list(ablation_variants(names=("attn_int8", "ssar1_int8"))) == ["attn_int8", "ssar1_int8 (RTN weights)"]


def test_layout_recall_of_dense_is_one_and_of_sparse_below():
    from qsparse_compiler.eval.fidelity import layout_recall, random_wan_inputs

    model = build_reference_model(TINY_MODEL_CONFIG, seed=0).eval()
    inputs = random_wan_inputs(model, frames=4, height=16, width=16, text_len=8)
    sites = {f"blocks.{i}.attn1": "dense" for i in range(2)}
    dense = layout_recall(model, inputs, sites, 1.0, block=16)
    sparse = layout_recall(model, inputs, {s: "local3d" for s in sites}, 0.25, block=16)
    assert all(abs(x - 1.0) < 1e-5 for heads in dense.values() for x in heads)
    assert all(0.0 < x < 1.0 for heads in sparse.values() for x in heads)
