"""What regional compilation asks of a plan: one graph serves every block of a family (``blocks.0.``,
``blocks.1.``, ...), so the plan must treat those blocks alike."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..config import SCHEDULE_KEYS
from .schema import Plan, PlanError

__all__ = ["block_family", "check_uniform_across_blocks"]


def block_family(prefix: str) -> re.Pattern:
    """Matches the FQN prefix of every block of the family of ``prefix`` ("blocks.3." -> blocks.0., blocks.1., ...):
    the blocks a regional graph compiled for one of them serves."""
    return re.compile(re.escape(prefix.rsplit(".", 2)[0]) + r"\.\d+\.")


def check_uniform_across_blocks(plan: Plan, prefix: str) -> None:
    """A regional graph serves every block of its family: the plan must say the same for each of them (calibrated
    weights may differ: they are looked up per parameter)."""
    family = block_family(prefix)
    seen: dict[str, tuple[str, Any]] = {}
    for fqn, entry in [*plan.linears.items(), *plan.attentions.items()]:
        match = family.match(fqn)
        if match is None:
            continue
        relative, value = fqn[match.end():], dataclasses.asdict(entry)
        if "cache" in value:  # refresh steps are chosen per call on the host (compiler/backend.py _schedule_of)
            value["cache"] = {k: v for k, v in value["cache"].items() if k not in SCHEDULE_KEYS}
        if relative in seen and seen[relative][1] != value:
            raise PlanError(
                f"qsparse_compiler.plan: the plan treats {seen[relative][0]} and {fqn} differently, but regional "
                "compilation shares one graph between them; use qs.optimize(..., regional=False)"
            )
        seen.setdefault(relative, (fqn, value))
