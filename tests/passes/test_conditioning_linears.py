"""Conditioning (adaptive-norm modulation) linears, input (B, D): kept by default, int4 weight-only on request, with
one counter and one report row per site; Wan (modulation is a parameter table) has none."""

import pytest
import torch
from torch._dynamo.utils import counters

from qsparse_compiler.config import ConfigError, QuantConfig
from qsparse_compiler.formats.quantization import linear_int4_weight_only
from qsparse_compiler.eval.capture import rewrite_with_default_passes
from qsparse_compiler.eval.models import TEST_OPTIONS, tiny_cogvideox, tiny_hunyuan, tiny_wan

FACTORIES = {"hunyuan": tiny_hunyuan, "cogvideox": lambda: tiny_cogvideox(num_layers=1)}
MODULATION = {
    "hunyuan": ["transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                "single_transformer_blocks.0.norm.linear"],
    "cogvideox": ["transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm2.linear"],
}


def rewrite(model, inputs, options=TEST_OPTIONS):
    return rewrite_with_default_passes(model, inputs, options)


def _quant(**fields):
    return {**TEST_OPTIONS, "quant": {**TEST_OPTIONS["quant"], **fields}}


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_modulation_linears_become_int4_weight_only(arch):
    tiny = FACTORIES[arch]()
    gm, sites, ctx = rewrite(tiny.model, tiny.make_inputs(), _quant(conditioning_linears="int4_weight_only"))
    assert counters["qsparse"]["int4_weight_only"] == tiny.conditioning_linears == len(MODULATION[arch])
    assert counters["qsparse"]["w4a8_linear"] == tiny.block_linears  # the token linears are as before
    for fqn in MODULATION[arch]:
        site = sites[fqn]
        assert site.action == "int4_weight_only" and site.reason == ""
        assert site.details["group"] == 32 and site.details["weights"] == "rtn"
    # The rewrite is qsparse::int4_weight_only_linear, fed by per-call packed-weight inputs.
    targets = [node.target for node in gm.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.qsparse.int4_weight_only_linear.default) == tiny.conditioning_linears
    assert len(ctx.packed_weight_slots) == tiny.block_linears + tiny.conditioning_linears
    assert {slot.fqn for slot in ctx.packed_weight_slots} >= set(MODULATION[arch])
    # Outside the blocks (the time embedding, norm_out) nothing changes.
    assert sites["norm_out.linear"].action == "kept"


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_keep_leaves_them_in_their_dtype_with_the_reason(arch):
    tiny = FACTORIES[arch]()
    _, sites, ctx = rewrite(tiny.model, tiny.make_inputs(), _quant(conditioning_linears="keep"))
    assert counters["qsparse"]["int4_weight_only"] == 0
    for fqn in MODULATION[arch]:
        assert sites[fqn].action == "kept"
        assert "no token dimension" in sites[fqn].reason and "conditioning_linears" in sites[fqn].reason
    assert len(ctx.packed_weight_slots) == tiny.block_linears


def test_block_weights_shrink_with_the_modulation_linears():
    tiny = tiny_hunyuan()
    _, _, kept = rewrite(tiny.model, tiny.make_inputs())  # the default keeps them
    _, _, packed = rewrite(tiny.model, tiny.make_inputs(), _quant(conditioning_linears="int4_weight_only"))
    assert kept.report.weight_bytes["bf16"] == packed.report.weight_bytes["bf16"]
    assert packed.report.compression > kept.report.compression * 1.15


def test_wan_has_no_conditioning_linears():
    tiny = tiny_wan(num_layers=1)
    graphs = {}
    for mode in ("keep", "int4_weight_only"):
        gm, sites, _ = rewrite(tiny.model, tiny.make_inputs(), _quant(conditioning_linears=mode))
        assert counters["qsparse"]["int4_weight_only"] == 0
        assert not [site for site in sites.values() if site.action == "int4_weight_only"]
        graphs[mode] = gm.code
    assert graphs["keep"] == graphs["int4_weight_only"]


def test_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"QuantConfig.conditioning_linears='int8'.*'keep', 'int4_weight_only'"):
        QuantConfig(conditioning_linears="int8")


def test_weight_only_linear_is_the_linear_of_the_dequantized_weight():
    from qsparse_compiler.formats.quantization import dequantize_weight_int4, quantize_weight_int4

    weight, bias, x = torch.randn(96, 64), torch.randn(96), torch.randn(2, 64, dtype=torch.bfloat16)
    packed = quantize_weight_int4(weight, 32)
    expected = torch.nn.functional.linear(
        x, dequantize_weight_int4(packed.qweight, packed.scale, 32).to(torch.bfloat16), bias.to(torch.bfloat16))
    actual = linear_int4_weight_only(x, packed.qweight, packed.scale, bias.to(torch.bfloat16), 32)
    assert actual.dtype == torch.bfloat16 and torch.equal(actual, expected)
