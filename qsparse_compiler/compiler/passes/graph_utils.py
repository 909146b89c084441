"""Small, shared helpers for reading a Dynamo FX graph: module FQNs, fake values, shapes, walks."""

from __future__ import annotations

import re
from collections import deque
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

__all__ = [
    "normalize_path",
    "is_diffusers_model",
    "model_root",
    "module_fqn",
    "source_fqn",
    "fake_value",
    "node_arg",
    "same_size",
    "walk_inputs",
    "placeholder_index",
    "LINEAR_TARGETS",
    "SDPA_TARGETS",
    "FUSED_ATTENTION_TARGETS",
    "CAT_TARGETS",
]

LINEAR_TARGETS = {torch.nn.functional.linear, torch._C._nn.linear}
SDPA_TARGETS = {torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
# Attention inside one call of torch's own modules (nn.MultiheadAttention, nn.TransformerEncoderLayer's fast path):
# their projections and attention are not separate linear/SDPA nodes in the graph.
FUSED_ATTENTION_TARGETS = {
    torch.nn.functional.multi_head_attention_forward, torch._native_multi_head_attention,
    torch._transformer_encoder_layer_fwd,
}
CAT_TARGETS = {torch.cat, torch.concat, torch.concatenate}

# Dynamo writes module paths like  L['self'].__dict__['_modules']['blocks'].0.attn1  or
# L['self']._modules['blocks']._modules['0']._parameters['weight'];  both mean blocks.0.attn1(.weight).
_PATH_TOKEN = re.compile(r"\['([^']*)'\]|\[(\d+)\]|\.([A-Za-z_]\w*|\d+)")
_CONTAINER_WORDS = {"__dict__", "_modules", "_parameters", "_buffers"}
# A module whose forward a diffusers hook wraps (HookRegistry: e.g. the context-parallel split hook on Wan's first
# block) is reached again through the wrapper: blocks.0.forward.func.__closure__[0].cell_contents.forward.__self__
# (inside a compiled model; nested hooks repeat the middle), or L['function_reference'].forward.__self__ (the wrapper
# is the compiled frame: a block compiled on its own). Both detours stand for the module itself.
_HOOK_DETOUR = re.compile(r"\.forward(?:\.(?:func|__closure__|cell_contents|forward|\d+))*\.__self__(?=\.|$)")
_ROOTS = ("self", "fn", "mod", "model", "function_reference")


def normalize_path(path: str) -> str:
    """Dynamo's access path of a module, parameter or buffer -> the dotted FQN torch uses in named_modules()."""
    parts: list[str] = []
    for match in _PATH_TOKEN.finditer(path):
        token = next(group for group in match.groups() if group is not None)
        if token not in _CONTAINER_WORDS:
            parts.append(token)
    parts = _HOOK_DETOUR.sub("", ".".join(parts)).split(".")
    # Drop the root: L['self'] (a compiled module), L['fn'] (a function's closure), a diffusers hook's wrapper.
    if parts[0] in _ROOTS and path.startswith("L["):
        parts = parts[1:]
    return ".".join(parts)


def is_diffusers_model(module_type: Any) -> bool:
    """Whether a module class is a diffusers model (a ``ModelMixin``), found by name: diffusers is optional."""
    if not isinstance(module_type, type):
        return False
    return any(cls.__name__ == "ModelMixin" and cls.__module__.startswith("diffusers") for cls in module_type.__mro__)


def model_root(gm: fx.GraphModule) -> str:
    """The path (as ``normalize_path`` writes it) of the model whose FQNs the graph's sites take, + ".", or "".

    Module FQNs are relative to the model, however it was compiled: the model itself (its root is Dynamo's
    ``L['self']``, dropped), a function calling it (``G['net']`` / ``L['net']``) or a module holding it
    (``L['self'].transformer``). Read from Dynamo's ``nn_module_stack``, which records every module call with its
    class: the outermost diffusers model called in the graph is the root; without one, a graph whose root is not the
    compiled module itself takes the one module every call goes through."""
    cached = gm.meta.get("qsparse_model_root")
    if cached is not None:
        return cached
    outermost: list[tuple[str, Any]] = []
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path, module_type = list(stack.values())[0][:2]
            outermost.append((path, module_type))
    root = ""
    models = []
    for node in gm.graph.nodes:
        for path, module_type in (node.meta.get("nn_module_stack") or {}).values():
            if is_diffusers_model(module_type):
                models.append(normalize_path(path))
    if models:
        root = min(models, key=len)
    elif outermost and not any(path.startswith(f"L['{word}']") for path, _ in outermost for word in _ROOTS):
        paths = {normalize_path(path) for path, _ in outermost}
        if len(paths) == 1:
            root = paths.pop()
    root = root + "." if root else ""
    gm.meta["qsparse_model_root"] = root
    return root


def _relative_to_model(node: fx.Node, fqn: str) -> str:
    gm = node.graph.owning_module
    root = model_root(gm) if gm is not None else ""
    return fqn[len(root):] if root and fqn.startswith(root) else fqn


def module_fqn(node: fx.Node) -> str | None:
    """FQN of the innermost module the node was traced in (relative to the model, see ``model_root``), or None at
    top level."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return _relative_to_model(node, normalize_path(path))


def source_fqn(placeholder: fx.Node) -> str | None:
    """FQN of the parameter/buffer/input a Dynamo placeholder stands for (a parameter's relative to the model, see
    ``model_root``)."""
    grapharg = placeholder.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name  # a property in torch >= 2.13, a method before
    return _relative_to_model(placeholder, normalize_path(name() if callable(name) else name))


def fake_value(node: Any) -> Any:
    """The traced (fake) value of a node: a FakeTensor, a SymInt, a python value; the value itself otherwise."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def node_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """An argument given either positionally or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def same_size(a: Any, b: Any) -> bool:
    """True only when two (possibly symbolic) sizes are provably equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(a == b)


def walk_inputs(
    start: Iterable[fx.Node],
    stop: Callable[[fx.Node], bool],
    max_depth: int = 48,
    within: Callable[[fx.Node], bool] = lambda _: True,
) -> list[fx.Node]:
    """Breadth-first walk towards the graph inputs; returns the nodes where ``stop`` holds (not walked past)."""
    found: list[fx.Node] = []
    seen: set[fx.Node] = set()
    queue = deque((node, 0) for node in start)
    while queue:
        node, depth = queue.popleft()
        if node in seen or depth > max_depth or not within(node):
            continue
        seen.add(node)
        if stop(node):
            found.append(node)
            continue
        queue.extend((arg, depth + 1) for arg in node.all_input_nodes)
    return found


def placeholder_index(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Position of each placeholder, i.e. of its tensor in ``example_inputs`` and in the runtime args."""
    return {node: i for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
