"""Block-pooled attention maps, computed query chunk by query chunk (S x S is never held at once).

    mass[b, h, m, n] = sum over queries i in block m, keys j in block n of softmax_j(scale * q_i . k_j)

Each query row of the softmax sums to 1, so a query block's row of ``mass`` sums to the number of queries in it, and
``mass`` summed over a set of tiles divided by its total is the *recall* of those tiles: the share of the dense
attention probability they keep. Sparse-vDiT's pattern search and MSAD's global term both read these maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..formats.layout import num_blocks
from ..formats.patterns import TokenGrid

__all__ = ["TileMask", "pooled_attention_mass", "attention_received", "pool_probabilities", "masked_attention", "sparse_attention_chunked", "video_block_flags", "video_tile_mask", "query_chunk_rows"]


@dataclass(frozen=True)
class TileMask:
    """A sparse layout as a tile bitmap bool [H|1, QB, KVB] of ``block_q`` x ``block_kv`` tiles."""

    bitmap: torch.Tensor
    block_q: int
    block_kv: int

    def rows(self, start: int, count: int, kv_len: int) -> torch.Tensor:
        """Token mask bool [1, H|1, count, kv_len] of query rows start .. start + count (start % block_q == 0)."""
        first = start // self.block_q
        blocks = self.bitmap[:, first : first + num_blocks(count, self.block_q)]
        mask = blocks.repeat_interleave(self.block_q, dim=1)[:, :count]
        return mask.repeat_interleave(self.block_kv, dim=2)[:, :, :kv_len].unsqueeze(0)


def query_chunk_rows(batch_heads: int, kv_len: int, block_q: int, max_elements: int) -> int:
    """Rows per query chunk: a multiple of ``block_q`` (chunks never split a block), at least one block."""
    rows = max_elements // max(1, batch_heads * kv_len)
    return max(block_q, rows // block_q * block_q)


def pooled_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_q: int,
    block_kv: int,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    max_elements: int = 1 << 24,
    tiles: TileMask | None = None,
) -> torch.Tensor:
    """Attention probability mass per tile: fp32 [B, H, QB, KVB] for q (B, H, Sq, D), k (B, H, Skv, D).

    Differentiable (MSAD's global term back-propagates through it). ``key_padding_mask`` (bool, True = the key
    takes part, broadcastable to (B, 1, 1, Skv)) removes padded keys as SDPA does. ``tiles`` restricts the softmax
    to a sparse layout's tiles (the attention a sparse kernel computes), expanded chunk by chunk.
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "qsparse_compiler.calibration.attention_maps: q and k must be (B, H, S, D) with matching B, H, D; got "
            f"q={tuple(q.shape)}, k={tuple(k.shape)}"
        )
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    qb, kvb = num_blocks(q_len, block_q), num_blocks(kv_len, block_kv)
    # Chunks hold whole pooling blocks and whole layout blocks.
    step = block_q if tiles is None else math.lcm(block_q, tiles.block_q)
    rows = query_chunk_rows(batch * heads, kv_len, step, max_elements)
    chunks = _probability_chunks(q, k, scale, key_padding_mask, rows, tiles)
    pieces = [pool_probabilities(p, block_q, block_kv) for p in chunks]
    return torch.cat(pieces, dim=2)[:, :, :qb]


def pool_probabilities(probs: torch.Tensor, block_q: int, block_kv: int) -> torch.Tensor:
    """Sum attention probabilities [B, H, Sq, Skv] into tiles [B, H, ceil(Sq / block_q), ceil(Skv / block_kv)]."""
    batch, heads, q_len, kv_len = probs.shape
    qb, kvb = num_blocks(q_len, block_q), num_blocks(kv_len, block_kv)
    padded = torch.nn.functional.pad(probs, (0, kvb * block_kv - kv_len, 0, qb * block_q - q_len))
    return padded.view(batch, heads, qb, block_q, kvb, block_kv).sum((3, 5))


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention restricted to ``token_mask`` (bool, broadcastable to [B, H, Sq, Skv]) in fp32, differentiable:
    (out [B, H, Sq, D], probs [B, H, Sq, Skv]). The math of qsparse::sparse_attention's reference (a row with no
    key gives 0), for calibration-sized sequences."""
    mask = token_mask if key_padding_mask is None else token_mask & key_padding_mask.to(torch.bool)
    scores = (q.to(torch.float32) @ k.to(torch.float32).transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs @ v.to(torch.float32), probs


def sparse_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tiles: TileMask,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    max_elements: int = 1 << 24,
    pool: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention on a layout's tiles, query chunk by query chunk: (out fp32 [B, H, Sq, D], tile mass of its softmax
    pooled to ``pool`` = (block_q, block_kv) [B, H, QB, KVB], or None).

    Memory-bounded in training too: with autograd on, each chunk runs under activation checkpointing, so the backward
    recomputes the chunk's probabilities instead of keeping S x S of them. Same math as ``masked_attention``.
    """
    from torch.utils.checkpoint import checkpoint

    batch, heads, q_len, _ = q.shape
    step = tiles.block_q if pool is None else math.lcm(tiles.block_q, pool[0])
    rows = query_chunk_rows(batch * heads, k.shape[2], step, max_elements)
    kf, vf = k.to(torch.float32), v.to(torch.float32)

    def chunk(qc: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, start: int):
        scores = (qc.to(torch.float32) @ kf.transpose(-1, -2)) * scale
        mask = tiles.rows(start, qc.shape[2], kf.shape[2]).to(scores.device)
        if key_padding_mask is not None:
            mask = mask & key_padding_mask.to(torch.bool)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        pooled = pool_probabilities(probs, *pool) if pool is not None else probs.new_zeros(())
        return probs @ vf, pooled

    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs, pooled = [], []
    for start in range(0, q_len, rows):
        qc = q[:, :, start : start + rows]
        if needs_grad:
            out, mass = checkpoint(chunk, qc, kf, vf, start, use_reentrant=False)
        else:
            out, mass = chunk(qc, kf, vf, start)
        outs.append(out)
        pooled.append(mass)
    out = torch.cat(outs, dim=2)
    if pool is None:
        return out, None
    return out, torch.cat(pooled, dim=2)[:, :, : num_blocks(q_len, pool[0])]


def attention_received(
    q: torch.Tensor, k: torch.Tensor, scale: float, key_padding_mask: torch.Tensor | None = None,
    max_elements: int = 1 << 24,
) -> torch.Tensor:
    """Attention each key token receives, summed over queries: fp32 [B, H, Skv] (S²Q's token saliency)."""
    rows = query_chunk_rows(q.shape[0] * q.shape[1], k.shape[2], 1, max_elements)
    total = None
    for probs in _probability_chunks(q, k, scale, key_padding_mask, rows):
        part = probs.sum(2)
        total = part if total is None else total + part
    return total


def _probability_chunks(q, k, scale, key_padding_mask, rows, tiles=None):
    """Softmax rows of ``rows`` queries at a time: [B, H, rows, Skv] fp32, the only large temporary."""
    kf = k.to(torch.float32).transpose(-1, -2)
    for start in range(0, q.shape[2], rows):
        scores = (q[:, :, start : start + rows].to(torch.float32) @ kf) * scale
        if key_padding_mask is not None:
            scores = scores.masked_fill(~key_padding_mask.to(torch.bool), float("-inf"))
        if tiles is not None:
            scores = scores.masked_fill(~tiles.rows(start, scores.shape[2], k.shape[2]).to(scores.device), float("-inf"))
        yield torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked row attends nothing


def video_block_flags(grid: TokenGrid, block: int) -> torch.Tensor:
    """bool [NB]: blocks whose tokens are all video (the tiles a pattern may drop; text tiles are always dense)."""
    nb = num_blocks(grid.seq_len, block)
    first = torch.arange(nb) * block
    last = torch.clamp(first + block, max=grid.seq_len)
    return (first >= grid.video_start) & (last <= grid.video_end)


def video_tile_mask(grid: TokenGrid, block_q: int, block_kv: int) -> torch.Tensor:
    """bool [QB, KVB]: the video x video tiles, the region the density budget is counted over."""
    return video_block_flags(grid, block_q)[:, None] & video_block_flags(grid, block_kv)[None, :]
