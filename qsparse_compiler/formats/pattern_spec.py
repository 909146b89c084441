"""Pattern specs: the registry of static block-sparse attention patterns by name, the spec parser, and the layout
of a spec on a token grid.

A spec is ``name[:density]`` for every head, or one such entry per head separated by ``;`` (``"local3d:0.15;dense"``);
an entry without a density uses the caller's default. Names are the keys of ``PATTERNS`` (``dense`` computes every
tile; the others are documented in formats/patterns.py). ``qsparse::video_block_layout`` (ops/video_layout.py) builds
these layouts at run time; configs, plans and the calibration search validate and enumerate names here.
"""

from __future__ import annotations

import torch

from .layout import BlockSparseLayout, num_blocks
from .patterns import TokenGrid, local_3d, multi_diagonal, skip, vertical_stripe

__all__ = ["PATTERNS", "parse_pattern_spec", "build_video_layout"]


def _dense(grid: TokenGrid, block_q: int, block_kv: int, density: float) -> torch.Tensor:
    return torch.ones(num_blocks(grid.seq_len, block_q), num_blocks(grid.seq_len, block_kv), dtype=torch.bool)


# Static patterns by spec name (patterns.py documents each): pattern(grid, block_q, block_kv, density).
PATTERNS = {
    "local3d": local_3d, "multidiag": multi_diagonal, "stripe": vertical_stripe, "skip": skip, "dense": _dense,
}


def parse_pattern_spec(spec: str, density: float) -> list[tuple[str, float]]:
    """``"local3d:0.15;dense"`` -> [("local3d", 0.15), ("dense", density)]; errors name the bad entry."""
    entries = []
    for entry in spec.split(";"):
        name, _, value = entry.strip().partition(":")
        if name not in PATTERNS:
            raise ValueError(
                f"qsparse::video_block_layout: unknown pattern {name!r} in spec {spec!r}; known: {sorted(PATTERNS)}"
            )
        try:
            entries.append((name, float(value) if value else float(density)))
        except ValueError:
            raise ValueError(f"qsparse::video_block_layout: bad density {value!r} in spec {spec!r}") from None
    return entries


def build_video_layout(grid: TokenGrid, pattern: str, density: float, block_q: int, block_kv: int) -> BlockSparseLayout:
    """The layout of a pattern spec on ``grid`` as [1, H, QB, KVB] (H = 1 for a single entry)."""
    bitmaps = [PATTERNS[name](grid, block_q, block_kv, d) for name, d in parse_pattern_spec(pattern, density)]
    bitmap = torch.stack(bitmaps)[None]
    return BlockSparseLayout.from_bitmap(bitmap, block_q, block_kv, grid.seq_len, grid.seq_len)
