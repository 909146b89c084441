"""Per-forward facts a regionally compiled block cannot see in its own graph, and parameter names.

A transformer block compiled on its own (regional compilation: one graph shared by every block of the same
structure) sees neither the video latents (so not the token grid) nor which block it is. ``qs.optimize`` supplies both:
- the token grid of the current forward (a forward pre-hook on the transformer sets it from the latents' shape and
  the patch size), read by ``qsparse::video_block_layout`` when its grid arguments are 0. It is the full grid even
  under context parallelism: the hook sees the latents before diffusers splits the sequence, and Ulysses attention
  attends every token (runtime/parallel.py);
- the per-sample timesteps of the current forward (float32 [B] on the latents' device, set by the same hook from the
  transformer's ``timestep`` argument), which a regional graph with timestep-aware LoRA takes as a per-call input:
  the block's own graph never sees the timestep, only its embedding;
- the CFG branch of the current forward (the name of diffusers' ``cache_context``, "cond" / "uncond"), which keys
  the residual caches of each branch (runtime/residual_cache.py); None where the pipeline sets no cache context;
- the fully qualified name of every parameter (``register_parameters``), from which the backend and its runtime
  wrapper learn which block a graph was compiled for and which block each call runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from typing import Any, Iterator, Mapping, Sequence

import torch

__all__ = ["VideoGridContext", "patchified_grid", "latent_grid", "current_video_grid", "video_grid",
           "current_timesteps", "forward_timesteps", "current_branch", "forward_branch", "register_parameters",
           "parameter_name"]

VideoGridContext = tuple[int, int, int]  # (frames, height, width) in tokens, after patchify


def patchified_grid(
    config: Mapping[str, Any], latent_shape: Sequence[int], frames_first: bool = False
) -> VideoGridContext:
    """(frames, height, width) of the video tokens of 5-D latents ``latent_shape`` after a diffusers video
    transformer's patchify, from its config: ``patch_size`` (t, h, w) (Wan) or an int with ``patch_size_t``
    (HunyuanVideo; CogVideoX 1.0 has none: 1). ``frames_first``: CogVideoX's (B, F, C, H, W) latents; Wan's and
    HunyuanVideo's are (B, C, F, H, W)."""
    patch = config.get("patch_size")
    if patch is None or len(latent_shape) != 5:
        raise ValueError(
            f"qsparse_compiler.ops.context: cannot find the video token grid: need a config with patch_size and "
            f"5-D latents, got patch_size={patch!r} and latents {tuple(latent_shape)}; pass a diffusers video "
            "transformer (Wan, HunyuanVideo, CogVideoX) and its hidden_states"
        )
    if isinstance(patch, (tuple, list)):
        p_t, p_h, p_w = (int(p) for p in patch)
    else:
        p_t, p_h, p_w = int(config.get("patch_size_t") or 1), int(patch), int(patch)
    frames = latent_shape[1] if frames_first else latent_shape[2]
    return int(frames) // p_t, int(latent_shape[-2]) // p_h, int(latent_shape[-1]) // p_w


def latent_grid(transformer: torch.nn.Module, hidden_states: torch.Tensor) -> VideoGridContext:
    """``patchified_grid`` of a diffusers video transformer's ``hidden_states``."""
    config = getattr(transformer, "config", None)
    frames_first = "CogVideoX" in type(transformer).__name__
    return patchified_grid(config if isinstance(config, Mapping) else {}, tuple(hidden_states.shape), frames_first)

_grid: contextvars.ContextVar[VideoGridContext | None] = contextvars.ContextVar("qsparse_video_grid", default=None)
_timesteps: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("qsparse_timesteps", default=None)
_branch: contextvars.ContextVar[str | None] = contextvars.ContextVar("qsparse_cfg_branch", default=None)
_names: dict[int, tuple[weakref.ref, str]] = {}
_lock = threading.Lock()


def current_video_grid() -> VideoGridContext | None:
    return _grid.get()


@contextlib.contextmanager
def video_grid(grid: VideoGridContext) -> Iterator[None]:
    token = _grid.set(tuple(int(v) for v in grid))
    try:
        yield
    finally:
        _grid.reset(token)


def current_timesteps() -> torch.Tensor | None:
    return _timesteps.get()


@contextlib.contextmanager
def forward_timesteps(timesteps: torch.Tensor | None) -> Iterator[None]:
    """The per-sample timesteps (float32 [B]) of the forward running inside; None: this forward has none."""
    token = _timesteps.set(timesteps)
    try:
        yield
    finally:
        _timesteps.reset(token)


def current_branch() -> str | None:
    return _branch.get()


@contextlib.contextmanager
def forward_branch(name: str | None) -> Iterator[None]:
    """The CFG branch (diffusers cache-context name) of the forward running inside; None: unnamed."""
    token = _branch.set(name)
    try:
        yield
    finally:
        _branch.reset(token)


def register_parameters(model: torch.nn.Module) -> None:
    """Remember the FQN of every parameter of ``model`` (weakly: nothing is kept alive)."""
    with _lock:
        for name, param in model.named_parameters():
            _names[id(param)] = (weakref.ref(param), name)


def parameter_name(tensor: object) -> str | None:
    entry = _names.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        return None
    return entry[1]
