"""Attention on a plan's per-head patterns, as an ``AttentionInterceptor`` handler (hooks.py).

Used wherever calibration needs the sparse attention a plan implies, in plain torch: MSAD's student (msad.py), the
residual measurement of SSAR (ssar.py) and the eager plan simulation (simulate.py). The layout of a site comes from
the registry (``formats.pattern_spec.build_video_layout``), exactly as the backend builds it, cached per (spec, grid).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ..formats.pattern_spec import build_video_layout
from ..formats.patterns import TokenGrid
from .attention_maps import TileMask, sparse_attention_chunked
from .hooks import AttentionCall

__all__ = ["SparsePatternAttention", "pool_block", "row_counts"]


class SparsePatternAttention:
    """Attention handler of the student: the plan's per-head patterns on their tiles (layouts cached per grid),
    chunk-wise (sparse_attention_chunked), recording the average-pooled map for the global term when asked."""

    def __init__(
        self, specs: Mapping[str, str], block_q: int, block_kv: int, record: bool, pool_blocks: int,
        max_elements: int = 1 << 24,
    ) -> None:
        self.specs = dict(specs)
        self.max_elements = max_elements
        self.block_q, self.block_kv = block_q, block_kv
        self.record = record
        self.pool_blocks = pool_blocks
        self.maps: dict[str, torch.Tensor] = {}
        self._tiles: dict[tuple[str, TokenGrid], TileMask] = {}

    def tile_mask(self, fqn: str, grid: TokenGrid) -> TileMask:
        key = (self.specs[fqn], grid)
        if key not in self._tiles:
            layout = build_video_layout(grid, self.specs[fqn], 1.0, self.block_q, self.block_kv)
            self._tiles[key] = TileMask(layout.to_dense()[0], self.block_q, self.block_kv)
        return self._tiles[key]

    def __call__(self, call: AttentionCall) -> torch.Tensor | None:
        if call.fqn not in self.specs:
            return None
        tiles = self.tile_mask(call.fqn, call.grid)
        q_len, kv_len = call.q.shape[2], call.k.shape[2]
        pool = (pool_block(q_len, self.pool_blocks), pool_block(kv_len, self.pool_blocks)) if self.record else None
        out, mass = sparse_attention_chunked(call.q, call.k, call.v, tiles, call.scale, call.key_padding_mask,
                                             self.max_elements, pool)
        if mass is not None:
            self.maps[call.fqn] = mass / row_counts(q_len, pool[0], mass.device)
        return out.to(call.q.dtype)


def pool_block(seq_len: int, pool_blocks: int) -> int:
    """Tokens per pooling block so that a sequence of ``seq_len`` gives at most ``pool_blocks`` blocks."""
    return max(1, math.ceil(seq_len / pool_blocks))


def row_counts(seq_len: int, block: int, device: torch.device) -> torch.Tensor:
    """Queries in each pooling block [1, 1, NB, 1] (the last one may be short): pooled mass / this = row average."""
    starts = torch.arange(0, seq_len, block, device=device)
    return (torch.clamp(starts + block, max=seq_len) - starts).to(torch.float32).view(1, 1, -1, 1)
