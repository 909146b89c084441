"""Differentiable W4A8 simulation: the student of MSAD and the RTN model of salient selection.

``FakeQuantLinear`` computes exactly what ``qsparse::w4a8_linear`` computes (formats/quantization.py's formats), with
straight-through rounding so the per-group weight scales can be trained (LSQ): the codes are
``clamp(round(w / s), -8, 7)`` and the weight is ``codes * s``; d/ds sees the rounding residual, as in LSQ. The scale
passes through its storage dtype (bf16 by default) in the forward, so the student's numbers are the packed plan's
numbers: ``packed()`` stores the same codes and scales.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..config import WEIGHT_ONLY
from ..formats.quantization import (
    FP8_E4M3_MAX,
    INT4_MAX,
    INT4_MIN,
    PackedInt4Weight,
    effective_group_size,
    pack_int4,
    quantize_weight_int4,
)

__all__ = ["round_ste", "fake_quant_activation", "FakeQuantLinear", "swap_linears"]

_EPS = 1e-12
_SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def _through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` forward, gradient of ``x`` backward."""
    return x + (value - x).detach()


def fake_quant_activation(x: torch.Tensor, act_format: str) -> torch.Tensor:
    """Per-token dynamic 8-bit quantize + dequantize (same math as formats.quantization.quantize_activation), fp32."""
    xf = x.to(torch.float32)
    if act_format == "fp8_e4m3":
        scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS) / FP8_E4M3_MAX
        scaled = (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
        return _through(scaled, scaled.to(torch.float8_e4m3fn).to(torch.float32)) * scale
    if act_format == "int8":
        scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS) / 127.0
        return round_ste(xf / scale).clamp(-127, 127) * scale
    if act_format == "uint8_msfp":
        low = xf.amin(dim=-1, keepdim=True)
        scale = (xf.amax(dim=-1, keepdim=True) - low).clamp_min(_EPS) / 255.0
        return round_ste((xf - low) / scale).clamp(0, 255) * scale + low
    raise ValueError(f"qsparse_compiler.calibration.fake_quant: unknown act_format {act_format!r}")


class FakeQuantLinear(torch.nn.Module):
    """A linear with int4 weights (trainable log group scales) and 8-bit per-token activations, in fp32; with
    ``act_format=WEIGHT_ONLY`` the activations are not quantized (``qsparse::int4_weight_only_linear``)."""

    def __init__(
        self,
        linear: torch.nn.Linear,
        group_size: int,
        act_format: str,
        scale_dtype: str = "bfloat16",
        init: PackedInt4Weight | None = None,
    ) -> None:
        super().__init__()
        n, k = linear.weight.shape
        self.group = effective_group_size(k, group_size)
        self.group_size = group_size
        self.act_format = act_format
        self.scale_dtype = scale_dtype
        self.register_buffer("weight", linear.weight.detach().to(torch.float32).clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.float32).clone())
        packed = init if init is not None else quantize_weight_int4(linear.weight, group_size, scale_dtype)
        if packed.scale.shape != (n, k // self.group):
            raise ValueError(
                f"qsparse_compiler.calibration.fake_quant: initial scales {tuple(packed.scale.shape)} do not fit a "
                f"({n}, {k}) weight with group {self.group}; expected ({n}, {k // self.group})"
            )
        # log-parametrised: Adam steps are relative changes and the scale stays positive.
        self.log_scale = torch.nn.Parameter(packed.scale.to(torch.float32).clamp_min(_EPS).log())
        self.lora: torch.nn.Module | None = None  # a TimestepLoRA once attached (lora.py), added in full precision

    def scale(self) -> torch.Tensor:
        s = self.log_scale.exp()
        return _through(s, s.to(_SCALE_DTYPES[self.scale_dtype]).to(torch.float32).clamp_min(_EPS))

    def codes_and_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = self.weight.shape
        s = self.scale()
        grouped = self.weight.view(n, k // self.group, self.group)
        # x * (1/s), as torchao's quantize_affine, so the initial codes equal round-to-nearest's bit for bit.
        codes = round_ste(grouped * (1.0 / s).unsqueeze(-1)).clamp(INT4_MIN, INT4_MAX)
        return codes, s

    def dequantized_weight(self) -> torch.Tensor:
        codes, s = self.codes_and_scale()
        return (codes * s.unsqueeze(-1)).view_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_used = x.to(torch.float32) if self.act_format == WEIGHT_ONLY else fake_quant_activation(x, self.act_format)
        out = torch.nn.functional.linear(x_used, self.dequantized_weight(), self.bias)
        if self.lora is not None:
            out = out + self.lora(x)
        return out.to(x.dtype)

    @torch.no_grad()
    def packed(self) -> PackedInt4Weight:
        """The plan's storage: codes packed two per byte, scales in ``scale_dtype`` — what the forward used."""
        codes, s = self.codes_and_scale()
        n, k = self.weight.shape
        return PackedInt4Weight(
            pack_int4(codes.reshape(n, k).to(torch.int8)), s.to(_SCALE_DTYPES[self.scale_dtype]).contiguous(), self.group
        )


def _resolve(root: torch.nn.Module, fqn: str) -> tuple[torch.nn.Module, str]:
    parent_name, _, child = fqn.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


@contextlib.contextmanager
def swap_linears(root: torch.nn.Module, replacements: dict[str, torch.nn.Module]) -> Iterator[None]:
    """Temporarily put ``replacements[fqn]`` (FQN relative to ``root``) in place of those submodules."""
    originals = {}
    try:
        for fqn, module in replacements.items():
            parent, child = _resolve(root, fqn)
            originals[fqn] = getattr(parent, child)
            setattr(parent, child, module)
        yield
    finally:
        for fqn, module in originals.items():
            parent, child = _resolve(root, fqn)
            setattr(parent, child, module)
