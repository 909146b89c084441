"""``qsparse::layer_norm_modulate_quant`` — LayerNorm, adaLN modulation and per-token 8-bit quantization in one op,
producing the (codes, act_scale) pair ``qsparse::w4a8_gemm`` consumes.

Schema:

    layer_norm_modulate_quant(x: (B, S, K) bf16/fp16/fp32, weight: (K,) | None, bias: (K,) | None,
                              scale: (B|1, S|1, K) | None, shift: same | None, eps: float, act_format: str)
        -> (codes (B, S, K) float8_e4m3fn | int8, act_scale (B, S, 1) fp32)

    = quantize_activation_symmetric(((layer_norm(x.float(), weight, bias, eps) * (1 + scale) + shift).to(x.dtype)),
                                    act_format)

i.e. exactly the unfused graph of a DiT block's pre-norm (Wan: ``norm1(h.float()) * (1 + scale_msa) + shift_msa``,
``.type_as(h)``, then the activation quantization ``quantize_linears`` put in front of each W4A8 GEMM), including the
rounding to the model dtype before the quantization: the codes and scales are those of the same bf16 activation.

Implementations: the plain-torch reference below (any device; bit-identical to the unfused ops on CPU), and on CUDA
the Triton kernel (``kernels/ln_modulate_quant.py``) through ``register_kernel("cuda")``, falling back to the reference
for inputs the kernel refuses.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..formats.quantization import quantize_activation_symmetric

__all__ = ["layer_norm_modulate_quant", "layer_norm_modulate_quant_reference", "check_layer_norm_modulate_quant_args"]

_CODE_DTYPE = {"fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}


def check_layer_norm_modulate_quant_args(x, weight, bias, scale, shift, act_format: str) -> None:
    """Raise ValueError naming the argument when the inputs do not fit the schema (works on fake tensors)."""
    problem = ""
    if act_format not in _CODE_DTYPE:
        problem = f"act_format={act_format!r}; use one of {tuple(_CODE_DTYPE)}"
    elif x.ndim != 3:
        problem = f"x must be (B, S, K), got {tuple(x.shape)}"
    elif (scale is None) != (shift is None):
        problem = "scale and shift must both be tensors or both be None"
    else:
        k = x.shape[-1]
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and tuple(t.shape) != (k,):
                problem = f"{name} has shape {tuple(t.shape)}, expected ({k},)"
        for name, t in (("scale", scale), ("shift", shift)):
            if t is not None and (t.ndim != 3 or t.shape[-1] != k or t.shape[0] not in (1, x.shape[0])
                                  or t.shape[1] not in (1, x.shape[1])):
                problem = f"{name} has shape {tuple(t.shape)}, expected (B|1, S|1, {k})"
    if problem:
        raise ValueError(f"qsparse::layer_norm_modulate_quant: {problem}")


def layer_norm_modulate_quant_reference(x, weight, bias, scale, shift, eps: float, act_format: str):
    """The unfused graph's ops, in its order."""
    check_layer_norm_modulate_quant_args(x, weight, bias, scale, shift, act_format)
    y = F.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if scale is not None:
        y = y * (1 + scale.float()) + shift.float()
    return quantize_activation_symmetric(y.to(x.dtype), act_format)


@torch.library.custom_op("qsparse::layer_norm_modulate_quant", mutates_args=())
def layer_norm_modulate_quant(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    eps: float,
    act_format: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return layer_norm_modulate_quant_reference(x, weight, bias, scale, shift, eps, act_format)


@layer_norm_modulate_quant.register_fake
def _(x, weight, bias, scale, shift, eps, act_format):
    check_layer_norm_modulate_quant_args(x, weight, bias, scale, shift, act_format)
    return x.new_empty(x.shape, dtype=_CODE_DTYPE[act_format]), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


try:
    from ..kernels.ln_modulate_quant import ln_modulate_quant as _triton_ln_modulate_quant
    from ..kernels.ln_modulate_quant import unsupported_reason as _kernel_unsupported_reason
except ImportError:  # no triton on this machine: the reference serves CUDA tensors too
    _triton_ln_modulate_quant = None


if _triton_ln_modulate_quant is not None:

    @layer_norm_modulate_quant.register_kernel("cuda")
    def _(x, weight, bias, scale, shift, eps, act_format):
        if _kernel_unsupported_reason(x, weight, bias, scale, shift, act_format) is not None:
            return layer_norm_modulate_quant_reference(x, weight, bias, scale, shift, eps, act_format)
        codes, act_scale = _triton_ln_modulate_quant(x, weight, bias, scale, shift, eps, act_format)
        return codes.view(x.shape), act_scale.view(*x.shape[:-1], 1)
