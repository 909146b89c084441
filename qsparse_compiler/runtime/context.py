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
- the fully qualified name of every parameter (``register_parameters``), from which the backend and its runtime
  wrapper learn which block a graph was compiled for and which block each call runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from typing import Iterator

import torch

__all__ = ["VideoGridContext", "current_video_grid", "video_grid", "current_timesteps", "forward_timesteps",
           "register_parameters", "parameter_name"]

VideoGridContext = tuple[int, int, int]  # (frames, height, width) in tokens, after patchify

_grid: contextvars.ContextVar[VideoGridContext | None] = contextvars.ContextVar("qsparse_video_grid", default=None)
_timesteps: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("qsparse_timesteps", default=None)
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
