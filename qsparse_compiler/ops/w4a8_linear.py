"""``qsparse::w4a8_linear`` — y = A8(x) @ W4ᵀ + bias.

Schema (what the passes emit, and what every backend kernel must implement):

    w4a8_linear(x: (..., K) bf16/fp16/fp32, qweight: (N, K//2) uint8, wscale: (N, K//G),
                bias: (N,) or None, group_size: int (0 = per channel), act_format: str) -> (..., N), dtype of x

The default implementation (CPU and any device without a kernel) is the plain-torch reference: quantize x
per token in ``act_format``, dequantize both operands exactly and multiply in fp32. A CUDA kernel registers
itself with ``register_cuda_impl`` (kernels/ stays free of torch.library); shapes it cannot handle go to
the reference, so the op is never wrong, only slower.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .quantization import dequantize_activation, dequantize_weight_int4, quantize_activation

__all__ = ["w4a8_linear", "w4a8_linear_reference", "register_cuda_impl"]


def w4a8_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor],
    group_size: int,
    act_format: str,
) -> torch.Tensor:
    codes, scale, zero = quantize_activation(x, act_format)
    x_hat = dequantize_activation(codes, scale, zero)
    w_hat = dequantize_weight_int4(qweight, wscale, group_size).to(x.device)
    out = x_hat @ w_hat.t()
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


# A CUDA implementation returns None for a shape or dtype it does not support.
_CudaImpl = Callable[..., Optional[torch.Tensor]]
_cuda_impl: list[_CudaImpl] = []


def register_cuda_impl(fn: _CudaImpl) -> None:
    _cuda_impl[:] = [fn]


@torch.library.custom_op("qsparse::w4a8_linear", mutates_args=())
def w4a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor],
    group_size: int,
    act_format: str,
) -> torch.Tensor:
    _check(x, qweight, wscale, bias, group_size)
    if x.is_cuda and _cuda_impl:
        out = _cuda_impl[0](x, qweight, wscale, bias, group_size, act_format)
        if out is not None:
            return out
    return w4a8_linear_reference(x, qweight, wscale, bias, group_size, act_format)


@w4a8_linear.register_fake
def _(x, qweight, wscale, bias, group_size, act_format):
    _check(x, qweight, wscale, bias, group_size)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _check(x, qweight, wscale, bias, group_size) -> None:
    n, half_k = qweight.shape
    k = x.shape[-1]
    groups = 1 if group_size == 0 else k // group_size
    if k != 2 * half_k or wscale.shape != (n, groups) or (bias is not None and bias.shape != (n,)):
        raise ValueError(
            "qsparse::w4a8_linear: inconsistent shapes x=(..., %s), qweight=%s, wscale=%s, bias=%s, group_size=%s; "
            "qweight must be (N, K//2) and wscale (N, K//group_size)"
            % (k, tuple(qweight.shape), tuple(wscale.shape), None if bias is None else tuple(bias.shape), group_size)
        )
