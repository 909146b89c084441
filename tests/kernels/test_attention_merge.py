"""The refresh step's dense attention from the sparse result: complement layout, lse merge (kernel and reference).

sparse (layout) + complement, merged through the lse, must equal dense attention: bf16 by the 2x rule against
torch's bf16 SDPA (both vs fp64 attention), int8_fp8 against the dense 8-bit kernel (the same recipe on the same
quantized inputs: equal up to fp32 rounding and where P is rounded). Conventions: a full layout row has an empty
complement row (the merge keeps the sparse part), rows with every key masked stay 0 / -inf.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsparse_compiler.kernels.attention_int8_fp8 import block_sparse_attention_int8_fp8, dense_attention_int8_fp8
from qsparse_compiler.kernels.attention_merge import merge_attention_partials
from qsparse_compiler.kernels.block_sparse_attention import block_sparse_attention
from qsparse_compiler.ops.attention_quantization import quantize_attention_inputs
from qsparse_compiler.ops.refresh_attention import dense_from_sparse, merge_attention_partials_reference
from qsparse_compiler.formats.complement import complement_blocks
from qsparse_compiler.formats.layout import BlockSparseLayout, num_blocks
from qsparse_compiler.eval.metrics import sqnr_db, within_reference_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layout(b, h, sq, skv, block, density, gen=None):
    bitmap = torch.rand(b, h, num_blocks(sq, block), num_blocks(skv, block), generator=gen) < density
    bitmap[..., 0, :] = True  # a full row: its complement row is empty
    return BlockSparseLayout.from_bitmap(bitmap, block, block, sq, skv)


@given(density=st.sampled_from([0.0, 0.3, 0.7, 1.0]), heads=st.integers(1, 3), seed=st.integers(0, 2**16))
@settings(max_examples=20, deadline=None)
def test_complement_is_the_other_tiles(density, heads, seed):
    gen = torch.Generator().manual_seed(seed)
    layout = _layout(2, heads, 70, 150, 32, density, gen)
    kv_num, kv_idx = complement_blocks(layout.kv_num_blocks, layout.kv_indices)
    complement = BlockSparseLayout(kv_num, kv_idx, 32, 32, 70, 150)  # validates: ascending, in range
    assert torch.equal(complement.to_dense(), ~layout.to_dense())
    assert (kv_num[..., 0] == 0).all()


def test_merge_kernel_matches_reference_and_conventions():
    b, h, s, d = 2, 3, 50, 64
    out_a, out_b = (torch.randn(b, h, s, d).to(DEVICE) for _ in range(2))
    lse_a, lse_b = (torch.randn(b, h, s, device=DEVICE) * 3 for _ in range(2))
    lse_a[0, 0, :10] = float("-inf")  # part a empty: the merge is part b
    out_a[0, 0, :10] = 0
    lse_b[0, 1, :10] = float("-inf")
    out_b[0, 1, :10] = 0
    lse_a[1, 2, :5] = lse_b[1, 2, :5] = float("-inf")  # both empty: 0 and -inf
    out_a[1, 2, :5] = out_b[1, 2, :5] = 0
    out, lse = merge_attention_partials(out_a, lse_a, out_b.transpose(1, 2).contiguous().transpose(1, 2), lse_b)
    ref_out, ref_lse = merge_attention_partials_reference(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0, 0, :10], out_b[0, 0, :10])
    assert (out[1, 2, :5] == 0).all() and torch.isneginf(lse[1, 2, :5]).all()
    with pytest.raises(ValueError, match="attention_merge"):
        merge_attention_partials(out_a, lse_a[..., :3], out_b, lse_b)


def _exact(q, k, v, scale, mask):
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v.double(), torch.logsumexp(scores, -1)


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_sparse_plus_complement_is_dense_attention(masked):
    b, h, s, d = 2, 2, 77, 32
    q, k, v = (torch.randn(b, h, s, d).to(DEVICE, torch.bfloat16) for _ in range(3))
    layout = _layout(b, h, s, s, 32, 0.4)
    kv_num, kv_idx = layout.kv_num_blocks.to(DEVICE), layout.kv_indices.to(DEVICE)
    mask = None
    if masked:
        mask = torch.rand(b, 1, 1, s, device=DEVICE) < 0.7
        mask[1] = False  # batch 1 attends to nothing
    scale = d**-0.5
    out_s, lse_s = block_sparse_attention(q, k, v, kv_num, kv_idx, 32, 32, scale, mask)
    out, lse = dense_from_sparse(q, k, v, out_s, lse_s, kv_num, kv_idx, 32, 32, scale, mask)
    # The kernels themselves (dense_from_sparse runs the references off CUDA).
    kv_num_c, kv_idx_c = complement_blocks(kv_num, kv_idx)
    out_c, lse_c = block_sparse_attention(q, k, v, kv_num_c, kv_idx_c, 32, 32, scale, mask)
    out_k, lse_k = merge_attention_partials(out_s, lse_s, out_c, lse_c)
    exact_out, exact_lse = _exact(q, k, v, scale, mask)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).nan_to_num(0.0)
    attended = torch.isfinite(exact_lse)
    for got, got_lse in ((out, lse), (out_k, lse_k)):
        ok, ours, theirs = within_reference_error(got[attended], sdpa[attended], exact_out[attended])
        assert ok, (ours, theirs)
        assert (got_lse.double() - exact_lse)[attended].abs().max() < 1e-3
        assert (got[~attended] == 0).all() and torch.isneginf(got_lse[~attended]).all()


def test_int8_fp8_sparse_plus_complement_is_the_dense_8bit_kernel():
    b, h, s, d = 1, 2, 96, 32
    q, k, v = (torch.randn(b, h, s, d).to(DEVICE, torch.bfloat16) for _ in range(3))
    k = k + 2.0
    layout = _layout(b, h, s, s, 32, 0.4)
    kv_num, kv_idx = layout.kv_num_blocks.to(DEVICE), layout.kv_indices.to(DEVICE)
    scale = d**-0.5
    x = quantize_attention_inputs(q, k, v, 64)
    args = (x.q_codes, x.q_scale, x.k_codes, x.k_scale, x.v_codes, x.v_scale, x.lse_shift)
    out_s, lse_s = block_sparse_attention_int8_fp8(*args, kv_num, kv_idx, 32, 32, scale)
    kv_num_c, kv_idx_c = complement_blocks(kv_num, kv_idx)
    out_c, lse_c = block_sparse_attention_int8_fp8(*args, kv_num_c, kv_idx_c, 32, 32, scale)
    merged, merged_lse = merge_attention_partials(out_s, lse_s, out_c, lse_c)
    dense, dense_lse = dense_attention_int8_fp8(*args, scale, config={"BLOCK_M": 32, "BLOCK_N": 32})
    # Same codes, same scores; P is rounded against different running maxima (the tile order differs).
    assert sqnr_db(merged, dense) > 35
    assert (merged_lse - dense_lse).abs().max() < 1e-4
    # The composition (references off CUDA) agrees with the kernels.
    out, lse = dense_from_sparse(q, k, v, out_s, lse_s, kv_num, kv_idx, 32, 32, scale, precision="int8_fp8")
    assert sqnr_db(out, merged) > 35 and (lse - merged_lse).abs().max() < 1e-4
    exact_out, _ = _exact(q, k, v, scale, None)
    assert sqnr_db(merged, exact_out) > 25


def test_unknown_precision_is_named():
    q = torch.randn(1, 1, 64, 32)
    layout = _layout(1, 1, 64, 64, 32, 0.5)
    with pytest.raises(ValueError, match="precision"):
        dense_from_sparse(q, q, q, q, q[..., 0], layout.kv_num_blocks, layout.kv_indices, 32, 32, 0.1, None, "fp4")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "int8_fp8"])
def test_gpu_dense_from_sparse(precision):
    b, h, s, d = 1, 4, 3000, 128
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    layout = _layout(b, h, s, s, 128, 0.15)
    kv_num, kv_idx = layout.kv_num_blocks.cuda(), layout.kv_indices.cuda()
    scale = d**-0.5
    if precision == "bf16":
        out_s, lse_s = block_sparse_attention(q, k, v, kv_num, kv_idx, 128, 128, scale)
    else:
        x = quantize_attention_inputs(q, k, v, 64)
        args = (x.q_codes, x.q_scale, x.k_codes, x.k_scale, x.v_codes, x.v_scale, x.lse_shift)
        out_s, lse_s = block_sparse_attention_int8_fp8(*args, kv_num, kv_idx, 128, 128, scale)
    out, lse = dense_from_sparse(q, k, v, out_s, lse_s, kv_num, kv_idx, 128, 128, scale, precision=precision)
    sdpa = F.scaled_dot_product_attention(q, k, v, scale=scale)
    exact_out, exact_lse = _exact(q, k, v, scale, None)
    if precision == "bf16":
        ok, ours, theirs = within_reference_error(out, sdpa, exact_out)
        assert ok, (ours, theirs)
    else:
        assert sqnr_db(out, sdpa) > 25  # the recipe measures 28.0-28.6 dB here (H100, 2026-12-07)
    assert (lse.double() - exact_lse).abs().max() < 0.05


def test_the_layout_op_builds_the_complement_with_the_layout_once():
    """qsparse::video_block_layout(complement=True) returns copies of the complement of the layout it returns,
    built together with it (one cache entry per grid); dense_from_sparse with it equals building it on the fly."""
    from qsparse_compiler.ops.video_layout import _cached_layouts

    _cached_layouts.cache_clear()
    q = torch.randn(1, 2, 77, 32)
    args = (q, 1, 7, 11, 0, "local3d;skip", 0.4, 32, 32)  # per head; the skip head: all complement
    kv_num, kv_idx = torch.ops.qsparse.video_block_layout(*args)
    comp_num, comp_idx = torch.ops.qsparse.video_block_layout(*args, True)
    assert _cached_layouts.cache_info().misses == 1 and _cached_layouts.cache_info().hits == 1
    expected = complement_blocks(kv_num, kv_idx)
    assert torch.equal(comp_num, expected[0]) and torch.equal(comp_idx, expected[1])
    again = torch.ops.qsparse.video_block_layout(*args, True)
    assert again[0].data_ptr() != comp_num.data_ptr()  # a copy per call: op outputs never alias the cache
    torch.library.opcheck(torch.ops.qsparse.video_block_layout.default, (*args, True))
    k, v = torch.randn(2, 1, 2, 77, 32).unbind(0)
    out_s, lse_s = torch.ops.qsparse.sparse_attention(q, k, v, kv_num, kv_idx, 32, 32, 0.2, None)
    built = dense_from_sparse(q, k, v, out_s, lse_s, kv_num, kv_idx, 32, 32, 0.2)
    given = dense_from_sparse(q, k, v, out_s, lse_s, kv_num, kv_idx, 32, 32, 0.2, complement=(comp_num, comp_idx))
    assert torch.equal(built[0], given[0]) and torch.equal(built[1], given[1])


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "int8_fp8"])
def test_gpu_residual_refresh_from_the_complement_matches_the_dense_refresh(precision):
    """qsparse::residual_attention's CUDA kernel: a refresh given the sparse lse, layout and complement (the fused step
    on the merged O_dense) vs the old refresh (a dense attention) - O_dense and R by the 2x rule against fp64."""
    from qsparse_compiler.ops.residual_attention import MODE_REFRESH

    b, h, s, d = 1, 4, 3000, 128
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    layout = _layout(1, h, s, s, 128, 0.15)
    kv_num, kv_idx = layout.kv_num_blocks.cuda(), layout.kv_indices.cuda()
    complement = complement_blocks(kv_num, kv_idx)
    scale = d**-0.5
    o_sparse, lse = torch.ops.qsparse.sparse_attention(q, k, v, kv_num, kv_idx, 128, 128, scale, None, precision)
    results = {}
    for path, extra in (("old", ()), ("new", (lse, kv_num, kv_idx, 128, 128, *complement))):
        state = [torch.zeros(q.shape, device="cuda"), torch.zeros(q.shape, device="cuda"),
                 torch.full((1,), -1.0, device="cuda")]
        out = torch.ops.qsparse.residual_attention(o_sparse, q, k, v, None, scale, state, None, MODE_REFRESH, 2,
                                                   precision, 0, *extra)
        results[path] = (out, state[0])
    exact, _ = _exact(q, k, v, scale, None)
    for i, truth in enumerate((exact, exact - o_sparse.double())):
        ok, ours, theirs = within_reference_error(results["new"][i], results["old"][i], truth)
        assert ok, (i, ours, theirs)
