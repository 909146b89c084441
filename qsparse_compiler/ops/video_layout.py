"""``qsparse::video_block_layout`` — the block layout of a video attention, built for the grid it runs on.

    video_block_layout(q: (B, H, S, D), frames, height, width, video_start: SymInt, pattern: str,
                       density: float, block_q: int, block_kv: int, complement: bool = False)
        -> (kv_num_blocks int32 [1, H|1, QB], kv_indices int32 [1, H|1, QB, KVB])

``q`` is read for its sequence length and device only. ``pattern`` is a spec: ``name[:density]`` for every head, or
one such entry per head separated by ``;`` (then the layout has H = number of entries); an entry without a density
uses ``density``. Names are the keys of ``PATTERNS`` (formats/pattern_spec.py) (``dense`` computes every tile). ``frames = height = width = 0``
means "the grid of the current forward" (ops/context.py), for blocks compiled on their own.

The layout depends on the token grid, which changes with frame count and resolution (and is symbolic under dynamic
shapes), so it is built at run time — once per grid: results are cached on the host and per device, and each call
returns a copy (op outputs must not alias).

``complement=True`` returns the complement of that layout instead (formats/complement.py: the tiles it skips), which
a refresh of the residual cache attends over (ops/refresh_attention.py). It is built together with the layout and
cached with it, so a refresh never rebuilds it: the call is one copy of cached int32 tensors, like the layout's.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..formats.complement import complement_blocks
from ..formats.layout import BlockSparseLayout, num_blocks
from ..formats.pattern_spec import build_video_layout, parse_pattern_spec
from ..formats.patterns import TokenGrid
from .context import current_video_grid

__all__ = ["video_block_layout", "cached_video_layout"]


@lru_cache(maxsize=64)
def _cached_layouts(key: tuple, device: torch.device) -> tuple[BlockSparseLayout, BlockSparseLayout]:
    """(layout, its complement) of one grid on one device, built together (a refresh then finds its complement)."""
    pattern, density, block_q, block_kv, frames, height, width, seq_len, video_start = key
    layout = build_video_layout(
        TokenGrid(frames, height, width, seq_len, video_start), pattern, density, block_q, block_kv
    )
    layout = BlockSparseLayout(
        layout.kv_num_blocks.to(device), layout.kv_indices.to(device), block_q, block_kv, seq_len, seq_len
    )
    complement = BlockSparseLayout(*complement_blocks(layout.kv_num_blocks, layout.kv_indices), block_q, block_kv,
                                   seq_len, seq_len)
    return layout, complement


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
    complement: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    if frames == 0:
        # A regionally compiled block: the grid of the current forward comes from the runtime context.
        grid = current_video_grid()
        if grid is None:
            raise RuntimeError(
                "qsparse::video_block_layout: this block was compiled without its video grid and none is set for "
                "this forward; compile through qs.optimize(...), or wrap the call in "
                "qsparse_compiler.ops.context.video_grid((frames, height, width))"
            )
        frames, height, width = grid
    layout = cached_video_layout(q.shape[2], q.device, frames, height, width, video_start, pattern, density, block_q,
                                 block_kv, complement)
    return layout.kv_num_blocks.clone(), layout.kv_indices.clone()


def cached_video_layout(seq_len: int, device: torch.device, frames: int, height: int, width: int, video_start: int,
                        pattern: str, density: float, block_q: int, block_kv: int,
                        complement: bool = False) -> BlockSparseLayout:
    """The layout (``complement``: its complement) ``qsparse::video_block_layout`` returns copies of, both built once
    per grid and device.

    The backend's runtime wrapper calls this before a compiled graph runs (compiler/backend.py): the cached device
    tensors (the complement's too) then never come into being inside a CUDA-graph memory pool, where a tensor
    outliving the graph is an error."""
    key = (pattern, float(density), block_q, block_kv, frames, height, width, seq_len, video_start)
    return _cached_layouts(key, device)[1 if complement else 0]


@video_block_layout.register_fake
def _(q, frames, height, width, video_start, pattern, density, block_q, block_kv, complement=False):
    seq_len = q.shape[2]
    qb, kvb = num_blocks(seq_len, block_q), num_blocks(seq_len, block_kv)
    heads = len(parse_pattern_spec(pattern, density))
    return (
        q.new_empty((1, heads, qb), dtype=torch.int32),
        q.new_empty((1, heads, qb, kvb), dtype=torch.int32),
    )
