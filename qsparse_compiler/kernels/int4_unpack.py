"""Unpack packed int4 weights (Triton): into 8-bit MMA operands for the W4A8 GEMM's pre-unpacked mode, or
dequantized into a floating-point weight for the int4 weight-only linear.

    qweight (N, K//2) uint8, q[n, 2j] low nibble, q[n, 2j+1] high nibble  ->  out (N, K), k order restored
        fmt "int8":     out = 16 * q  (int8; the nibble moved to the top of the byte, the GEMM divides by 16)
        fmt "fp8_e4m3": out = q       (float8_e4m3fn; -8..7 are exact e4m3 values)
        dequantize:     out = dtype(q * scale[n, k // group])  (the product in fp32, exact for a bf16/fp16/fp32
                        scale, rounded once: the same bits as formats.quantization.dequantize_weight_int4(...).to(dtype))

Why a separate pass: inside the GEMM, weights produced in registers reach the tensor cores only after a
synchronous hand-off (Triton waits for each wgmma that reads a register-made operand), so unpacking and MMA
serialize. One memory-bound pass here (read N*K/2 bytes, write N*K bytes: ~10 us for a 8960 x 1536 weight on an
H100) lets the GEMM stream both operands through pipelined shared memory. The int4 weight stays the stored
format; the 8-bit copy is a per-call scratch of one layer.

The weight-only linear (a DiT's adaptive-norm modulation: one row per sample) dequantizes here and hands the weight
to cuBLAS: one pass reading N*K/2 bytes and writing the weight, instead of the plain-torch dequantization's
unpack, fp32 product and cast (measured at 13.7 ms per forward of the scaled HunyuanVideo, whose modulation
linears hold 680M parameters).

This module imports nothing from qsparse_compiler (kernels/ rule).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .rounding import round_to_bf16_grid

__all__ = ["unpack_int4_to_mma", "dequantize_int4", "DEQUANTIZED_DTYPES"]

_OUT_DTYPE = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
DEQUANTIZED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# MODE: what the kernel writes.
_INT8, _FP8, _DEQUANTIZED = 0, 1, 2
_BN, _BKH = 32, 128  # rows x packed columns per program (256 weights per row)


@triton.jit
def _int4_unpack_kernel(w_ptr, out_ptr, s_ptr, N, HALF_K, GROUP, GROUPS, MODE: tl.constexpr, BN: tl.constexpr,
                        BKH: tl.constexpr, INTERPRET_ROUND_BF16: tl.constexpr):
    tl.static_assert(BKH % 16 == 0, "int4_unpack: BKH must be a multiple of 16")
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BKH + tl.arange(0, BKH)
    mask = (rows < N)[:, None] & (cols < HALF_K)[None, :]
    packed = tl.load(w_ptr + rows.to(tl.int64)[:, None] * HALF_K + cols[None, :], mask=mask, other=0)
    out_cols = tl.program_id(1) * 2 * BKH + tl.arange(0, 2 * BKH)
    out_mask = (rows < N)[:, None] & (out_cols < 2 * HALF_K)[None, :]
    if MODE == 0:  # _INT8: the nibble moved to the top of the byte
        lo = (packed << 4).to(tl.int8, bitcast=True)
        hi = (packed & 0xF0).to(tl.int8, bitcast=True)
    else:  # the signed nibbles, -8..7
        as_int = packed.to(tl.int16)
        lo = ((as_int & 0xF) ^ 8) - 8
        hi = ((as_int >> 4) ^ 8) - 8
        if MODE == 1:  # _FP8
            lo = lo.to(tl.float16).to(tl.float8e4nv)
            hi = hi.to(tl.float16).to(tl.float8e4nv)
    out = tl.join(lo, hi).reshape(BN, 2 * BKH)
    if MODE == 2:  # _DEQUANTIZED
        scale = tl.load(s_ptr + rows.to(tl.int64)[:, None] * GROUPS + (out_cols // GROUP)[None, :], mask=out_mask,
                        other=0.0)
        out = out.to(tl.float32) * scale.to(tl.float32)
        if INTERPRET_ROUND_BF16:
            out = round_to_bf16_grid(out)  # CPU interpreter only: its bf16 cast truncates (kernels/rounding.py)
        out = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * (2 * HALF_K) + out_cols[None, :], out, mask=out_mask)


def _check_packed(qweight: torch.Tensor) -> None:
    if qweight.ndim != 2 or qweight.dtype != torch.uint8 or not qweight.is_contiguous():
        raise ValueError(
            f"qsparse_compiler.kernels.int4_unpack: need a contiguous (N, K//2) uint8 tensor, got "
            f"{tuple(qweight.shape)} {qweight.dtype}; call .contiguous() first"
        )


def _launch(qweight: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None, group: int, mode: int) -> torch.Tensor:
    if out.numel() == 0:
        return out
    n, half_k = qweight.shape
    grid = (triton.cdiv(n, _BN), triton.cdiv(half_k, _BKH))
    groups = 1 if scale is None else scale.shape[1]
    interpret_round_bf16 = os.environ.get("TRITON_INTERPRET", "0") == "1" and out.dtype == torch.bfloat16
    _int4_unpack_kernel[grid](qweight, out, qweight if scale is None else scale, n, half_k, group, groups, MODE=mode,
                              BN=_BN, BKH=_BKH, INTERPRET_ROUND_BF16=interpret_round_bf16, num_warps=4)
    return out


def unpack_int4_to_mma(qweight: torch.Tensor, fmt: str) -> torch.Tensor:
    """(N, K//2) uint8 -> (N, K) int8 (16 * q) or float8_e4m3fn (q); see the module docstring."""
    if fmt not in _OUT_DTYPE:
        raise ValueError(f"qsparse_compiler.kernels.int4_unpack: fmt={fmt!r}; use one of {sorted(_OUT_DTYPE)}")
    _check_packed(qweight)
    out = torch.empty((qweight.shape[0], 2 * qweight.shape[1]), device=qweight.device, dtype=_OUT_DTYPE[fmt])
    return _launch(qweight, out, None, 1, _FP8 if fmt == "fp8_e4m3" else _INT8)


def dequantize_int4(qweight: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, K//2) uint8 codes and (N, K // group) scales -> the (N, K) weight in ``dtype`` (group_size 0: one group
    per row); see the module docstring."""
    _check_packed(qweight)
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    group = k if group_size == 0 else group_size
    if dtype not in DEQUANTIZED_DTYPES or scale.dtype not in DEQUANTIZED_DTYPES:
        raise ValueError(
            f"qsparse_compiler.kernels.int4_unpack: dequantize to {dtype} with {scale.dtype} scales; both must be "
            f"one of {DEQUANTIZED_DTYPES}"
        )
    if group <= 0 or k % group or scale.shape != (n, k // group) or not scale.is_contiguous():
        raise ValueError(
            f"qsparse_compiler.kernels.int4_unpack: scale {tuple(scale.shape)} does not fit a ({n}, {k}) weight in "
            f"groups of {group_size}; need a contiguous ({n}, K // group_size) tensor (group_size 0: ({n}, 1))"
        )
    out = torch.empty((n, k), device=qweight.device, dtype=dtype)
    return _launch(qweight, out, scale, group, _DEQUANTIZED)
