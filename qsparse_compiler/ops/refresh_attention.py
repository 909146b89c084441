"""Dense attention for a refresh step from the sparse result it already has: the complement tiles, merged by lse.

    dense_from_sparse(q, k, v, out_sparse, lse_sparse, kv_num_blocks, kv_indices, block_q, block_kv, scale,
                      key_padding_mask=None, precision="bf16", complement=None)
        -> (out_dense (B, H, Sq, D) dtype of q, lse (B, H, Sq))

A refresh of the residual cache needs O_dense next to the O_sparse of the same step. Instead of a second, full
dense attention (which recomputes the layout's tiles), this attends only over the complement layout
(formats/complement.py) and merges the two parts through their log-sum-exps (kernels/attention_merge.py): the cost
is (1 - density) of one dense attention plus one elementwise pass, so a refresh never costs more than one dense
attention (issue #16). ``precision`` "bf16" runs the complement in the bf16 block-sparse kernel, "int8_fp8" in the
8-bit one (ops/attention_quantization.py's recipe); ``out_sparse``/``lse_sparse`` should come from the same precision
(the merge is exact for any pair, but then O_dense - O_sparse holds the precision's difference on the layout's tiles).
``complement`` is the layout's complement (kv_num_blocks, kv_indices) where the caller has it built already (once per
layout: ops/video_layout.py caches it with the layout); None builds it here, on the device without a host sync.

On CUDA the Triton kernels run; elsewhere (and for inputs they do not support) the plain-torch references, which
materialize Sq x Skv (tests, small shapes). ``merge_attention_partials_reference`` is the merge's plain-torch form.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..formats.complement import complement_blocks
from ..formats.quantization import ATTENTION_PRECISIONS
from .attention_int8_fp8_cuda import attention_int8_fp8_cuda
from .sparse_attention import reference_of_precision
from .sparse_attention_cuda import sparse_attention_cuda

__all__ = ["dense_from_sparse", "merge_attention_partials_reference"]


def merge_attention_partials_reference(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 torch form of kernels/attention_merge.py (same conventions: two empty parts give 0 and -inf)."""
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_a = torch.exp(lse_a - finite).unsqueeze(-1)
    w_b = torch.exp(lse_b - finite).unsqueeze(-1)
    out = out_a.to(torch.float32) * w_a + out_b.to(torch.float32) * w_b
    return out.to(out_a.dtype), lse


def _complement_part(q, k, v, kv_num, kv_idx, block_q, block_kv, scale, key_padding_mask, precision):
    """The complement tiles' attention through the ops' own CUDA paths, else the precision's reference."""
    if q.is_cuda:
        if precision == "int8_fp8":
            result = attention_int8_fp8_cuda(q, k, v, scale, key_padding_mask, kv_num, kv_idx, block_q, block_kv)
        else:
            result = sparse_attention_cuda(q, k, v, kv_num, kv_idx, block_q, block_kv, scale, key_padding_mask)
        if result is not None:
            return result
    return reference_of_precision(q, k, v, kv_num, kv_idx, block_q, block_kv, scale, key_padding_mask, precision)


def dense_from_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out_sparse: torch.Tensor,
    lse_sparse: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_q: int,
    block_kv: int,
    scale: float,
    key_padding_mask: Optional[torch.Tensor] = None,
    precision: str = "bf16",
    complement: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention = the sparse part (given) merged with attention over the complement tiles. See the module
    docstring."""
    if precision not in ATTENTION_PRECISIONS:
        raise ValueError(f"qsparse_compiler.ops.refresh_attention: precision={precision!r}; use one of "
                         f"{ATTENTION_PRECISIONS}")
    kv_num_c, kv_idx_c = complement_blocks(kv_num_blocks, kv_indices) if complement is None else complement
    out_c, lse_c = _complement_part(q, k, v, kv_num_c, kv_idx_c, block_q, block_kv, scale, key_padding_mask,
                                    precision)
    if q.is_cuda:
        from ..kernels.attention_merge import merge_attention_partials

        return merge_attention_partials(out_sparse, lse_sparse.contiguous(), out_c, lse_c, q.dtype)
    return merge_attention_partials_reference(out_sparse, lse_sparse, out_c, lse_c)
