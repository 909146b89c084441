"""Capture the Dynamo FX graph of a model (what the backend receives), to run passes on it without Inductor."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..passes.pass_manager import private_copy

__all__ = ["capture_dynamo_graph"]


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
