"""Structural discovery: the video token grid and the names of a graph's sites, for any diffusers video DiT, from
what the graph and the frame Dynamo compiled show - never from the model's class name.

The token grid (frames, height, width) of a graph, in this order (the first that gives a grid whose f * h * w tokens
- or one frame's h * w, for factorized attention - are the sequence of an attention of the graph wins; the report
names the source):
1. ``conv patch embedding``: a Conv3d on (B, C, F, H, W) latents, or a Conv2d on frames folded into the batch
   (``find_sites._find_grid``; Wan, HunyuanVideo, CogVideoX, Allegro, EasyAnimate, ...);
2. ``runtime context``: the grid ``qs.optimize``'s step-clock hook (runtime/hooks.py) sets for each forward, read by
   a block compiled on its own (``find_sites._context_grid``; the token count symbolic where the graph's is);
3. ``forward arguments``: the compiled forward's ``num_frames``/``height``/``width`` integers, in latent units,
   divided by the model's patch sizes (LTX-Video patchifies flattened tokens with a linear);
4. ``rotary position ids``: a forward argument that is three position tensors, one per axis (their lengths are the
   grid: Kandinsky 5's ``visual_rope_pos``, Allegro's per-axis rotary tables);
5. ``latent shape / patch size``: the 5-D ``hidden_states`` argument divided by the config's ``patch_size`` (and
   ``patch_size_t``), its channel axis found from the config's input channels (Cosmos patchifies by reshape + linear).
Sources 3-5 read the Python frame Dynamo is compiling (its locals: ``self`` and the forward's arguments), the
values the graph was specialized on; a grid from them is static (a new grid is a new shape: Dynamo recompiles).

Names: after a graph break, the rest of a model runs as nested frames (a block's ``forward`` compiled on its own)
whose parameter names start at that block (``attn1.to_q``). The outermost module Dynamo compiles is met first (its
graph comes before any nested frame's), so its model's parameter names are registered then (``ops.context
.register_parameters``, the registry ``qs.optimize`` fills): the nested frames' graphs find their block prefix as a
regional graph does. "Its model" is the one ``graph_utils.model_root`` makes every FQN relative to: the outermost
diffusers model in the compiled module (the module itself when it is one, the transformer when a wrapper holding it
is compiled), else the compiled module - so a registered name and a graph's own FQNs always share one root.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.fx as fx

from .graph_utils import SDPA_TARGETS, fake_value, is_diffusers_model, node_arg, same_size

__all__ = ["GridCandidate", "factorized_grid", "frame_locals", "register_frame_names", "discover_grid",
           "forward_grid", "GRID_SOURCES"]

GRID_SOURCES = ("conv patch embedding", "runtime context", "forward arguments", "rotary position ids",
                "latent shape / patch size")
_FRAME_ARGS = ("num_frames", "num_latent_frames", "frames", "latent_num_frames")
_HEIGHT_ARGS = ("height", "latent_height")
_WIDTH_ARGS = ("width", "latent_width")
_CHANNEL_KEYS = ("in_channels", "in_visual_dim", "in_dim")


@dataclass(frozen=True)
class GridCandidate:
    frames: int
    height: int
    width: int
    source: str  # one of GRID_SOURCES, with the argument it came from

    @property
    def video_len(self) -> int:
        return self.frames * self.height * self.width


def frame_locals() -> Mapping[str, Any]:
    """Locals of the frame Dynamo is compiling (its ``self`` and arguments), or {} outside a Dynamo compile (a graph
    handed to the passes directly) and on a torch whose tracer does not expose them."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:  # an internal API: its absence only costs the frame-based sources
        return {}
    return getattr(tx, "f_locals", None) or {}


def register_frame_names(locals_: Mapping[str, Any]) -> None:
    """Register the parameter names of the frame's model if none of them is registered yet: the outermost module
    (its first graph), whose names every nested frame's graph then extends. The names are relative to the model
    ``graph_utils.model_root`` picks (see the module doc)."""
    from ...ops.context import parameter_name, register_parameters

    module = locals_.get("self")
    if not isinstance(module, torch.nn.Module):
        return
    # modules() is pre-order: the first diffusers model met is the outermost one.
    model = next((m for m in module.modules() if is_diffusers_model(type(m))), module)
    first = next(model.parameters(), None)
    if first is not None and parameter_name(first) is None:
        register_parameters(model)


def _patch_sizes(config: Mapping[str, Any]) -> tuple[int, int, int] | None:
    patch = config.get("patch_size")
    if patch is None:
        return None
    if isinstance(patch, (tuple, list)):
        if len(patch) != 3:
            return None
        return tuple(int(p) for p in patch)
    return int(config.get("patch_size_t") or 1), int(patch), int(patch)


def _config(module: Any) -> Mapping[str, Any]:
    config = getattr(module, "config", None)
    return config if isinstance(config, Mapping) else {}


def _from_arguments(locals_: Mapping[str, Any], patch: tuple[int, int, int] | None) -> GridCandidate | None:
    def first_int(names: tuple[str, ...]) -> tuple[str, int] | None:
        for name in names:
            value = locals_.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return name, value
        return None

    found = [first_int(names) for names in (_FRAME_ARGS, _HEIGHT_ARGS, _WIDTH_ARGS)]
    if not all(found):
        return None
    p_t, p_h, p_w = patch or (1, 1, 1)
    (nf, f), (nh, h), (nw, w) = found
    return GridCandidate(f // p_t, h // p_h, w // p_w, f"forward arguments {nf}/{nh}/{nw} / patch {(p_t, p_h, p_w)}")


def _from_rotary_positions(locals_: Mapping[str, Any]) -> list[GridCandidate]:
    """Every argument that is (or holds, one level down) three per-axis position tensors or rotary tables."""
    found = []
    for name, value in locals_.items():
        groups = [value]
        if isinstance(value, (tuple, list)):
            groups += [item for item in value if isinstance(item, (tuple, list))]
        for group in groups:
            if (isinstance(group, (tuple, list)) and len(group) == 3
                    and all(isinstance(t, torch.Tensor) and t.ndim in (1, 2) for t in group)):
                f, h, w = (int(t.shape[0]) for t in group)
                found.append(GridCandidate(f, h, w, f"rotary position ids ({name}: one tensor per axis)"))
    return found


def _from_latents(locals_: Mapping[str, Any], config: Mapping[str, Any],
                  patch: tuple[int, int, int] | None) -> list[GridCandidate]:
    latents = locals_.get("hidden_states")
    if patch is None or not isinstance(latents, torch.Tensor) or latents.ndim != 5:
        return []
    channels = next((int(config[key]) for key in _CHANNEL_KEYS if isinstance(config.get(key), int)), None)
    shape = tuple(int(d) for d in latents.shape)
    # (B, C, F, H, W) (Wan, Cosmos), (B, F, C, H, W) (CogVideoX), (B, F, H, W, C) (Kandinsky 5).
    layouts = {1: (2, 3, 4), 2: (1, 3, 4), 4: (1, 2, 3)}
    axes = [axis for axis in layouts if channels is not None and shape[axis] == channels] or [1]
    p_t, p_h, p_w = patch
    found = []
    for axis in axes:
        f, h, w = (shape[i] for i in layouts[axis])
        if f % p_t == 0 and h % p_h == 0 and w % p_w == 0:
            found.append(GridCandidate(f // p_t, h // p_h, w // p_w,
                                       f"latent shape {shape} / patch {patch} (channels at axis {axis})"))
    return found


def _token_lengths(gm: fx.GraphModule) -> tuple[set[int], bool]:
    """Static sequence lengths of the graph's attentions (their q), the lengths a video grid must match; and whether
    some attention's length is symbolic (a graph Dynamo recompiled for several shapes)."""
    lengths, symbolic = set(), False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            q = fake_value(node_arg(node, 0, "query"))
            if not isinstance(q, torch.Tensor) or q.ndim != 4:
                continue
            if isinstance(q.shape[-2], int):
                lengths.add(int(q.shape[-2]))
            else:
                symbolic = True
    return lengths, symbolic


def discover_grid(gm: fx.GraphModule, locals_: Mapping[str, Any]) -> tuple[GridCandidate | None, list[str]]:
    """Sources 3-5 of the module docstring: the first grid whose token count is an attention's sequence, or the
    video part of one (a joint text + video sequence is longer), or whose frame (h*w tokens, f > 1) is (attention
    within each frame of a factorized model); and a note per source that gave a grid that did
    not fit (why it was not used)."""
    kwargs = locals_.get("kwargs")
    if isinstance(kwargs, Mapping):  # a decorator's wrapper frame: forward(*args, **kwargs)
        locals_ = {**kwargs, **locals_}
    module = locals_.get("self")
    config = _config(module)
    patch = _patch_sizes(config)
    candidates = [_from_arguments(locals_, patch), *_from_rotary_positions(locals_),
                  *_from_latents(locals_, config, patch)]
    lengths, symbolic = _token_lengths(gm)
    # A grid read from the compiling frame holds at that frame's shape only: an attention of symbolic length (a graph
    # serving several shapes) cannot take it. qs.optimize gives such graphs each forward's grid (runtime context).
    detail = "; the others are symbolic and cannot take a grid read at one shape" if symbolic else ""
    rejected = []
    for candidate in filter(None, candidates):
        if candidate.video_len > 0 and any(candidate.video_len <= s < 2 * candidate.video_len for s in lengths):
            return candidate, rejected
        if candidate.frames > 1 and candidate.height * candidate.width in lengths:
            return candidate, rejected  # attention within each frame (factorized, Latte): h*w tokens
        rejected.append(f"{candidate.source} gives grid {candidate.frames}x{candidate.height}x{candidate.width}, "
                        f"no attention of this graph has its {candidate.video_len} tokens (static sequences: "
                        f"{sorted(lengths)}{detail})")
    return None, rejected


def forward_grid(locals_: Mapping[str, Any]) -> GridCandidate | None:
    """The grid of a diffusers video model's running forward from its frame's locals (``self`` is the model): its
    ``num_frames``/``height``/``width`` (source 3), else its 5-D ``hidden_states`` (source 5) while they are still
    the latents. For a block compiled in place (runtime/repeated.py) in the forward that compiled it, before
    qsparse's hook gives each forward its grid: Wan, HunyuanVideo and CogVideoX unpack the latents' shape into these
    names before patchifying."""
    config = _config(locals_.get("self"))
    patch = _patch_sizes(config)
    return _from_arguments(locals_, patch) or next(iter(_from_latents(locals_, config, patch)), None)


def factorized_grid(seq_len: Any, frames: Any, height: Any, width: Any) -> tuple[str, tuple[Any, Any, Any]] | None:
    """A self-attention over one axis group of the grid (factorized space/time attention, Latte's blocks): ("spatial",
    (1, h, w)) within each frame (S = h*w, the frames folded into the batch), ("temporal", (f, 1, 1)) across frames
    (S = f, the positions in the batch), else None. The grid returned is the one a batch entry of that attention
    sees, so the video layout of it is a 2-D window per frame or a 1-D window over time. Symbolic sizes count only
    when provably equal; were f = h*w, the sequence would not tell the two apart and spatial is assumed."""
    if same_size(seq_len, height * width) and not (isinstance(frames, int) and frames == 1):
        return "spatial", (1, height, width)
    if same_size(seq_len, frames) and not (isinstance(height * width, int) and height * width == 1):
        return "temporal", (frames, 1, 1)
    return None
