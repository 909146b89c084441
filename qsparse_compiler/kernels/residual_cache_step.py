"""One pass over a site's full-rank residual cache (SSAR) per denoising step (Triton).

For ``qsparse::residual_attention`` on CUDA, replacing a chain of eager elementwise ops (on the H100 the reuse
step's add + addcmul cost 0.8 ms per Wan-1.3B layer, the refresh step's fp32 temporaries 1.7 ms):

    reuse   out = o_sparse + R + steps * dR          (order 1: out = o_sparse + R)
    refresh R_new = dense - o_sparse
            dR = (R_new - R) / (steps + 1) if steps >= 0 else 0        (order 2 only; steps = -1: no previous R)
            R = R_new;  out = dense (a contiguous copy: the op's output layout)

All arithmetic in fp32; R and dR are stored in their own dtype. ``steps`` (1,) fp32 is read from device memory, so
the host never synchronizes and the launch is CUDA-graph safe. Tensors are (B, H, S, D): ``o_sparse`` and ``dense``
with any strides over B, H, S (SDPA returns a (B, S, H, D) memory order) and a unit D stride; R, dR and ``out`` are
contiguous. One program handles BLOCK_R whole rows of D features.

This module imports nothing from qsparse_compiler (kernels/ rule).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["residual_cache_step", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _residual_cache_step_kernel(
    o_ptr,
    dense_ptr,
    r_ptr,
    dr_ptr,
    out_ptr,
    steps_ptr,
    ROWS,
    H,
    S,
    D,
    stride_ob,
    stride_oh,
    stride_os,
    stride_db,
    stride_dh,
    stride_ds,
    REFRESH: tl.constexpr,
    ORDER2: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < ROWS)[:, None] & (cols < D)[None, :]
    # Row r of the (B*H*S, D) view is (b, h, s); 64-bit offsets: B*H*S*D passes 2**31 at 720p with 40 heads.
    rows64 = rows.to(tl.int64)
    s = rows64 % S
    h = (rows64 // S) % H
    b = rows64 // (S * H)
    flat = rows64[:, None] * D + cols[None, :]
    o = tl.load(o_ptr + (b * stride_ob + h * stride_oh + s * stride_os)[:, None] + cols[None, :], mask=mask)
    o = o.to(tl.float32)
    r = tl.load(r_ptr + flat, mask=mask).to(tl.float32)
    steps = tl.load(steps_ptr)
    if REFRESH:
        dense = tl.load(dense_ptr + (b * stride_db + h * stride_dh + s * stride_ds)[:, None] + cols[None, :], mask=mask)
        dense = dense.to(tl.float32)
        r_new = dense - o
        if ORDER2:
            delta = tl.where(steps >= 0, (r_new - r) / (tl.maximum(steps, 0.0) + 1.0), 0.0)
            tl.store(dr_ptr + flat, delta.to(dr_ptr.dtype.element_ty), mask=mask)
        tl.store(r_ptr + flat, r_new.to(r_ptr.dtype.element_ty), mask=mask)
        out = dense
    else:
        out = o + r
        if ORDER2:
            out += steps * tl.load(dr_ptr + flat, mask=mask).to(tl.float32)
    tl.store(out_ptr + flat, out.to(out_ptr.dtype.element_ty), mask=mask)


def residual_cache_step(
    o_sparse: torch.Tensor,
    residual: torch.Tensor,
    delta: torch.Tensor,
    steps: torch.Tensor,
    order: int,
    dense: torch.Tensor | None = None,
) -> torch.Tensor:
    """A reuse step (``dense`` None) or a refresh step (``dense`` = the dense attention output) of one cache.

    ``residual`` / ``delta`` (the cache's R and dR, contiguous (B, H, S, D)) are updated in place on a refresh;
    ``steps`` is only read: on a reuse step it must already count this step (n steps after the refresh: n), on a
    refresh it holds the steps since the previous refresh (the caller zeroes it afterwards). Returns the attention output (contiguous,
    dtype of ``o_sparse``): the estimate ``o_sparse + R (+ steps * dR)`` or a copy of ``dense``.
    """
    shape = tuple(o_sparse.shape)
    tensors = {"o_sparse": o_sparse, "residual": residual, "delta": delta}
    if dense is not None:
        tensors["dense"] = dense
    problem = None
    if o_sparse.ndim != 4 or shape[-1] > MAX_HEAD_DIM:
        problem = f"o_sparse must be (B, H, S, D) with D <= {MAX_HEAD_DIM}"
    elif any(tuple(t.shape) != shape or t.dtype not in _DTYPES or t.device != o_sparse.device for t in tensors.values()):
        problem = "every tensor must have the shape, device and a bf16/fp16/fp32 dtype of o_sparse"
    elif any(t.stride(-1) != 1 for t in tensors.values()) or not (residual.is_contiguous() and delta.is_contiguous()):
        problem = "D must be the unit-stride dimension, and R, dR contiguous"
    elif order not in (1, 2) or steps.shape != (1,) or steps.dtype != torch.float32:
        problem = "order must be 1 or 2 and steps a (1,) fp32 tensor"
    if problem:
        described = {name: (tuple(t.shape), t.dtype, t.stride()) for name, t in tensors.items()}
        raise ValueError(f"qsparse_compiler.kernels.residual_cache_step: {problem}; got {described}")
    b, h, s, d = shape
    out = torch.empty(shape, dtype=o_sparse.dtype, device=o_sparse.device)
    rows = b * h * s
    if rows == 0:
        return out
    block_d = max(16, triton.next_power_of_2(d))
    block_r = max(1, 4096 // block_d)  # ~4K elements per program: enough bytes in flight, no spills
    source = dense if dense is not None else o_sparse  # dense's pointer is unused on a reuse step
    _residual_cache_step_kernel[(triton.cdiv(rows, block_r),)](
        o_sparse, source, residual, delta, out, steps, rows, h, s, d,
        o_sparse.stride(0), o_sparse.stride(1), o_sparse.stride(2),
        source.stride(0), source.stride(1), source.stride(2),
        REFRESH=dense is not None, ORDER2=order == 2, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4,
    )
    return out
