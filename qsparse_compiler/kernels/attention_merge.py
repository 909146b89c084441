"""Merge two partial attention results over disjoint key sets through their log-sum-exps (Triton), one pass.

    merge_attention_partials(out_a, lse_a, out_b, lse_b, out_dtype=None) -> out (B, H, S, D), lse (B, H, S) fp32

With softmax attention split over two disjoint key sets A and B (a block-sparse layout and its complement,
sparsity/complement.py), each part normalized over its own keys:

    lse = log(exp(lse_a) + exp(lse_b)) = m + log(w_a + w_b),   m = max(lse_a, lse_b),  w_x = exp(lse_x - m)
    out = (w_a * out_a + w_b * out_b) / (w_a + w_b)

which is attention over A u B exactly (up to fp32 rounding). A part that attended nothing (out 0, lse -inf) gets
weight 0; when both did, out = 0 and lse = -inf (the convention of ``qsparse::sparse_attention``). The lse of either
part may come from the bf16 kernel or the 8-bit one (both keep the natural-log lse of the unsmoothed scores).

Inputs: out_a / out_b (B, H, S, D) bf16, fp16 or fp32 with any strides over B, H, S and a unit D stride (SDPA-style
(B, S, H, D) views need no copy); lse (B, H, S) fp32 contiguous. All arithmetic in fp32. ``out`` is contiguous.
One program handles BLOCK_R rows of D features; no host synchronization (graph-capturable).

This module imports nothing from qsparse_compiler outside kernels/ (kernels/ rule).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .rounding import round_to_bf16_grid

__all__ = ["merge_attention_partials", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _merge_kernel(
    a_ptr, b_ptr, lse_a_ptr, lse_b_ptr, out_ptr, lse_ptr,
    ROWS, H, S, D,
    stride_ab, stride_ah, stride_as,
    stride_bb, stride_bh, stride_bs,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRETED: tl.constexpr = False,  # round bf16 outputs to nearest before the cast (the interpreter truncates)
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < ROWS
    mask = row_ok[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)  # B*H*S*D passes 2**31 at 720p with 40 heads
    s = rows64 % S
    h = (rows64 // S) % H
    b = rows64 // (S * H)
    lse_a = tl.load(lse_a_ptr + rows64, mask=row_ok, other=float("-inf"))
    lse_b = tl.load(lse_b_ptr + rows64, mask=row_ok, other=float("-inf"))
    m = tl.maximum(lse_a, lse_b)
    m_sub = tl.where(m == float("-inf"), 0.0, m)  # both parts empty: weights exp(-inf) = 0, no NaN
    w_a = tl.exp(lse_a - m_sub)
    w_b = tl.exp(lse_b - m_sub)
    total = w_a + w_b
    some = total > 0.0
    inv = 1.0 / tl.where(some, total, 1.0)
    a = tl.load(a_ptr + (b * stride_ab + h * stride_ah + s * stride_as)[:, None] + cols[None, :], mask=mask)
    o_b = tl.load(b_ptr + (b * stride_bb + h * stride_bh + s * stride_bs)[:, None] + cols[None, :], mask=mask)
    out = a.to(tl.float32) * (w_a * inv)[:, None] + o_b.to(tl.float32) * (w_b * inv)[:, None]
    if INTERPRETED:
        if out_ptr.dtype.element_ty == tl.bfloat16:
            out = round_to_bf16_grid(out)
    tl.store(out_ptr + rows64[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    lse = tl.where(some, m_sub + tl.log(tl.where(some, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + rows64, lse, mask=row_ok)


def merge_attention_partials(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the two parts' (out, lse); see the module docstring.
    ``out_dtype`` defaults to ``out_a``'s dtype."""
    shape = tuple(out_a.shape)
    out_dtype = out_dtype or out_a.dtype
    problem = None
    if out_a.ndim != 4 or shape[-1] > MAX_HEAD_DIM or tuple(out_b.shape) != shape:
        problem = f"out_a and out_b must both be (B, H, S, D) with D <= {MAX_HEAD_DIM}"
    elif any(t.dtype not in _DTYPES for t in (out_a, out_b)) or out_dtype not in _DTYPES:
        problem = f"outputs must be one of {_DTYPES}"
    elif any(tuple(t.shape) != shape[:3] or t.dtype != torch.float32 or not t.is_contiguous() for t in (lse_a, lse_b)):
        problem = "lse_a and lse_b must be contiguous fp32 (B, H, S)"
    elif out_a.stride(-1) != 1 or out_b.stride(-1) != 1:
        problem = "D must be the unit-stride dimension of out_a and out_b"
    elif len({t.device for t in (out_a, lse_a, out_b, lse_b)}) != 1:
        problem = "all tensors must be on one device"
    if problem:
        described = {name: (tuple(t.shape), t.dtype, t.stride())
                     for name, t in dict(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b).items()}
        raise ValueError(f"qsparse_compiler.kernels.attention_merge: {problem}; got {described}")
    b, h, s, d = shape
    out = torch.empty(shape, dtype=out_dtype, device=out_a.device)
    lse = torch.empty(shape[:3], dtype=torch.float32, device=out_a.device)
    rows = b * h * s
    if rows == 0:
        return out, lse
    block_d = max(16, triton.next_power_of_2(d))
    block_r = max(1, 4096 // block_d)  # ~4K elements per program, as kernels/residual_cache_step.py
    _merge_kernel[(triton.cdiv(rows, block_r),)](
        out_a, out_b, lse_a, lse_b, out, lse, rows, h, s, d,
        out_a.stride(0), out_a.stride(1), out_a.stride(2),
        out_b.stride(0), out_b.stride(1), out_b.stride(2),
        BLOCK_R=block_r, BLOCK_D=block_d, INTERPRETED=not out_a.is_cuda, num_warps=4,
    )
    return out, lse
