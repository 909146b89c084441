"""Unpack packed int4 weights into 8-bit MMA operands (Triton), for the W4A8 GEMM's pre-unpacked mode.

    qweight (N, K//2) uint8, q[n, 2j] low nibble, q[n, 2j+1] high nibble  ->  out (N, K), k order restored
        fmt "int8":     out = 16 * q  (int8; the nibble moved to the top of the byte, the GEMM divides by 16)
        fmt "fp8_e4m3": out = q       (float8_e4m3fn; -8..7 are exact e4m3 values)

Why a separate pass: inside the GEMM, weights produced in registers reach the tensor cores only after a
synchronous hand-off (Triton waits for each wgmma that reads a register-made operand), so unpacking and MMA
serialize. One memory-bound pass here (read N*K/2 bytes, write N*K bytes: ~10 us for a 8960 x 1536 weight on an
H100) lets the GEMM stream both operands through pipelined shared memory. The int4 weight stays the stored
format; the 8-bit copy is a per-call scratch of one layer.

This module imports nothing from qsparse_compiler (kernels/ rule).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["unpack_int4_to_mma"]

_OUT_DTYPE = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


@triton.jit
def _int4_unpack_kernel(w_ptr, out_ptr, N, HALF_K, IS_FP8: tl.constexpr, BN: tl.constexpr, BKH: tl.constexpr):
    tl.static_assert(BKH % 16 == 0, "int4_unpack: BKH must be a multiple of 16")
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BKH + tl.arange(0, BKH)
    mask = (rows < N)[:, None] & (cols < HALF_K)[None, :]
    packed = tl.load(w_ptr + rows.to(tl.int64)[:, None] * HALF_K + cols[None, :], mask=mask, other=0)
    if IS_FP8:
        as_int = packed.to(tl.int16)
        lo = (((as_int & 0xF) ^ 8) - 8).to(tl.float16).to(tl.float8e4nv)
        hi = (((as_int >> 4) ^ 8) - 8).to(tl.float16).to(tl.float8e4nv)
    else:
        lo = (packed << 4).to(tl.int8, bitcast=True)
        hi = (packed & 0xF0).to(tl.int8, bitcast=True)
    out = tl.join(lo, hi).reshape(BN, 2 * BKH)
    out_cols = tl.program_id(1) * 2 * BKH + tl.arange(0, 2 * BKH)
    out_mask = (rows < N)[:, None] & (out_cols < 2 * HALF_K)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * (2 * HALF_K) + out_cols[None, :], out, mask=out_mask)


def unpack_int4_to_mma(qweight: torch.Tensor, fmt: str) -> torch.Tensor:
    """(N, K//2) uint8 -> (N, K) int8 (16 * q) or float8_e4m3fn (q); see the module docstring."""
    if fmt not in _OUT_DTYPE:
        raise ValueError(f"qsparse_compiler.kernels.int4_unpack: fmt={fmt!r}; use one of {sorted(_OUT_DTYPE)}")
    if qweight.ndim != 2 or qweight.dtype != torch.uint8 or not qweight.is_contiguous():
        raise ValueError(
            f"qsparse_compiler.kernels.int4_unpack: need a contiguous (N, K//2) uint8 tensor, got "
            f"{tuple(qweight.shape)} {qweight.dtype}; call .contiguous() first"
        )
    n, half_k = qweight.shape
    out = torch.empty((n, 2 * half_k), device=qweight.device, dtype=_OUT_DTYPE[fmt])
    if out.numel() == 0:
        return out
    bn, bkh = 32, 128
    grid = (triton.cdiv(n, bn), triton.cdiv(half_k, bkh))
    _int4_unpack_kernel[grid](qweight, out, n, half_k, IS_FP8=fmt == "fp8_e4m3", BN=bn, BKH=bkh, num_warps=4)
    return out
