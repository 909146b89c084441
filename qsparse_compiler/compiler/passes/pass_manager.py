"""Runs an explicit, ordered list of graph passes over a Dynamo FX graph.

A pass is a plain object with a ``name`` and ``__call__(gm, ctx) -> int`` (how many rewrites it made). The
manager lints and recompiles the graph after each pass, dumps it (``dump_dir``) before the first and after
every pass as readable code, and keeps a counter per rewrite in ``torch._dynamo.utils.counters["qsparse"]``
(the Inductor convention; tests assert on it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from ...config import QuantSparseConfig
from ...runtime.session import Session, default_session
from .graph_inputs import CacheSlot, GraphInputs, LoraSlot, PackedWeightSlot, TimestepSlot
from .report import RewriteReport

__all__ = ["GraphPass", "PassContext", "run_passes", "count_rewrite"]


def count_rewrite(ctx: "PassContext", name: str) -> None:
    counters["qsparse"][name] += 1
    ctx.report.counters[name] = ctx.report.counters.get(name, 0) + 1


@dataclass
class PassContext:
    config: QuantSparseConfig
    example_inputs: list[Any]
    report: RewriteReport
    plan: Any = None  # plan.Plan when the backend was given one
    inputs: GraphInputs = field(default_factory=GraphInputs)  # the graph inputs the passes add (graph_inputs.py)
    layout_slots: list[Any] = field(default_factory=list)  # sparsify_attention.LayoutSlot: layouts to build up front
    analysis: dict[str, Any] = field(default_factory=dict)  # results of analysis passes, by pass name
    session: Session = field(default_factory=default_session)  # owns the packed weights the passes seed

    @property
    def packed_weight_slots(self) -> list[PackedWeightSlot]:
        return self.inputs.of(PackedWeightSlot)

    @property
    def lora_slots(self) -> list[LoraSlot]:
        return self.inputs.of(LoraSlot)

    @property
    def cache_slots(self) -> list[CacheSlot]:
        return self.inputs.of(CacheSlot)

    @property
    def timestep_input(self) -> bool:
        """Whether the graph takes the forward's per-sample timesteps (a regional graph's LoRA)."""
        return bool(self.inputs.of(TimestepSlot))

    @property
    def extra_example_inputs(self) -> list[torch.Tensor]:
        return self.inputs.examples


class GraphPass(Protocol):
    name: str

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> int: ...


def _dump(gm: fx.GraphModule, folder: Path | None, stem: str) -> None:
    if folder is None:
        return
    code = gm.print_readable(print_output=False, include_stride=False, include_device=True)
    (folder / f"{stem}.py").write_text(code)


def private_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of Dynamo's graph module to rewrite: Dynamo keeps reading its own graph's placeholders after the
    backend returns, so the original must stay as it was. Keeps what AOT autograd reads off a Dynamo graph."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, env)
    graph.output(output)
    copy = fx.GraphModule(gm, graph)
    copy.meta = dict(gm.meta)
    for attribute in ("_param_name_to_source",):
        if hasattr(gm, attribute):
            setattr(copy, attribute, getattr(gm, attribute))
    for old, new in env.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return copy


def _has_effects(node: fx.Node) -> bool:
    """FX's purity test, plus what it misses in a Dynamo graph, which is not functional yet: in-place tensor methods
    and functions (``pos[:, 8:].copy_(embedding)``, ``torch.relu_(x)``) and ``out=`` calls, whose results are often
    never read. FX's dead-code elimination alone drops them (CogVideoX's positional embedding at a frame count other
    than its config's) and the rewritten graph computes something else than the model."""
    if node.is_impure():
        return True
    if node.op not in ("call_method", "call_function"):
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return "out" in node.kwargs or (isinstance(name, str) and name.endswith("_") and not name.endswith("__"))


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: Sequence[GraphPass]) -> fx.GraphModule:
    """Run ``passes`` in order on a private copy of ``gm``; returns the rewritten copy."""
    gm = private_copy(gm)
    folder = None
    if ctx.config.dump_dir:
        folder = Path(ctx.config.dump_dir) / f"graph_{ctx.report.graph_index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
    _dump(gm, folder, "00_dynamo_input")
    for position, graph_pass in enumerate(passes, start=1):
        changed = graph_pass(gm, ctx)
        if changed:
            gm.graph.eliminate_dead_code(is_impure_node=_has_effects)
        gm.graph.lint()
        gm.recompile()
        _dump(gm, folder, f"{position:02d}_after_{graph_pass.name}")
    if folder is not None:
        ctx.report.save(folder / "report.json")
    return gm
