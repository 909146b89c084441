"""``qsparse::residual_attention`` — put back what sparse attention drops (SSAR, second-order reparameterization).

    residual_attention(o_sparse (B, H, S, D), q, k, v, key_padding_mask or None, scale: float,
                       state: list[Tensor] (mutated), refresh: bool CPU scalar tensor or None, cache_mode: int,
                       order: int, attention_precision: str = "bf16", delta_rank: int = 0,
                       lse_sparse (B, H, S) fp32 or None = None, kv_num_blocks int32 [B|1, H|1, QB] or None = None,
                       kv_indices int32 [B|1, H|1, QB, KVB] or None = None, block_q: int = 0, block_kv: int = 0,
                       complement_num_blocks or None = None, complement_indices or None = None) -> (B, H, S, D)

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

O_dense of a refresh (issue #16: a refresh never costs more than one dense attention). With the sparse attention's
``lse_sparse`` and its layout (``kv_num_blocks``, ``kv_indices``, ``block_q``, ``block_kv``: the outputs and
arguments of the ``qsparse::sparse_attention`` that made ``o_sparse``, in the same precision), the refresh attends
only over the complement tiles and merges that with O_sparse through the two lse (ops/refresh_attention.py): exact
dense attention for (1 - density) of its cost plus one elementwise pass. ``complement_num_blocks`` /
``complement_indices`` are that complement, built once per layout (``qsparse::video_block_layout(...,
complement=True)``, what the pass emits); without them the refresh builds it from the layout
(formats/complement.py; a layout that changes every step). Without a layout (a caller with no sparse lse) the
refresh computes a full dense attention. ``attention_precision`` is the site's
(``formats.quantization.ATTENTION_PRECISIONS``) for both parts: "int8_fp8" runs the complement (or the dense
attention) with the 8-bit recipe (ops/attention_quantization.py; on CUDA the 8-bit kernels, bf16 where they cannot
run). A reuse step reads none of these: it pays nothing for them (the sparse kernel writes its lse on every step
anyway, 4 bytes per row next to the output's 2 * D).

The refresh decision is a host-side branch: ``cache_mode`` 1 always refreshes, 2 always reuses, 0 follows the
``refresh`` flag, a CPU tensor the runtime passes per call (reading it is no device read, and one compiled graph
serves both paths without a recompile). Under CUDA graphs qs.optimize compiles a refresh graph (mode 1) and a reuse
graph (mode 2) whose op each takes one fixed path, so each can be captured; the pass emits the complement layout only
where a refresh can happen (modes 0 and 1), and everything a refresh reads is cached outside the graph's memory pool
(ops/video_layout.py), so no step reads the device or recompiles. The reuse graph is the one of before; in mode 0 a
reuse step also runs the layout op's copy of the cached complement (QB x KVB int32 per layout head: 0.26 MB at
32,760 tokens in 128-token blocks), the price of one graph for both paths.

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
from .refresh_attention import dense_from_sparse

__all__ = ["residual_attention", "residual_attention_reference", "refreshes", "dense_attention", "refresh_dense",
           "check_refresh_layout", "is_fp8", "denoise_delta", "MODE_AUTO", "MODE_REFRESH", "MODE_REUSE"]

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


def check_refresh_layout(lse_sparse, kv_num_blocks, kv_indices, block_q: int, block_kv: int, complement_num_blocks,
                         complement_indices) -> None:
    """Raise for a refresh layout given in part: lse and layout come together, the complement in pairs."""
    given = {"lse_sparse": lse_sparse, "kv_num_blocks": kv_num_blocks, "kv_indices": kv_indices}
    if any(t is not None for t in given.values()) and any(t is None for t in given.values()):
        missing = [name for name, t in given.items() if t is None]
        raise ValueError(f"qsparse::residual_attention: {missing} is None while the other refresh-layout arguments "
                         "are given; pass lse_sparse, kv_num_blocks and kv_indices together (the outputs and layout "
                         "of the qsparse::sparse_attention that made o_sparse), or none of them")
    if lse_sparse is not None and (block_q <= 0 or block_kv <= 0):
        raise ValueError(f"qsparse::residual_attention: block_q={block_q}, block_kv={block_kv} with a layout; pass "
                         "the layout's block sizes (those of qsparse::sparse_attention)")
    if (complement_num_blocks is None) != (complement_indices is None) or (
            complement_num_blocks is not None and lse_sparse is None):
        raise ValueError("qsparse::residual_attention: complement_num_blocks and complement_indices come together, "
                         "and only with the layout (lse_sparse, kv_num_blocks, kv_indices) they complement")


def refresh_dense(q, k, v, key_padding_mask, scale, precision: str, o_sparse, lse_sparse, kv_num_blocks, kv_indices,
                  block_q: int, block_kv: int, complement_num_blocks, complement_indices) -> torch.Tensor:
    """O_dense of a refresh step: the sparse result merged with its complement tiles where the layout is given,
    else a dense attention (module docstring)."""
    if lse_sparse is None:
        return dense_attention(q, k, v, key_padding_mask, scale, precision)
    complement = None if complement_num_blocks is None else (complement_num_blocks, complement_indices)
    return dense_from_sparse(q, k, v, o_sparse, lse_sparse, kv_num_blocks, kv_indices, block_q, block_kv, scale,
                             key_padding_mask, precision, complement)[0]


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
    lse_sparse: Optional[torch.Tensor] = None,
    kv_num_blocks: Optional[torch.Tensor] = None,
    kv_indices: Optional[torch.Tensor] = None,
    block_q: int = 0,
    block_kv: int = 0,
    complement_num_blocks: Optional[torch.Tensor] = None,
    complement_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The plain-torch step: what ``qsparse::residual_attention`` computes, on any device and any cache storage."""
    check_refresh_layout(lse_sparse, kv_num_blocks, kv_indices, block_q, block_kv, complement_num_blocks,
                         complement_indices)
    steps = state[-1]
    do_refresh = refreshes(cache_mode, refresh)
    if do_refresh:
        dense = refresh_dense(q, k, v, key_padding_mask, scale, attention_precision, o_sparse, lse_sparse,
                              kv_num_blocks, kv_indices, block_q, block_kv, complement_num_blocks, complement_indices)
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


# The op's body is the reference itself (one signature, not a copy that forwards to it); CUDA gets the fused step
# (residual_attention_cuda.py).
residual_attention = torch.library.custom_op("qsparse::residual_attention", mutates_args=("state",))(
    residual_attention_reference)


@residual_attention.register_fake
def _(o_sparse, q, k, v, key_padding_mask, scale, state, refresh, cache_mode, order, attention_precision="bf16",
      delta_rank=0, lse_sparse=None, kv_num_blocks=None, kv_indices=None, block_q=0, block_kv=0,
      complement_num_blocks=None, complement_indices=None):
    check_refresh_layout(lse_sparse, kv_num_blocks, kv_indices, block_q, block_kv, complement_num_blocks,
                         complement_indices)
    return o_sparse.new_empty(o_sparse.shape)
