"""CUDA implementations of ``qsparse::w4a8_linear`` (Triton activation quantization + Triton W4A8 GEMM), of
``qsparse::w4a8_gemm`` (the GEMM alone, for activations quantized in the graph) and of
``qsparse::int4_weight_only_linear`` (the weight dequantized by one Triton pass, then cuBLAS).

Registered as each op's CUDA kernel (``register_kernel("cuda")``) on import when Triton is present. The functions
return None for what the kernels do not cover, and the registered kernel then runs the plain-torch reference: fp8
on GPUs without fp8 tensor cores (compute capability < 8.9), group sizes that are not multiples of 32, K > 32768.
"uint8_msfp" (asymmetric per-token uint8) runs on the int8 MMA with a rank-1 zero-point correction; its weight
row sums are computed per call here (one pass over the packed weight), because the op's schema carries no place
for them - a plan could store them next to the scales.

Graph-safe by construction: every decision below reads shapes, dtypes and the device's compute capability (host
metadata), never tensor data, and nothing synchronizes, so the op runs inside torch.compile(fullgraph=True) and is
captured by CUDA graphs ("reduce-overhead"). The GEMM autotunes on the first call of each (M-bucket, N, K) - that
call must come before a CUDA-graph capture, which torch.compile's warm-up run guarantees.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..formats.quantization import effective_group_size, linear_int4_weight_only, unpack_int4
from .w4a8_linear import (check_gemm_args, check_linear_args, int4_weight_only_linear, w4a8_gemm, w4a8_gemm_reference,
                          w4a8_linear, w4a8_linear_reference)

__all__ = ["w4a8_linear_cuda", "w4a8_gemm_cuda", "int4_weight_only_linear_cuda", "REGISTERED", "weight_row_sums"]

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# At or above this many tokens the weight may first be unpacked to an 8-bit scratch (kernels/int4_unpack.py,
# 6-44 us) so the GEMM streams both operands through pipelined shared memory; below it the GEMM unpacks the int4
# tile in registers (no scratch, no extra launch).
PRE_UNPACK_MIN_TOKENS = 2048
# Which path wins at M = 32,760 on the H100 (benchmarks/results/w4a8_linear.md, 2026-11-25):
#   per-channel weights: pre-unpacked, every shape and both formats (fp8: the only path where Triton keeps a wgmma
#                        in flight across k-steps; 0.98 vs 1.34 ms at 1536 -> 8960);
#   grouped fp8:  pre-unpacked for K <= 5120 (1.35 vs 1.58 ms at K=1536), register unpack above (1.87 vs 2.04 ms at
#                 K=8960, 7.9 vs 8.1 ms at K=13824);
#   grouped int8: pre-unpacked only for K <= 1536.
_PRE_UNPACK_MAX_K_GROUPED = {"fp8_e4m3": 5120, "int8": 1536}


def _use_pre_unpack(m: int, k: int, per_channel: bool, act_format: str) -> bool:
    if m < PRE_UNPACK_MIN_TOKENS:
        return False
    return per_channel or k <= _PRE_UNPACK_MAX_K_GROUPED[act_format]


@functools.lru_cache(maxsize=None)
def _has_fp8_mma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def weight_row_sums(qweight: torch.Tensor, wscale: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) fp32 sums over K of the dequantized weight: sum_g scale[n, g] * sum_{k in g} q[n, k] (exact integers)."""
    n = qweight.shape[0]
    k = qweight.shape[1] * 2
    group = effective_group_size(k, group_size)
    code_sums = unpack_int4(qweight).reshape(n, k // group, group).sum(dim=-1, dtype=torch.int32)
    return (code_sums.to(torch.float32) * wscale.to(torch.float32)).sum(dim=-1)


_CODE_DTYPE = {"fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8, "uint8_msfp": torch.uint8}


def _kernel_problem(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, group_size: int, act_format: str,
                    out_dtype: torch.dtype) -> bool:
    """True if the Triton kernels do not cover this problem (then the op runs its reference). Decided from shapes,
    strides and dtypes only, and memoized on them: it runs for every linear of every forward (~20 us uncached)."""
    return _kernel_problem_cached(
        x.device, x.shape[-1], tuple(qweight.shape), qweight.dtype, qweight.stride(-1), tuple(wscale.shape),
        wscale.stride(-1),
        wscale.dtype, group_size, act_format, out_dtype,
    )


@functools.lru_cache(maxsize=4096)
def _kernel_problem_cached(device: torch.device, k: int, qweight_shape: tuple, qweight_dtype: torch.dtype,
                           qweight_k_stride: int,
                           wscale_shape: tuple, wscale_k_stride: int, wscale_dtype: torch.dtype, group_size: int,
                           act_format: str, out_dtype: torch.dtype) -> bool:
    from ..kernels.act_quant import ACT_QUANT_FORMATS, MAX_K
    from ..kernels.w4a8_gemm import supports

    if act_format not in (*ACT_QUANT_FORMATS, "uint8_msfp") or out_dtype not in _X_DTYPES:
        return True
    if act_format == "fp8_e4m3" and device.type == "cuda" and not _has_fp8_mma(device.index or 0):
        return True
    if k > MAX_K or qweight_k_stride != 1 or wscale_k_stride != 1:
        return True
    # supports() reads only shapes/dtypes; check with empty stand-ins before any kernel launch.
    probe = torch.empty((0, k), dtype=_CODE_DTYPE[act_format], device="meta")
    qweight = torch.empty(qweight_shape, dtype=qweight_dtype, device="meta")
    wscale = torch.empty(wscale_shape, dtype=wscale_dtype, device="meta")
    return supports(probe, qweight, wscale, group_size, out_dtype) is not None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (M, K) with a unit K-stride (the kernels' layout)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def w4a8_linear_cuda(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor],
    group_size: int,
    act_format: str,
    activation: str = "none",
) -> Optional[torch.Tensor]:
    """y = A8(activation(x)) @ W4^T + bias via the Triton kernels, or None if this problem is not covered (see
    module doc); the activation runs inside the quantization kernel.

    Also runs on CPU tensors under TRITON_INTERPRET=1 (that is how the CPU tests exercise this path).
    """
    from ..kernels.act_quant import act_quant, act_quant_asym
    from ..kernels.w4a8_gemm import SPLIT_CHUNK, w4a8_gemm

    if x.dtype not in _X_DTYPES or _kernel_problem(x, qweight, wscale, group_size, act_format, x.dtype):
        return None
    k, n = x.shape[-1], qweight.shape[0]
    x2 = _rows(x)
    if act_format == "uint8_msfp":
        codes, scale, zero = act_quant_asym(x2, activation)
        wsum = weight_row_sums(qweight, wscale, group_size)
        out = w4a8_gemm(codes, scale, qweight, wscale, bias, group_size, x.dtype, a_zero=zero, wsum=wsum)
        return out.reshape(*x.shape[:-1], n)
    pre_unpack = _use_pre_unpack(x2.shape[0], k, group_size in (0, k), act_format) and qweight.is_contiguous()
    # The split code layout lets the register-unpack GEMM pair half-tiles of codes with the weight nibbles (no join,
    # weights stay in registers); it needs whole 128-column chunks inside every weight group.
    group = k if group_size == 0 else group_size
    chunk = SPLIT_CHUNK if not pre_unpack and group % SPLIT_CHUNK == 0 else 0
    codes, scale = act_quant(x2, act_format, chunk=chunk, activation=activation)
    return _gemm(codes, scale, qweight, wscale, bias, group_size, act_format, x.dtype, pre_unpack, chunk).reshape(
        *x.shape[:-1], n)


def w4a8_gemm_cuda(
    codes: torch.Tensor,
    act_scale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor],
    group_size: int,
    out_dtype: torch.dtype,
) -> Optional[torch.Tensor]:
    """``qsparse::w4a8_gemm`` (activations quantized in the graph) via the Triton GEMM, or None if not covered.

    The codes come in the natural layout, so the register-unpack path runs without the split layout (the
    pre-unpacked path, the one per-channel weights take at video token counts, does not use it anyway)."""
    act_format = {torch.float8_e4m3fn: "fp8_e4m3", torch.int8: "int8"}.get(codes.dtype)
    if act_format is None or _kernel_problem(codes, qweight, wscale, group_size, act_format, out_dtype):
        return None
    k, n = codes.shape[-1], qweight.shape[0]
    codes2 = _rows(codes)
    pre_unpack = _use_pre_unpack(codes2.shape[0], k, group_size in (0, k), act_format) and qweight.is_contiguous()
    scale = act_scale.reshape(-1).contiguous()
    return _gemm(codes2, scale, qweight, wscale, bias, group_size, act_format, out_dtype, pre_unpack, 0).reshape(
        *codes.shape[:-1], n)


# Per-channel fp8 on the unpacked weight: cuBLAS's row-wise-scaled fp8 GEMM (torch._scaled_mm, what torchao's fp8
# linear runs) beat our Triton GEMM on the same operands on the H100: 0.81 vs 0.98 ms at 32,760 x 1,536 -> 8,960
# (benchmarks/results/w4a8_linear.md). The int4 weight stays the stored format; only the per-call scratch is fp8.
# Fast accumulation as torchao's inference default (the fp8 products are summed in the tensor core's reduced
# precision between promotions).
CUBLAS_FP8_FAST_ACCUM = True


def _cublas_fp8_ok(codes: torch.Tensor, k: int, n: int, group_size: int, bias, out_dtype: torch.dtype) -> bool:
    return (
        codes.is_cuda and codes.dtype == torch.float8_e4m3fn and group_size in (0, k) and out_dtype == torch.bfloat16
        and k % 16 == 0 and n % 16 == 0 and (bias is None or bias.dtype == torch.bfloat16)
    )


def _gemm(codes, scale, qweight, wscale, bias, group_size, act_format, out_dtype, pre_unpack: bool, chunk: int):
    from ..kernels.int4_unpack import unpack_int4_to_mma
    from ..kernels.w4a8_gemm import w4a8_gemm

    if pre_unpack:
        w8 = unpack_int4_to_mma(qweight, act_format)
        n, k = w8.shape
        if _cublas_fp8_ok(codes, k, n, group_size, bias, out_dtype):
            return torch._scaled_mm(
                codes, w8.t(), scale_a=scale.reshape(-1, 1), scale_b=wscale.to(torch.float32).reshape(1, n),
                bias=bias, out_dtype=out_dtype, use_fast_accum=CUBLAS_FP8_FAST_ACCUM,
            )
        return w4a8_gemm(codes, scale, qweight, wscale, bias, group_size, out_dtype, w_unpacked=w8)
    return w4a8_gemm(codes, scale, qweight, wscale, bias, group_size, out_dtype, a_chunk=chunk)


def int4_weight_only_linear_cuda(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                                 bias: Optional[torch.Tensor], group_size: int) -> Optional[torch.Tensor]:
    """``F.linear`` on the weight dequantized by ``kernels.int4_unpack.dequantize_int4``: the same bits as the
    reference's dequantization, in one pass instead of its unpack, fp32 product and cast."""
    from ..kernels.int4_unpack import DEQUANTIZED_DTYPES, dequantize_int4

    if x.dtype not in DEQUANTIZED_DTYPES or wscale.dtype not in DEQUANTIZED_DTYPES or not qweight.is_contiguous():
        return None
    weight = dequantize_int4(qweight, wscale.contiguous(), group_size, x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


REGISTERED = _triton_imports()
if REGISTERED:

    @w4a8_linear.register_kernel("cuda")
    def _(x, qweight, wscale, bias, group_size, act_format, activation="none"):
        check_linear_args("w4a8_linear", x, qweight, wscale, bias, group_size, activation)
        out = w4a8_linear_cuda(x, qweight, wscale, bias, group_size, act_format, activation)
        if out is None:
            out = w4a8_linear_reference(x, qweight, wscale, bias, group_size, act_format, activation)
        return out

    @w4a8_gemm.register_kernel("cuda")
    def _(codes, act_scale, qweight, wscale, bias, group_size, out_dtype):
        check_gemm_args(codes, act_scale, qweight, wscale, bias, group_size)
        out = w4a8_gemm_cuda(codes, act_scale, qweight, wscale, bias, group_size, out_dtype)
        if out is None:
            out = w4a8_gemm_reference(codes, act_scale, qweight, wscale, bias, group_size, out_dtype)
        return out

    @int4_weight_only_linear.register_kernel("cuda")
    def _(x, qweight, wscale, bias, group_size):
        check_linear_args("int4_weight_only_linear", x, qweight, wscale, bias, group_size)
        out = int4_weight_only_linear_cuda(x, qweight, wscale, bias, group_size)
        if out is None:
            out = linear_int4_weight_only(x, qweight, wscale, bias, group_size)
        return out
