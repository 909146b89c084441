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

fp8 storage (CacheConfig.storage="fp8_e4m3"): R and dR are e4m3 codes with one fp32 scale per row, (B, H, S, 1);
a value is code * scale, scale = max(row amax, 1e-12) / 448 and code = e4m3(value / scale) - the rounding of
formats/quantization.py's quantize_activation. A whole row sits in one program, so the amax needs no second pass.

This module imports nothing from qsparse_compiler outside kernels/ (kernels/ rule).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import round_to_e4m3_grid

__all__ = ["residual_cache_step", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FP8_MAX = tl.constexpr(448.0)
_AMAX_EPS = tl.constexpr(1e-12)  # formats/quantization.py's: a row of zeros gets a tiny scale, not a division by zero


@triton.jit
def _load_stored(ptr, scale_ptr, rows64, flat, mask, row_ok, FP8: tl.constexpr):
    value = tl.load(ptr + flat, mask=mask).to(tl.float32)
    if FP8:
        value *= tl.load(scale_ptr + rows64, mask=row_ok)[:, None]  # scales are (rows, 1), contiguous
    return value


@triton.jit
def _store_stored(ptr, scale_ptr, rows64, flat, mask, row_ok, value, FP8: tl.constexpr):
    if FP8:
        scale = tl.maximum(tl.max(tl.abs(tl.where(mask, value, 0.0)), axis=1), _AMAX_EPS) / _FP8_MAX
        codes = tl.minimum(tl.maximum(value / scale[:, None], -_FP8_MAX), _FP8_MAX)
        tl.store(ptr + flat, round_to_e4m3_grid(codes).to(ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + rows64, scale, mask=row_ok)
    else:
        tl.store(ptr + flat, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_cache_step_kernel(
    o_ptr,
    dense_ptr,
    r_ptr,
    dr_ptr,
    r_scale_ptr,
    dr_scale_ptr,
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
    FP8: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < ROWS
    mask = row_ok[:, None] & (cols < D)[None, :]
    # Row r of the (B*H*S, D) view is (b, h, s); 64-bit offsets: B*H*S*D passes 2**31 at 720p with 40 heads.
    rows64 = rows.to(tl.int64)
    s = rows64 % S
    h = (rows64 // S) % H
    b = rows64 // (S * H)
    flat = rows64[:, None] * D + cols[None, :]
    o = tl.load(o_ptr + (b * stride_ob + h * stride_oh + s * stride_os)[:, None] + cols[None, :], mask=mask)
    o = o.to(tl.float32)
    r = _load_stored(r_ptr, r_scale_ptr, rows64, flat, mask, row_ok, FP8)
    steps = tl.load(steps_ptr)
    if REFRESH:
        dense = tl.load(dense_ptr + (b * stride_db + h * stride_dh + s * stride_ds)[:, None] + cols[None, :], mask=mask)
        dense = dense.to(tl.float32)
        r_new = dense - o
        if ORDER2:
            delta = tl.where(steps >= 0, (r_new - r) / (tl.maximum(steps, 0.0) + 1.0), 0.0)
            _store_stored(dr_ptr, dr_scale_ptr, rows64, flat, mask, row_ok, delta, FP8)
        _store_stored(r_ptr, r_scale_ptr, rows64, flat, mask, row_ok, r_new, FP8)
        out = dense
    else:
        out = o + r
        if ORDER2:
            out += steps * _load_stored(dr_ptr, dr_scale_ptr, rows64, flat, mask, row_ok, FP8)
    tl.store(out_ptr + flat, out.to(out_ptr.dtype.element_ty), mask=mask)


def block_shape(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_R): a padded head row, and rows for ~4K elements per program (enough bytes in flight, no
    spills)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    return block_d, max(1, 4096 // block_d)


def _delta_shapes(shape: tuple[int, ...], order: int) -> tuple[tuple[int, ...], ...]:
    """Accepted shapes of dR (or of its scales) for an R of ``shape``: order 1 may hold none (no tokens)."""
    return (shape,) if order == 2 else (shape, shape[:2] + (0,) + shape[3:])


def residual_cache_step(
    o_sparse: torch.Tensor,
    residual: torch.Tensor,
    delta: torch.Tensor,
    steps: torch.Tensor,
    order: int,
    dense: torch.Tensor | None = None,
    residual_scale: torch.Tensor | None = None,
    delta_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """A reuse step (``dense`` None) or a refresh step (``dense`` = the dense attention output) of one cache.

    ``residual`` / ``delta`` (the cache's R and dR, contiguous (B, H, S, D)) are updated in place on a refresh;
    with fp8 storage they are e4m3 codes and ``residual_scale`` / ``delta_scale`` their contiguous (B, H, S, 1) fp32
    row scales (updated too). Order 1 never touches dR: it may have no tokens ((B, H, 0, D), scales (B, H, 0, 1)).
    ``steps`` is only read: on a reuse step it must already count this step (n steps after the refresh: n), on a
    refresh it holds the steps since the previous refresh (the caller zeroes it afterwards).
    Returns the attention output (contiguous, dtype of ``o_sparse``): the estimate ``o_sparse + R (+ steps * dR)``
    or a copy of ``dense``.
    """
    shape = tuple(o_sparse.shape)
    activations = {"o_sparse": o_sparse} if dense is None else {"o_sparse": o_sparse, "dense": dense}
    stored = {"residual": residual, "delta": delta}
    fp8 = residual_scale is not None
    scales = {"residual_scale": residual_scale, "delta_scale": delta_scale} if fp8 else {}
    stored_dtypes = (torch.float8_e4m3fn,) if fp8 else _DTYPES
    problem = None
    if o_sparse.ndim != 4 or shape[-1] > MAX_HEAD_DIM:
        problem = f"o_sparse must be (B, H, S, D) with D <= {MAX_HEAD_DIM}"
    elif any(t is None for t in scales.values()) or (delta_scale is not None and not fp8):
        problem = "fp8 storage needs both residual_scale and delta_scale"
    elif any(tuple(t.shape) != shape or t.device != o_sparse.device for t in (*activations.values(), residual)) \
            or tuple(delta.shape) not in _delta_shapes(shape, order) or delta.device != o_sparse.device \
            or any(t.dtype not in _DTYPES for t in activations.values()) \
            or any(t.dtype not in stored_dtypes for t in stored.values()):
        problem = ("every tensor must have the shape and device of o_sparse (order 1: dR may have no tokens) and a "
                   "bf16/fp16/fp32 dtype (R, dR: float8_e4m3fn codes when scales are given)")
    elif fp8 and (tuple(residual_scale.shape) != shape[:3] + (1,)
                  or tuple(delta_scale.shape) not in _delta_shapes(shape[:3] + (1,), order)
                  or any(t.dtype != torch.float32 or not t.is_contiguous() or t.device != o_sparse.device
                         for t in scales.values())):
        problem = ("the fp8 scales must be contiguous (B, H, S, 1) fp32 tensors on o_sparse's device (order 1: dR's "
                   "may have no tokens)")
    elif any(t.stride(-1) != 1 for t in activations.values()) or not (residual.is_contiguous() and delta.is_contiguous()):
        problem = "D must be the unit-stride dimension, and R, dR contiguous"
    elif order not in (1, 2) or steps.shape != (1,) or steps.dtype != torch.float32:
        problem = "order must be 1 or 2 and steps a (1,) fp32 tensor"
    if problem:
        described = {name: (tuple(t.shape), t.dtype, t.stride())
                     for name, t in {**activations, **stored, **scales}.items() if t is not None}
        raise ValueError(f"qsparse_compiler.kernels.residual_cache_step: {problem}; got {described}")
    b, h, s, d = shape
    out = torch.empty(shape, dtype=o_sparse.dtype, device=o_sparse.device)
    rows = b * h * s
    if rows == 0:
        return out
    block_d, block_r = block_shape(d)
    source = dense if dense is not None else o_sparse  # dense's pointer is unused on a reuse step
    # Without fp8 the scale pointers are unused (FP8=False): any tensor of the right device fills the slots.
    residual_scale = residual_scale if fp8 else steps
    delta_scale = delta_scale if fp8 else steps
    _residual_cache_step_kernel[(triton.cdiv(rows, block_r),)](
        o_sparse, source, residual, delta, residual_scale, delta_scale, out, steps, rows, h, s, d,
        o_sparse.stride(0), o_sparse.stride(1), o_sparse.stride(2),
        source.stride(0), source.stride(1), source.stride(2),
        REFRESH=dense is not None, ORDER2=order == 2, FP8=fp8, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4,
    )
    return out
