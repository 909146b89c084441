"""Capture the Dynamo FX graph of a model (what the backend receives), to run passes on it without Inductor."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..compiler.passes import PassContext, default_passes, run_passes
from ..compiler.passes.pass_manager import private_copy
from ..compiler.passes.report import RewriteReport
from ..config import QuantSparseConfig

__all__ = ["capture_dynamo_graph", "rewrite_with_default_passes", "rewritten_reference_output"]


def capture_dynamo_graph(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[fx.GraphModule, list[Any]]:
    """The single graph Dynamo builds for ``model(**inputs)`` (fullgraph) and its example inputs."""
    captured: list[tuple[fx.GraphModule, list[Any]]] = []

    def backend(gm: fx.GraphModule, example_inputs: list[Any]):
        # Dynamo strips placeholder metadata (e.g. the parameter sources) once its backend returns: keep a copy.
        captured.append((private_copy(gm), list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(**inputs)
    return captured[0]


def rewrite_with_default_passes(model: torch.nn.Module, inputs: dict[str, Any], options: dict[str, Any]):
    """The backend's passes on ``model``'s captured graph, without Inductor: (rewritten graph, report sites by FQN,
    the pass context). Clears Dynamo's counters first, so ``counters["qsparse"]`` holds this rewrite's."""
    from torch._dynamo.utils import counters

    counters.clear()
    with torch.no_grad():
        gm, example_inputs = capture_dynamo_graph(model, inputs)
        ctx = PassContext(QuantSparseConfig.from_options(options), example_inputs, RewriteReport(0))
        gm = run_passes(gm, ctx, default_passes())
    return gm, {site.fqn: site for site in ctx.report.sites}, ctx


def rewritten_reference_output(model: torch.nn.Module, inputs: dict[str, Any], options: dict[str, Any], seed: int = 0):
    """The first output of ``model(**inputs)`` through the backend's passes, run eagerly without Inductor (on CPU
    every qsparse op runs its plain-torch reference): what a compiled quantized run must equal (its error against
    eager is the quantization's, not the compiler's). Seeds torch's RNG with ``seed`` first, as a caller seeds eager."""
    gm, _, ctx = rewrite_with_default_passes(model, inputs, options)
    with torch.no_grad():
        torch.manual_seed(seed)
        return gm(*ctx.example_inputs, *ctx.extra_example_inputs)[0]
