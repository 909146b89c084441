"""CUDA implementation of ``qsparse::residual_attention``: one fused pass per step (kernels/residual_cache_step.py).

Importing this module registers the op's CUDA kernel (``register_kernel("cuda")``) when Triton imports. A full-rank
cache (bf16/fp16/fp32 or fp8 codes with per-row scales) with a head dim up to the kernel's ``MAX_HEAD_DIM`` takes the
fused step; a low-rank cache, a larger head dim or a refresh that denoises dR (``delta_rank`` > 0: a truncated SVD
the kernel does not compute) runs the plain-torch reference (ops/residual_attention.py), which the fused step is
tested against (under the Triton interpreter on CPU, on the GPU at model sizes). A refresh's O_dense comes from the
reference's ``refresh_dense``: the complement tiles merged with O_sparse where the op is given the sparse lse and
layout (the ops' Triton kernels), else a dense attention.
"""

from __future__ import annotations

from typing import Optional

import torch

from .residual_attention import (check_refresh_layout, is_fp8, refresh_dense, refreshes, residual_attention,
                                 residual_attention_reference)

try:
    from ..kernels.residual_cache_step import MAX_HEAD_DIM, residual_cache_step
except ImportError:  # no triton on this machine: the reference serves every call
    residual_cache_step = None  # type: ignore[assignment]

__all__ = ["residual_attention_fused", "fused_step_supported", "cuda_step", "REGISTERED"]


def fused_step_supported(o_sparse: torch.Tensor, state: list[torch.Tensor], denoises: bool = False) -> bool:
    """Whether the fused kernel serves this step: full rank (three tensors, or fp8 codes and scales), a head dim it
    tiles, and no denoising of dR (``denoises``: a refresh of order 2 with ``delta_rank`` > 0 needs an SVD)."""
    full_rank = len(state) == 3 or is_fp8(state)
    return full_rank and not denoises and o_sparse.shape[-1] <= MAX_HEAD_DIM


def cuda_step(o_sparse, state, refresh, cache_mode: int, order: int, delta_rank: int):
    """The implementation that serves one call on CUDA: the fused step where it computes the op's formula, else the
    reference."""
    denoises = order == 2 and delta_rank > 0 and refreshes(cache_mode, refresh)
    return residual_attention_fused if fused_step_supported(o_sparse, state, denoises) else residual_attention_reference


def residual_attention_fused(
    o_sparse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    scale: float,
    state: list[torch.Tensor],
    refresh: Optional[torch.Tensor],
    cache_mode: int,
    order: int,
    attention_precision: str = "bf16",
    lse_sparse: Optional[torch.Tensor] = None,
    kv_num_blocks: Optional[torch.Tensor] = None,
    kv_indices: Optional[torch.Tensor] = None,
    block_q: int = 0,
    block_kv: int = 0,
    complement_num_blocks: Optional[torch.Tensor] = None,
    complement_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The op's step through the fused kernel (``fused_step_supported`` must hold); the refresh's O_dense as the
    reference's (``refresh_dense``)."""
    steps = state[-1]
    # fp8: codes and their scales; else R and dR with no scales.
    residual, residual_scale, delta, delta_scale = state[:4] if is_fp8(state) else (state[0], None, state[1], None)
    scales = dict(residual_scale=residual_scale, delta_scale=delta_scale)
    if not refreshes(cache_mode, refresh):
        steps.add_(1)  # a reuse step n steps after the refresh adds n * dR
        return residual_cache_step(o_sparse, residual, delta, steps, order, **scales)
    dense = refresh_dense(q, k, v, key_padding_mask, scale, attention_precision, o_sparse, lse_sparse, kv_num_blocks,
                          kv_indices, block_q, block_kv, complement_num_blocks, complement_indices)
    out = residual_cache_step(o_sparse, residual, delta, steps, order, dense, **scales)  # reads the steps before it
    steps.zero_()
    return out


REGISTERED = residual_cache_step is not None
if REGISTERED:

    @residual_attention.register_kernel("cuda")
    def _(o_sparse, q, k, v, key_padding_mask, scale, state, refresh, cache_mode, order, attention_precision="bf16",
          delta_rank=0, lse_sparse=None, kv_num_blocks=None, kv_indices=None, block_q=0, block_kv=0,
          complement_num_blocks=None, complement_indices=None):
        check_refresh_layout(lse_sparse, kv_num_blocks, kv_indices, block_q, block_kv, complement_num_blocks,
                             complement_indices)
        layout = (lse_sparse, kv_num_blocks, kv_indices, block_q, block_kv, complement_num_blocks, complement_indices)
        step = cuda_step(o_sparse, state, refresh, cache_mode, order, delta_rank)
        if step is residual_attention_reference:
            return step(o_sparse, q, k, v, key_padding_mask, scale, state, refresh, cache_mode, order,
                        attention_precision, delta_rank, *layout)
        return step(o_sparse, q, k, v, key_padding_mask, scale, state, refresh, cache_mode, order, attention_precision,
                    *layout)
