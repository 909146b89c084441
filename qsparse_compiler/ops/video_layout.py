"""``qsparse::video_block_layout`` — the block layout of a video attention, built for the grid it runs on.

    video_block_layout(q: (B, H, S, D), frames, height, width, video_start: SymInt, pattern: str,
                       density: float, block_q: int, block_kv: int) -> (kv_num_blocks int32 [1, 1, QB],
                                                                        kv_indices int32 [1, 1, QB, KVB])

``q`` is read for its sequence length and device only. The layout depends on the token grid, which changes with
frame count and resolution (and is symbolic under dynamic shapes), so it is built at run time — once per grid:
results are cached on the host and per device, and each call returns a copy (op outputs must not alias).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..sparsity.layout import BlockSparseLayout, num_blocks
from ..sparsity.patterns import TokenGrid, local_3d, multi_diagonal, skip, vertical_stripe

__all__ = ["video_block_layout", "build_video_layout"]

# Static patterns by spec string (sparsity/patterns.py documents each): pattern(grid, block_q, block_kv, density).
_PATTERNS = {"local3d": local_3d, "multidiag": multi_diagonal, "stripe": vertical_stripe, "skip": skip}


@lru_cache(maxsize=64)
def _cached_layout(key: tuple, device: torch.device) -> BlockSparseLayout:
    pattern, density, block_q, block_kv, frames, height, width, seq_len, video_start = key
    layout = build_video_layout(
        TokenGrid(frames, height, width, seq_len, video_start), pattern, density, block_q, block_kv
    )
    return BlockSparseLayout(
        layout.kv_num_blocks.to(device), layout.kv_indices.to(device), block_q, block_kv, seq_len, seq_len
    )


def build_video_layout(grid: TokenGrid, pattern: str, density: float, block_q: int, block_kv: int) -> BlockSparseLayout:
    """One head's layout of ``pattern`` on ``grid`` as [1, 1, QB, KVB]."""
    try:
        make = _PATTERNS[pattern]
    except KeyError:
        raise ValueError(f"qsparse::video_block_layout: unknown pattern {pattern!r}; known: {sorted(_PATTERNS)}") from None
    bitmap = make(grid, block_q, block_kv, density)
    return BlockSparseLayout.from_bitmap(bitmap[None, None], block_q, block_kv, grid.seq_len, grid.seq_len)


@torch.library.custom_op("qsparse::video_block_layout", mutates_args=())
def video_block_layout(
    q: torch.Tensor,
    frames: int,
    height: int,
    width: int,
    video_start: int,
    pattern: str,
    density: float,
    block_q: int,
    block_kv: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    key = (pattern, float(density), block_q, block_kv, frames, height, width, q.shape[2], video_start)
    layout = _cached_layout(key, q.device)
    return layout.kv_num_blocks.clone(), layout.kv_indices.clone()


@video_block_layout.register_fake
def _(q, frames, height, width, video_start, pattern, density, block_q, block_kv):
    seq_len = q.shape[2]
    qb, kvb = num_blocks(seq_len, block_q), num_blocks(seq_len, block_kv)
    return (
        q.new_empty((1, 1, qb), dtype=torch.int32),
        q.new_empty((1, 1, qb, kvb), dtype=torch.int32),
    )
