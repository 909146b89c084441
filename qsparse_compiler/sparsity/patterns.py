"""Sparse-attention patterns over the 3D video token grid.

Video tokens are frame-major after patchify: token ``i`` of the video range sits at
``(frame, row, col) = (i // (H*W), (i // W) % H, i % W)``. A sequence may also hold text tokens before or after
the video range (joint attention in CogVideoX and HunyuanVideo); every tile that touches a text token is kept
dense — text is short, and its rows and columns carry the conditioning.

A pattern returns a tile bitmap ``bool [QB, KVB]`` (True = computed) for one head; ``BlockSparseLayout.from_bitmap``
turns stacked bitmaps into the kernel's layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layout import num_blocks

__all__ = ["TokenGrid", "local_3d"]


@dataclass(frozen=True)
class TokenGrid:
    """Where the video tokens of an attention sequence are, and their (frames, height, width) grid."""

    frames: int
    height: int
    width: int
    seq_len: int  # all tokens of the attention (video + text)
    video_start: int = 0  # index of the first video token

    def __post_init__(self) -> None:
        if min(self.frames, self.height, self.width) < 1 or self.video_start < 0 or self.video_end > self.seq_len:
            raise ValueError(
                f"qsparse_compiler.sparsity.TokenGrid: grid {self.frames}x{self.height}x{self.width} starting at token "
                f"{self.video_start} does not fit a sequence of {self.seq_len} tokens"
            )

    @property
    def video_len(self) -> int:
        return self.frames * self.height * self.width

    @property
    def video_end(self) -> int:
        return self.video_start + self.video_len


def _block_geometry(grid: TokenGrid, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of ``block`` tokens: centroid of its video tokens (float [NB, 3]) and whether it is all video."""
    nb = num_blocks(grid.seq_len, block)
    token = torch.arange(nb * block)
    exists = token < grid.seq_len
    is_video = (token >= grid.video_start) & (token < grid.video_end)
    i = (token - grid.video_start).clamp(0, grid.video_len - 1)
    hw = grid.height * grid.width
    coords = torch.stack((i // hw, (i // grid.width) % grid.height, i % grid.width), dim=-1).float()
    weight = is_video.float().view(nb, block, 1)
    centroid = (coords.view(nb, block, 3) * weight).sum(1) / weight.sum(1).clamp_min(1.0)
    has_text = (exists & ~is_video).view(nb, block).any(1)
    all_video = is_video.view(nb, block).any(1) & ~has_text
    return centroid, all_video


def local_3d(grid: TokenGrid, block_q: int, block_kv: int, density: float) -> torch.Tensor:
    """Diagonal (3D-local) pattern: each video query block keeps the ``density`` share of video key blocks whose
    centroids are nearest to its own in (frame, row, col) units — always including its own position (the
    diagonal). Tiles touching text are dense. Returns bool [QB, KVB]."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"qsparse_compiler.sparsity.local_3d: density={density} must be in (0, 1]")
    q_centroid, q_video = _block_geometry(grid, block_q)
    kv_centroid, kv_video = _block_geometry(grid, block_kv)
    bitmap = torch.ones(q_centroid.shape[0], kv_centroid.shape[0], dtype=torch.bool)
    video_rows = q_video.nonzero().flatten()
    video_cols = kv_video.nonzero().flatten()
    if video_rows.numel() == 0 or video_cols.numel() == 0:
        return bitmap
    keep = min(video_cols.numel(), max(1, math.ceil(density * video_cols.numel())))
    distance = torch.cdist(q_centroid[video_rows], kv_centroid[video_cols])
    nearest = distance.topk(keep, dim=-1, largest=False).indices
    video_tiles = torch.zeros(video_rows.numel(), video_cols.numel(), dtype=torch.bool)
    video_tiles.scatter_(1, nearest, True)
    # The diagonal: key blocks that overlap the query block's own tokens.
    q_first = video_rows * block_q
    q_last = torch.clamp(q_first + block_q, max=grid.seq_len) - 1
    kv_first = video_cols * block_kv
    kv_last = kv_first + block_kv - 1
    video_tiles |= (kv_first[None, :] <= q_last[:, None]) & (kv_last[None, :] >= q_first[:, None])
    bitmap[video_rows[:, None], video_cols[None, :]] = video_tiles
    return bitmap
