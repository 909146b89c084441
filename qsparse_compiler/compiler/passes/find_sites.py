"""Analysis pass: find every linear and every scaled-dot-product attention and say what each one is.

What the Dynamo graph of a diffusers video DiT looks like (torch 2.11-2.13, diffusers 0.42, no graph breaks):
- a linear is ``call_function torch._C._nn.linear(x, weight, bias)`` with weight/bias placeholders (parameters are
  graph inputs), its module in ``node.meta["nn_module_stack"]``;
- attention is ``call_function F.scaled_dot_product_attention`` (diffusers' dispatcher is inlined), q/k/v (B, H, S, D);
- the video token grid comes from the patch embedding: Wan and HunyuanVideo use a Conv3d on the (B, C, F, H, W) latents
  (grid = conv output's (f, h, w)); CogVideoX folds frames into the batch and uses a Conv2d (f = conv batch / B).

Attention kinds (``AttentionSite.kind``):
- ``self_attention``   q, k, v all video tokens (Wan ``attn1``)                         -> sparsified
- ``joint_attention``  text and video tokens in one sequence (CogVideoX: text first; HunyuanVideo: video first,
                       padded text masked by a key-padding mask) -> the video x video region is sparsified, every
                       tile touching a text token stays dense (text is short and carries the conditioning)
- ``cross_attention``  keys from another sequence (text, image) -> dense
- ``text_attention``   self-attention without video tokens (HunyuanVideo's token refiner) -> dense
- ``spatial_attention`` self-attention within each frame (S = h*w, frames in the batch: Latte's spatial blocks)
                       -> sparsified with the layout of a one-frame grid (1, h, w): a 2-D window per frame
- ``temporal_attention`` self-attention across frames (S = f, positions in the batch: Latte's temporal blocks) ->
                       sparsified with the layout of a grid (f, 1, 1) where S spans several query blocks; the few
                       frames of a real model fit in one, so it stays dense with that reason
- ``attention``        self-attention in a graph without a video grid (a ViT, a block compiled on its own) -> dense
- ``fused_attention``  nn.MultiheadAttention / nn.TransformerEncoderLayer in one call (projections inside) -> kept
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .graph_utils import (
    CAT_TARGETS,
    FUSED_ATTENTION_TARGETS,
    LINEAR_TARGETS,
    SDPA_TARGETS,
    fake_value,
    module_fqn,
    node_arg,
    same_size,
    source_fqn,
    walk_inputs,
)
from .discovery import discover_grid, factorized_grid, frame_locals, register_frame_names
from .pass_manager import PassContext, count_rewrite

__all__ = ["FindSites", "VideoGrid", "AttentionSite", "LinearSite"]

_SHAPE_OPS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "to", "unflatten", "float", "type"}
_SHAPE_FUNCS = {torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.Tensor.view}


@dataclass
class VideoGrid:
    """The (frames, height, width) token grid of the video latents; values may be SymInts."""

    frames: Any
    height: Any
    width: Any
    conv: fx.Node | None  # None: the grid comes from the runtime context or from structural discovery (discovery.py)
    batch_source: fx.Node | None  # Conv2d case: the 5-D latents whose batch divides the conv batch
    source: str = "conv patch embedding"  # which source of discovery.GRID_SOURCES gave it
    # A block compiled on its own: the graph's (possibly symbolic) size of the video tokens, which the grid of the
    # compiling forward only gives at one shape (see _context_grid).
    tokens: Any = None

    @property
    def video_len(self) -> Any:
        if self.tokens is not None:
            return self.tokens
        return self.frames * self.height * self.width

    def emit(self, graph: fx.Graph) -> tuple[Any, Any, Any]:
        """Graph values for (frames, height, width): python ints when static, size nodes when symbolic, and
        (0, 0, 0) - "the current forward's grid" - for a grid that comes from the runtime context."""
        if self.conv is None:
            return (0, 0, 0) if self.source == "runtime context" else (self.frames, self.height, self.width)

        def dim(node: fx.Node, index: int) -> Any:
            value = fake_value(node).shape[index]
            if isinstance(value, int):
                return value
            size = graph.call_function(torch.ops.aten.sym_size.int, (node, index))
            size.meta["example_value"] = value
            return size

        height, width = dim(self.conv, -2), dim(self.conv, -1)
        if self.batch_source is None:
            return dim(self.conv, 2), height, width
        frames = self.frames
        if not isinstance(frames, int):
            frames = graph.call_function(operator.floordiv, (dim(self.conv, 0), dim(self.batch_source, 0)))
            frames.meta["example_value"] = self.frames
        return frames, height, width


@dataclass
class AttentionSite:
    node: fx.Node
    fqn: str
    kind: str
    seq_len: Any
    video_start: Any = None  # joint/self: index of the first video token
    why: str = ""
    # spatial/temporal attention: the grid one batch entry sees, (1, h, w) or (f, 1, 1), in place of the graph's
    grid: tuple[Any, Any, Any] | None = None


@dataclass
class LinearSite:
    node: fx.Node
    fqn: str
    weight: fx.Node | None  # the weight's placeholder, if the weight is a graph input


def _is_shape_op(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_OPS
    return node.op == "call_function" and node.target in _SHAPE_FUNCS


def _find_grid(gm: fx.GraphModule) -> VideoGrid | None:
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.conv3d, torch.conv2d):
            continue
        out = fake_value(node)
        if out is None or not node.args:
            continue
        if node.target is torch.conv3d and out.ndim == 5:
            f, h, w = out.shape[2:]
            return VideoGrid(f, h, w, node, None)
        if node.target is torch.conv2d and out.ndim == 4:
            # Frames folded into the batch: walk back through reshapes to the 5-D latents (B, F, C, H, W).
            latents = walk_inputs(
                [node.args[0]],
                stop=lambda n: getattr(fake_value(n), "ndim", 0) == 5,
                within=lambda n: getattr(fake_value(n), "ndim", 0) == 5 or _is_shape_op(n),
                max_depth=8,
            )
            if latents:
                batch = fake_value(latents[0]).shape[0]
                return VideoGrid(out.shape[0] // batch, out.shape[2], out.shape[3], node, latents[0])
    return None


def _parent(fqn: str) -> str:
    return fqn.rsplit(".", 1)[0] if "." in fqn else ""


def _projection_inputs(start: fx.Node, scope: str) -> set[fx.Node]:
    """Inputs of the nearest linears that produce ``start`` (q or k) inside the attention's block."""
    linears = walk_inputs(
        [start],
        stop=lambda n: n.op == "call_function" and n.target in LINEAR_TARGETS,
        within=lambda n: (module_fqn(n) or "").startswith(scope),
    )
    return {node_arg(linear, 0, "input") for linear in linears}


def _video_start(q: fx.Node, seq_len: Any, video_len: Any, scope: str) -> Any:
    """Index of the first video token in a joint sequence, from the text/video concatenation feeding q."""
    cats = walk_inputs(
        [q],
        stop=lambda n: n.op == "call_function" and n.target in CAT_TARGETS,
        within=lambda n: (module_fqn(n) or "").startswith(scope),
    )
    for cat in cats:
        parts = node_arg(cat, 0, "tensors")
        out = fake_value(cat)
        if out is None or not isinstance(parts, (list, tuple)) or len(parts) != 2:
            continue
        dim = node_arg(cat, 1, "dim", 0) % out.ndim
        if not same_size(out.shape[dim], seq_len):
            continue
        first, second = (fake_value(part).shape[dim] for part in parts)
        if same_size(first, video_len):
            return 0
        if same_size(second, video_len):
            return first
    return None


def _fqn_prefix(gm: fx.GraphModule, example_inputs: list[Any]) -> str:
    """"blocks.3." when this graph is one block compiled on its own (its parameters' names, as qs.optimize registered
    them, extend the graph's own relative names); "" for a whole model."""
    from ...ops.context import parameter_name

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        relative, absolute = source_fqn(node), parameter_name(value)
        if relative and absolute and absolute != relative and absolute.endswith("." + relative):
            return absolute[: -len(relative)]
    return ""


def _context_grid(gm: fx.GraphModule, example_inputs: list[Any]) -> VideoGrid | None:
    """The grid of the forward being compiled, for a block compiled on its own. Its token count is taken as the
    block's own size of the video tokens: once Dynamo recompiles the block with a symbolic sequence length (a second
    resolution), that symbol - not the compiling forward's number - is what the attention's length is compared with,
    so the graph stays sparse at every shape it serves (the layout's grid comes from each forward:
    ops/video_layout.py)."""
    from ...ops.context import current_video_grid, parameter_name

    grid = current_video_grid()
    if grid is None:
        return None
    frames, height, width = grid
    video_len = frames * height * width
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        fake = fake_value(node)
        if not isinstance(fake, torch.Tensor) or isinstance(value, torch.nn.Parameter) or parameter_name(value):
            continue
        for size in fake.shape:
            if isinstance(size, torch.SymInt) and size.node.hint == video_len:
                return VideoGrid(frames, height, width, conv=None, batch_source=None, source="runtime context",
                                 tokens=size)
    return VideoGrid(frames, height, width, conv=None, batch_source=None, source="runtime context")


class FindSites:
    """Annotates ``ctx.analysis["sites"]`` with a LinearSite / AttentionSite per node, and the video grid."""

    name = "find_sites"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        frame = frame_locals()
        register_frame_names(frame)
        prefix = _fqn_prefix(gm, ctx.example_inputs)
        ctx.analysis["prefix"] = prefix
        grid = (_find_grid(gm) or (_context_grid(gm, ctx.example_inputs) if prefix else None)
                or self._discovered_grid(gm, frame, ctx))
        if grid is not None and all(isinstance(v, int) for v in (grid.frames, grid.height, grid.width)):
            ctx.report.notes.append(f"video token grid {grid.frames}x{grid.height}x{grid.width} from {grid.source}")
        if prefix:
            ctx.report.notes.append(
                f"regional graph: compiled for {prefix.rstrip('.')} and shared by every block of the same structure "
                "(packed weights and residual caches are looked up per call)"
            )
        linears: list[LinearSite] = []
        attentions: list[AttentionSite] = []
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in LINEAR_TARGETS:
                weight = node_arg(node, 1, "weight")
                placeholder = weight if isinstance(weight, fx.Node) and weight.op == "placeholder" else None
                fqn = source_fqn(placeholder) if placeholder is not None else None
                fqn = re.sub(r"\.weight$", "", fqn) if fqn else (module_fqn(node) or node.name)
                linears.append(LinearSite(node, prefix + fqn, placeholder))
                count_rewrite(ctx, "found_linear")
            elif node.target in SDPA_TARGETS:
                attentions.append(self._classify(node, grid, prefix))
                count_rewrite(ctx, "found_attention")
            elif node.target in FUSED_ATTENTION_TARGETS:
                fqn = prefix + (module_fqn(node) or node.name)
                why = (f"{node.target.__name__}: torch's fused attention (projections and attention in one call), "
                       "left as is; write the attention with F.scaled_dot_product_attention to have it rewritten")
                attentions.append(AttentionSite(node, fqn, "fused_attention", None, why=why))
                count_rewrite(ctx, "found_attention")
        ctx.analysis["grid"] = grid
        ctx.analysis["linears"] = linears
        ctx.analysis["attentions"] = attentions
        if grid is None:
            ctx.report.notes.append("no video token grid found (no patch-embedding conv, grid arguments, per-axis "
                                    "rotary positions or 5-D latents with a patch size): attention stays dense")
        return 0

    @staticmethod
    def _discovered_grid(gm: fx.GraphModule, frame: Any, ctx: PassContext) -> VideoGrid | None:
        found, rejected = discover_grid(gm, frame)
        ctx.report.notes.extend(rejected)
        if found is None:
            return None
        return VideoGrid(found.frames, found.height, found.width, conv=None, batch_source=None, source=found.source)

    @staticmethod
    def _classify(node: fx.Node, grid: VideoGrid | None, prefix: str) -> AttentionSite:
        relative = module_fqn(node) or node.name
        fqn = prefix + relative
        q, k = node_arg(node, 0, "query"), node_arg(node, 1, "key")
        q_val, k_val = fake_value(q), fake_value(k)
        seq_len = q_val.shape[-2]
        scope = _parent(relative)
        if not same_size(seq_len, k_val.shape[-2]) or _projection_inputs(q, scope) != _projection_inputs(k, scope):
            return AttentionSite(node, fqn, "cross_attention", seq_len, why="keys come from another sequence")
        if grid is None:
            why = "no video token grid in this graph"
            if not prefix and not re.search(r"(^|\.)\d+(\.|$)", relative):
                # No patch embedding, no regional prefix, no block index in the name: a block compiled on its own
                # and called outside its model's forward (or compiled by torch.compile(block), not block.compile()).
                why += (" (a block compiled on its own sees no latents: compile through qs.optimize(pipe) or "
                        "transformer.compile_repeated_blocks(backend='quantsparse') and call the transformer, which "
                        "give the blocks each forward's grid)")
            return AttentionSite(node, fqn, "attention", seq_len, why=why)
        if same_size(seq_len, grid.video_len):
            return AttentionSite(node, fqn, "self_attention", seq_len, video_start=0)
        start = _video_start(q, seq_len, grid.video_len, scope)
        factorized = factorized_grid(seq_len, grid.frames, grid.height, grid.width) if start is None else None
        if factorized is not None:
            axis, site_grid = factorized
            return AttentionSite(node, fqn, f"{axis}_attention", seq_len, video_start=0, grid=site_grid)
        if start is None:
            return AttentionSite(
                node, fqn, "text_attention", seq_len,
                why=f"no video tokens: S={seq_len} is not the video grid ({grid.video_len} tokens) nor text+video",
            )
        return AttentionSite(node, fqn, "joint_attention", seq_len, video_start=start)
