"""Rounding helpers shared by the Triton kernels (jit functions, not kernels).

Triton 3.9's CPU interpreter truncates fp32 -> bf16 and fp32 -> fp8 casts where the GPU rounds to nearest even,
which would bias the CPU tests of a kernel (by up to one bf16 ulp; for e4m3 far more, see ``round_to_e4m3_grid``).
Kernels round onto the target grid first (bf16: under the interpreter only, a constexpr flag; e4m3: always, it is a
few integer ops), so the cast is exact on both.

This module imports nothing from qsparse_compiler (kernels/ rule).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["round_to_bf16_grid", "round_to_e4m3_grid"]


@triton.jit
def round_to_bf16_grid(x):
    """fp32 -> fp32 holding the nearest-even bf16 value (a cast of the result is then exact)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to_e4m3_grid(v):
    """Round fp32 |v| <= 448 to the nearest e4m3 value, ties to even, staying in fp32.

    Why not just cast: the GPU's cvt.rn does this in hardware, but Triton's CPU interpreter truncates mantissas
    without carrying into the exponent (124.5 -> 64), so the same source would be wrong on CPU. Rounding first
    makes the cast exact everywhere; on the GPU it is a few integer ops in a memory-bound kernel.
    Normal range (|v| >= 2**-6): keep 3 mantissa bits of the fp32 pattern with round-half-even (the carry may
    bump the exponent, which is right). Subnormal range: multiples of 2**-9, via the add-and-subtract trick.
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = (v + 24576.0) - 24576.0  # 1.5 * 2**14: ulp of the sum is 2**-9
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)
