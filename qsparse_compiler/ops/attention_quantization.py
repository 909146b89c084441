"""8-bit attention (``attention_precision="int8_fp8"``) in plain torch: the quantization recipe and the reference
that the Triton kernels (kernels/attention_int8_fp8.py) are checked against.

The recipe (SageAttention2's, arXiv 2411.10958, written here from the paper's description):

    K smoothing   k_s = k - mean_t(k)   per (batch, head), the mean over the Skv tokens in fp32. Softmax is
                  invariant to it (q . mean_t(k) is one constant per query row), and it removes the channel-wise
                  offset that DiT keys carry, which would otherwise set every key tile's int8 scale.
    Q, K          symmetric int8, one fp32 scale per (batch, head, tile of ``quant_block`` tokens):
                  scale = max(amax, 1e-12) / 127, code = round_half_even(x / scale) clamped to [-127, 127].
    scores        S = (Q_codes . K_codes^T) * q_scale[row tile] * k_scale[key tile] * softmax scale: the int8 dot is
                  exact in int32, so S differs from fp32 attention only by the Q/K rounding.
    V             e4m3 with one fp32 scale per (batch, head, channel): scale = max(amax over tokens, 1e-12) / 448,
                  code = e4m3(v / scale). Stored channel-major, (B, H, D, Skv): P . V is then a dot whose reduction
                  dim (keys) is the contiguous one, the operand order Hopper's fp8 tensor-core MMA wants.
    P             the online softmax's unnormalized probabilities p = exp(s - m) in [0, 1] are multiplied by
                  ``P_SCALE`` = 448 and rounded to e4m3 (the full e4m3 range: values down to 2^-9 / 448 keep
                  precision); the row sum l is accumulated from the fp32 p, so the lse is that of fp32 softmax.
    output        out = (sum_j e4m3(448 p_j) * V_codes_j) * v_scale / (448 * l); lse = m + log(l) (natural log)
                  + scale * (q . mean_t(k)) (fp32 q): the smoothing's shift added back, so lse keeps the contract of
                  ``qsparse::sparse_attention`` (the log-sum-exp of the scaled scores of the unsmoothed keys) and
                  partial results of either precision merge through it (kernels/attention_merge.py).

The reference below applies P's rounding with the row's final max (one softmax over the whole row); the kernels
round each key tile's p against the running max of the online softmax. Both are the same recipe with errors of the
same size, which is what the 2x rule compares (tests/kernels/test_attention_int8_fp8.py).

Conventions (those of ``qsparse::sparse_attention``): rows that attend to nothing (an empty layout row, or every
listed key masked) give out = 0 and lse = -inf; tokens past Sq/Skv in tail tiles do not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..formats.layout import BlockSparseLayout

__all__ = [
    "QUANT_BLOCK",
    "P_SCALE",
    "QuantizedAttentionInputs",
    "quantize_int8_per_block",
    "smooth_keys",
    "quantize_v_per_channel",
    "quantize_attention_inputs",
    "attention_int8_fp8_reference",
]

QUANT_BLOCK = 64  # tokens per Q / K int8 scale (kernel tiles are independent of it: scales are gathered per token)
P_SCALE = 448.0  # e4m3's largest finite value: P in [0, 1] is scaled onto the whole e4m3 range
INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
V_ROW_ALIGN = 128  # tokens (= bytes of e4m3) a V-codes row is padded to (quantize_v_per_channel)
_AMAX_EPS = 1e-12  # ops/quantization.py's: an all-zero tile gets a tiny scale, not a division by zero


@dataclass(frozen=True)
class QuantizedAttentionInputs:
    """What the 8-bit kernels read. Codes have a unit last stride; scales fp32.

    q_codes (B, H, Sq, D) int8, q_scale (B, H, ceil(Sq / quant_block))
    k_codes (B, H, Skv, D) int8 of the smoothed keys, k_scale (B, H, ceil(Skv / quant_block))
    lse_shift (B, H, Sq) q . mean_t(k) in fp32, what smoothing removed from every score of the row (without the
        softmax scale): the kernels add ``scale * lse_shift`` to the lse
    v_codes (B, H, D, Skv) float8_e4m3fn (channel-major; a view of rows zero-padded to 128 tokens),
        v_scale (B, H, D)
    """

    q_codes: torch.Tensor
    q_scale: torch.Tensor
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    lse_shift: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    quant_block: int


def quantize_int8_per_block(x: torch.Tensor, quant_block: int = QUANT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, S, D) -> int8 codes (B, H, S, D) and fp32 scales (B, H, ceil(S / quant_block)): one symmetric scale
    per tile of ``quant_block`` tokens of one (batch, head); the last tile may be shorter."""
    b, h, s, d = x.shape
    tiles = -(-s // quant_block)
    xf = x.to(torch.float32)
    padded = torch.nn.functional.pad(xf, (0, 0, 0, tiles * quant_block - s))  # zeros never raise an amax
    amax = padded.reshape(b, h, tiles, quant_block * d).abs().amax(dim=-1)
    scale = amax.clamp_min(_AMAX_EPS) / INT8_MAX
    per_token = scale.repeat_interleave(quant_block, dim=-1)[..., :s, None]
    codes = torch.round(xf / per_token).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes.contiguous(), scale.contiguous()


def smooth_keys(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k minus its mean over tokens, the mean (B, H, D)), per (batch, head, channel), in fp32 (softmax-invariant)."""
    kf = k.to(torch.float32)
    mean = kf.mean(dim=2, keepdim=True)
    return kf - mean, mean.squeeze(2).contiguous()


def quantize_v_per_channel(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, Skv, D) -> e4m3 codes (B, H, D, Skv) channel-major and fp32 scales (B, H, D).

    The codes are a view of a buffer whose rows are padded with zero codes to a multiple of ``V_ROW_ALIGN`` tokens.
    Compiled Triton vectorizes (and pipelines) a tile load only when it can prove the row stride divisible by 16 and
    the tile unmasked; with Wan's 32,760 tokens neither held, and the 8-bit kernel read V one byte at a time. With the
    padding the rows are aligned and the kernel's tail tiles read zeros instead of masking
    (kernels/attention_int8_fp8.py ``v_padded``)."""
    vf = v.to(torch.float32).transpose(-1, -2)
    scale = vf.abs().amax(dim=-1).clamp_min(_AMAX_EPS) / FP8_E4M3_MAX
    codes = (vf / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    skv = codes.shape[-1]
    padded = codes.new_zeros(*codes.shape[:-1], -(-skv // V_ROW_ALIGN) * V_ROW_ALIGN)
    padded[..., :skv] = codes
    return padded[..., :skv], scale.contiguous()


def quantize_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, quant_block: int = QUANT_BLOCK
) -> QuantizedAttentionInputs:
    """The whole recipe's input side: int8 Q, smoothed int8 K, channel-major e4m3 V with their scales."""
    q_codes, q_scale = quantize_int8_per_block(q, quant_block)
    smoothed, k_mean = smooth_keys(k)
    k_codes, k_scale = quantize_int8_per_block(smoothed, quant_block)
    v_codes, v_scale = quantize_v_per_channel(v)
    lse_shift = (q.to(torch.float32) @ k_mean[..., None]).squeeze(-1).contiguous()
    return QuantizedAttentionInputs(q_codes, q_scale, k_codes, k_scale, lse_shift, v_codes, v_scale, quant_block)


def _per_token(scale: torch.Tensor, quant_block: int, length: int) -> torch.Tensor:
    return scale.repeat_interleave(quant_block, dim=-1)[..., :length]


def attention_int8_fp8_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    kv_num_blocks: Optional[torch.Tensor] = None,
    kv_indices: Optional[torch.Tensor] = None,
    block_q: int = 128,
    block_kv: int = 128,
    key_padding_mask: Optional[torch.Tensor] = None,
    quant_block: int = QUANT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 Q.K^T / e4m3 P.V attention in fp32 torch: (out (B, H, Sq, D) in q's dtype, lse (B, H, Sq) fp32).

    Dense when ``kv_num_blocks`` is None, else restricted to the layout's tiles (``qsparse::sparse_attention``'s
    contract); ``key_padding_mask`` bool (B|1, 1, 1, Skv), True = the key takes part. Materializes Sq x Skv:
    tests and small shapes only."""
    quantized = quantize_attention_inputs(q, k, v, quant_block)
    sq, skv = q.shape[2], k.shape[2]
    q_hat = quantized.q_codes.to(torch.float32) * _per_token(quantized.q_scale, quant_block, sq)[..., None]
    k_hat = quantized.k_codes.to(torch.float32) * _per_token(quantized.k_scale, quant_block, skv)[..., None]
    scores = (q_hat @ k_hat.transpose(-1, -2)) * scale
    mask = torch.ones(1, 1, sq, skv, dtype=torch.bool, device=q.device)
    if kv_num_blocks is not None:
        layout = BlockSparseLayout(kv_num_blocks, kv_indices, block_q, block_kv, sq, skv)
        mask = layout.to_token_mask().to(q.device)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.to(torch.bool)
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.where(mask, torch.exp(scores - row_max), torch.zeros_like(scores))
    row_sum = p.sum(dim=-1)
    attended = row_sum > 0
    shift = quantized.lse_shift * scale  # the smoothing's constant per row
    lse = torch.where(attended, row_max.squeeze(-1) + torch.log(torch.where(attended, row_sum, 1.0)) + shift,
                      float("-inf"))
    p_codes = (p * P_SCALE).to(torch.float8_e4m3fn).to(torch.float32)
    acc = p_codes @ quantized.v_codes.to(torch.float32).transpose(-1, -2)  # (B, H, Sq, D)
    out = acc * quantized.v_scale[..., None, :] / (P_SCALE * torch.where(attended, row_sum, 1.0))[..., None]
    return out.to(q.dtype), lse
