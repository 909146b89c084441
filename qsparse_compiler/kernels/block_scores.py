"""Block-level attention estimate for dynamic sparsity (Triton): pooled q.k^T per (query block, key block).

    block_scores(q, k, block_q, block_kv, scale=None) -> probs fp32 [B, H, QB, KVB]

For each (batch, head): mean-pool q over query blocks of ``block_q`` tokens and k over key blocks of ``block_kv``
tokens (tail blocks average over the tokens that exist), score every pair of pooled vectors, ``scale * qp . kp``,
and normalise each query block's row with a softmax over the key blocks. The result estimates how much attention
mass a query block sends to each key block; ``torch.topk`` over it picks a dynamic layout (see
``qsparse_compiler.sparsity.dynamic``).

One program handles TILE_QB query blocks of one head: it pools them once, then streams over all key blocks —
loading each as whole contiguous tiles, pooling it, scoring it against the pooled queries in fp32 (the estimate
feeds a ranking, and near-ties should rank as the fp32 reference ranks them), writing the raw scores and keeping
a running row max and sum — and a second pass rescales the written rows in place (TILE_KB columns at a time).
Everything stays on the device and no value is read back to the host.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["block_scores", "CONFIGS", "keep_config"]

_LOG2E = 1.4426950408889634


@triton.jit
def _pool_block(base, stride_row, block, SEQ, BLOCK: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Mean of the rows of token block ``block`` (rows block*BLOCK ... that exist) -> fp32 [HEAD_DIM].

    Reads the block as whole [ROWS, HEAD_DIM] tiles (contiguous rows: wide, pipelined loads); the row loop is
    unrolled so that the caller's loop over blocks stays the innermost loop the compiler software-pipelines."""
    offs_d = tl.arange(0, HEAD_DIM)
    total = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for r0 in tl.static_range(0, BLOCK, ROWS):
        offs_r = r0 + tl.arange(0, ROWS)
        rows = block * BLOCK + offs_r
        ok = (rows < SEQ) & (offs_r < BLOCK)
        x = tl.load(base + rows[:, None] * stride_row + offs_d[None, :], mask=ok[:, None], other=0.0)
        total += tl.sum(x.to(tl.float32), 0)
    count = tl.minimum(SEQ - block * BLOCK, BLOCK)
    return total / tl.maximum(count, 1).to(tl.float32)


@triton.jit
def _block_scores_kernel(
    Q, K, Out,
    scale_log2,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_om,
    H, SEQ_Q, SEQ_KV, NQB, NKB,
    HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    ROWS_Q: tl.constexpr,
    ROWS_KV: tl.constexpr,
    TILE_QB: tl.constexpr,
    TILE_KB: tl.constexpr,
):
    tl.static_assert(ROWS_Q >= 1 and ROWS_KV >= 1, "row tiles must be non-empty")
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    lanes = tl.arange(0, TILE_QB)
    qblocks = pid_t * TILE_QB + lanes
    q_ok = qblocks < NQB

    # Pooled queries of this program's TILE_QB blocks, one row at a time. Blocks past NQB read nothing (all rows
    # are past SEQ_Q) and are never stored.
    q_base = Q + b * stride_qb + h * stride_qh
    q_mean = tl.zeros([TILE_QB, HEAD_DIM], dtype=tl.float32)
    for i in range(TILE_QB):
        row = _pool_block(q_base, stride_qm, pid_t * TILE_QB + i, SEQ_Q, BLOCK_Q, ROWS_Q, HEAD_DIM)
        q_mean = tl.where((lanes == i)[:, None], row[None, :], q_mean)

    # Pass 1: per key block, pool it, score it against every pooled query (fp32 multiply-add: exact enough to rank
    # as the fp32 reference ranks), store the raw score, keep each row's running max and sum.
    k_base = K + b * stride_kb + h * stride_kh
    o_row = Out + b * stride_ob + h * stride_oh + qblocks * stride_om
    m_i = tl.full([TILE_QB], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TILE_QB], dtype=tl.float32)
    for kb in range(0, NKB):
        k_mean = _pool_block(k_base, stride_kn, kb, SEQ_KV, BLOCK_KV, ROWS_KV, HEAD_DIM)
        s = tl.sum(q_mean * k_mean[None, :], 1) * scale_log2
        tl.store(o_row + kb, s, mask=q_ok)
        m_new = tl.maximum(m_i, s)
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.math.exp2(s - m_new)
        m_i = m_new

    # Pass 2 reads what this program's threads wrote, possibly from other threads: order them first.
    tl.debug_barrier()
    o_tile = Out + b * stride_ob + h * stride_oh + qblocks[:, None] * stride_om
    for kb0 in range(0, NKB, TILE_KB):
        kblocks = kb0 + tl.arange(0, TILE_KB)
        ok = q_ok[:, None] & (kblocks < NKB)[None, :]
        s = tl.load(o_tile + kblocks[None, :], mask=ok, other=float("-inf"))
        tl.store(o_tile + kblocks[None, :], tl.math.exp2(s - m_i[:, None]) / l_i[:, None], mask=ok)


CONFIGS: list[triton.Config] = [
    triton.Config({"TILE_QB": tq, "TILE_KB": tk}, num_warps=w, num_stages=s)
    for tq, tk, w, s in [(32, 64, 8, 3), (16, 64, 8, 3), (16, 16, 4, 1)]
]


def keep_config(config: triton.Config, num_q_blocks: int) -> bool:
    """Keep query tiles no larger than the problem needs (several programs per head keep the GPU busy)."""
    return config.kwargs["TILE_QB"] <= max(16, triton.next_power_of_2(num_q_blocks) // 4)


def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_q: int,
    block_kv: int,
    scale: Optional[float] = None,
    *,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """Softmax-normalised pooled block scores, fp32 [B, H, ceil(Sq/block_q), ceil(Skv/block_kv)] (rows sum to 1)."""
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"qsparse_compiler.kernels.block_scores: q and k must be (B, H, S, D) with matching B, H, D; "
            f"got q={tuple(q.shape)}, k={tuple(k.shape)}"
        )
    d = q.shape[3]
    if d < 16 or d & (d - 1):
        raise ValueError(f"qsparse_compiler.kernels.block_scores: head dim {d} must be a power of two >= 16")
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"qsparse_compiler.kernels.block_scores: blocks must be >= 1, got {block_q}x{block_kv}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    nqb, nkb = triton.cdiv(sq, block_q), triton.cdiv(skv, block_kv)
    out = torch.empty((b, h, nqb, nkb), dtype=torch.float32, device=q.device)
    if config is None:
        config = next(
            {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in CONFIGS if keep_config(c, nqb)
        )
    grid = (triton.cdiv(nqb, config["TILE_QB"]), b * h)
    _block_scores_kernel[grid](
        q, k, out, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, sq, skv, nqb, nkb,
        HEAD_DIM=d, BLOCK_Q=block_q, BLOCK_KV=block_kv,
        ROWS_Q=min(triton.next_power_of_2(block_q), 128), ROWS_KV=min(triton.next_power_of_2(block_kv), 128),
        TILE_QB=config["TILE_QB"], TILE_KB=config["TILE_KB"],
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2),
    )
    return out
