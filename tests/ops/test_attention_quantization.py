"""The int8/fp8 attention recipe in plain torch (ops/attention_quantization.py): codes, scales, conventions."""

from __future__ import annotations

import math

import torch

from qsparse_compiler.ops.attention_quantization import (
    P_SCALE,
    attention_int8_fp8_reference,
    quantize_attention_inputs,
    quantize_int8_per_block,
    quantize_v_per_channel,
    smooth_keys,
)
from qsparse_compiler.ops.sparse_attention import sparse_attention_reference
from qsparse_compiler.formats.layout import BlockSparseLayout
from qsparse_compiler.eval.metrics import sqnr_db


def test_int8_per_block_scales_and_codes():
    x = torch.randn(2, 3, 70, 16)
    x[0, 1, 64:] *= 100.0  # the tail tile (6 tokens) has its own, larger scale
    codes, scale = quantize_int8_per_block(x, 32)
    assert codes.dtype == torch.int8 and scale.shape == (2, 3, 3)
    assert codes.abs().max() == 127
    tile_amax = torch.stack([x[..., i * 32:(i + 1) * 32, :].abs().amax(dim=(-1, -2)) for i in range(3)], -1)
    torch.testing.assert_close(scale, tile_amax / 127)
    per_token = scale.repeat_interleave(32, -1)[..., :70, None]
    # Round to nearest: every value within half a step of its code.
    assert ((codes.float() * per_token - x).abs() <= per_token / 2 + 1e-6).all()


def test_v_channel_major_fp8():
    v = torch.randn(1, 2, 50, 16) * torch.linspace(0.01, 10, 16)  # channels of very different ranges
    codes, scale = quantize_v_per_channel(v)
    assert codes.shape == (1, 2, 16, 50) and codes.dtype == torch.float8_e4m3fn and scale.shape == (1, 2, 16)
    assert codes.float().abs().amax(-1).eq(448).all()
    assert sqnr_db(codes.float().transpose(-1, -2) * scale[..., None, :], v) > 28  # e4m3: 3 mantissa bits
    # Rows zero-padded to 128 tokens (compiled Triton vectorizes V tile loads only with aligned, unmasked rows); the
    # last dim stays unit-stride, and the kernel sees the room.
    from qsparse_compiler.kernels.attention_int8_fp8 import v_padded

    assert codes.stride() == (2 * 16 * 128, 16 * 128, 128, 1) and codes.data_ptr() % 16 == 0
    assert torch.all(codes.as_strided((1, 2, 16, 128), codes.stride()).float()[..., 50:] == 0)
    assert v_padded(codes) and not v_padded(codes.contiguous())


def test_key_smoothing_leaves_attention_unchanged():
    q, k, v = torch.randn(3, 1, 2, 40, 16).unbind(0)
    k = k + 5.0  # a large common offset: what smoothing removes
    smoothed, mean = smooth_keys(k)
    assert smoothed.mean(dim=2).abs().max() < 1e-5
    torch.testing.assert_close(mean, k.mean(dim=2))
    dense = torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v
    torch.testing.assert_close(torch.softmax(q @ smoothed.transpose(-1, -2) / 4, -1) @ v, dense)


def test_reference_close_to_fp32_attention_and_smoothing_helps():
    q, k, v = torch.randn(3, 2, 2, 96, 64).unbind(0)
    k = k + 3.0 * torch.randn(1, 1, 1, 64)  # a per-channel key offset, as DiT keys have
    exact = torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v
    out, lse = attention_int8_fp8_reference(q, k, v, 1 / 8, quant_block=32)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 8, -1), atol=0.05, rtol=0)
    smoothed = sqnr_db(out, exact)
    assert smoothed > 25, smoothed
    # Q.K^T alone (fp32 softmax and V): smoothed keys keep the scores far closer than the raw keys, whose offset
    # sets every key tile's scale.
    quantized = quantize_attention_inputs(q, k, v, 32)
    q_hat = quantized.q_codes.float() * quantized.q_scale.repeat_interleave(32, -1)[..., None]
    k_smooth = quantized.k_codes.float() * quantized.k_scale.repeat_interleave(32, -1)[..., None]
    raw_codes, raw_scale = quantize_int8_per_block(k, 32)
    k_raw = raw_codes.float() * raw_scale.repeat_interleave(32, -1)[..., None]
    scores = q @ k.transpose(-1, -2)
    with_smoothing = sqnr_db(q_hat @ k_smooth.transpose(-1, -2) + quantized.lse_shift[..., None], scores)
    without = sqnr_db(q_hat @ k_raw.transpose(-1, -2), scores)
    assert with_smoothing > without + 6, (with_smoothing, without)


def test_p_scale_uses_the_e4m3_range():
    # p = 1 -> 448 (e4m3's max, exact); p = 2^-15 still has a nonzero code only because of the 448 scale.
    p = torch.tensor([1.0, 2.0**-15])
    assert (p * P_SCALE).to(torch.float8_e4m3fn).float().tolist()[0] == 448.0
    assert (p * P_SCALE).to(torch.float8_e4m3fn).float()[1] > 0
    assert p.to(torch.float8_e4m3fn).float()[1] == 0


def test_sparse_reference_conventions():
    b, h, s, d = 2, 2, 70, 16
    q, k, v = torch.randn(3, b, h, s, d).unbind(0)
    bitmap = torch.rand(b, h, 3, 3) < 0.6
    bitmap[0, 0, 1] = False  # an empty row
    layout = BlockSparseLayout.from_bitmap(bitmap, 32, 32, s, s)
    mask = torch.rand(b, 1, 1, s) < 0.8
    mask[1] = False  # batch 1 attends to nothing
    out, lse = attention_int8_fp8_reference(q, k, v, d**-0.5, layout.kv_num_blocks, layout.kv_indices, 32, 32, mask)
    ref_out, ref_lse = sparse_attention_reference(q, k, v, layout.kv_num_blocks, layout.kv_indices, 32, 32, d**-0.5,
                                                  mask)
    empty = torch.isneginf(ref_lse)
    assert empty[0, 0, 32:64].all() and empty[1].all()
    assert torch.equal(torch.isneginf(lse), empty)
    assert (out[empty] == 0).all()
    assert sqnr_db(out[~empty], ref_out[~empty]) > 25
    assert (lse[~empty] - ref_lse[~empty]).abs().max() < 0.05 * math.sqrt(d)
