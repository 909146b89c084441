"""Rounding helpers shared by the Triton kernels (jit functions, not kernels).

Triton 3.9's CPU interpreter truncates fp32 -> bf16 casts where the GPU rounds to nearest even, which would bias the
CPU tests of a kernel by up to one bf16 ulp. Kernels round with ``round_to_bf16_grid`` first when they run under the
interpreter (a constexpr flag), so the cast is exact on both.

This module imports nothing from qsparse_compiler (kernels/ rule).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["round_to_bf16_grid"]


@triton.jit
def round_to_bf16_grid(x):
    """fp32 -> fp32 holding the nearest-even bf16 value (a cast of the result is then exact)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
