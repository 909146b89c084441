"""The Plan: what calibration decided for each site of one model, versioned and checked before any compute.

On disk a plan is a directory:

    plan.json          {"schema_version": 5, "fingerprint": {...}, "linears": {FQN: {...}}, "attentions": {FQN: {...}},
                        "metadata": {...}}
    plan.safetensors   tensors keyed "<linear FQN>.qweight" / "<linear FQN>.scale" (calibrated int4 weights),
                       "<linear FQN>.lora_a" [buckets, rank, K] / "<linear FQN>.lora_b" [buckets, N, rank]
                       (timestep-aware LoRA, with metadata["lora"] = {"rank", "bucket_edges", ...}), and any other
                       per-site tensor a later schema adds. safetensors never unpickles.

A site listed in ``linears`` is quantized with its settings (and its calibrated weights when the tensors are there):
W4A8 in its ``act_format``, or int4 weight-only when that is ``config.WEIGHT_ONLY`` (a conditioning linear); a block
linear not listed stays in its dtype. A site listed in ``attentions`` uses its per-head patterns, and its
``precision`` (one of ``formats.quantization.ATTENTION_PRECISIONS``) when the plan sets one, else the compile's
``sparsity.attention_precision``; an attention not listed stays dense. Everything is keyed by module FQN, as
``named_modules()`` spells it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import ACT_FORMATS, SCALE_DTYPES, WEIGHT_ONLY
from ..formats.pattern_spec import parse_pattern_spec
from ..formats.quantization import ATTENTION_PRECISIONS, PackedInt4Weight, effective_group_size

__all__ = ["PLAN_SCHEMA_VERSION", "PlanError", "ModelFingerprint", "LinearPlan", "AttentionPlan", "Plan"]

# 1: W4A8 linears, per-head attention patterns, residual-cache settings, TALoRA tensors.
# 2: a linear's act_format may be WEIGHT_ONLY (int4 weights, activations not quantized). Version 1 plans load as is.
# 3: an attention's cache may give its own refresh steps ("refresh_steps" with "num_steps": calibration's
#    refresh_budget), checked as config.CacheConfig fields when the plan loads. Version 1 and 2 plans load as is.
# 4: an attention's cache may denoise its second order ("delta_rank": QuantSparse's SVD-denoised dR). Older plans
#    load as is.
# 5: an attention may set its own attention precision ("precision": "bf16" | "int8_fp8"; null = the compile option
#    decides): calibration's attention_precision stage. Older plans load as is (every site follows the option).
PLAN_SCHEMA_VERSION = 5


class PlanError(ValueError):
    """A plan cannot be used: missing or corrupt files, another model, a newer schema, missing tensors."""


def _config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    items = dict(config) if not isinstance(config, dict) else config
    return {k: v for k, v in sorted(items.items()) if not k.startswith("_")}


@dataclass(frozen=True)
class ModelFingerprint:
    """What a plan was made for: the model class, a hash of its config, and every parameter's shape."""

    model_class: str
    config_hash: str
    parameter_shapes: dict[str, list[int]]

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelFingerprint":
        config = json.dumps(_config_dict(model), sort_keys=True, default=str)
        return cls(
            model_class=f"{type(model).__module__}.{type(model).__qualname__}",
            config_hash=hashlib.sha256(config.encode()).hexdigest()[:16],
            parameter_shapes={name: list(p.shape) for name, p in model.named_parameters()},
        )

    def check(self, other: "ModelFingerprint") -> None:
        """Raise PlanError naming the first difference between the plan's model (self) and ``other``."""
        if self.model_class != other.model_class:
            raise PlanError(
                f"qsparse_compiler.plan: plan was made for {self.model_class}, not {other.model_class}; "
                "calibrate a plan for this model (`qsparse calibrate`)"
            )
        if self.config_hash != other.config_hash:
            raise PlanError(
                f"qsparse_compiler.plan: plan was made for another {self.model_class} config "
                f"(config hash {self.config_hash} vs {other.config_hash}); calibrate a plan for this config"
            )
        self.check_shapes(other.parameter_shapes)

    def check_shapes(self, shapes: dict[str, list[int]]) -> None:
        for name, shape in shapes.items():
            expected = self.parameter_shapes.get(name)
            if expected is not None and list(expected) != list(shape):
                raise PlanError(
                    f"qsparse_compiler.plan: parameter {name} has shape {list(shape)} but the plan expects {expected}; "
                    "the plan belongs to another model"
                )


@dataclass(frozen=True)
class LinearPlan:
    group_size: int = 128
    act_format: str = "fp8_e4m3"
    scale_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        formats_ok = self.act_format in (*ACT_FORMATS, WEIGHT_ONLY) and self.scale_dtype in SCALE_DTYPES
        if not formats_ok or self.group_size < 0:
            raise PlanError(f"qsparse_compiler.plan: invalid linear entry {self}")


@dataclass(frozen=True)
class AttentionPlan:
    """Per-head sparse patterns of one attention site (``head_patterns[h]`` is a pattern spec, e.g. ``local3d:0.15``)."""

    head_patterns: list[str]
    block_q: int = 128
    block_kv: int = 128
    # Residual-cache settings: config.CacheConfig fields (refresh_first / refresh_every, or per-layer refresh_steps
    # with num_steps; order, delta_rank, rank).
    cache: dict[str, Any] = field(default_factory=dict)
    # The site's attention precision (``ATTENTION_PRECISIONS``); None leaves it to ``sparsity.attention_precision``.
    precision: str | None = None

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in ATTENTION_PRECISIONS:
            raise PlanError(
                f"qsparse_compiler.plan: invalid attention entry {self}: precision={self.precision!r} must be one of "
                f"{ATTENTION_PRECISIONS} or null (the compile's sparsity.attention_precision decides)"
            )
        blocks_ok = all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in (self.block_q, self.block_kv))
        if not isinstance(self.head_patterns, list) or not self.head_patterns or not blocks_ok \
                or not all(isinstance(p, str) for p in self.head_patterns) or not isinstance(self.cache, dict):
            raise PlanError(
                f"qsparse_compiler.plan: invalid attention entry {self}; head_patterns must be a non-empty list of "
                "pattern specs, block_q/block_kv positive integers, cache a dict"
            )
        try:
            parse_pattern_spec(";".join(self.head_patterns), 1.0)
        except ValueError as exc:
            raise PlanError(f"qsparse_compiler.plan: invalid attention entry {self}: {exc}") from None
        if self.cache:
            from ..config import CacheConfig, ConfigError

            try:
                CacheConfig(enabled=True, **self.cache)
            except (ConfigError, TypeError) as exc:
                raise PlanError(f"qsparse_compiler.plan: invalid cache settings {self.cache}: {exc}") from None

    @property
    def pattern_spec(self) -> str:
        """The spec string of ``qsparse::video_block_layout``: one entry for all heads or one per head."""
        unique = set(self.head_patterns)
        return self.head_patterns[0] if len(unique) == 1 else ";".join(self.head_patterns)


@dataclass
class Plan:
    fingerprint: ModelFingerprint
    linears: dict[str, LinearPlan] = field(default_factory=dict)
    attentions: dict[str, AttentionPlan] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_version: int = PLAN_SCHEMA_VERSION

    def packed_weight(self, fqn: str):
        """Calibrated int4 weights of a linear, or None when the plan leaves it to round-to-nearest."""
        qweight, scale = self.tensors.get(f"{fqn}.qweight"), self.tensors.get(f"{fqn}.scale")
        if qweight is None or scale is None:
            return None
        group = effective_group_size(qweight.shape[1] * 2, self.linears[fqn].group_size)
        return PackedInt4Weight(qweight, scale, group)

    @property
    def lora_edges(self) -> tuple[float, ...] | None:
        """Timestep bucket edges of the plan's timestep-aware LoRA, or None when it has none."""
        meta = self.metadata.get("lora")
        if not isinstance(meta, dict) or not any(name.endswith(".lora_a") for name in self.tensors):
            return None
        return tuple(float(e) for e in meta["bucket_edges"])

    def lora(self, fqn: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A [buckets, rank, K], B [buckets, N, rank]) of a linear's timestep-aware LoRA, or None."""
        a, b = self.tensors.get(f"{fqn}.lora_a"), self.tensors.get(f"{fqn}.lora_b")
        return None if a is None else (a, b)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "fingerprint": asdict(self.fingerprint),
            "linears": {fqn: asdict(entry) for fqn, entry in sorted(self.linears.items())},
            "attentions": {fqn: asdict(entry) for fqn, entry in sorted(self.attentions.items())},
            "metadata": self.metadata,
            "tensors": sorted(self.tensors),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "Plan":
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise PlanError("qsparse_compiler.plan: plan.json has no integer schema_version; the file is not a plan")
        if version > PLAN_SCHEMA_VERSION:
            raise PlanError(
                f"qsparse_compiler.plan: plan schema version {version} is newer than this release supports "
                f"({PLAN_SCHEMA_VERSION}); upgrade qsparse_compiler"
            )
        for key, kind in (("fingerprint", dict), ("linears", dict), ("attentions", dict), ("metadata", dict),
                          ("tensors", list)):
            if not isinstance(data.get(key, kind()), kind):
                raise PlanError(
                    f"qsparse_compiler.plan: plan.json does not follow schema {version}: '{key}' is a "
                    f"{type(data[key]).__name__}, not a JSON {'object' if kind is dict else 'array'}; the file is corrupt"
                )
        try:
            plan = cls(
                fingerprint=ModelFingerprint(**data["fingerprint"]),
                linears={fqn: LinearPlan(**entry) for fqn, entry in data.get("linears", {}).items()},
                attentions={fqn: AttentionPlan(**entry) for fqn, entry in data.get("attentions", {}).items()},
                tensors=tensors,
                metadata=dict(data.get("metadata", {})),
                schema_version=version,
            )
        except (KeyError, TypeError) as exc:
            raise PlanError(f"qsparse_compiler.plan: plan.json does not follow schema {version}: {exc}") from None
        weight_only = sorted(fqn for fqn, entry in plan.linears.items() if entry.act_format == WEIGHT_ONLY)
        if weight_only and version < 2:
            raise PlanError(
                f"qsparse_compiler.plan: plan.json (schema {version}) lists {weight_only[0]} as act_format "
                f"{WEIGHT_ONLY!r}, which schema 2 introduced; the file is corrupt or was edited - re-run calibration"
            )
        with_precision = sorted(fqn for fqn, entry in plan.attentions.items() if entry.precision is not None)
        if with_precision and version < 5:
            raise PlanError(
                f"qsparse_compiler.plan: plan.json (schema {version}) sets a precision for attention "
                f"{with_precision[0]}, which schema 5 introduced; the file is corrupt or was edited - re-run "
                "calibration"
            )
        missing = sorted(set(data.get("tensors", [])) - set(tensors))
        if missing:
            raise PlanError(
                f"qsparse_compiler.plan: plan.safetensors lacks {len(missing)} tensor(s) listed in plan.json, e.g. "
                f"{missing[:3]}; the plan is incomplete - re-run calibration"
            )
        plan._check_packed_weights()
        plan._check_lora()
        return plan

    def _check_packed_weights(self) -> None:
        """Each linear's calibrated tensors come in pairs and fit the weight the fingerprint records: (N, K//2) uint8
        codes and (N, K//group) float scales for an (N, K) weight."""
        for fqn, entry in self.linears.items():
            pair = self._tensor_pair(fqn, "qweight", "scale")
            if pair is None:
                continue
            qweight, scale = pair
            weight = self.fingerprint.parameter_shapes.get(f"{fqn}.weight")
            if weight is None or len(weight) != 2:
                raise PlanError(
                    f"qsparse_compiler.plan: the plan holds packed weights for {fqn}, but its model has no 2-D parameter "
                    f"{fqn}.weight; the plan is corrupt - re-run calibration"
                )
            n, k = weight
            group = effective_group_size(k, entry.group_size)
            expected = {"qweight": [n, k // 2], "scale": [n, k // max(group, 1)]}
            for name, tensor in (("qweight", qweight), ("scale", scale)):
                dtype_ok = tensor.dtype == torch.uint8 if name == "qweight" else tensor.is_floating_point()
                if list(tensor.shape) != expected[name] or not dtype_ok:
                    raise PlanError(
                        f"qsparse_compiler.plan: {fqn}.{name} is {list(tensor.shape)} {tensor.dtype}, but the {n}x{k} "
                        f"weight with group_size={entry.group_size} needs {expected[name]} "
                        f"{'uint8' if name == 'qweight' else 'float'}; the plan is corrupt or for another model - "
                        "re-run calibration"
                    )

    def _tensor_pair(self, fqn: str, first: str, second: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The tensors ``<fqn>.<first>`` and ``<fqn>.<second>``, None when neither is there; one without the other is
        an incomplete plan."""
        a, b = self.tensors.get(f"{fqn}.{first}"), self.tensors.get(f"{fqn}.{second}")
        if a is None and b is None:
            return None
        if a is None or b is None:
            present, absent = (first, second) if b is None else (second, first)
            raise PlanError(
                f"qsparse_compiler.plan: plan.safetensors has {fqn}.{present} but not {fqn}.{absent}; the plan is "
                "incomplete - re-run calibration"
            )
        return a, b

    def _check_lora(self) -> None:
        """Timestep-aware LoRA tensors come in pairs, belong to a quantized linear, and fit its (N, K) weight and
        metadata["lora"]: A [len(bucket_edges) + 1, rank, K], B [len(bucket_edges) + 1, N, rank], floating point."""
        suffixes = (".lora_a", ".lora_b")
        fqns = sorted({name[: -len(".lora_a")] for name in self.tensors if name.endswith(suffixes)})
        if not fqns:
            return
        meta = self.metadata.get("lora")
        rank = meta.get("rank") if isinstance(meta, dict) else None
        edges = meta.get("bucket_edges") if isinstance(meta, dict) else None
        edges_ok = isinstance(edges, list) and all(
            isinstance(e, (int, float)) and not isinstance(e, bool) for e in edges) and edges == sorted(set(edges))
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or not edges_ok:
            raise PlanError(
                f"qsparse_compiler.plan: plan.safetensors holds timestep-aware LoRA tensors (e.g. {fqns[0]}.lora_a) "
                f"but metadata['lora'] is {meta!r}; it needs an integer 'rank' >= 1 and 'bucket_edges', a list of "
                "strictly ascending timesteps - the plan is corrupt, re-run calibration"
            )
        buckets = len(edges) + 1
        for fqn in fqns:
            a, b = self._tensor_pair(fqn, "lora_a", "lora_b")  # fqns come from these names: never both absent
            weight = self.fingerprint.parameter_shapes.get(f"{fqn}.weight")
            if fqn not in self.linears or weight is None or len(weight) != 2:
                raise PlanError(
                    f"qsparse_compiler.plan: the plan holds timestep-aware LoRA for {fqn}, which is not a quantized "
                    f"linear of the plan (not in 'linears', or its model has no 2-D parameter {fqn}.weight); the plan "
                    "is corrupt - re-run calibration"
                )
            n, k = weight
            expected = {"lora_a": [buckets, rank, k], "lora_b": [buckets, n, rank]}
            for name, tensor in (("lora_a", a), ("lora_b", b)):
                if list(tensor.shape) != expected[name] or not tensor.is_floating_point():
                    raise PlanError(
                        f"qsparse_compiler.plan: {fqn}.{name} is {list(tensor.shape)} {tensor.dtype}, but the {n}x{k} "
                        f"weight with metadata['lora'] rank={rank} and {buckets} timestep buckets "
                        f"(bucket_edges={edges}) needs {expected[name]} float; the plan is corrupt or its metadata "
                        "does not match its tensors - re-run calibration"
                    )
