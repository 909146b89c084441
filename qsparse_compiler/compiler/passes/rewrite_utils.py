"""Helpers shared by the rewrite passes: new graph inputs, op calls with correct fake values, autograd check."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from .graph_utils import fake_value

__all__ = ["add_placeholder", "graph_fake_mode", "call_op", "call_op_like", "autograd_reason"]


def _fake_mode(gm: fx.GraphModule, near: Sequence[Any] = ()):
    """The fake mode of the values at hand (Dynamo's); the graph's inputs' mode if none is a fake tensor."""
    for value in near:
        mode = getattr(fake_value(value), "fake_mode", None)
        if mode is not None:
            return mode
    for node in gm.graph.nodes:
        mode = getattr(fake_value(node), "fake_mode", None) if node.op == "placeholder" else None
        if mode is not None:
            return mode
    return None


def graph_fake_mode(gm: fx.GraphModule):
    """Dynamo's fake mode of this graph (None for a graph without fake values)."""
    return _fake_mode(gm)


def add_placeholder(gm: fx.GraphModule, name: str, example: torch.Tensor) -> fx.Node:
    """Append a graph input after the existing ones (the runtime passes it last). ``example`` may be a real tensor
    (static shape) or a fake tensor of the graph's fake mode (e.g. with the graph's symbolic sizes)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(name)
    mode = _fake_mode(gm)
    if isinstance(example, torch._subclasses.FakeTensor) or mode is None:
        node.meta["example_value"] = example
    else:
        node.meta["example_value"] = mode.from_tensor(example, static_shapes=True)
    node.meta["qsparse_extra"] = True
    # AOT autograd expects every placeholder of a Dynamo graph to carry a source (None: not from user code), and
    # reads "static" inputs from tensor_dict: packed weights live as long as their parameter, so CUDA graphs
    # need not copy them on every replay.
    node._dynamo_source = None
    node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    return node


def _fake_args(args: Sequence[Any]) -> Any:
    return fx.node.map_aggregate(args, lambda a: fake_value(a) if isinstance(a, fx.Node) else a)


def call_op(gm: fx.GraphModule, before: fx.Node, op: Any, args: tuple, meta_from: fx.Node,
            kwargs: dict[str, Any] | None = None) -> fx.Node:
    """Insert ``op(*args, **kwargs)`` before ``before``; its example value is the op's fake result, meta copied for
    dumps."""
    kwargs = kwargs or {}
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(op, args, kwargs)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in meta_from.meta:
            node.meta[key] = meta_from.meta[key]
    mode = _fake_mode(gm, [a for a in args if isinstance(a, fx.Node)])
    if mode is not None:
        with mode:
            node.meta["example_value"] = op(*_fake_args(args), **_fake_args(kwargs))
    return node


def call_op_like(gm: fx.GraphModule, original: fx.Node, op: Any, args: tuple) -> fx.Node:
    """Replace ``original`` by ``op(*args)`` (same output)."""
    node = call_op(gm, original, op, args, original)
    original.replace_all_uses_with(node)
    gm.graph.erase_node(original)
    return node


def autograd_reason(example_inputs: Sequence[Any]) -> str:
    """qsparse ops have no backward: a graph traced for training keeps its original ops."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
        return "autograd enabled (inputs require grad): qsparse ops are inference-only; run under torch.no_grad()"
    return ""
