"""``qsparse::w4a8_linear`` — y = A8(x) @ W4ᵀ + bias — and its GEMM half ``qsparse::w4a8_gemm``.

Schemas (what the passes emit, and what every backend kernel must implement):

    w4a8_linear(x: (..., K) bf16/fp16/fp32, qweight: (N, K//2) uint8, wscale: (N, K//G),
                bias: (N,) or None, group_size: int (0 = per channel), act_format: str,
                activation: str = "none") -> (..., N), dtype of x
                = A8(activation(x)) @ W4ᵀ + bias; activation "gelu_tanh" folds a preceding GELU into the
                quantization pass (the FFN down-projection: no separate GELU kernel)
    w4a8_gemm(codes: (..., K) float8_e4m3fn/int8, act_scale: (..., 1) fp32, qweight, wscale, bias, group_size,
              out_dtype) -> (..., N) = (codes * act_scale) @ W4ᵀ + bias
    int4_weight_only_linear(x, qweight, wscale, bias, group_size) -> (..., N), dtype of x
              = x @ dequant(W4).to(x.dtype)ᵀ + bias: the conditioning linears (one row per sample), x not quantized

``w4a8_gemm`` takes activations already quantized by ``quantization.quantize_activation_symmetric``: the pass emits
that quantization as ordinary graph ops so Inductor fuses it into whatever produced x (a norm, the modulation, a
GELU, a residual add) instead of running a separate pass over the activation (``QuantConfig.act_quant_in_graph``).

Each op's own body is the plain-torch reference (CPU and any device without a kernel): quantize x per token in
``act_format``, dequantize both operands exactly and multiply in fp32. ops/w4a8_cuda.py registers the CUDA kernels
with ``register_kernel("cuda")`` (kernels/ stays free of torch.library); shapes they cannot handle go to the
reference, so the op is never wrong, only slower.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..formats.quantization import (ACTIVATIONS, apply_activation, dequantize_activation, dequantize_weight_int4,
                           linear_int4_weight_only, quantize_activation)

__all__ = ["w4a8_linear", "w4a8_linear_reference", "w4a8_gemm", "w4a8_gemm_reference", "int4_weight_only_linear",
           "check_linear_args", "check_gemm_args"]


def _dequantized_matmul(
    x_hat: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: Optional[torch.Tensor], group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    w_hat = dequantize_weight_int4(qweight, wscale, group_size).to(x_hat.device)
    out = x_hat @ w_hat.t()
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def w4a8_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor],
    group_size: int,
    act_format: str,
    activation: str = "none",
) -> torch.Tensor:
    codes, scale, zero = quantize_activation(apply_activation(x, activation), act_format)
    return _dequantized_matmul(dequantize_activation(codes, scale, zero), qweight, wscale, bias, group_size, x.dtype)


def w4a8_gemm_reference(
    codes: torch.Tensor,
    act_scale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor],
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _dequantized_matmul(dequantize_activation(codes, act_scale, None), qweight, wscale, bias, group_size, out_dtype)


@torch.library.custom_op("qsparse::w4a8_linear", mutates_args=())
def w4a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor],
    group_size: int,
    act_format: str,
    activation: str = "none",
) -> torch.Tensor:
    check_linear_args("w4a8_linear", x, qweight, wscale, bias, group_size, activation)
    return w4a8_linear_reference(x, qweight, wscale, bias, group_size, act_format, activation)


@w4a8_linear.register_fake
def _(x, qweight, wscale, bias, group_size, act_format, activation="none"):
    check_linear_args("w4a8_linear", x, qweight, wscale, bias, group_size, activation)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


_CODE_DTYPES = (torch.float8_e4m3fn, torch.int8)


@torch.library.custom_op("qsparse::w4a8_gemm", mutates_args=())
def w4a8_gemm(
    codes: torch.Tensor,
    act_scale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor],
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    check_gemm_args(codes, act_scale, qweight, wscale, bias, group_size)
    return w4a8_gemm_reference(codes, act_scale, qweight, wscale, bias, group_size, out_dtype)


@w4a8_gemm.register_fake
def _(codes, act_scale, qweight, wscale, bias, group_size, out_dtype):
    check_gemm_args(codes, act_scale, qweight, wscale, bias, group_size)
    return codes.new_empty((*codes.shape[:-1], qweight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("qsparse::int4_weight_only_linear", mutates_args=())
def int4_weight_only_linear(
    x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: Optional[torch.Tensor], group_size: int
) -> torch.Tensor:
    # At one row per sample the GEMM is a GEMV bound by reading the weight, so the dequantization is what costs: on
    # CUDA one Triton pass (ops/w4a8_cuda.py), elsewhere the plain-torch reference. An op rather than inline graph
    # ops: traced, the dequantization's shape arithmetic on the packed-weight inputs (graph inputs with no Dynamo
    # source) produced guards that a warm FX-graph cache could not rebuild (IndexError in produce_guards).
    check_linear_args("int4_weight_only_linear", x, qweight, wscale, bias, group_size)
    return linear_int4_weight_only(x, qweight, wscale, bias, group_size)


@int4_weight_only_linear.register_fake
def _(x, qweight, wscale, bias, group_size):
    check_linear_args("int4_weight_only_linear", x, qweight, wscale, bias, group_size)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def check_gemm_args(codes, act_scale, qweight, wscale, bias, group_size) -> None:
    """Raise for arguments ``qsparse::w4a8_gemm`` does not take (every implementation checks the same)."""
    check_linear_args("w4a8_gemm", codes, qweight, wscale, bias, group_size)
    if codes.dtype not in _CODE_DTYPES or act_scale.dtype != torch.float32 or act_scale.shape != (*codes.shape[:-1], 1):
        raise ValueError(
            f"qsparse::w4a8_gemm: codes must be float8_e4m3fn or int8 (got {codes.dtype}, shape {tuple(codes.shape)}) "
            f"and act_scale fp32 of shape {(*codes.shape[:-1], 1)} (got {act_scale.dtype} {tuple(act_scale.shape)}); "
            "make them with formats.quantization.quantize_activation_symmetric"
        )


def check_linear_args(op: str, x, qweight, wscale, bias, group_size, activation: str = "none") -> None:
    """Raise for arguments ``qsparse::<op>`` does not take (every implementation checks the same)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"qsparse::{op}: activation={activation!r}; use one of {ACTIVATIONS}")
    n, half_k = qweight.shape
    k = x.shape[-1]
    groups = 1 if group_size == 0 else k // group_size
    if k != 2 * half_k or wscale.shape != (n, groups) or (bias is not None and bias.shape != (n,)):
        raise ValueError(
            "qsparse::%s: inconsistent shapes x=(..., %s), qweight=%s, wscale=%s, bias=%s, group_size=%s; "
            "qweight must be (N, K//2) and wscale (N, K//group_size)"
            % (op, k, tuple(qweight.shape), tuple(wscale.shape), None if bias is None else tuple(bias.shape), group_size)
        )
