"""The rewrite report: one row per site (module FQN), what it became, or why it was left alone."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SiteReport", "RewriteReport"]

# Reasons that are the user's own choice (or already warned about: autograd), not a shortfall of the compile.
_CHOSEN = ("sparsity disabled", "the plan keeps", "autograd")
_IN_REPEATED_BLOCK = re.compile(r"(^|\.)\d+\.")


@dataclass
class SiteReport:
    fqn: str
    kind: str  # linear | self_attention | joint_attention | cross_attention | text_attention | attention
    action: str  # what it became (an op name) or "kept"
    reason: str = ""  # why it was kept, or a note on the rewrite
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewriteReport:
    graph_index: int
    sites: list[SiteReport] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    weight_bytes: dict[str, int] = field(default_factory=dict)  # bf16 vs qsparse bytes of block weights
    notes: list[str] = field(default_factory=list)

    def add(self, fqn: str, kind: str, action: str, reason: str = "", **details: Any) -> None:
        self.sites.append(SiteReport(fqn, kind, action, reason, details))

    def rewritten(self, action: str) -> list[SiteReport]:
        return [site for site in self.sites if site.action == action]

    def kept(self) -> list[SiteReport]:
        return [site for site in self.sites if site.action == "kept"]

    @property
    def compression(self) -> float | None:
        bf16, ours = self.weight_bytes.get("bf16"), self.weight_bytes.get("qsparse")
        return bf16 / ours if bf16 and ours else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["compression"] = self.compression
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str))

    def summary(self) -> str:
        lines = [f"qsparse rewrite report (graph {self.graph_index}): " + ", ".join(
            f"{name}={count}" for name, count in sorted(self.counters.items()))]
        if self.compression:
            lines.append(
                f"block weights: {self.weight_bytes['bf16'] / 2**20:.2f} MiB as bf16 -> "
                f"{self.weight_bytes['qsparse'] / 2**20:.2f} MiB ({self.compression:.2f}x smaller)"
            )
        lines.extend(self.notes)
        return "\n".join(lines)

    def shortfalls(self) -> list[str]:
        """Warning lines when this graph rewrote less than it should - a video self/joint/per-frame attention left
        dense, a block compiled without its video grid, or a graph with repeated blocks that rewrote nothing - one
        line per reason with its count and an example site; [] when the graph did its job."""
        video = [site for site in self.sites
                 if site.kind in ("self_attention", "joint_attention", "spatial_attention")
                 or "compiled on its own" in site.reason]
        dense = [site for site in video if site.action == "kept" and not site.reason.startswith(_CHOSEN)]
        nothing = self.sites and all(site.action == "kept" for site in self.sites)
        shown = dense
        if nothing and (dense or any(_IN_REPEATED_BLOCK.search(site.fqn) for site in self.sites)):
            shown = [site for site in self.sites if not site.reason.startswith(_CHOSEN)]
        if not shown:
            return []
        head = (f"qsparse_compiler: graph {self.graph_index} rewrote "
                + ("none of its " + str(len(self.sites)) + " sites" if nothing else
                   f"{len(video) - len(dense)} of {len(video)} video attentions") + ":")
        examples: dict[str, str] = {}
        for site in shown:
            examples.setdefault(site.reason, site.fqn)
        counts = Counter(site.reason for site in shown)
        return [head] + [f"  {count} x {reason} (e.g. {examples[reason]})" for reason, count in counts.most_common()]

    def print_table(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"qsparse rewrite report - graph {self.graph_index}", show_lines=False)
        for column in ("site (module FQN)", "kind", "became", "attention precision", "why / notes"):
            table.add_column(column, overflow="fold")
        for site in self.sites:
            note = site.reason or ", ".join(f"{k}={v}" for k, v in site.details.items() if k != "precision")
            table.add_row(site.fqn, site.kind, site.action, site.details.get("precision", ""), note)
        console = Console(width=160)
        console.print(table)
        console.print(self.summary())
