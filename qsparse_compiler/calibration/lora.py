"""Timestep-aware LoRA (MSFP's TALoRA): a few low-rank corrections per linear, one per timestep bucket.

A W4A8 linear's error depends on the denoising step (activations change with the timestep), so instead of one
correction, each quantized linear gets ``len(edges) + 1`` LoRA pairs and the timestep picks one:

    bucket(t) = number of edges <= t                      (edges ascending, e.g. (250, 500, 750) -> 4 buckets)
    y = W4A8(x) + (x @ A[bucket]^T) @ B[bucket]^T         A: [NB, r, K], B: [NB, N, r], x in full precision

B starts at zero (the correction starts as a no-op) and A small and random, as in LoRA. Samples in a batch may sit at
different timesteps (rows get their own bucket). The timestep reaches the linears through a shared
``TimestepState``, set from the model's ``timestep`` argument (a forward pre-hook) or by the distillation loop.
In the plan: tensors ``<fqn>.lora_a`` / ``<fqn>.lora_b`` (bf16) and ``metadata["lora"]`` with the rank and edges.
The math (``bucket_index``, ``lora_delta``) lives in ops/lora.py, shared with the backend's ``apply_lora`` pass, which
computes the same correction in the compiled graph.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..ops.lora import bucket_index, lora_delta

__all__ = ["TimestepState", "TimestepLoRA", "bucket_index", "lora_delta", "timestep_hook"]


class TimestepState:
    """The current samples' buckets, shared by every LoRA of a model (set once per forward)."""

    def __init__(self, edges: Sequence[float]) -> None:
        self.edges = tuple(float(e) for e in edges)
        self.buckets: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return len(self.edges) + 1

    def set(self, timestep: torch.Tensor | float) -> None:
        self.buckets = bucket_index(timestep, self.edges)


class TimestepLoRA(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, state: TimestepState,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.state = state
        a = torch.randn(state.count, rank, in_features, generator=generator) / in_features**0.5
        self.a = torch.nn.Parameter(a)
        self.b = torch.nn.Parameter(torch.zeros(state.count, out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state.buckets is None:
            raise RuntimeError(
                "qsparse_compiler.calibration.lora: no timestep set for the timestep-aware LoRA; call the model with "
                "`timestep=` (or TimestepState.set) before the forward"
            )
        return lora_delta(x, self.a, self.b, self.state.buckets)


def timestep_hook(model: torch.nn.Module, state: TimestepState) -> Any:
    """Forward pre-hook on the transformer that sets ``state`` from its ``timestep`` argument; returns the handle."""

    import inspect

    signature = inspect.signature(model.forward)

    def hook(_module, args, kwargs):
        # Bind like the call does: the timestep is positional in some models (Wan: forward(hidden_states, timestep,
        # ...); CogVideoX: forward(hidden_states, encoder_hidden_states, timestep, ...)).
        timestep = signature.bind_partial(*args, **kwargs).arguments.get("timestep")
        if timestep is not None:
            state.set(timestep)

    return model.register_forward_pre_hook(hook, with_kwargs=True)
