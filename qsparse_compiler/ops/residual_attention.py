"""``qsparse::residual_attention`` — put back what sparse attention drops (SSAR, second-order reparameterization).

    residual_attention(o_sparse (B, H, S, D), q, k, v, key_padding_mask or None, scale: float,
                       state: list[Tensor] (mutated), refresh: bool CPU scalar tensor or None, cache_mode: int,
                       order: int, attention_precision: str = "bf16", delta_rank: int = 0) -> (B, H, S, D)

``state`` holds the cache of one site and one CFG branch (allocated and owned by runtime/residual_cache.py):
    full rank  [residual (B,H,S,D), delta (B,H,S,D), steps (1,) fp32]
    fp8        [residual codes (B,H,S,D) e4m3, residual scales (B,H,S,1) fp32, delta codes, delta scales, steps]
    rank r     [residual_u (B,H,S,r), residual_v (B,H,r,D), delta_u, delta_v, steps (1,) fp32]
An fp8 value is codes * scale, one scale per (b, h, s) row = the row's amax / 448 (CacheConfig.storage).
With order 1 the full-rank dR tensors have no tokens (S = 0): order 1 never reads or writes dR.
``steps`` counts the steps since the last refresh, on the device (no host sync, CUDA-graph safe), and is -1 before
the first refresh of a new generation.

A refresh step computes dense attention, R = O_dense - O_sparse, and for order 2 the per-step change
dR = (R - R_prev) / (steps + 1) between two refreshes; it stores R (and dR) and returns O_dense. A reuse step returns
O_sparse + R + steps * dR (order 1: O_sparse + R).
``delta_rank`` r > 0 (order 2, full-rank caches; CacheConfig.delta_rank) is QuantSparse's denoised second order: the
refresh replaces dR by its best rank-r approximation per (batch, head) over (S, D) - a truncated SVD that keeps the
change's dominant directions and drops the token-level noise of two sparse/dense differences (the paper's beta term) -
before it is stored; a reuse step is unchanged. r >= min(S, D) keeps dR as measured.
``cache_mode`` 1 always refreshes, 2 always reuses, 0 follows the ``refresh`` flag that the runtime supplies per call
(a host-side branch: no device read). ``attention_precision`` is the site's (``formats.quantization.ATTENTION_PRECISIONS``): "int8_fp8" computes the refresh's dense attention with the 8-bit
recipe (ops/attention_quantization.py; on CUDA the dense 8-bit kernel, bf16 SDPA where it cannot run).

The op's body is the plain-torch reference (CPU, low-rank caches). On CUDA a full-rank cache (bf16/fp16/fp32 or fp8)
takes one fused pass per step (kernels/residual_cache_step.py), registered as the op's CUDA kernel by
ops/residual_attention_cuda.py and tested against this reference. The fused step has no SVD: a refresh with
``delta_rank`` > 0 runs this reference on CUDA too (its reuse steps stay fused: the same formula).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..formats.quantization import dequantize_activation, quantize_activation_symmetric
from .attention_int8_fp8_cuda import attention_int8_fp8_cuda
from .attention_quantization import attention_int8_fp8_reference

__all__ = ["residual_attention", "residual_attention_reference", "refreshes", "dense_attention", "is_fp8", "denoise_delta",
           "MODE_AUTO", "MODE_REFRESH", "MODE_REUSE"]

MODE_AUTO, MODE_REFRESH, MODE_REUSE = 0, 1, 2


def _low_rank(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors per (batch, head) of a (B, H, S, D) tensor: (U * sigma) (B,H,S,r) and V^T (B,H,r,D)."""
    u, sigma, vh = torch.linalg.svd(residual.to(torch.float32), full_matrices=False)
    return u[..., :rank] * sigma[..., None, :rank], vh[..., :rank, :]


def denoise_delta(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """QuantSparse's denoised dR: the best rank-``rank`` approximation per (batch, head) of a (B, H, S, D) change, in
    fp32; unchanged when ``rank`` is 0 or at least min(S, D) (nothing to drop)."""
    if rank <= 0 or rank >= min(delta.shape[-2:]):
        return delta.to(torch.float32)
    factor_u, factor_v = _low_rank(delta, rank)
    return factor_u @ factor_v


def is_fp8(state: list[torch.Tensor]) -> bool:
    """Whether ``state`` stores R and dR as e4m3 codes with per-row scales."""
    return state[0].dtype == torch.float8_e4m3fn


def _expand(state: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, dR) in full, fp32, from the stored state."""
    if len(state) == 3:
        return state[0].to(torch.float32), state[1].to(torch.float32)
    if is_fp8(state):
        return dequantize_activation(state[0], state[1], None), dequantize_activation(state[2], state[3], None)
    return state[0].float() @ state[1].float(), state[2].float() @ state[3].float()


def _store(state: list[torch.Tensor], residual: torch.Tensor, delta: torch.Tensor | None) -> None:
    """Write R and (order 2; None for order 1) dR into the state in its storage format."""
    if len(state) == 3:
        parts = (residual,) if delta is None else (residual, delta)
    elif is_fp8(state):
        # The same per-row e4m3 rounding as the activations of a W4A8 linear (and as the fused kernel).
        parts = quantize_activation_symmetric(residual, "fp8_e4m3")
        if delta is not None:
            parts += quantize_activation_symmetric(delta, "fp8_e4m3")
    else:
        rank = state[0].shape[-1]
        parts = _low_rank(residual, rank) + (_low_rank(delta, rank) if delta is not None else ())
    for target, source in zip(state, parts):
        target.copy_(source)


def refreshes(cache_mode: int, refresh: Optional[torch.Tensor]) -> bool:
    """Whether this call refreshes: ``cache_mode`` forces it, or (MODE_AUTO) the runtime's host-side flag says so."""
    return cache_mode == MODE_REFRESH or (cache_mode == MODE_AUTO and refresh is not None and bool(refresh))


def dense_attention(q, k, v, key_padding_mask, scale, precision: str) -> torch.Tensor:
    """The refresh's dense attention in the site's precision (on CUDA the 8-bit kernel where it runs, else SDPA)."""
    if precision == "int8_fp8":
        if not q.is_cuda:
            return attention_int8_fp8_reference(q, k, v, scale, key_padding_mask=key_padding_mask)[0]
        result = attention_int8_fp8_cuda(q, k, v, scale, key_padding_mask)
        if result is not None:
            return result[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask, scale=scale)


@torch.library.custom_op("qsparse::residual_attention", mutates_args=("state",))
def residual_attention(
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
    delta_rank: int = 0,
) -> torch.Tensor:
    return residual_attention_reference(o_sparse, q, k, v, key_padding_mask, scale, state, refresh, cache_mode, order,
                                        attention_precision, delta_rank)


@residual_attention.register_fake
def _(o_sparse, q, k, v, key_padding_mask, scale, state, refresh, cache_mode, order, attention_precision="bf16",
      delta_rank=0):
    return o_sparse.new_empty(o_sparse.shape)


def residual_attention_reference(
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
    delta_rank: int = 0,
) -> torch.Tensor:
    """The plain-torch step: what ``qsparse::residual_attention`` computes, on any device and any cache storage."""
    steps = state[-1]
    do_refresh = refreshes(cache_mode, refresh)
    if do_refresh:
        dense = dense_attention(q, k, v, key_padding_mask, scale, attention_precision)
        new_residual = dense.to(torch.float32) - o_sparse.to(torch.float32)
        previous, _ = _expand(state)
        delta = None
        if order == 2:
            # steps = -1 before the first refresh: no previous residual, dR starts at 0.
            have_previous = (steps >= 0).to(torch.float32)
            delta = have_previous * (new_residual - previous) / (steps.clamp_min(0) + 1)
            if delta_rank > 0:
                delta = denoise_delta(delta, delta_rank)
        _store(state, new_residual, delta)
        steps.zero_()
        return dense.to(o_sparse.dtype).contiguous()
    steps.add_(1)
    if len(state) == 3:
        # Full rank, the hot path of a reuse step: two passes in the activation dtype, no fp32 temporaries.
        out = torch.add(o_sparse, state[0].to(o_sparse.dtype))
        if order == 2:
            out.addcmul_(state[1].to(o_sparse.dtype), steps.to(o_sparse.dtype))
        return out
    residual, delta = _expand(state)
    estimate = residual + steps * delta if order == 2 else residual
    return (o_sparse.to(torch.float32) + estimate).to(o_sparse.dtype)
