"""Number formats of the W4A8 linear, in plain torch: the reference every kernel is checked against.

Weights — signed int4, symmetric, one scale per output channel and K-group (torchao's affine primitives
compute the scales and codes), packed two codes per byte:

    qweight[n, j] = (q[n, 2j] & 0xF) | (q[n, 2j+1] & 0xF) << 4        # uint8, shape (N, K // 2)
    scale[n, g]   = scale of q[n, g*G : (g+1)*G]                      # shape (N, K // G); G = K per-channel
    w[n, k]      ~= q[n, k] * scale[n, k // G]

The (N, K // 2) layout keeps K contiguous: fp8 tensor-core MMA on Hopper wants both operands K-major, and
the low/high nibbles of a byte are two neighbouring k, so a kernel unpacks a tile in registers with a
join + reshape and no shuffle.

Activations — per-token (per row) dynamic 8-bit, see ``config.ACT_FORMATS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "PackedInt4Weight",
    "quantize_weight_int4",
    "pack_int4",
    "unpack_int4",
    "dequantize_weight_int4",
    "linear_int4_weight_only",
    "quantize_activation",
    "quantize_activation_symmetric",
    "apply_activation",
    "ACTIVATIONS",
    "dequantize_activation",
    "effective_group_size",
]

INT4_MIN, INT4_MAX = -8, 7
FP8_E4M3_MAX = 448.0
_AMAX_EPS = 1e-12  # a row or group of zeros gets a tiny scale instead of a division by zero

_SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# Number formats of the sparsified attentions (qsparse::sparse_attention's precision, and the refresh's dense
# attention of a residual cache; config.SparsityConfig.attention_precision):
#   bf16      the model's dtype (bf16 / fp16 / fp32)
#   int8_fp8  int8 Q.K^T with per-tile scales and mean-smoothed K, e4m3 P.V with per-channel V scales, fp32
#             accumulation (ops/attention_quantization.py); on CUDA needs e4m3 tensor cores (sm89+)
ATTENTION_PRECISIONS = ("bf16", "int8_fp8")

@dataclass(frozen=True)
class PackedInt4Weight:
    """A linear weight in the W4 storage format. ``group_size`` is the effective K-group (K if per-channel)."""

    qweight: torch.Tensor  # (N, K // 2) uint8
    scale: torch.Tensor  # (N, K // group_size)
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.scale.numel() * self.scale.element_size()


def effective_group_size(in_features: int, group_size: int) -> int:
    """0 means per-channel: one group spanning all of K."""
    return in_features if group_size == 0 else group_size


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int codes in [-8, 7] -> (N, K // 2) uint8, neighbouring k in the low/high nibble."""
    if q.ndim != 2 or q.shape[1] % 2:
        raise ValueError(f"qsparse_compiler.formats.quantization.pack_int4: need (N, K) with K even, got {tuple(q.shape)}")
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) int8 in [-8, 7]; inverse of ``pack_int4``."""
    as_int = packed.to(torch.int16)
    low = ((as_int & 0xF) ^ 0x8) - 0x8  # sign-extend a nibble
    high = (((as_int >> 4) & 0xF) ^ 0x8) - 0x8
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2).to(torch.int8)


def quantize_weight_int4(weight: torch.Tensor, group_size: int = 128, scale_dtype: str = "bfloat16") -> PackedInt4Weight:
    """Round-to-nearest symmetric int4 of a (N, K) linear weight; computed once, stored, never per call."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    if weight.ndim != 2:
        raise ValueError(f"qsparse_compiler.formats.quantization: expected a (N, K) weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    group = effective_group_size(k, group_size)
    if k % group or group % 2:
        raise ValueError(
            f"qsparse_compiler.formats.quantization: K={k} is not a multiple of group_size={group} (or the group is odd); "
            "choose group_size dividing K, or 0 for per-channel scales"
        )
    w = weight.detach().to(torch.float32)
    block = (1, group)
    scale, _ = choose_qparams_affine(
        w, MappingType.SYMMETRIC, block, torch.int8, INT4_MIN, INT4_MAX, eps=_AMAX_EPS, scale_dtype=torch.float32
    )
    # Round the scale to its storage dtype first, so the codes are chosen for the scale the kernel will use.
    scale = scale.reshape(n, k // group).to(_SCALE_DTYPES[scale_dtype])
    scale_f32 = scale.to(torch.float32)
    zero = torch.zeros_like(scale_f32, dtype=torch.int32)
    codes = quantize_affine(w, block, scale_f32, zero, torch.int8, INT4_MIN, INT4_MAX)
    return PackedInt4Weight(pack_int4(codes), scale, group)


def dequantize_weight_int4(qweight: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """Exact fp32 value of a packed weight: codes times their group scale."""
    codes = unpack_int4(qweight).to(torch.float32)
    n, k = codes.shape
    group = effective_group_size(k, group_size)
    return (codes.reshape(n, k // group, group) * scale.to(torch.float32).reshape(n, k // group, 1)).reshape(n, k)


def linear_int4_weight_only(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """``F.linear`` with a packed int4 weight, dequantized and cast to ``x.dtype``; x itself is not quantized.
    The implementation of ``qsparse::int4_weight_only_linear`` (ops/w4a8_linear.py)."""
    return torch.nn.functional.linear(x, dequantize_weight_int4(qweight, scale, group_size).to(x.dtype), bias)


ACTIVATIONS = ("none", "gelu_tanh")


def apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The elementwise function a W4A8 linear applies to its input before quantizing it, in fp32 ("gelu_tanh":
    a DiT FFN's GELU folded into the down-projection, see ``qsparse::w4a8_linear``)."""
    if activation == "none":
        return x
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(x.to(torch.float32), approximate="tanh")
    raise ValueError(f"qsparse_compiler.formats.quantization: activation={activation!r}; use one of {ACTIVATIONS}")


def quantize_activation(x: torch.Tensor, act_format: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token dynamic quantization of (..., K): returns (codes, scale (..., 1) fp32, zero (..., 1) or None)."""
    xf = x.to(torch.float32)
    if act_format == "fp8_e4m3":
        scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_AMAX_EPS) / FP8_E4M3_MAX
        codes = (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        return codes, scale, None
    if act_format == "int8":
        scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_AMAX_EPS) / 127.0
        codes = torch.round(xf / scale).clamp(-127, 127).to(torch.int8)
        return codes, scale, None
    if act_format == "uint8_msfp":
        low = xf.amin(dim=-1, keepdim=True)
        scale = (xf.amax(dim=-1, keepdim=True) - low).clamp_min(_AMAX_EPS) / 255.0
        codes = torch.round((xf - low) / scale).clamp(0, 255).to(torch.uint8)
        return codes, scale, low
    raise ValueError(f"qsparse_compiler.formats.quantization: unknown act_format {act_format!r}")


def quantize_activation_symmetric(x: torch.Tensor, act_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of a symmetric format ("fp8_e4m3" or "int8"): the input of ``qsparse::w4a8_gemm``.

    Plain torch ops on purpose: the quantize_linears pass puts this function into the graph, and Inductor fuses it
    into the op that produced x (one pass over x writes the 8-bit codes; no separate quantization kernel)."""
    if act_format not in ("fp8_e4m3", "int8"):
        raise ValueError(
            f"qsparse_compiler.formats.quantization: {act_format!r} is not symmetric; quantize_activation_symmetric takes "
            "'fp8_e4m3' or 'int8' (uint8_msfp needs its zero point: use qsparse::w4a8_linear)"
        )
    codes, scale, _ = quantize_activation(x, act_format)
    return codes, scale


def dequantize_activation(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    value = codes.to(torch.float32) * scale
    return value if zero is None else value + zero
