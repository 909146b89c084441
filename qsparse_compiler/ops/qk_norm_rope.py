"""``qsparse::qk_norm_rope`` — the q/k RMS-norm and rotary embedding of an attention, in one op.

Schema (what ``passes/fuse_qk_norm_rope.py`` emits, and what a device kernel must implement):

    qk_norm_rope(q: (B, S, H*D), k: (B, S, H*D), q_weight: (H*D,) | (D,) | None, k_weight: same,
                 cos: (B|1, S, 1, D/2) | (S, D/2), sin: same, heads: int, eps: float, norm: str)
        -> (q_out (B, S, H, D), k_out (B, S, H, D)), contiguous, dtype of q

    y = x * rsqrt(mean(x^2) + eps) * weight     over H*D features (norm="across_heads") or each head's D ("per_head")
    out[..., 2i] = y[2i] cos[i] - y[2i+1] sin[i];   out[..., 2i+1] = y[2i] sin[i] + y[2i+1] cos[i]

computed in fp32 and rounded once (see ``kernels/qk_norm_rope.py`` for the contract's details and why).

Implementations: the plain-torch reference below serves every device; CUDA tensors go to the Triton kernel through
``register_kernel("cuda")`` (torch.library's device dispatch), falling back to the reference for inputs the kernel
refuses, so the op is never wrong, only slower. Why a dispatched custom op and not ``triton_op``: the op sits between
two opaque kernels (the q/k GEMMs before it, the attention op after), so Inductor has nothing to fuse into it on either
side; what ``triton_op`` would save is the dispatcher's per-call host time, which ``benchmarks/bench_membound.py``
measures (op call vs direct kernel launch) and which CUDA-graph replay removes anyway.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["qk_norm_rope", "qk_norm_rope_reference", "check_qk_norm_rope_args", "NORMS"]

NORMS = ("across_heads", "per_head")


def check_qk_norm_rope_args(q, k, q_weight, k_weight, cos, sin, heads: int, norm: str) -> None:
    """Raise ValueError naming the argument when the inputs do not fit the schema (works on fake tensors)."""
    problem = ""
    if norm not in NORMS:
        problem = f"norm={norm!r}; use one of {NORMS}"
    elif q.ndim != 3 or q.shape != k.shape:
        problem = f"q and k must be (B, S, H*D) of one shape, got q={tuple(q.shape)}, k={tuple(k.shape)}"
    elif heads <= 0 or q.shape[-1] % heads or (q.shape[-1] // heads) % 2:
        problem = f"{q.shape[-1]} features do not split into heads={heads} of an even head dim"
    elif (q_weight is None) != (k_weight is None):
        problem = "q_weight and k_weight must both be tensors or both be None"
    if problem:
        raise ValueError(f"qsparse::qk_norm_rope: {problem}")
    expected = q.shape[-1] if norm == "across_heads" else q.shape[-1] // heads
    for name, weight in (("q_weight", q_weight), ("k_weight", k_weight)):
        if weight is not None and tuple(weight.shape) != (expected,):
            raise ValueError(f"qsparse::qk_norm_rope: {name} has shape {tuple(weight.shape)}, a {norm} norm over "
                             f"{expected} features needs ({expected},)")
    half = q.shape[-1] // heads // 2
    for name, table in (("cos", cos), ("sin", sin)):
        fits = (table.ndim == 2 and tuple(table.shape) == (q.shape[1], half)) or (
            table.ndim == 4 and table.shape[0] in (1, q.shape[0]) and tuple(table.shape[1:]) == (q.shape[1], 1, half))
        if not fits:
            raise ValueError(f"qsparse::qk_norm_rope: {name} has shape {tuple(table.shape)}; expected (B|1, S, 1, D/2) "
                             f"or (S, D/2) with S={q.shape[1]}, D/2={half}")


def _norm_rope(x: torch.Tensor, weight: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, heads: int,
               eps: float, norm: str) -> torch.Tensor:
    xf = x.to(torch.float32)
    if norm == "across_heads":
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            y = y * weight.to(torch.float32)
        y = y.unflatten(-1, (heads, -1))
    else:
        xf = xf.unflatten(-1, (heads, -1))
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            y = y * weight.to(torch.float32)
    if cos.ndim == 2:  # (S, D/2) -> (1, S, 1, D/2)
        cos, sin = cos[None, :, None], sin[None, :, None]
    cos, sin = cos.to(torch.float32), sin.to(torch.float32)
    even, odd = y[..., 0::2], y[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)


def qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, heads: int, eps: float, norm: str):
    """The op's math in plain torch, fp32 with one rounding at the end (any device)."""
    check_qk_norm_rope_args(q, k, q_weight, k_weight, cos, sin, heads, norm)
    return (_norm_rope(q, q_weight, cos, sin, heads, eps, norm).contiguous(),
            _norm_rope(k, k_weight, cos, sin, heads, eps, norm).contiguous())


@torch.library.custom_op("qsparse::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float,
    norm: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, heads, eps, norm)


@qk_norm_rope.register_fake
def _(q, k, q_weight, k_weight, cos, sin, heads, eps, norm):
    check_qk_norm_rope_args(q, k, q_weight, k_weight, cos, sin, heads, norm)
    shape = (q.shape[0], q.shape[1], heads, q.shape[2] // heads)
    return q.new_empty(shape), q.new_empty(shape)


try:
    from ..kernels.qk_norm_rope import qk_norm_rope as _triton_qk_norm_rope
    from ..kernels.qk_norm_rope import unsupported_reason as _kernel_unsupported_reason
except ImportError:  # no triton on this machine: the reference serves CUDA tensors too
    _triton_qk_norm_rope = None


if _triton_qk_norm_rope is not None:

    @qk_norm_rope.register_kernel("cuda")
    def _(q, k, q_weight, k_weight, cos, sin, heads, eps, norm):
        if _kernel_unsupported_reason(q, k, q_weight, k_weight, cos, sin, heads, norm) is not None:
            return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, heads, eps, norm)
        return _triton_qk_norm_rope(q, k, q_weight, k_weight, cos, sin, heads, eps, norm)
