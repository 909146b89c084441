"""Packed int4 weights, owned by the runtime and keyed by the parameter they come from.

The compiled graph does not bake packed weights in as constants: with regional compilation (one graph reused by
every transformer block) each call brings its own block's parameters, so the runtime looks the packed form up per
parameter. Packing happens once per parameter (and again only if the parameter is modified in place: its version
counter moves), never per call; a plan can seed the store with calibrated weights. The plan's timestep-aware LoRA
tensors (``lora_store``) follow the same mechanism: keyed by the weight parameter, moved to its device once.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..formats.quantization import PackedInt4Weight, dequantize_weight_int4, effective_group_size, quantize_weight_int4

__all__ = ["PackedWeightStore", "default_store", "LoraStore", "lora_store"]


@dataclass
class _Entry:
    ref: weakref.ref
    version: int
    group_size: int
    scale_dtype: str
    packed: PackedInt4Weight
    source: str  # "rtn" (round-to-nearest here) or the plan the calibrated weights came from
    released: bool = False  # the dense parameter's storage was freed: it can never be re-packed


# A plan's int4 weights are the model's weights rounded (and their scales distilled): relative to the weight's norm they
# differ by the int4 rounding, ~0.1 for groups of 128 and below ~0.3 per channel even with outliers. Weights of another
# checkpoint or another random initialisation differ by ~1.4 (independent weights of one distribution: sqrt(2)).
CALIBRATED_WEIGHT_TOLERANCE = 0.5


def check_calibrated_weight(param: torch.Tensor, packed: PackedInt4Weight, source: str, name: str | None = None) -> None:
    """Refuse a plan's calibrated weight that is not a rounding of ``param``: the plan was made from other weights
    (fingerprints compare classes, configs and shapes, not values), and using it would silently swap the model's
    weights for another model's. Skipped for a released parameter (its values are gone)."""
    if param.untyped_storage().nbytes() == 0:
        return
    with torch.no_grad():
        weight = param.detach().to(torch.float32)
        plan_weight = dequantize_weight_int4(packed.qweight.to(param.device), packed.scale.to(param.device),
                                             packed.group_size)
        distance = float((plan_weight - weight).norm() / weight.norm().clamp_min(1e-12))
    if distance > CALIBRATED_WEIGHT_TOLERANCE:
        from ..plan.schema import PlanError
        from ..ops.context import parameter_name

        name = name or parameter_name(param) or f"a {tuple(param.shape)} linear weight"
        raise PlanError(
            f"qsparse_compiler.runtime: plan {source} holds calibrated int4 weights for {name} that differ from the "
            f"model's by {distance:.0%} of its norm (int4 rounding is ~10%): the plan was calibrated on other weights "
            "(another checkpoint or random initialisation) - calibrate a plan for this model's weights"
        )


class PackedWeightStore:
    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._lock = threading.Lock()

    def seed(self, param: torch.Tensor, packed: PackedInt4Weight, scale_dtype: str, source: str,
             name: str | None = None) -> None:
        """Use ``packed`` (calibrated weights from the plan ``source``) for ``param`` (the parameter ``name``)
        instead of round-to-nearest."""
        check_calibrated_weight(param, packed, source, name)
        self._put(param, packed, scale_dtype, source)

    def get(
        self,
        param: torch.Tensor,
        group_size: int,
        scale_dtype: str,
        source: str = "rtn",
        calibrated: Callable[[], PackedInt4Weight | None] | None = None,
    ) -> PackedInt4Weight:
        """The packed form of ``param`` from ``source``: round-to-nearest is computed (once) when missing; for a
        plan, ``calibrated()`` supplies its tensors on first use (a regional graph meets each block's parameters
        only at run time)."""
        entry = self._entries.get(id(param))
        if (
            entry is not None
            and entry.ref() is param
            and entry.version == param._version
            and entry.scale_dtype == scale_dtype
            and entry.group_size == effective_group_size(param.shape[1], group_size)
            and entry.source == source
        ):
            return entry.packed
        if entry is not None and entry.released and entry.ref() is param:
            raise RuntimeError(
                f"qsparse_compiler.runtime: a linear weight {tuple(param.shape)} was released with "
                "release_dense_weights() and cannot be re-packed (it changed, or another format was asked for); "
                "reload the model"
            )
        fresh = calibrated() if source != "rtn" and calibrated is not None else None
        if fresh is not None:
            check_calibrated_weight(param, fresh, source)
            return self._put(param, fresh, scale_dtype, source)
        if source != "rtn":
            raise RuntimeError(
                f"qsparse_compiler.runtime: calibrated weights of plan {source} for a {tuple(param.shape)} linear are "
                "gone (the parameter changed after compiling); recompile with the plan"
            )
        packed = quantize_weight_int4(param, group_size, scale_dtype)
        self._put(param, packed, scale_dtype, source)
        return packed

    def _put(self, param: torch.Tensor, packed: PackedInt4Weight, scale_dtype: str, source: str) -> PackedInt4Weight:
        """Store ``packed`` for ``param`` on the parameter's device (a plan's tensors load on the CPU; the GEMM
        kernels read them from the GPU) and return what was stored."""
        if packed.qweight.device != param.device or packed.scale.device != param.device:
            packed = PackedInt4Weight(packed.qweight.to(param.device), packed.scale.to(param.device), packed.group_size)
        key = id(param)
        with self._lock:
            self._entries[key] = _Entry(
                weakref.ref(param, self._forget(key)), param._version, packed.group_size, scale_dtype, packed, source
            )
        return packed

    def _forget(self, key: int):
        def drop(_ref: weakref.ref) -> None:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry.ref() is None:
                    del self._entries[key]

        return drop

    def release_dense(self, model: torch.nn.Module) -> int:
        """Free the storage of every parameter of ``model`` that has a packed copy; returns the bytes freed.

        The tensors keep their shape, dtype and device (Dynamo's guards and the compiled graphs still see the same
        parameters), but their data is gone: only compiled graphs that use the packed weights may run afterwards.
        """
        freed = 0
        with self._lock:
            for param in model.parameters():
                entry = self._entries.get(id(param))
                if entry is None or entry.ref() is not param or entry.released:
                    continue
                storage = param.untyped_storage()
                freed += storage.nbytes()
                storage.resize_(0)
                entry.released = True
        return freed

    def packed_nbytes(self, param: torch.Tensor) -> int | None:
        """Bytes of the packed copy of ``param`` (codes + scales), or None if it has none."""
        entry = self._entries.get(id(param))
        return entry.packed.nbytes if entry is not None and entry.ref() is param else None

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        return sum(entry.packed.nbytes for entry in self._entries.values())


default_store = PackedWeightStore()


class LoraStore:
    """The (A, B) timestep-aware LoRA tensors of a plan's linear on its weight's device, keyed by the weight parameter
    (weakly) and the plan: loaded and moved once, then handed to every call."""

    def __init__(self) -> None:
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._lock = threading.Lock()

    def get(self, param: torch.Tensor, source: str,
            load: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors of plan ``source`` for ``param``; ``load()`` gives them (on any device) the first time."""
        entry = self._entries.get(param)
        if entry is not None and entry[0] == source and entry[1].device == param.device:
            return entry[1], entry[2]
        a, b = (t.to(param.device) for t in load())
        with self._lock:
            self._entries[param] = (source, a, b)
        return a, b


lora_store = LoraStore()
