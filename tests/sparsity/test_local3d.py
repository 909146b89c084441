"""The layout type's invariants and the static 3D-local (diagonal) pattern."""

import pytest
import torch

from qsparse_compiler.formats.layout import BlockSparseLayout, LayoutError
from qsparse_compiler.formats.patterns import TokenGrid, local_3d


def test_from_bitmap_roundtrip_and_density():
    bitmap = torch.rand(2, 3, 5, 4) < 0.5
    layout = BlockSparseLayout.from_bitmap(bitmap, 32, 16, 150, 60)
    assert torch.equal(layout.to_dense(), bitmap)
    assert layout.density() == pytest.approx(bitmap.float().mean().item())
    assert layout.to_token_mask().shape == (2, 3, 150, 60)
    listed = layout.kv_indices[0, 0, 0, : layout.kv_num_blocks[0, 0, 0]]
    assert torch.equal(listed, bitmap[0, 0, 0].nonzero().flatten().int())  # ascending
    assert "density=" in repr(layout)


def test_validation_names_the_problem():
    bitmap = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    layout = BlockSparseLayout.from_bitmap(bitmap, 16, 16, 64, 64)
    with pytest.raises(LayoutError, match="expected QB=5"):
        BlockSparseLayout(layout.kv_num_blocks, layout.kv_indices, 16, 16, 65, 64)
    bad = layout.kv_indices.clone()
    bad[0, 0, 0, 0] = 9
    with pytest.raises(LayoutError, match=r"kv_indices must lie in \[0, 4\)"):
        BlockSparseLayout(layout.kv_num_blocks, bad, 16, 16, 64, 64)


@pytest.mark.parametrize("density", [0.05, 0.15, 0.3, 1.0])
def test_local3d_keeps_diagonal_and_budget(density):
    grid = TokenGrid(frames=6, height=8, width=12, seq_len=576)
    bitmap = local_3d(grid, 32, 32, density)
    qb = bitmap.shape[0]
    assert bool(bitmap.diagonal().all())
    per_row = bitmap.sum(-1)
    assert int(per_row.max()) <= max(1, -(-density * qb // 1)) + 1  # budget (+ the diagonal's neighbour on overlap)
    assert abs(bitmap.float().mean().item() - density) <= 1.0 / qb + 0.02


def test_local3d_prefers_the_same_place_in_neighbouring_frames():
    grid = TokenGrid(frames=4, height=8, width=8, seq_len=256)  # one frame = 64 tokens = 4 blocks of 16
    bitmap = local_3d(grid, 16, 16, 0.25)
    # Query block 5 (frame 1, rows 2-3): its own block and the same rows of the frames before/after.
    assert bool(bitmap[5, 5]) and bool(bitmap[5, 1]) and bool(bitmap[5, 9])
    assert not bool(bitmap[5, 15])  # far frame, far rows


def test_text_tiles_stay_dense_in_joint_sequences():
    grid = TokenGrid(frames=2, height=4, width=8, seq_len=64 + 20, video_start=20)  # text first
    bitmap = local_3d(grid, 16, 16, 0.2)
    assert bool(bitmap[0].all()) and bool(bitmap[1].all())  # blocks holding text tokens
    assert bool(bitmap[:, 0].all()) and bool(bitmap[:, 1].all())
    assert not bool(bitmap[2:, 2:].all())  # the video x video part is sparse
