"""CUDA implementation of ``qsparse::sparse_attention``: the Triton block-sparse kernel.

Importing this module registers the op's CUDA kernel (``register_kernel("cuda")``) when Triton imports.
``sparse_attention_cuda`` returns None for inputs the kernel does not handle (fp32, unusual head dims or block
sizes), and the registered kernel then runs the plain-torch reference. Everything here is shape/dtype logic on
the host: no ``.item()``, no synchronization, so the op can sit in a ``fullgraph=True`` compiled graph and be
captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention_int8_fp8_cuda import attention_int8_fp8_cuda
from .sparse_attention import check_args, reference_of_precision, sparse_attention

__all__ = ["sparse_attention_cuda", "REGISTERED"]

try:
    from ..kernels.block_sparse_attention import block_sparse_attention, unsupported_reason
except ImportError:  # no triton on this machine: the reference serves every call
    block_sparse_attention = None  # type: ignore[assignment]
    unsupported_reason = None  # type: ignore[assignment]


def sparse_attention_cuda(
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
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    if block_sparse_attention is None or not q.is_cuda:
        return None
    if precision == "int8_fp8":
        result = attention_int8_fp8_cuda(q, k, v, scale, key_padding_mask, kv_num_blocks, kv_indices, block_q,
                                         block_kv)
        if result is not None:
            return result  # else the bf16 kernel: the passes report such sites as bf16 at compile time
    if unsupported_reason(q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, key_padding_mask) is not None:
        return None
    return block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, scale, key_padding_mask)


REGISTERED = block_sparse_attention is not None
if REGISTERED:

    @sparse_attention.register_kernel("cuda")
    def _(q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, scale, key_padding_mask, precision="bf16"):
        check_args(q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, precision)
        result = sparse_attention_cuda(q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, scale, key_padding_mask,
                                       precision)
        if result is None:
            result = reference_of_precision(q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, scale,
                                            key_padding_mask, precision)
        return result


def static_unsupported_reason(dtype: torch.dtype, head_dim: int, block_q: int, block_kv: int) -> Optional[str]:
    """Why the CUDA kernel would refuse attention of this dtype/head dim/tiling, decided before any tensor exists
    (the passes ask at compile time: an unsupported CUDA site stays on dense SDPA instead of the S x S reference)."""
    if block_sparse_attention is None:
        return "no Triton on this machine: the sparse reference would materialize S x S on the GPU"
    meta = dict(device="meta")
    q = torch.empty(1, 1, 2 * block_q, head_dim, dtype=dtype, **meta)
    k = torch.empty(1, 1, 2 * block_kv, head_dim, dtype=dtype, **meta)
    kv_num_blocks = torch.empty(1, 1, 2, dtype=torch.int32, **meta)
    kv_indices = torch.empty(1, 1, 2, 2, dtype=torch.int32, **meta)
    return unsupported_reason(q, k, k, kv_num_blocks, kv_indices, block_q, block_kv, None)
