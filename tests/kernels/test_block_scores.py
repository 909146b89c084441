"""Fused block-score kernel vs the torch reference, and the dynamic top-k layouts built from it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qsparse_compiler.kernels.block_scores import block_scores
from qsparse_compiler.ops.dynamic_layout import block_scores_reference, dynamic_topk_blocks, dynamic_topk_layout
from qsparse_compiler.formats.layout import BlockSparseLayout, num_blocks
from qsparse_compiler.formats.patterns import diagonal_tiles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=6, deadline=None)
@given(
    sq=st.integers(1, 150),
    skv=st.integers(1, 150),
    heads=st.integers(1, 3),
    blocks=st.sampled_from([(16, 16), (32, 16), (16, 32), (8, 24)]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference(sq, skv, heads, blocks, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, sq, 32, generator=gen).to(DEVICE, torch.bfloat16)
    k = torch.randn(2, heads, skv, 32, generator=gen).to(DEVICE, torch.bfloat16)
    got = block_scores(q, k, *blocks)
    ref = block_scores_reference(q, k, *blocks)
    assert got.shape == (2, heads, num_blocks(sq, blocks[0]), num_blocks(skv, blocks[1]))
    # fp32 pooling in a different order: agreement to fp32 rounding, far below the gaps topk must resolve.
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]))


def test_scores_find_planted_blocks():
    # Query block 2 and key block 5 share a direction the others lack: the estimate must rank that tile first.
    q = torch.randn(1, 1, 128, 32) * 0.1
    k = torch.randn(1, 1, 128, 32) * 0.1
    direction = torch.randn(32)
    q[0, 0, 32:48] += direction
    k[0, 0, 80:96] += direction
    probs = block_scores(q.to(DEVICE), k.to(DEVICE), 16, 16)
    assert int(probs[0, 0, 2].argmax()) == 5


@pytest.mark.parametrize("mode", ["row", "head"])
@pytest.mark.parametrize("density", [0.05, 0.25, 0.6])
def test_dynamic_layout_keeps_diagonal_within_budget(mode, density):
    q = torch.randn(2, 3, 200, 32, device=DEVICE)
    k = torch.randn(2, 3, 200, 32, device=DEVICE)
    layout = dynamic_topk_layout(q, k, 32, 16, density, mode=mode)
    dense = layout.to_dense().cpu()
    diag = diagonal_tiles(200, 200, 32, 16)
    assert dense[..., diag].all(), "diagonal tiles are always kept"
    qb, kvb = diag.shape
    budget = max(int(diag.sum()), math.floor(density * qb * kvb)) if mode == "head" else qb * max(
        int(diag.sum(-1).max()), math.floor(density * kvb)
    )
    per_head = dense.sum((-1, -2))
    assert (per_head <= budget).all()
    if mode == "row":
        assert (layout.kv_num_blocks == layout.kv_num_blocks.flatten()[0]).all(), "row mode: equal work per row"


def test_dynamic_layout_selects_top_scores():
    scores = torch.rand(1, 2, 4, 8)
    q = torch.zeros(1, 2, 64, 16)
    num, idx = dynamic_topk_blocks(q, q.new_zeros(1, 2, 128, 16), 16, 16, 0.25, scores=scores)
    layout = BlockSparseLayout(num, idx, 16, 16, 64, 128)
    ranked = scores + 2.0 * diagonal_tiles(64, 128, 16, 16)
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, ranked.topk(2, -1).indices, True)
    assert torch.equal(layout.to_dense(), expected)


def test_bad_inputs_name_the_problem():
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ValueError, match="density"):
        dynamic_topk_blocks(q, q, 16, 16, 0.0)
    with pytest.raises(ValueError, match="mode"):
        dynamic_topk_blocks(q, q, 16, 16, 0.5, mode="col")
    with pytest.raises(ValueError, match="head dim"):
        block_scores(torch.randn(1, 1, 32, 24), torch.randn(1, 1, 32, 24), 16, 16)


@pytest.mark.gpu
def test_gpu_block_scores_at_wan_shape():
    q = torch.randn(1, 12, 32760, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 12, 32760, 128, device="cuda", dtype=torch.bfloat16)
    got = block_scores(q, k, 128, 128)
    torch.testing.assert_close(got, block_scores_reference(q, k, 128, 128), rtol=1e-4, atol=1e-6)
    num, idx = dynamic_topk_blocks(q, k, 128, 128, 0.15)
    assert num.shape == (1, 12, 256) and int(num[0, 0, 0]) == math.floor(0.15 * 256)


@pytest.mark.gpu
def test_gpu_dynamic_layout_and_attention_capture_in_a_cuda_graph():
    """Scores -> top-k layout -> block-sparse attention, captured once and replayed on new inputs: proves the whole
    dynamic path runs without host synchronization."""
    from qsparse_compiler.kernels.block_sparse_attention import block_sparse_attention
    from qsparse_compiler.ops.sparse_attention import sparse_attention_reference

    b, h, s, d = 1, 4, 3000, 128
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def step():
        num, idx = dynamic_topk_blocks(q, k, 128, 128, 0.2)
        out, _ = block_sparse_attention(q, k, v, num, idx, 128, 128, d**-0.5)
        return num, idx, out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up (autotuning happens here, outside the capture)
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        num, idx, out = step()
    for _ in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        ref_num, ref_idx = dynamic_topk_blocks(q, k, 128, 128, 0.2)
        assert torch.equal(num, ref_num) and torch.equal(idx, ref_idx)
        ref_out, _ = sparse_attention_reference(q, k, v, num, idx, 128, 128, d**-0.5)
        torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)


def test_pool_blocks_on_strided_views_with_tails():
    from qsparse_compiler.kernels.block_scores import pool_blocks

    base = torch.randn(2, 70, 3, 16)  # (B, S, H, D) storage
    x = base.transpose(1, 2)  # (B, H, S, D) view, not contiguous
    pooled = pool_blocks(x, 32)  # blocks of 32, 32 and a 6-token tail
    assert pooled.shape == (2, 3, 3, 16) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled[:, :, 1], x[:, :, 32:64].mean(2))
    torch.testing.assert_close(pooled[:, :, 2], x[:, :, 64:].mean(2))
    assert pool_blocks(x[:, :, :64], 32).shape[2] == 2 and pool_blocks(x[:, :, :5], 32).shape[2] == 1
