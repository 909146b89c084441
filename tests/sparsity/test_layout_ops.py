"""BlockSparseLayout: union/intersection, ASCII view, to_dense round trip (incl. block 0 next to padding slots)."""

from __future__ import annotations

import pytest
import torch

from qsparse_compiler.formats.layout import BlockSparseLayout, LayoutError, bitmap_to_blocks


def _layout(bitmap: torch.Tensor, block=16, q_len=None, kv_len=None) -> BlockSparseLayout:
    qb, kvb = bitmap.shape[-2:]
    return BlockSparseLayout.from_bitmap(bitmap, block, block, q_len or qb * block, kv_len or kvb * block)


def test_to_dense_round_trips_including_block_zero_with_padding_slots():
    bitmap = torch.rand(2, 3, 9, 11) < 0.3
    bitmap[0, 0, 0] = False
    bitmap[0, 0, 0, 0] = True  # one listed block (index 0) followed by padding slots
    assert torch.equal(_layout(bitmap).to_dense(), bitmap)


def test_union_and_intersection_match_bitmap_logic_and_broadcast():
    a = torch.rand(2, 3, 6, 7) < 0.4
    b = torch.rand(1, 3, 6, 7) < 0.4  # B broadcasts
    la, lb = _layout(a), _layout(b)
    assert torch.equal((la | lb).to_dense(), a | b)
    assert torch.equal((la & lb).to_dense(), a & b)
    assert torch.equal(la.union(lb).kv_num_blocks, (a | b).sum(-1, dtype=torch.int32))
    # Union never lowers and intersection never raises density.
    assert (la & lb).density() <= la.density() <= (la | lb).density()


def test_combining_different_geometry_is_an_error_naming_the_fix():
    la = _layout(torch.ones(1, 1, 4, 4, dtype=torch.bool), block=16)
    lb = _layout(torch.ones(1, 1, 2, 2, dtype=torch.bool), block=32)
    with pytest.raises(LayoutError, match="different geometry"):
        la | lb
    lc = _layout(torch.ones(2, 1, 4, 4, dtype=torch.bool))
    ld = _layout(torch.ones(3, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(LayoutError, match="must match or be 1"):
        lc & ld


def test_ascii_shows_tiles_and_pools_large_maps():
    bitmap = torch.eye(4, dtype=torch.bool)[None, None].clone()
    bitmap[0, 0, :, 0] = True
    text = _layout(bitmap).to_ascii()
    assert text.splitlines()[1:] == ["#...", "##..", "#.#.", "#..#"]
    big = torch.zeros(1, 1, 100, 100, dtype=torch.bool)
    big[0, 0, :50, :50] = True
    big[0, 0, 60, 60] = True
    rows = _layout(big).to_ascii(max_size=10).splitlines()[1:]
    assert len(rows) == 10 and all(len(r) == 10 for r in rows)
    assert rows[0] == "#####....." and rows[6][6] == "+" and rows[9] == ".........."
    with pytest.raises(IndexError):
        _layout(big).to_ascii(head=1)


def test_bitmap_to_blocks_lists_ascending_indices_first():
    bitmap = torch.tensor([[[[False, True, False, True, True]]]])
    num, idx = bitmap_to_blocks(bitmap)
    assert num.tolist() == [[[3]]] and idx[0, 0, 0, :3].tolist() == [1, 3, 4]
