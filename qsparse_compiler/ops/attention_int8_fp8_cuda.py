"""CUDA path of ``attention_precision="int8_fp8"``: quantize q/k/v (one pass each, plain torch on the device: the
recipe of ops/attention_quantization.py) and run the 8-bit Triton kernels (kernels/attention_int8_fp8.py).

Used by ``qsparse::sparse_attention`` (the block-sparse entry point) and by ``qsparse::residual_attention``'s refresh
(block-sparse over the layout's complement, ops/refresh_attention.py; the dense entry point where the op has no
layout). Every function returns None where the kernel cannot run, and the caller then computes in bf16 -
never a wrong answer. ``static_unsupported_reason`` answers the same question at compile time (the passes report
it per site) from the dtype, head dim, tiling and device alone. Shape/dtype logic only on the host: no sync.
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention_quantization import QUANT_BLOCK, quantize_attention_inputs

__all__ = ["attention_int8_fp8_cuda", "static_unsupported_reason", "FP8_MIN_CAPABILITY"]

try:
    from ..kernels.attention_int8_fp8 import (SUPPORTED_HEAD_DIMS, block_sparse_attention_int8_fp8,
                                              dense_attention_int8_fp8, unsupported_reason)
except ImportError:  # no triton on this machine
    block_sparse_attention_int8_fp8 = dense_attention_int8_fp8 = unsupported_reason = None  # type: ignore
    SUPPORTED_HEAD_DIMS = ()

FP8_MIN_CAPABILITY = (8, 9)  # e4m3 tensor-core MMA: Ada (sm89) and Hopper (sm90)
_SUPPORTED_LAYOUT_BLOCKS = (32, 64, 128, 256)
_MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def static_unsupported_reason(dtype: torch.dtype, head_dim: int, block_q: int, block_kv: int,
                              device: torch.device) -> Optional[str]:
    """Why the 8-bit kernels would refuse a site of this dtype/head dim/tiling on ``device``, or None."""
    if device.type != "cuda":
        return None  # CPU: the plain-torch recipe (the reference) serves the site
    if dense_attention_int8_fp8 is None:
        return "no Triton on this machine"
    if dtype not in _MODEL_DTYPES:
        return f"dtype {dtype} (needs one of {_MODEL_DTYPES})"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {head_dim} not in {SUPPORTED_HEAD_DIMS}"
    if block_q not in _SUPPORTED_LAYOUT_BLOCKS or block_kv not in _SUPPORTED_LAYOUT_BLOCKS:
        return f"layout blocks {block_q}x{block_kv}: the 8-bit kernel needs each in {_SUPPORTED_LAYOUT_BLOCKS}"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        return f"GPU compute capability {capability} has no e4m3 tensor cores (needs >= {FP8_MIN_CAPABILITY})"
    return None


def attention_int8_fp8_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_padding_mask: Optional[torch.Tensor] = None,
    kv_num_blocks: Optional[torch.Tensor] = None,
    kv_indices: Optional[torch.Tensor] = None,
    block_q: int = 128,
    block_kv: int = 128,
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(out in q's dtype, lse) by the 8-bit kernels - block-sparse when a layout is given, else dense - or None."""
    if dense_attention_int8_fp8 is None or not q.is_cuda:
        return None
    head_dim = q.shape[-1] if q.ndim == 4 else 0
    bq, bkv = (block_q, block_kv) if kv_num_blocks is not None else (128, 128)
    if static_unsupported_reason(q.dtype, head_dim, bq, bkv, q.device) is not None:
        return None
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return None
    x = quantize_attention_inputs(q, k, v, QUANT_BLOCK)
    args = (x.q_codes, x.q_scale, x.k_codes, x.k_scale, x.v_codes, x.v_scale, x.lse_shift)
    if unsupported_reason(*args, QUANT_BLOCK, kv_num_blocks, kv_indices, block_q, block_kv, key_padding_mask,
                          q.dtype) is not None:
        return None
    if kv_num_blocks is None:
        return dense_attention_int8_fp8(*args, scale, key_padding_mask, QUANT_BLOCK, q.dtype)
    return block_sparse_attention_int8_fp8(*args, kv_num_blocks, kv_indices, block_q, block_kv, scale,
                                           key_padding_mask, QUANT_BLOCK, q.dtype)
