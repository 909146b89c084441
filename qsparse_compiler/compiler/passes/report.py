"""The rewrite report: one row per site (module FQN), what it became, or why it was left alone."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SiteReport", "RewriteReport"]


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
