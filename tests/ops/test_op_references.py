"""The plain-torch references of the qsparse:: ops, checked against exact math, and opcheck on each op."""

import math

import pytest
import torch
import torch.nn.functional as F

import qsparse_compiler.ops  # noqa: F401  registers the ops
from qsparse_compiler.formats.quantization import (
    dequantize_activation,
    dequantize_weight_int4,
    pack_int4,
    quantize_activation,
    quantize_activation_symmetric,
    quantize_weight_int4,
    unpack_int4,
)
from qsparse_compiler.ops.sparse_attention import sparse_attention_reference
from qsparse_compiler.formats.pattern_spec import build_video_layout
from qsparse_compiler.formats.layout import BlockSparseLayout
from qsparse_compiler.formats.patterns import TokenGrid
from qsparse_compiler.eval.metrics import relative_error, sqnr_db


def test_int4_pack_roundtrip_covers_every_code():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # (3, 32)
    packed = pack_int4(codes)
    assert packed.shape == (3, 16) and packed.dtype == torch.uint8
    # Neighbouring k share a byte, the even one in the low nibble.
    assert int(packed[0, 0]) == ((-8) & 0xF) | (((-7) & 0xF) << 4)
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("group_size", [0, 32, 128])
def test_weight_quantization_is_symmetric_int4_per_group(group_size):
    weight = torch.randn(48, 256)
    packed = quantize_weight_int4(weight, group_size, "float32")
    group = 256 if group_size == 0 else group_size
    assert packed.qweight.shape == (48, 128) and packed.scale.shape == (48, 256 // group)
    codes = unpack_int4(packed.qweight)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    restored = dequantize_weight_int4(packed.qweight, packed.scale, group_size)
    # Round to nearest: every element within half a step of its group's scale.
    step = packed.scale.repeat_interleave(group, dim=1)
    assert bool(((restored - weight).abs() <= step / 2 + 1e-6).all())
    assert sqnr_db(restored, weight) > (17 if group_size else 14)


@pytest.mark.parametrize("act_format, levels", [("fp8_e4m3", None), ("int8", 127), ("uint8_msfp", 255)])
def test_activation_quantization_per_token(act_format, levels):
    x = torch.randn(7, 64) * torch.linspace(0.01, 10, 7)[:, None]
    if act_format == "uint8_msfp":
        x = F.gelu(x)  # near non-negative, the case MSFP's unsigned format is for
    codes, scale, zero = quantize_activation(x, act_format)
    restored = dequantize_activation(codes, scale, zero)
    assert scale.shape == (7, 1)
    if levels is not None:
        assert bool(((restored - x).abs() <= scale / 2 + 1e-6).all())  # half a step
    assert sqnr_db(restored, x) > 28


def test_msfp_unsigned_beats_signed_int8_on_gelu_outputs():
    x = F.gelu(torch.randn(64, 512) * 3)
    signed = dequantize_activation(*quantize_activation(x, "int8"))
    unsigned = dequantize_activation(*quantize_activation(x, "uint8_msfp"))
    assert sqnr_db(unsigned, x) > sqnr_db(signed, x) + 3


@pytest.mark.parametrize("act_format", ["fp8_e4m3", "int8", "uint8_msfp"])
def test_w4a8_linear_equals_exact_dequantized_math(act_format):
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    weight, bias = torch.randn(96, 128), torch.randn(96)
    packed = quantize_weight_int4(weight, 64)
    out = torch.ops.qsparse.w4a8_linear(x, packed.qweight, packed.scale, bias, 64, act_format)
    x_hat = dequantize_activation(*quantize_activation(x, act_format)).double()
    w_hat = dequantize_weight_int4(packed.qweight, packed.scale, 64).double()
    exact = x_hat @ w_hat.T + bias.double()
    assert out.shape == (2, 5, 96) and out.dtype == torch.bfloat16
    assert relative_error(out, exact) < 4e-3  # only the final bf16 rounding
    assert sqnr_db(out, x.float() @ weight.T + bias) > 15  # and the quantization error is an int4 one


def test_w4a8_linear_rejects_inconsistent_shapes():
    packed = quantize_weight_int4(torch.randn(32, 64), 32)
    with pytest.raises(ValueError, match="qweight must be"):
        torch.ops.qsparse.w4a8_linear(torch.randn(3, 128), packed.qweight, packed.scale, None, 32, "int8")


@pytest.mark.parametrize("act_format", ["fp8_e4m3", "int8"])
def test_w4a8_gemm_on_graph_codes_equals_w4a8_linear(act_format):
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    packed, bias = quantize_weight_int4(torch.randn(96, 128), 0), torch.randn(96)
    codes, scale = quantize_activation_symmetric(x, act_format)
    out = torch.ops.qsparse.w4a8_gemm(codes, scale, packed.qweight, packed.scale, bias, 0, torch.bfloat16)
    one_op = torch.ops.qsparse.w4a8_linear(x, packed.qweight, packed.scale, bias, 0, act_format)
    assert out.dtype == torch.bfloat16 and torch.equal(out, one_op)


def test_w4a8_gemm_rejects_unquantized_input_and_asymmetric_format():
    packed = quantize_weight_int4(torch.randn(32, 64), 32)
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="quantize_activation_symmetric"):
        torch.ops.qsparse.w4a8_gemm(x, torch.ones(3, 1), packed.qweight, packed.scale, None, 32, torch.float32)
    with pytest.raises(ValueError, match="uint8_msfp needs its zero point"):
        quantize_activation_symmetric(x, "uint8_msfp")


def test_opcheck_w4a8_gemm():
    packed = quantize_weight_int4(torch.randn(32, 64), 32)
    codes, scale = quantize_activation_symmetric(torch.randn(3, 4, 64), "int8")
    torch.library.opcheck(
        torch.ops.qsparse.w4a8_gemm.default, (codes, scale, packed.qweight, packed.scale, torch.randn(32), 32, torch.float32)
    )


def test_opcheck_w4a8_linear():
    packed = quantize_weight_int4(torch.randn(32, 64), 32)
    torch.library.opcheck(
        torch.ops.qsparse.w4a8_linear.default, (torch.randn(3, 4, 64), packed.qweight, packed.scale, torch.randn(32), 32, "fp8_e4m3")
    )


def test_int4_weight_only_linear_is_the_dequantized_linear_and_passes_opcheck():
    packed = quantize_weight_int4(torch.randn(32, 64), 32)
    x, bias = torch.randn(2, 64), torch.randn(32)
    expected = torch.nn.functional.linear(x, dequantize_weight_int4(packed.qweight, packed.scale, 32), bias)
    actual = torch.ops.qsparse.int4_weight_only_linear(x, packed.qweight, packed.scale, bias, 32)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.qsparse.int4_weight_only_linear.default, (x, packed.qweight, packed.scale, bias, 32))
    with pytest.raises(ValueError, match=r"qsparse::int4_weight_only_linear: inconsistent shapes"):
        torch.ops.qsparse.int4_weight_only_linear(torch.randn(2, 48), packed.qweight, packed.scale, bias, 32)


def _random_layout(batch, heads, seq, block, density, generator):
    qb = math.ceil(seq / block)
    bitmap = torch.rand(batch, heads, qb, qb, generator=generator) < density
    bitmap |= torch.eye(qb, dtype=torch.bool)
    bitmap[0, 0, -1] = False  # an empty row: defined as output 0, lse -inf
    return BlockSparseLayout.from_bitmap(bitmap, block, block, seq, seq)


def test_sparse_attention_reference_equals_sdpa_with_the_equivalent_mask():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 50, 16, dtype=torch.float64) for _ in range(3))
    layout = _random_layout(2, 3, 50, 16, 0.4, generator)
    out, lse = sparse_attention_reference(q, k, v, layout.kv_num_blocks, layout.kv_indices, 16, 16, 0.25)
    mask = layout.to_token_mask()
    empty = ~mask.any(-1)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)
    assert torch.allclose(out[~empty], expected[~empty], atol=1e-5)
    assert bool((out[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all())
    scores = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf"))
    assert torch.allclose(lse[~empty], torch.logsumexp(scores, -1).float()[~empty], atol=1e-5)


def test_sparse_attention_key_padding_mask():
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    full = build_video_layout(TokenGrid(1, 1, 40, 40), "local3d", 1.0, 16, 16)
    padding = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    padding[..., 35:] = False
    out, _ = torch.ops.qsparse.sparse_attention(q, k, v, full.kv_num_blocks, full.kv_indices, 16, 16, 0.25, padding)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=padding, scale=0.25)
    assert torch.allclose(out, expected, atol=1e-5)


def test_opcheck_sparse_attention_and_layout():
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    layout = torch.ops.qsparse.video_block_layout(q, 2, 4, 5, 0, "local3d", 0.5, 16, 16)
    torch.library.opcheck(torch.ops.qsparse.video_block_layout.default, (q, 2, 4, 5, 0, "local3d", 0.5, 16, 16))
    torch.library.opcheck(torch.ops.qsparse.sparse_attention.default, (q, k, v, *layout, 16, 16, 0.25, None))


def test_video_layout_op_matches_the_pattern_and_returns_fresh_tensors():
    q = torch.randn(1, 2, 8 + 60, 16)
    first = torch.ops.qsparse.video_block_layout(q, 3, 4, 5, 8, "local3d", 0.3, 16, 16)
    second = torch.ops.qsparse.video_block_layout(q, 3, 4, 5, 8, "local3d", 0.3, 16, 16)
    expected = build_video_layout(TokenGrid(3, 4, 5, 68, 8), "local3d", 0.3, 16, 16)
    assert torch.equal(first[0], expected.kv_num_blocks) and torch.equal(first[1], expected.kv_indices)
    assert first[0].data_ptr() != second[0].data_ptr()
