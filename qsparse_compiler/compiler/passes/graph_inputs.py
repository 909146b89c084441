"""The inputs the passes add to a graph, which the backend's runtime wrapper supplies on every call.

A rewritten graph needs tensors its caller never passes: the packed int4 weights of each quantized linear, the
forward's per-sample timesteps (a regional graph with timestep-aware LoRA), a plan's LoRA tensors, the residual-cache
state of each cached attention. A pass adds them only through ``GraphInputs.add``, which appends the placeholders
after every existing one and records one slot saying what they stand for, in the same order. The wrapper
(compiler/backend.py ``_RuntimeInputs``) walks ``slots`` in that order and appends, per slot:

    PackedWeightSlot   qweight (N, K//2) uint8, scale (N, K//G)          from the session's PackedWeightStore
    TimestepSlot       timesteps float32 [B]                              from the forward's context (ops/context.py)
    LoraSlot           lora_a [buckets, rank, K], lora_b [buckets, N, rank]  from the session's LoraStore
    CacheSlot          its ``num_state`` state tensors, then (auto mode) the refresh flag   from the cache runtime

so the placeholder order is never an unwritten contract between passes and wrapper. ``examples`` are the example
values of the new inputs, in the same order, for Inductor's ``compile_fx``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import torch
import torch.fx as fx

from ...config import CacheConfig
from .rewrite_utils import add_placeholder

__all__ = ["PackedWeightSlot", "TimestepSlot", "LoraSlot", "CacheSlot", "Slot", "GraphInputs"]


@dataclass(frozen=True)
class PackedWeightSlot:
    """Two graph inputs (qweight, scale) for the parameter at ``param_index``."""

    param_index: int
    fqn: str
    group_size: int
    scale_dtype: str
    source: str = "rtn"  # where the packed weights come from: round-to-nearest, or a plan's calibrated tensors


@dataclass(frozen=True)
class TimestepSlot:
    """One graph input: the forward's per-sample timesteps (float32 [B]), for a regional graph's LoRA buckets."""


@dataclass(frozen=True)
class LoraSlot:
    """Two graph inputs (lora_a, lora_b) for the linear whose weight is at ``param_index``: the plan's timestep-aware
    LoRA of the block each call runs (zeros for a block without one)."""

    param_index: int
    fqn: str
    a_shape: tuple[int, int, int]  # [buckets, rank, K]
    b_shape: tuple[int, int, int]  # [buckets, N, rank]
    dtype: torch.dtype
    source: str  # the plan


@dataclass(frozen=True)
class CacheSlot:
    """Graph inputs for one cached site: its state tensors, then (auto mode) the refresh flag."""

    fqn: str
    schedule: CacheConfig
    shape: tuple[Any, ...]  # (B, H, S, D), ints or SymInts of the graph
    dtype: torch.dtype
    device: torch.device
    num_state: int


Slot = Union[PackedWeightSlot, TimestepSlot, LoraSlot, CacheSlot]


@dataclass
class GraphInputs:
    slots: list[Slot] = field(default_factory=list)
    examples: list[torch.Tensor] = field(default_factory=list)

    def add(self, gm: fx.GraphModule, slot: Slot, examples: Sequence[tuple[str, torch.Tensor]]) -> list[fx.Node]:
        """Append one placeholder per (name, example value) after the graph's inputs, for ``slot``; returns them."""
        nodes = [add_placeholder(gm, name, example) for name, example in examples]
        self.examples += [example for _, example in examples]
        self.slots.append(slot)
        return nodes

    def of(self, kind: type) -> list[Any]:
        """The slots of one kind, in order."""
        return [slot for slot in self.slots if isinstance(slot, kind)]
