"""Chunk-wise pooled attention maps equal the pooled dense softmax (small S, where S x S is affordable)."""

import pytest
import torch

from qsparse_compiler.calibration.attention_maps import (
    TileMask,
    attention_received,
    masked_attention,
    pool_probabilities,
    pooled_attention_mass,
    query_chunk_rows,
    sparse_attention_chunked,
    video_tile_mask,
)
from qsparse_compiler.formats.patterns import TokenGrid


def _dense_pooled(q, k, block_q, block_kv, scale, mask=None):
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return pool_probabilities(probs, block_q, block_kv)


@pytest.mark.parametrize("seq_len", [64, 70, 33])  # exact blocks and ragged tails
@pytest.mark.parametrize("max_elements", [1024, 1 << 20])  # many chunks / one chunk
def test_chunked_pooled_mass_equals_dense_softmax_pooled(seq_len, max_elements):
    q, k = torch.randn(2, 3, seq_len, 8), torch.randn(2, 3, seq_len, 8)
    actual = pooled_attention_mass(q, k, 16, 8, 0.4, max_elements=max_elements)
    expected = _dense_pooled(q, k, 16, 8, 0.4)
    assert actual.shape == (2, 3, -(-seq_len // 16), -(-seq_len // 8))
    torch.testing.assert_close(actual.double(), expected, atol=1e-5, rtol=1e-5)
    # Rows of the softmax sum to 1: a query block's row sums to its number of queries.
    rows = torch.full((actual.shape[2],), 16.0)
    rows[-1] = seq_len - 16 * (actual.shape[2] - 1)
    torch.testing.assert_close(actual.sum(-1), rows.expand(2, 3, -1), atol=1e-4, rtol=1e-5)


def test_chunks_stay_below_the_element_budget_and_hold_whole_blocks():
    rows = query_chunk_rows(batch_heads=12, kv_len=32760, block_q=128, max_elements=1 << 28)
    assert rows == 640 and rows * 12 * 32760 <= 1 << 28  # 1x12x32,760: 5 query blocks per chunk, not S x S
    # A budget below one block still makes progress, one block at a time.
    assert query_chunk_rows(batch_heads=12, kv_len=32760, block_q=128, max_elements=1 << 20) == 128


def test_key_padding_mask_removes_keys():
    q, k = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    padding = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    padding[..., 35:] = False
    actual = pooled_attention_mass(q, k, 16, 16, 0.3, padding, max_elements=1024)
    expected = _dense_pooled(q, k, 16, 16, 0.3, padding)
    torch.testing.assert_close(actual.double(), expected, atol=1e-5, rtol=1e-5)


def test_tile_mask_restricts_the_softmax_like_the_sparse_reference():
    q, k, v = torch.randn(1, 2, 48, 8), torch.randn(1, 2, 48, 8), torch.randn(1, 2, 48, 8)
    bitmap = torch.rand(2, 3, 3) < 0.5
    bitmap[:, torch.arange(3), torch.arange(3)] = True
    tiles = TileMask(bitmap, 16, 16)
    token_mask = tiles.rows(0, 48, 48)
    expected = _dense_pooled(q, k, 8, 8, 0.5, token_mask)
    actual = pooled_attention_mass(q, k, 8, 8, 0.5, max_elements=1024, tiles=tiles)
    torch.testing.assert_close(actual.double(), expected, atol=1e-5, rtol=1e-5)
    out, _ = masked_attention(q, k, v, token_mask, 0.5)
    ref = torch.ops.qsparse.sparse_attention.default  # the op's reference math on CPU
    from qsparse_compiler.formats.layout import BlockSparseLayout

    layout = BlockSparseLayout.from_bitmap(bitmap[None], 16, 16, 48, 48)
    expected_out, _ = ref(q, k, v, layout.kv_num_blocks, layout.kv_indices, 16, 16, 0.5, None)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)


def test_attention_received_is_column_mass():
    q, k = torch.randn(1, 2, 37, 8), torch.randn(1, 2, 37, 8)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1)
    torch.testing.assert_close(attention_received(q, k, 0.3, max_elements=1024), probs.sum(2), atol=1e-5, rtol=1e-5)


def test_video_tiles_exclude_text_blocks():
    grid = TokenGrid(2, 4, 4, seq_len=48, video_start=16)  # 16 text tokens first (CogVideoX order)
    tiles = video_tile_mask(grid, 16, 16)
    assert tiles.tolist() == [[False, False, False], [False, True, True], [False, True, True]]


@pytest.mark.parametrize("max_elements", [1024, 1 << 20])
def test_chunked_sparse_attention_matches_masked_attention_values_pools_and_gradients(max_elements):
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 8, requires_grad=True) for _ in range(3))
    bitmap = torch.rand(2, 3, 3) < 0.5
    bitmap[:, torch.arange(3), torch.arange(3)] = True
    tiles = TileMask(bitmap, 16, 16)
    padding = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    padding[..., 38:] = False
    out, pooled = sparse_attention_chunked(q, k, v, tiles, 0.5, padding, max_elements, pool=(8, 8))
    ref_out, ref_probs = masked_attention(q, k, v, tiles.rows(0, 40, 40), 0.5, padding)
    ref_pooled = pool_probabilities(ref_probs, 8, 8)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad((out.square().sum() + pooled.square().sum()), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out.square().sum() + ref_pooled.square().sum()), (q, k, v))
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
