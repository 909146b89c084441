"""Dynamic top-k block layouts: per head, keep the key blocks that pooled q.k^T scores rank highest.

    scores = block_scores(q, k, block_q, block_kv)                     # fp32 [B, H, QB, KVB], rows sum to 1
    kv_num_blocks, kv_indices = dynamic_topk_blocks(q, k, 128, 128, density=0.15)

The diagonal (key blocks overlapping the query block's own tokens) is always kept and counts towards the budget.
Two ways to spend the budget of ``density`` x tiles:
  ``mode="row"``  every query block keeps the same number of key blocks, ``max(diagonal, floor(density * KVB))``
                  (equal work per row: the kernel's programs stay balanced);
  ``mode="head"`` the head keeps its ``floor(density * QB * KVB)`` highest-scoring tiles wherever they are (rows
                  with peaked attention get more blocks, flat rows fewer), plus the diagonal.
Either way the density never exceeds the budget unless the diagonal alone does.

All of it is tensor code (the fused Triton scoring kernel on CUDA, a plain-torch reference on CPU, then
``torch.topk``/sort/scatter): no Python loops over blocks or heads and no host synchronization, so it can run in a
compiled graph every step. The counts are Python ints computed from shapes.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch

from ..formats.layout import BlockSparseLayout, bitmap_to_blocks, num_blocks
from ..formats.patterns import diagonal_tiles

__all__ = ["block_scores_reference", "estimate_block_scores", "dynamic_topk_blocks", "dynamic_topk_layout"]


def block_scores_reference(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int, scale: Optional[float] = None
) -> torch.Tensor:
    """Plain-torch (fp32) version of ``kernels.block_scores``: mean-pooled q and k per block (tails averaged over
    the tokens that exist), softmax over key blocks of ``scale * qp . kp``. Returns fp32 [B, H, QB, KVB]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    def pool(x: torch.Tensor, block: int) -> torch.Tensor:
        b, h, s, d = x.shape
        nb = num_blocks(s, block)
        padded = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block - s))
        counts = torch.clamp(s - torch.arange(nb, device=x.device) * block, max=block).float()
        return padded.view(b, h, nb, block, d).sum(3) / counts[:, None]

    scores = pool(q, block_q) @ pool(k, block_kv).transpose(-1, -2) * scale
    return torch.softmax(scores, dim=-1)


def estimate_block_scores(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int, scale: Optional[float] = None
) -> torch.Tensor:
    """The fused Triton kernel for CUDA tensors (head dims that are powers of two), else the torch reference."""
    d = q.shape[-1]
    if q.is_cuda and d >= 16 and d & (d - 1) == 0:
        from ..kernels.block_scores import block_scores

        return block_scores(q, k, block_q, block_kv, scale)
    return block_scores_reference(q, k, block_q, block_kv, scale)


def dynamic_topk_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    block_q: int,
    block_kv: int,
    density: float,
    *,
    mode: str = "row",
    scale: Optional[float] = None,
    scores: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic layout (kv_num_blocks int32 [B, H, QB], kv_indices int32 [B, H, QB, KVB]) for self-attention of
    q (B, H, S, D) over k (B, H, S, D). ``scores`` (fp32 [B, H, QB, KVB]) skips the estimate when given."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"qsparse_compiler.ops.dynamic_layout.dynamic_topk_blocks: density={density} must be in (0, 1]")
    if mode not in ("row", "head"):
        raise ValueError(f"qsparse_compiler.ops.dynamic_layout.dynamic_topk_blocks: mode={mode!r}; use 'row' or 'head'")
    q_len, kv_len = q.shape[2], k.shape[2]
    qb, kvb = num_blocks(q_len, block_q), num_blocks(kv_len, block_kv)
    if scores is None:
        scores = estimate_block_scores(q, k, block_q, block_kv, scale)
    if scores.shape[-2:] != (qb, kvb):
        raise ValueError(
            f"qsparse_compiler.ops.dynamic_layout.dynamic_topk_blocks: scores {tuple(scores.shape)} do not match "
            f"QB={qb}, KVB={kvb} for q_len={q_len}, kv_len={kv_len}, blocks {block_q}x{block_kv}"
        )
    # The diagonal is built on the scores' device (no copy from the host); its counts come from the host's copy,
    # so no value is read back from the device.
    diag = diagonal_tiles(q_len, kv_len, block_q, block_kv, device=scores.device)
    diag_per_row, diag_total = _diagonal_counts(q_len, kv_len, block_q, block_kv)
    # Probabilities lie in [0, 1]: adding 2 ranks every diagonal tile above every other tile.
    ranked = scores + 2.0 * diag
    b, h = scores.shape[:2]
    if mode == "row":
        keep = min(kvb, max(diag_per_row, math.floor(density * kvb)))
        chosen = ranked.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values.to(torch.int32)
        kv_indices = torch.zeros((b, h, qb, kvb), dtype=torch.int32, device=scores.device)
        kv_indices[..., :keep] = chosen
        kv_num_blocks = torch.full((b, h, qb), keep, dtype=torch.int32, device=scores.device)
        return kv_num_blocks, kv_indices
    keep = min(qb * kvb, max(diag_total, math.floor(density * qb * kvb)))
    chosen = ranked.flatten(2).topk(keep, dim=-1, sorted=False).indices
    bitmap = torch.zeros((b, h, qb * kvb), dtype=torch.bool, device=scores.device).scatter_(-1, chosen, True)
    return bitmap_to_blocks(bitmap.view(b, h, qb, kvb))


@lru_cache(maxsize=64)
def _diagonal_counts(q_len: int, kv_len: int, block_q: int, block_kv: int) -> tuple[int, int]:
    """(most diagonal tiles in one row, all diagonal tiles), computed on the host once per geometry."""
    diag = diagonal_tiles(q_len, kv_len, block_q, block_kv)
    return int(diag.sum(-1).max()), int(diag.sum())


def dynamic_topk_layout(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int, density: float, **kwargs
) -> BlockSparseLayout:
    """``dynamic_topk_blocks`` wrapped (and validated, which syncs) as a ``BlockSparseLayout`` for inspection."""
    kv_num_blocks, kv_indices = dynamic_topk_blocks(q, k, block_q, block_kv, density, **kwargs)
    return BlockSparseLayout(kv_num_blocks, kv_indices, block_q, block_kv, q.shape[2], k.shape[2])
