"""Block-sparse attention kernel vs dense attention with the equivalent boolean mask.

Numerics rule (flash-attention's): the kernel's error against an fp32 reference must stay within 2x the error of
torch's same-dtype SDPA with the equivalent boolean mask (plus a small floor), both measured on rows that attend to
something. Rows that attend to nothing are checked exactly: out = 0, lse = -inf. On CPU the kernel runs under
TRITON_INTERPRET=1 (tests/conftest.py) at tiny shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsparse_compiler.kernels.block_sparse_attention import block_sparse_attention, unsupported_reason
from qsparse_compiler.formats.layout import BlockSparseLayout, num_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_layout(b, h, q_len, kv_len, block_q, block_kv, density, empty_rows=0.0, gen=None):
    qb, kvb = num_blocks(q_len, block_q), num_blocks(kv_len, block_kv)
    bitmap = torch.rand(b, h, qb, kvb, generator=gen) < density
    if empty_rows:
        bitmap &= ~(torch.rand(b, h, qb, 1, generator=gen) < empty_rows)
    return BlockSparseLayout.from_bitmap(bitmap, block_q, block_kv, q_len, kv_len)


def _check_against_references(q, k, v, layout, scale, key_padding_mask=None, floor=2e-3, **kw):
    """Run the kernel; assert the 2x-reference rule on attended rows and the empty-row convention elsewhere."""
    kv_num = layout.kv_num_blocks.to(q.device)
    kv_idx = layout.kv_indices.to(q.device)
    out, lse = block_sparse_attention(q, k, v, kv_num, kv_idx, layout.block_q, layout.block_kv, scale, key_padding_mask, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32

    mask = layout.to_token_mask().to(q.device)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask
    mask = mask.expand(q.shape[0], q.shape[1], -1, -1)
    attended = mask.any(-1)  # [B, H, Sq]

    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    ref_lse = torch.logsumexp(scores, -1)
    ref_out = torch.softmax(scores, -1).nan_to_num(0.0) @ v.double()
    # Same-dtype torch attention with the equivalent mask; fully masked rows give NaN there, so compare attended rows.
    torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    sel = attended.unsqueeze(-1).expand_as(out)
    if attended.any():
        err_kernel = (out.double() - ref_out)[sel].abs().max().item()
        err_torch = (torch_out.double() - ref_out)[sel].abs().max().item()
        assert err_kernel <= 2 * err_torch + floor, (err_kernel, err_torch)
        lse_err = (lse.double() - ref_lse)[attended].abs().max().item()
        assert lse_err <= 1e-3 * max(1.0, ref_lse[attended].abs().max().item()), lse_err
    assert torch.all(out[~sel] == 0), "rows that attend to nothing must be 0"
    assert torch.all(torch.isneginf(lse[~attended])), "rows that attend to nothing must have lse = -inf"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    return out, lse


def _qkv(b, h, sq, skv, d, dtype, gen=None):
    return (
        torch.randn(b, h, sq, d, generator=gen).to(DEVICE, dtype),
        torch.randn(b, h, skv, d, generator=gen).to(DEVICE, dtype),
        torch.randn(b, h, skv, d, generator=gen).to(DEVICE, dtype),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_masked_attention_tails_and_empty_rows(dtype):
    b, h, s, d = 2, 3, 77, 64  # 77: a tail in both the query and the key blocks
    q, k, v = _qkv(b, h, s, s, d, dtype)
    layout = _random_layout(b, h, s, s, 32, 32, density=0.5, empty_rows=0.3)
    assert (layout.kv_num_blocks == 0).any(), "test setup: expected empty rows"
    _check_against_references(q, k, v, layout, scale=1 / math.sqrt(d))


def test_key_padding_mask_and_broadcast_layout():
    b, h, sq, skv, d = 2, 2, 40, 70, 64
    q, k, v = _qkv(b, h, sq, skv, d, torch.bfloat16)
    layout = _random_layout(1, 1, sq, skv, 16, 32, density=0.7)  # one layout for every batch and head
    key_padding_mask = torch.rand(b, 1, 1, skv, device=DEVICE) < 0.6
    key_padding_mask[1, ..., :] = False  # batch 1 attends to nothing at all: out 0, lse -inf
    _check_against_references(q, k, v, layout, 0.1, key_padding_mask)


def test_head_dim_128_and_kernel_tiles_smaller_than_layout_blocks():
    b, h, s, d = 1, 2, 100, 128
    q, k, v = _qkv(b, h, s, s, d, torch.bfloat16)
    layout = _random_layout(b, h, s, s, 32, 64, density=0.6)
    # BLOCK_N=32 inside 64-token key blocks: each listed block is two kernel tiles.
    _check_against_references(q, k, v, layout, 1 / math.sqrt(d), config={"BLOCK_M": 32, "BLOCK_N": 32})


def test_keys_a_multiple_of_the_kernel_tile_but_not_of_the_layout_block():
    """96 keys in 64-token layout blocks with 32-key tiles: the tail block's second tile lies wholly past the keys and
    must be masked although 96 % 32 == 0 (it was read unmasked - found by the kernel fuzz)."""
    b, h, s, d = 1, 2, 96, 64
    q, k, v = _qkv(b, h, s, s, d, torch.bfloat16)
    layout = _random_layout(b, h, s, s, 32, 64, density=1.0)
    _check_against_references(q, k, v, layout, 1 / math.sqrt(d), config={"BLOCK_M": 32, "BLOCK_N": 32})


@pytest.mark.parametrize(
    "tma, tail_branch, lazy", [(False, False, False), (True, False, False), (True, True, False), (False, True, True),
                               (True, True, True)]
)
def test_tma_pointer_tail_branch_and_lazy_rescale_paths(tma, tail_branch, lazy):
    b, h, s, d = 2, 2, 83, 64
    q, k, v = _qkv(b, h, s, s, d, torch.bfloat16)
    # Growing score scales along the keys make row maxima jump by more than 2^8 mid-row (exercises the rescale).
    k = k * torch.linspace(0.2, 6.0, s, device=DEVICE).to(k.dtype)[:, None]
    layout = _random_layout(b, h, s, s, 32, 32, density=0.6, empty_rows=0.2)
    key_padding_mask = torch.rand(b, 1, 1, s, device=DEVICE) < 0.8
    key_padding_mask[0, ..., :40] = False  # rows whose first listed blocks are all masked
    # Two kernel tiles per key block; in the last block one is partly and one wholly past Skv.
    cfg = {"BLOCK_M": 32, "BLOCK_N": 16, "USE_TMA": tma, "TAIL_BRANCH": tail_branch, "LAZY_RESCALE": lazy}
    _check_against_references(q, k, v, layout, 1 / math.sqrt(d), config=cfg)
    _check_against_references(q, k, v, layout, 1 / math.sqrt(d), key_padding_mask, config=cfg)


def test_unaligned_tensors_fall_back_from_tma():
    b, h, s, d = 1, 1, 40, 16
    storage = torch.randn(3, b * h * s * d + 1).to(DEVICE, torch.bfloat16)
    q, k, v = (row[1:].view(b, h, s, d) for row in storage)  # base 2 bytes past alignment: no TMA possible
    layout = _random_layout(b, h, s, s, 16, 16, density=0.7)
    _check_against_references(q, k, v, layout, 0.25)
    with pytest.raises(ValueError, match="USE_TMA"):
        block_sparse_attention(q, k, v, layout.kv_num_blocks.to(DEVICE), layout.kv_indices.to(DEVICE), 16, 16, 0.25,
                               config={"BLOCK_M": 16, "BLOCK_N": 16, "USE_TMA": True})


def test_non_contiguous_bshd_views_need_no_copy():
    b, s, h, d = 1, 48, 2, 64
    base = [torch.randn(b, s, h, d).to(DEVICE, torch.bfloat16) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in base)  # (B, H, S, D) views of (B, S, H, D) storage
    assert not q.is_contiguous()
    layout = _random_layout(b, h, s, s, 16, 16, density=0.5)
    _check_against_references(q, k, v, layout, 0.125)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sq=st.integers(1, 90),
    skv=st.integers(1, 90),
    heads=st.integers(1, 3),
    batch=st.integers(1, 2),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    blocks=st.sampled_from([(16, 16), (32, 16), (16, 32), (32, 32)]),
    broadcast_heads=st.booleans(),
    variant=st.sampled_from([None, {"USE_TMA": True}, {"LAZY_RESCALE": True}, {"TAIL_BRANCH": True}]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_masked_attention(sq, skv, heads, batch, density, blocks, broadcast_heads, variant, seed):
    gen = torch.Generator().manual_seed(seed)
    d = 16
    q, k, v = _qkv(batch, heads, sq, skv, d, torch.bfloat16, gen)
    layout = _random_layout(batch, 1 if broadcast_heads else heads, sq, skv, *blocks, density, 0.2, gen)
    config = None if variant is None else {"BLOCK_M": 16, "BLOCK_N": 16, **variant}
    _check_against_references(q, k, v, layout, 1 / math.sqrt(d), config=config)


def test_unsupported_inputs_are_named():
    q = torch.randn(1, 1, 32, 96)
    layout = _random_layout(1, 1, 32, 32, 16, 16, 1.0)
    reason = unsupported_reason(q, q, q, layout.kv_num_blocks, layout.kv_indices, 16, 16)
    assert reason is not None and "dtype" in reason
    qb = q.to(torch.bfloat16)
    assert "head dim" in unsupported_reason(qb, qb, qb, layout.kv_num_blocks, layout.kv_indices, 16, 16)
    with pytest.raises(ValueError, match="block_sparse_attention"):
        block_sparse_attention(qb, qb, qb, layout.kv_num_blocks, layout.kv_indices, 16, 16, 0.1)


# ---- GPU: real shapes, autotuning, the op under torch.compile and CUDA graphs -----------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("blocks", [(128, 128), (128, 64), (64, 64)])
def test_gpu_autotuned_vs_masked_sdpa(d, blocks):
    b, h, s = 2, 4, 2000  # 2000: tails in 64- and 128-token blocks
    q, k, v = _qkv(b, h, s, s, d, torch.bfloat16)
    layout = _random_layout(b, h, s, s, *blocks, density=0.3, empty_rows=0.1)
    _check_against_references(q, k, v, layout, 1 / math.sqrt(d))


@pytest.mark.gpu
def test_gpu_every_config_is_correct():
    from qsparse_compiler.kernels.block_sparse_attention import CONFIGS

    b, h, s, d = 1, 2, 1000, 128
    q, k, v = _qkv(b, h, s, s, d, torch.bfloat16)
    layout = _random_layout(b, h, s, s, 128, 128, density=0.4, empty_rows=0.1)
    for c in CONFIGS:  # TMA and pointer-load configs alike, tail branch included
        cfg = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        _check_against_references(q, k, v, layout, 1 / math.sqrt(d), config=cfg)


@pytest.mark.gpu
def test_gpu_op_under_compile_fullgraph_and_cuda_graph():
    import qsparse_compiler.ops  # noqa: F401  registers qsparse::sparse_attention and its CUDA kernel
    from qsparse_compiler.ops.sparse_attention_cuda import REGISTERED

    assert REGISTERED
    b, h, s, d = 1, 4, 1500, 128
    q, k, v = _qkv(b, h, s, s, d, torch.bfloat16)
    layout = _random_layout(1, h, s, s, 128, 128, density=0.3)
    kv_num, kv_idx = layout.kv_num_blocks.cuda(), layout.kv_indices.cuda()

    def attn(q, k, v, kv_num, kv_idx):
        out, lse = torch.ops.qsparse.sparse_attention(q, k, v, kv_num, kv_idx, 128, 128, d**-0.5, None)
        return out * 2, lse

    eager_out, eager_lse = attn(q, k, v, kv_num, kv_idx)
    ref_out, _ = _check_against_references(q, k, v, layout, d**-0.5)
    torch.testing.assert_close(eager_out, ref_out * 2)
    compiled = torch.compile(attn, fullgraph=True, mode="reduce-overhead")  # CUDA graphs
    for _ in range(3):  # warm-up runs, then graph replays
        out, lse = compiled(q, k, v, kv_num, kv_idx)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(lse, eager_lse)
    # A new layout in the same buffers is picked up by the replay (the layout is data, not a constant).
    layout2 = _random_layout(1, h, s, s, 128, 128, density=0.6)
    kv_num.copy_(layout2.kv_num_blocks)
    kv_idx.copy_(layout2.kv_indices)
    out2, _ = compiled(q, k, v, kv_num, kv_idx)
    ref2, _ = _check_against_references(q, k, v, layout2, d**-0.5)
    torch.testing.assert_close(out2, ref2 * 2)
