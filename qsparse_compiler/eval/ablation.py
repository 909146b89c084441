"""The ablation of the QuantSparse paper as backend configurations: each variant turns a dense model into a compressed
one. Used by ``qsparse eval`` and FIDELITY.md.

    dense -> w4a8 | sparse | naive (w4a8 + sparse) | + msad (a calibrated plan) | + ssar order 1 / order 2 | + low-rank
    | + the plan's own SSAR settings; beside the table: ssar1_fp8 / ssar2_fp8 (the cache stored in fp8), and the 8-bit
    attention rows: attn_int8 (every tile, linears unquantized, ``attention_precision="int8_fp8"``: the attention
    recipe's cost alone) and ssar1_int8 / ssar_plan_int8 (ssar1 / ssar_plan with the option set to int8_fp8; a plan's
    per-site precision still wins where calibration set one)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..runtime.pipeline import optimize

__all__ = ["ablation_variants", "ABLATION_ORDER"]

ABLATION_ORDER = ("w4a8", "sparse", "naive", "msad", "ssar1", "ssar2", "lowrank", "ssar_plan")


def _compiled(options: dict[str, Any]) -> Callable[[nn.Module], nn.Module]:
    def make(model: nn.Module) -> nn.Module:
        return torch.compile(model, backend="quantsparse", options=options, fullgraph=True)

    return make


def _optimized(options: dict[str, Any], plan: str | None, cache: dict[str, Any] | bool) -> Callable[[nn.Module], nn.Module]:
    def make(model: nn.Module) -> nn.Module:
        return optimize(model, plan, options=options, cache=cache)

    return make


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def ablation_variants(
    density: float = 0.15,
    plan: str | None = None,
    names: tuple[str, ...] = ABLATION_ORDER,
    rank: int = 16,
    base_options: dict[str, Any] | None = None,
) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """name -> variant factory. ``msad`` and the SSAR rows use ``plan`` (calibrated weights and patterns) when given,
    round-to-nearest weights and the static pattern otherwise (their names say which). ``base_options`` are merged
    into every row's backend options (e.g. small tiles for tiny models)."""
    base_options = base_options or {}
    sparse = {"sparsity": {"density": density}}
    variants: dict[str, Callable[[nn.Module], nn.Module]] = {}
    planned = {"plan": plan} if plan else sparse
    ssar = {"refresh_first": 2, "refresh_every": 5}
    int8 = {"sparsity": {"attention_precision": "int8_fp8"}}

    def options(*parts: dict[str, Any]) -> dict[str, Any]:
        merged = base_options
        for part in parts:
            merged = _merge(merged, part)
        return merged

    table = {
        "w4a8": _compiled(options({"sparsity": {"enabled": False}})),
        "sparse": _compiled(options({"quant": {"enabled": False}}, sparse)),
        "naive": _compiled(options(sparse)),
        "msad": _compiled(options(planned)) if plan else None,
        "ssar1": _optimized(options(sparse if not plan else {}), plan, {**ssar, "order": 1}),
        "ssar2": _optimized(options(sparse if not plan else {}), plan, {**ssar, "order": 2}),
        "lowrank": _optimized(options(sparse if not plan else {}), plan, {**ssar, "order": 2, "rank": rank}),
        # R (and dR) stored as e4m3 codes + a scale per row: about half of bf16's cache memory.
        "ssar1_fp8": _optimized(options(sparse if not plan else {}), plan, {**ssar, "order": 1, "storage": "fp8_e4m3"}),
        "ssar2_fp8": _optimized(options(sparse if not plan else {}), plan, {**ssar, "order": 2, "storage": "fp8_e4m3"}),
        # The plan's own per-layer schedules, orders and ranks (calibration's SSAR settings).
        "ssar_plan": _optimized(options({}), plan, True) if plan else None,
        "attn_int8": _compiled(options({"quant": {"enabled": False}, "sparsity": {"pattern": "dense"}}, int8)),
        "ssar1_int8": _optimized(options(sparse if not plan else {}, int8), plan, {**ssar, "order": 1}),
        "ssar_plan_int8": _optimized(options(int8), plan, True) if plan else None,
    }
    for name in names:
        if name not in table:
            raise ValueError(f"qsparse_compiler.eval.ablation: unknown variant {name!r}; known: {list(table)}")
        if table[name] is None:
            raise ValueError(f"qsparse_compiler.eval.ablation: {name!r} needs a calibrated plan (--plan DIR)")
        label = name if plan or name in ("w4a8", "sparse", "naive", "attn_int8") else f"{name} (RTN weights)"
        variants[label] = table[name]
    return variants
