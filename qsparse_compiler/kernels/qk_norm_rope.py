"""q/k RMS-norm + rotary embedding in one pass over q and k (Triton).

    qk_norm_rope(q, k, q_weight, k_weight, cos, sin, heads, eps, norm) -> (q_out, k_out)

Contract (the kernel of ``qsparse::qk_norm_rope``):
    q, k       (B, S, H*D) bf16 / fp16 / fp32, the q/k projections' outputs; any batch and token strides, the
               feature dimension contiguous. Same shape and dtype.
    q_weight, k_weight  the norms' weights, both given or both None: (H*D,) for ``norm="across_heads"`` (Wan's
               RMSNorm over all heads' features), (D,) for ``norm="per_head"`` (an RMSNorm over each head's D features,
               as HunyuanVideo-style attention applies it after splitting the heads).
    cos, sin   per-token rotation tables of D/2 entries, (B|1, S, 1, D/2) or (S, D/2), any strides and float dtype:
               pair i of every head turns by the angle whose cosine is cos[.., s, i]. Wan's processor reads them as
               ``freqs_cos[..., 0::2]`` and ``freqs_sin[..., 1::2]`` of its (1, S, 1, D) tables: those strided views
               are passed as they are.
    out        q_out, k_out (B, S, H, D) contiguous, dtype of q: the layout the attention ops read through the
               graph's own permute to (B, H, S, D) (``qsparse::sparse_attention`` and ``residual_attention`` take any
               strides with a contiguous head dimension), so the rewrite leaves everything after the rope as it was.

Math, per token row x (fp32 throughout, one rounding to the output dtype at the end):
    y = x * rsqrt(mean(x^2) + eps) * w         mean over all H*D features (across_heads) or each head's D (per_head)
    out[2i]   = y[2i] * cos[i] - y[2i+1] * sin[i]     (the interleaved-pair form of diffusers' WanAttnProcessor and
    out[2i+1] = y[2i] * sin[i] + y[2i+1] * cos[i]      of its ``apply_rotary_emb(use_real_unbind_dim=-1)``)
The half-split form (pairs (i, i + D/2)) has no kernel mode: none of the supported models (Wan, HunyuanVideo,
CogVideoX) uses it.

Numerics: the unfused graph rounds twice (the norm's output to the model dtype, then the rope's); this kernel rounds
once, so its error against an fp32 evaluation of the same graph is at most that of the unfused graph (tests check it
with the 2x rule). Under the CPU interpreter the final fp32 -> bf16 cast truncates, so the value is first rounded onto
the bf16 grid (``rounding.round_to_bf16_grid``, interpreter only).

Why: Inductor's fused kernel for this subgraph (``triton_red_fused__fused_rms_norm_add_copy_mul_slice_sub_unbind_view``
in the H200 profile of the Wan-1.3B reuse step) moves the minimum bytes but runs ~15x below the bandwidth limit; here
one program owns ROWS whole token rows (all heads), loads each element once as (row, head, feature) with 16-byte
accesses, views it as (row, head, pair, 2) in registers, reduces the squares, applies weight and rotation, and stores
each element once: 2 x (read + write) of q and k plus the D/2-entry tables per token. q and k are the two halves of
one launch (grid axis 1). (Until 2026-12-08 the (row, head, pair, 2) tile was loaded directly: 4-byte accesses and a
layout change through shared memory on sm_90, 28.8 instead of 26.1 instructions per element; the H100's 0.355 ms
were measured with that form.)

Where an 8-bit attention would hook in: the rotated tile of one head is in registers when it is stored, so a
per-(token, head) amax and an int8 / fp8 code store are a reduction and a store added at ``_store_rotated`` (codes plus
one fp32 scale per token and head) - no extra pass over q or k.

Launch configurations (``LAUNCH_CONFIGS``) are data: rows per program and warps by the padded row width. They keep
<= 64 fp32 values per thread. ``benchmarks/bench_membound.py`` times each candidate at workload W; the 2048-wide
default (Wan-1.3B) was its measured best on an H100 with the earlier (head, pair, 2) loads (BENCHMARKS.md,
"memory-bound fusions"); the 16-byte form is not yet timed, nor are the other widths' defaults.

This module imports nothing from qsparse_compiler outside kernels/ (kernels/ rule).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .rounding import round_to_bf16_grid

__all__ = ["qk_norm_rope", "unsupported_reason", "NORMS", "QkLaunch", "LAUNCH_CONFIGS", "launch_config"]

NORMS = ("across_heads", "per_head")
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class QkLaunch:
    """One program normalizes and rotates ``rows`` token rows with ``num_warps`` warps."""

    rows: int
    num_warps: int


# By padded row width (next_pow2(H) * next_pow2(D), the register tile of one token): candidate launches, the first
# is the default. Wan-1.3B's rows are 12 x 128 -> 16 x 128 = 2048 values.
LAUNCH_CONFIGS: dict[int, tuple[QkLaunch, ...]] = {
    512: (QkLaunch(8, 4), QkLaunch(16, 8), QkLaunch(4, 4)),
    1024: (QkLaunch(4, 4), QkLaunch(8, 8), QkLaunch(2, 4)),
    2048: (QkLaunch(1, 4), QkLaunch(2, 4), QkLaunch(4, 8), QkLaunch(8, 8)),
    4096: (QkLaunch(1, 4), QkLaunch(2, 8), QkLaunch(1, 8)),
    8192: (QkLaunch(1, 8), QkLaunch(1, 16)),
}
_MAX_ROW_TILE = max(LAUNCH_CONFIGS)


def _row_tile(heads: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, padded row width)."""
    block_h, block_half = triton.next_power_of_2(heads), max(1, triton.next_power_of_2(head_dim // 2))
    return block_h, block_half, block_h * block_half * 2


def launch_config(heads: int, head_dim: int) -> tuple[QkLaunch, ...]:
    """The candidate launches for rows of ``heads`` x ``head_dim`` (the first is the default)."""
    width = max(_row_tile(heads, head_dim)[2], min(LAUNCH_CONFIGS))
    return LAUNCH_CONFIGS[width]


@triton.jit
def _store_rotated(out_ptr, offsets, mask, o1, o2, ROUND_BF16: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # (ROWS, BLOCK_H, BLOCK_HALF, 2) -> (ROWS, BLOCK_H, 2 * BLOCK_HALF): pair i back at columns 2i, 2i+1, each
    # thread's values contiguous again (16-byte stores).
    out = tl.reshape(tl.join(o1, o2), (ROWS, BLOCK_H, 2 * BLOCK_HALF))
    if ROUND_BF16:
        out = round_to_bf16_grid(out)  # CPU interpreter only: its bf16 cast truncates (kernels/rounding.py)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr,
    M, S,
    stride_qb, stride_qs, stride_kb, stride_ks,
    stride_cb, stride_cs, stride_ci, stride_sb, stride_ss, stride_si,
    eps,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ACROSS_HEADS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    W_HEAD_STRIDE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    tl.static_assert(HEAD_DIM % 2 == 0, "qk_norm_rope: the rotation pairs features, HEAD_DIM must be even")
    HALF: tl.constexpr = HEAD_DIM // 2
    # q and k are the two halves of grid axis 1: same shapes, their own strides and weights.
    if tl.program_id(1) == 0:
        x_ptr, out_ptr, w_ptr, stride_b, stride_s = q_ptr, q_out_ptr, q_w_ptr, stride_qb, stride_qs
    else:
        x_ptr, out_ptr, w_ptr, stride_b, stride_s = k_ptr, k_out_ptr, k_w_ptr, stride_kb, stride_ks
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    heads = tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_HALF)
    dims = tl.arange(0, 2 * BLOCK_HALF)
    row_ok = rows < M
    batch = (rows // S).to(tl.int64)  # 64-bit: B * S * H * D passes 2**31 at 10^5 tokens x 5,120 features
    token = (rows % S).to(tl.int64)
    # Column of (head, feature) inside a token row, as a (BLOCK_H, 2 * BLOCK_HALF) tile: loaded with the features
    # contiguous (16-byte loads), then viewed as (head, pair, 2) and split in registers. Loading the (head, pair, 2)
    # tile directly gave 4-byte accesses and a shared-memory layout change on sm_90 (tools/sm90_membound_report.py).
    cols = heads[:, None] * HEAD_DIM + dims[None, :]
    col_ok = (heads < HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    mask = row_ok[:, None, None] & col_ok[None, :, :]
    x = tl.load(x_ptr + (batch * stride_b + token * stride_s)[:, None, None] + cols[None, :, :],
                mask=mask, other=0.0).to(tl.float32)
    # (ROWS, BLOCK_H, BLOCK_HALF) each: even and odd features of each pair
    x1, x2 = tl.split(tl.reshape(x, (ROWS, BLOCK_H, BLOCK_HALF, 2)))

    squares = tl.sum(x1 * x1 + x2 * x2, axis=2)  # (ROWS, BLOCK_H); padded lanes hold zeros
    if ACROSS_HEADS:
        rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=1) / (HEADS * HEAD_DIM) + eps)
        y1, y2 = x1 * rstd[:, None, None], x2 * rstd[:, None, None]
    else:
        rstd = 1.0 / tl.sqrt(squares / HEAD_DIM + eps)
        y1, y2 = x1 * rstd[:, :, None], x2 * rstd[:, :, None]
    if HAS_WEIGHT:
        # (H*D,) across heads (W_HEAD_STRIDE = D); (D,) per head, the same D weights for every head (stride 0).
        w = tl.load(w_ptr + heads[:, None] * W_HEAD_STRIDE + dims[None, :], mask=col_ok, other=0.0).to(tl.float32)
        w1, w2 = tl.split(tl.reshape(w, (BLOCK_H, BLOCK_HALF, 2)))
        y1, y2 = y1 * w1[None, :, :], y2 * w2[None, :, :]

    table_mask = row_ok[:, None] & (pairs < HALF)[None, :]
    cos = tl.load(cos_ptr + (batch * stride_cb + token * stride_cs)[:, None] + pairs[None, :] * stride_ci,
                  mask=table_mask, other=0.0).to(tl.float32)[:, None, :]
    sin = tl.load(sin_ptr + (batch * stride_sb + token * stride_ss)[:, None] + pairs[None, :] * stride_si,
                  mask=table_mask, other=0.0).to(tl.float32)[:, None, :]
    out_offsets = rows.to(tl.int64)[:, None, None] * (HEADS * HEAD_DIM) + cols[None, :, :]
    _store_rotated(out_ptr, out_offsets, mask, y1 * cos - y2 * sin, y1 * sin + y2 * cos, ROUND_BF16, ROWS, BLOCK_H,
                   BLOCK_HALF)


def _table_strides(table: torch.Tensor, batch: int, seq_len: int, half: int) -> Optional[tuple[int, int, int]]:
    """(batch, token, pair) strides of a (B|1, S, 1, D/2) or (S, D/2) table; None when the shape does not fit."""
    if table.ndim == 2 and tuple(table.shape) == (seq_len, half):
        return 0, table.stride(0), table.stride(1)
    if table.ndim == 4 and table.shape[0] in (1, batch) and tuple(table.shape[1:]) == (seq_len, 1, half):
        return (table.stride(0) if table.shape[0] > 1 else 0), table.stride(1), table.stride(3)
    return None


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, q_weight: Optional[torch.Tensor],
                       k_weight: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, heads: int,
                       norm: str) -> Optional[str]:
    """Why the kernel cannot take these inputs (None: it can). Works on meta and fake tensors too."""
    if norm not in NORMS:
        return f"norm={norm!r}; use one of {NORMS}"
    if q.ndim != 3 or q.shape != k.shape:
        return f"q and k must be (B, S, H*D) of one shape, got q={tuple(q.shape)} k={tuple(k.shape)}"
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype:
        return f"dtypes q={q.dtype} k={k.dtype}; expected one of bf16, fp16, fp32 for both"
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        return f"the feature dimension must be contiguous (q strides {q.stride()}, k strides {k.stride()})"
    batch, seq_len, features = q.shape
    if heads <= 0 or features % heads or (features // heads) % 2:
        return f"{features} features do not split into {heads} heads of an even head dim"
    head_dim = features // heads
    if _row_tile(heads, head_dim)[2] > _MAX_ROW_TILE:
        return f"a token row of {heads} heads x {head_dim} pads to more than {_MAX_ROW_TILE} values (register tile)"
    if (q_weight is None) != (k_weight is None):
        return "q and k norms must both have a weight or both have none"
    expected = features if norm == "across_heads" else head_dim
    for name, weight in (("q_weight", q_weight), ("k_weight", k_weight)):
        if weight is not None and (weight.ndim != 1 or weight.shape[0] != expected or weight.stride(0) != 1):
            return f"{name} has shape {tuple(weight.shape)}; a {norm} norm needs a contiguous ({expected},) weight"
    for name, table in (("cos", cos), ("sin", sin)):
        if not table.is_floating_point() or _table_strides(table, batch, seq_len, head_dim // 2) is None:
            return (f"{name} has shape {tuple(table.shape)} {table.dtype}; expected a float (B|1, S, 1, D/2) or "
                    f"(S, D/2) table with S={seq_len}, D/2={head_dim // 2}")
    return None


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float,
    norm: str = "across_heads",
    config: Optional[QkLaunch] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalize and rotate q and k (see the module docstring); returns (B, S, H, D) contiguous tensors."""
    reason = unsupported_reason(q, k, q_weight, k_weight, cos, sin, heads, norm)
    if reason is not None:
        raise ValueError(f"qsparse_compiler.kernels.qk_norm_rope: {reason}")
    batch, seq_len, features = q.shape
    head_dim = features // heads
    q_out = torch.empty((batch, seq_len, heads, head_dim), device=q.device, dtype=q.dtype)
    k_out = torch.empty_like(q_out)
    tokens = batch * seq_len
    if tokens == 0:
        return q_out, k_out
    block_h, block_half, _ = _row_tile(heads, head_dim)
    launch = config or launch_config(heads, head_dim)[0]
    cos_strides = _table_strides(cos, batch, seq_len, head_dim // 2)
    sin_strides = _table_strides(sin, batch, seq_len, head_dim // 2)
    has_weight = q_weight is not None
    grid = (triton.cdiv(tokens, launch.rows), 2)
    _qk_norm_rope_kernel[grid](
        q, k, q_out, k_out,
        q_weight if has_weight else q, k_weight if has_weight else k,  # unread without HAS_WEIGHT
        cos, sin,
        tokens, seq_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        *cos_strides, *sin_strides,
        float(eps),
        HEADS=heads, HEAD_DIM=head_dim, ACROSS_HEADS=norm == "across_heads", HAS_WEIGHT=has_weight,
        W_HEAD_STRIDE=head_dim if norm == "across_heads" else 0,
        ROWS=launch.rows, BLOCK_H=block_h, BLOCK_HALF=block_half,
        ROUND_BF16=q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1",
        num_warps=launch.num_warps,
    )
    return q_out, k_out
