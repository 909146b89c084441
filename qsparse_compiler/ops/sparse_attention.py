"""``qsparse::sparse_attention`` — attention restricted to the tiles of a block layout.

Schema (what the passes emit, and what every backend kernel must implement):

    sparse_attention(q: (B, H, Sq, D), k: (B, H, Skv, D), v: (B, H, Skv, D),
                     kv_num_blocks: int32 [B|1, H|1, QB], kv_indices: int32 [B|1, H|1, QB, KVB],
                     block_q: int, block_kv: int, scale: float,
                     key_padding_mask: bool (B|1, 1, 1, Skv) or None,
                     precision: str = "bf16") -> (out (B, H, Sq, D) dtype of q, lse (B, H, Sq) fp32)

``kv_num_blocks``/``kv_indices`` are a ``sparsity.BlockSparseLayout``. ``key_padding_mask`` (True = the key takes
part) is SDPA's boolean mask in its key-padding form, as HunyuanVideo passes it for padded text. ``lse`` is the
natural-log log-sum-exp of the scaled scores over the attended keys; rows that attend nothing (an empty
layout row, or every key masked) give out = 0 and lse = -inf.

``precision`` (``formats.quantization.ATTENTION_PRECISIONS``): "bf16" attends in q's dtype; "int8_fp8" quantizes Q and the
mean-smoothed K to int8 and V and P to e4m3 (ops/attention_quantization.py: the recipe, its reference, and why).

The default implementation is the fp32 plain-torch reference of the precision's recipe (it materializes the
Sq x Skv mask: for tests and small shapes). ops/sparse_attention_cuda.py registers the Triton kernels with
``register_kernel("cuda")``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..formats.layout import BlockSparseLayout
from ..formats.quantization import ATTENTION_PRECISIONS
from .attention_quantization import attention_int8_fp8_reference

__all__ = ["sparse_attention", "sparse_attention_reference", "reference_of_precision", "check_args"]


def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_q: int,
    block_kv: int,
    scale: float,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    layout = BlockSparseLayout(kv_num_blocks, kv_indices, block_q, block_kv, q.shape[2], k.shape[2])
    mask = layout.to_token_mask().to(q.device)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.to(torch.bool)
    scores = (q.to(torch.float32) @ k.to(torch.float32).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.where(mask, torch.exp(scores - finite_lse.unsqueeze(-1)), torch.zeros_like(scores))
    out = probs @ v.to(torch.float32)
    return out.to(q.dtype), lse


@torch.library.custom_op("qsparse::sparse_attention", mutates_args=())
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_q: int,
    block_kv: int,
    scale: float,
    key_padding_mask: Optional[torch.Tensor],
    precision: str = "bf16",
) -> tuple[torch.Tensor, torch.Tensor]:
    check_args(q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, precision)
    return reference_of_precision(q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, scale, key_padding_mask,
                                  precision)


def reference_of_precision(q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, scale, key_padding_mask,
                           precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch reference of the precision's recipe (every device's fallback)."""
    if precision == "int8_fp8":
        return attention_int8_fp8_reference(q, k, v, scale, kv_num_blocks, kv_indices, block_q, block_kv,
                                            key_padding_mask)
    return sparse_attention_reference(q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, scale, key_padding_mask)


@sparse_attention.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, scale, key_padding_mask, precision="bf16"):
    check_args(q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, precision)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def check_args(q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, precision="bf16") -> None:
    """Raise for arguments ``qsparse::sparse_attention`` does not take (every implementation checks the same)."""
    if precision not in ATTENTION_PRECISIONS:
        raise ValueError(f"qsparse::sparse_attention: precision={precision!r}; use one of {ATTENTION_PRECISIONS}")
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"qsparse::sparse_attention: q, k, v must be (B, H, S, D) with matching B, H, D; got q={tuple(q.shape)}, "
            f"k={tuple(k.shape)}, v={tuple(v.shape)}"
        )
    if kv_num_blocks.ndim != 3 or kv_indices.ndim != 4:
        raise ValueError(
            f"qsparse::sparse_attention: layout must be kv_num_blocks [B, H, QB] and kv_indices [B, H, QB, KVB]; "
            f"got {tuple(kv_num_blocks.shape)} and {tuple(kv_indices.shape)}"
        )
