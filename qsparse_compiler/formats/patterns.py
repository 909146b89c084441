"""Sparse-attention patterns over the 3D video token grid.

Video tokens are frame-major after patchify: token ``i`` of the video range sits at
``(frame, row, col) = (i // (H*W), (i // W) % H, i % W)``. A sequence may also hold text tokens before or after
the video range (joint attention in CogVideoX and HunyuanVideo); every tile that touches a text token is kept
dense — text is short, and its rows and columns carry the conditioning.

A pattern returns a tile bitmap ``bool [QB, KVB]`` (True = computed) for one head; ``BlockSparseLayout.from_bitmap``
turns stacked bitmaps into the kernel's layout. Static patterns share the signature
``pattern(grid, block_q, block_kv, density) -> bitmap`` (the registry of ``qsparse::video_block_layout`` calls them
so); ``density`` is the share of video key blocks each video query block keeps (the diagonal comes on top when
the budget is smaller than the diagonal itself).

    diagonal        ``local_3d``: the nearest key blocks in (frame, row, col)
    multi-diagonal  ``multi_diagonal``: the same spatial window in every frame (diagonals at multiples of H*W tokens)
    vertical stripe ``vertical_stripe``: a set of key blocks that every query block sees, plus the diagonal
    skip            ``skip``: nothing at all (empty rows): the head's output comes from the residual cache
    dynamic top-k   ``ops.dynamic_layout``: per head, from pooled q.k^T block scores at run time

Combine patterns with ``|`` on bitmaps or on layouts (e.g. ``local_3d(...) | vertical_stripe(...)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layout import num_blocks

__all__ = ["TokenGrid", "local_3d", "multi_diagonal", "vertical_stripe", "skip", "diagonal_tiles", "random_blocks"]


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


def _check_density(where: str, density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"qsparse_compiler.sparsity.{where}: density={density} must be in (0, 1]")


def _block_ranges(length: int, block: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    first = torch.arange(num_blocks(length, block), device=device) * block
    return first, torch.clamp(first + block, max=length) - 1


def diagonal_tiles(q_len: int, kv_len: int, block_q: int, block_kv: int, device=None) -> torch.Tensor:
    """bool [QB, KVB]: tiles whose key block overlaps the query block's own token range (the diagonal; with
    block_q > block_kv a query block has several). Assumes queries and keys index the same sequence. Built on
    ``device`` from ``arange`` (no host-to-device copy, so it can be captured in a CUDA graph)."""
    q_first, q_last = _block_ranges(q_len, block_q, device)
    kv_first, kv_last = _block_ranges(kv_len, block_kv, device)
    return (kv_first[None, :] <= q_last[:, None]) & (kv_last[None, :] >= q_first[:, None])


def _keep_nearest(grid: TokenGrid, block_q: int, block_kv: int, density: float, distance_fn) -> torch.Tensor:
    """Shared body of the distance-ranked patterns: among video tiles, each video query block keeps the
    ``ceil(density * video key blocks)`` key blocks of smallest ``distance_fn(q_centroid, kv_centroid)`` plus the
    diagonal; tiles touching text stay dense."""
    q_centroid, q_video = _block_geometry(grid, block_q)
    kv_centroid, kv_video = _block_geometry(grid, block_kv)
    bitmap = torch.ones(q_centroid.shape[0], kv_centroid.shape[0], dtype=torch.bool)
    rows, cols = q_video.nonzero().flatten(), kv_video.nonzero().flatten()
    if rows.numel() == 0 or cols.numel() == 0:
        return bitmap
    keep = min(cols.numel(), max(1, math.ceil(density * cols.numel())))
    distance = distance_fn(q_centroid[rows], kv_centroid[cols])  # [rows, cols]
    nearest = distance.topk(keep, dim=-1, largest=False).indices
    tiles = torch.zeros(rows.numel(), cols.numel(), dtype=torch.bool).scatter_(1, nearest, True)
    tiles |= diagonal_tiles(grid.seq_len, grid.seq_len, block_q, block_kv)[rows[:, None], cols[None, :]]
    bitmap[rows[:, None], cols[None, :]] = tiles
    return bitmap


def _token_index(grid: TokenGrid, centroid: torch.Tensor) -> torch.Tensor:
    """Centroid (frame, row, col) -> position in the flattened video (float, in tokens)."""
    return (centroid[:, 0] * grid.height + centroid[:, 1]) * grid.width + centroid[:, 2]


def multi_diagonal(grid: TokenGrid, block_q: int, block_kv: int, density: float) -> torch.Tensor:
    """Multi-diagonal pattern: every query block attends to the same spatial window in all frames.

    In the flattened video, moving one frame moves H*W tokens, so "the same place in another frame" lies on the
    diagonals at offsets that are multiples of H*W. A key block's distance to a query block is the distance of
    their token positions modulo H*W (wrapped to [-H*W/2, H*W/2]); each query block keeps the ``density`` share of
    video key blocks nearest in that sense, so the window around the diagonal grows with the budget, in every frame
    alike. Returns bool [QB, KVB]."""
    _check_density("multi_diagonal", density)
    hw = float(grid.height * grid.width)

    def spatial_distance(qc: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
        offset = _token_index(grid, kc)[None, :] - _token_index(grid, qc)[:, None]
        wrapped = torch.remainder(offset + hw / 2, hw) - hw / 2
        # Tie-break towards nearer frames, so a small budget keeps the adjacent frames' windows first.
        frames_apart = (kc[None, :, 0] - qc[:, None, 0]).abs()
        return wrapped.abs() + 1e-3 * frames_apart

    return _keep_nearest(grid, block_q, block_kv, density, spatial_distance)


def vertical_stripe(
    grid: TokenGrid, block_q: int, block_kv: int, density: float, columns: torch.Tensor | None = None
) -> torch.Tensor:
    """Vertical-stripe pattern: a set of key blocks that every query block sees (global tokens), plus the diagonal.

    ``columns`` (key block indices) are the stripes, as calibration picks them per head (the key blocks that
    receive the most attention); without them, ``ceil(density * video key blocks)`` blocks spread evenly over the
    video (the same share of every frame). Tiles touching text stay dense. Returns bool [QB, KVB]."""
    _check_density("vertical_stripe", density)
    q_centroid, q_video = _block_geometry(grid, block_q)
    kv_centroid, kv_video = _block_geometry(grid, block_kv)
    qb, kvb = q_centroid.shape[0], kv_centroid.shape[0]
    bitmap = torch.ones(qb, kvb, dtype=torch.bool)
    rows, cols = q_video.nonzero().flatten(), kv_video.nonzero().flatten()
    if rows.numel() == 0 or cols.numel() == 0:
        return bitmap
    if columns is None:
        keep = min(cols.numel(), max(1, math.ceil(density * cols.numel())))
        columns = cols[torch.linspace(0, cols.numel() - 1, keep).round().long()]
    columns = torch.as_tensor(columns, dtype=torch.long).flatten()
    if columns.numel() and (columns.min() < 0 or columns.max() >= kvb):
        raise ValueError(
            f"qsparse_compiler.sparsity.vertical_stripe: columns must be key block indices in [0, {kvb}); "
            f"got min {int(columns.min())}, max {int(columns.max())}"
        )
    stripe = torch.zeros(kvb, dtype=torch.bool)
    stripe[columns] = True
    tiles = stripe[cols][None, :].expand(rows.numel(), -1).clone()
    tiles |= diagonal_tiles(grid.seq_len, grid.seq_len, block_q, block_kv)[rows[:, None], cols[None, :]]
    bitmap[rows[:, None], cols[None, :]] = tiles
    return bitmap


def skip(grid: TokenGrid, block_q: int, block_kv: int, density: float = 0.0) -> torch.Tensor:
    """Skip pattern: the head computes nothing (every row empty: out 0, lse -inf); its output is read from the
    residual cache. ``density`` is accepted for the common signature and ignored. Returns bool [QB, KVB]."""
    return torch.zeros(num_blocks(grid.seq_len, block_q), num_blocks(grid.seq_len, block_kv), dtype=torch.bool)


def random_blocks(
    q_len: int,
    kv_len: int,
    block_q: int,
    block_kv: int,
    density: float,
    batch: int = 1,
    heads: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random layout for tests and benchmarks: per (batch, head, query block), ``round(density * KVB)`` uniformly
    chosen key blocks with the diagonal always among them. Returns bool [batch, heads, QB, KVB]."""
    _check_density("random_blocks", density)
    qb, kvb = num_blocks(q_len, block_q), num_blocks(kv_len, block_kv)
    diag = diagonal_tiles(q_len, kv_len, block_q, block_kv)
    keep = min(kvb, max(int(diag.sum(-1).max()), round(density * kvb)))
    scores = torch.rand(batch, heads, qb, kvb, generator=generator) + 2.0 * diag
    chosen = scores.topk(keep, dim=-1).indices
    return torch.zeros(batch, heads, qb, kvb, dtype=torch.bool).scatter_(-1, chosen, True)


def local_3d(grid: TokenGrid, block_q: int, block_kv: int, density: float) -> torch.Tensor:
    """Diagonal (3D-local) pattern: each video query block keeps the ``density`` share of video key blocks whose
    centroids are nearest to its own in (frame, row, col) units — always including its own position (the
    diagonal). Tiles touching text are dense. Returns bool [QB, KVB]."""
    _check_density("local_3d", density)
    return _keep_nearest(grid, block_q, block_kv, density, torch.cdist)
