"""Timestep-aware LoRA (MSFP's TALoRA) math, in plain torch: one definition for calibration and the backend.

    bucket(t) = number of edges <= t                     (edges ascending, e.g. (250, 500, 750) -> 4 buckets)
    y = W4A8(x) + (x @ A[bucket]^T) @ B[bucket]^T        A: [NB, r, K], B: [NB, N, r]; the correction in fp32

Calibration trains A and B with these functions (calibration/lora.py, which re-exports them); the
``apply_lora`` pass (compiler/passes/apply_lora.py) inserts ``bucket_index`` and ``apply_lora`` into the compiled graph,
where Inductor traces them into ordinary ops. So they stay traceable: no host synchronisation (``.item()``,
``int(tensor)``, ``.cpu()``), no branch on tensor values, only on shapes; the edges become a graph constant.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["sample_timesteps", "bucket_index", "lora_delta", "apply_lora"]


def sample_timesteps(timestep: torch.Tensor | float) -> torch.Tensor:
    """float32 [B] (or [1] for a scalar), contiguous: one timestep per sample; a per-token timestep [B, tokens] ->
    mean. (Samplers often pass ``t.expand(B)``: stride 0, which bucketize would copy with a warning.)"""
    t = torch.as_tensor(timestep).detach().to(torch.float32)
    if t.ndim == 0:
        return t.reshape(1)
    if t.ndim > 1:
        return t.reshape(t.shape[0], -1).mean(1)
    return t.contiguous()


def bucket_index(timestep: torch.Tensor | float, edges: Sequence[float]) -> torch.Tensor:
    """int64 [B] on the timestep's device: the bucket of each sample's timestep (``sample_timesteps``)."""
    t = sample_timesteps(timestep)
    return torch.bucketize(t, torch.tensor([float(e) for e in edges], dtype=torch.float32, device=t.device), right=True)


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """(x @ A[bucket]^T) @ B[bucket]^T per batch row, fp32: x (B, ..., K), A [NB, r, K], B [NB, N, r] -> (B, ..., N).

    One bucket (``buckets`` of one element, or an unbatched x) applies to every row."""
    index = buckets.reshape(-1).to(a.device)
    if index.numel() == 1 or x.ndim < 2:
        first = index[:1]
        a_row, b_row = a.index_select(0, first)[0], b.index_select(0, first)[0]
        return (x.to(torch.float32) @ a_row.to(torch.float32).t()) @ b_row.to(torch.float32).t()
    if index.numel() != x.shape[0]:
        raise ValueError(
            f"qsparse_compiler.ops.lora: {index.numel()} timesteps for an input of batch {x.shape[0]} "
            f"(shape {tuple(x.shape)}); pass one timestep per sample"
        )
    low = torch.einsum("b...k,brk->b...r", x.to(torch.float32), a[index].to(torch.float32))
    return torch.einsum("b...r,bnr->b...n", low, b[index].to(torch.float32))


def apply_lora(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               buckets: torch.Tensor) -> torch.Tensor:
    """A quantized linear's output ``out`` (input ``x``) plus its timestep-aware correction, added in fp32 and
    returned in ``out``'s dtype."""
    return (out.to(torch.float32) + lora_delta(x, a, b, buckets)).to(out.dtype)
