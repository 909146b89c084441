"""Pattern generators: density budgets, the diagonal, text tiles, the registry of qsparse::video_block_layout."""

from __future__ import annotations

import math

import pytest
import torch

from qsparse_compiler.formats.pattern_spec import build_video_layout
from qsparse_compiler.formats.layout import BlockSparseLayout, num_blocks
from qsparse_compiler.formats.patterns import (
    TokenGrid,
    diagonal_tiles,
    local_3d,
    multi_diagonal,
    random_blocks,
    skip,
    vertical_stripe,
)

GRID = TokenGrid(frames=5, height=6, width=8, seq_len=5 * 48)  # 240 video tokens, no text
TEXT_GRID = TokenGrid(frames=5, height=6, width=8, seq_len=5 * 48 + 40, video_start=40)


@pytest.mark.parametrize("pattern", [local_3d, multi_diagonal, vertical_stripe])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5])
def test_static_patterns_keep_the_diagonal_and_respect_the_budget(pattern, density):
    bitmap = pattern(GRID, 16, 16, density)
    qb = kvb = num_blocks(GRID.seq_len, 16)
    assert bitmap.shape == (qb, kvb) and bitmap.dtype == torch.bool
    diag = diagonal_tiles(GRID.seq_len, GRID.seq_len, 16, 16)
    assert bitmap[diag].all(), "the diagonal must always be kept"
    # Per row: ceil(density * KVB) chosen blocks, plus at most the diagonal's blocks on top.
    budget = math.ceil(density * kvb) + int(diag.sum(-1).max())
    assert int(bitmap.sum(-1).max()) <= budget


def test_multi_diagonal_has_diagonals_at_frame_offsets():
    hw = GRID.height * GRID.width  # 48 tokens = 3 blocks of 16
    bitmap = multi_diagonal(GRID, 16, 16, 0.33)  # 15 key blocks: ceil(0.33 * 15) = 5 per row, one per frame
    for row in range(bitmap.shape[0]):
        frame_offsets = [row + f * (hw // 16) for f in range(-5, 6)]
        expected = {c for c in frame_offsets if 0 <= c < bitmap.shape[1]}
        assert set(bitmap[row].nonzero().flatten().tolist()) == expected


def test_vertical_stripe_explicit_columns():
    bitmap = vertical_stripe(GRID, 16, 16, 0.1, columns=torch.tensor([0, 7]))
    assert bitmap[:, 0].all() and bitmap[:, 7].all()
    assert torch.equal(bitmap, bitmap.new_zeros(bitmap.shape).index_fill_(1, torch.tensor([0, 7]), True)
                       | diagonal_tiles(GRID.seq_len, GRID.seq_len, 16, 16))
    with pytest.raises(ValueError, match="key block indices"):
        vertical_stripe(GRID, 16, 16, 0.1, columns=torch.tensor([99]))


def test_text_tiles_stay_dense_and_skip_is_empty():
    for pattern in (local_3d, multi_diagonal, vertical_stripe):
        bitmap = pattern(TEXT_GRID, 16, 16, 0.1)
        text_blocks = num_blocks(TEXT_GRID.video_start + 1, 16)  # blocks holding any text token
        assert bitmap[:text_blocks].all() and bitmap[:, :text_blocks].all()
    empty = skip(TEXT_GRID, 16, 16, 0.15)
    assert not empty.any()
    layout = BlockSparseLayout.from_bitmap(empty[None, None], 16, 16, TEXT_GRID.seq_len, TEXT_GRID.seq_len)
    assert layout.density() == 0.0 and int(layout.kv_num_blocks.max()) == 0


def test_random_blocks_exact_row_counts_and_diagonal():
    bitmap = random_blocks(100, 100, 16, 16, 0.3, batch=2, heads=3, generator=torch.Generator().manual_seed(1))
    assert bitmap.shape == (2, 3, 7, 7)
    assert (bitmap.sum(-1) == 2).all()  # round(0.3 * 7) = 2
    assert bitmap[..., diagonal_tiles(100, 100, 16, 16)].all()


def test_diagonal_tiles_with_unequal_blocks():
    diag = diagonal_tiles(100, 100, 32, 16)  # each 32-token query block overlaps two 16-token key blocks
    assert diag.shape == (4, 7)
    assert diag.sum(-1).tolist() == [2, 2, 2, 1]


@pytest.mark.parametrize("spec", ["local3d", "multidiag", "stripe", "skip"])
def test_registry_specs_build_layouts(spec):
    layout = build_video_layout(TEXT_GRID, spec, 0.2, 16, 16)
    assert layout.shape[:2] == (1, 1)
    assert (layout.density() == 0.0) == (spec == "skip")


@pytest.mark.parametrize("pattern", [local_3d, multi_diagonal, vertical_stripe, random_blocks])
def test_density_must_be_in_range(pattern):
    with pytest.raises(ValueError, match="density"):
        if pattern is random_blocks:
            pattern(64, 64, 16, 16, 0.0)
        else:
            pattern(GRID, 16, 16, 1.5)
