"""Blocks compiled in place outside ``qs.optimize``: diffusers' ``compile_repeated_blocks(backend="quantsparse")``.

``transformer.compile_repeated_blocks(backend="quantsparse", options=...)`` calls ``block.compile(...)`` on every
block of a ``_repeated_blocks`` class: ``torch.compile`` of each block's ``_call_impl`` - one code object, so Dynamo
compiles one graph that serves every block of a structure, with the block's parameters as graph inputs, exactly as
``qs.optimize``'s regional compilation does. What the block's graph cannot see is what ``qs.optimize``'s hooks give
it: the token grid of the forward (the block sees tokens, not latents), which block a call runs (its parameters'
names), the CFG branch and the denoising step. So when the backend compiles a block compiled in place (a module
whose ``_compiled_call_impl`` is set, which ``Module.compile`` does), it finds the diffusers model whose forward is
calling the block - the outermost running frame on the Python stack whose ``self`` is a diffusers model holding the
block (the block is compiled lazily, at its first call, inside that forward) - and
- registers the model's parameter names (``ops.context.register_parameters``): the graph learns its block prefix,
  packed weights, a plan's calibrated weights and LoRA and the residual caches are then looked up per call and per
  block, as for ``qs.optimize``;
- adds qsparse's step-clock hook (``qsparse_runtime``, runtime/hooks.py ``StepClockHook``) to the model, so every
  later forward sets the token grid, the CFG branch, the step and (a plan's LoRA) the timesteps - with the pipeline
  whose ``__call__`` is running found the same way, so the step also follows its scheduler. ``qs.runtime_of(model)``
  then returns the residual-cache runtime; ``qs.optimize(pipe)`` later undoes the in-place compiles and this hook.

The forward that compiles the first block started before the hook existed: for its blocks the backend reads the
grid (and timesteps) from the model's running frame instead (``running_locals``; compiler/backend.py).
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

import torch
from diffusers.hooks import HookRegistry
from diffusers.models.modeling_utils import ModelMixin

from ..ops.context import register_parameters
from .hooks import RUNTIME_HOOK, StepClockHook
from .residual_cache import ResidualCacheRuntime

__all__ = ["InPlaceOwner", "compiled_in_place", "find_owner", "attach_runtime", "running_locals"]

# From the backend the model's forward lies past Dynamo's own frames (about a hundred); the bound only guards
# against a pathological stack.
_MAX_FRAMES = 512


class InPlaceOwner:
    """The diffusers model whose forward calls a block compiled in place, and the pipeline calling the model (None:
    the model is called directly). Lives for one compile."""

    def __init__(self, model: torch.nn.Module, pipeline: Any, frame_locals: Mapping[str, Any]) -> None:
        self.model = model
        self.pipeline = pipeline
        self.frame_locals = frame_locals  # the locals of the model's running forward


def compiled_in_place(module: Any) -> bool:
    """Whether ``module`` was compiled by ``module.compile(...)`` (``compile_repeated_blocks`` does this per block)."""
    return isinstance(module, torch.nn.Module) and getattr(module, "_compiled_call_impl", None) is not None


def _frames():
    frame = sys._getframe(2)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return
        yield frame
        frame = frame.f_back


def find_owner(block: torch.nn.Module) -> InPlaceOwner | None:
    """The outermost diffusers model running a forward on the Python stack that holds ``block``, with the locals of
    its innermost running frame (its forward's own, inside any decorator's wrapper) and the pipeline (a running
    frame whose ``self`` has the model among its components); None when the block was called outside any model's
    forward."""
    frames = [(frame, frame.f_locals.get("self")) for frame in _frames()]  # innermost first
    models = [owner for _, owner in frames
              if isinstance(owner, ModelMixin) and any(module is block for module in owner.modules())]
    if not models:
        return None
    model = models[-1]
    model_locals = next(dict(frame.f_locals) for frame, owner in frames if owner is model)
    pipeline = next((owner for _, owner in frames if _is_pipeline_of(owner, model)), None)
    return InPlaceOwner(model, pipeline, model_locals)


def _is_pipeline_of(candidate: Any, model: torch.nn.Module) -> bool:
    """A denoising pipeline of ``model``: it holds the model as its transformer (Wan 2.2: or second transformer) and
    a scheduler, whose steps the clock then follows."""
    # The instance's own attributes only: the frames on the stack hold all kinds of objects, some with __getattr__.
    attrs = getattr(candidate, "__dict__", None)
    if not isinstance(attrs, dict) or isinstance(candidate, torch.nn.Module) or attrs.get("scheduler") is None:
        return False
    return any(attrs.get(name) is model for name in ("transformer", "transformer_2"))


def attach_runtime(owner: InPlaceOwner, runtime: ResidualCacheRuntime, timesteps: bool) -> bool:
    """Register the model's parameter names and add the step-clock hook (unless the model has it); returns whether
    the hook was added now. ``timesteps``: the forward's per-sample timesteps are needed (a plan's LoRA)."""
    from .pipeline import _RUNTIME_ATTR, _invalidate_child_registries

    model = owner.model
    register_parameters(model)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if registry.get_hook(RUNTIME_HOOK) is not None:
        return False
    blocks = tuple(module for module in model.modules() if compiled_in_place(module))
    hook = StepClockHook(runtime, owner.pipeline, timesteps=timesteps, compiled_blocks=blocks, in_place=True)
    registry.register_hook(hook, RUNTIME_HOOK)
    _invalidate_child_registries(registry)
    setattr(model, _RUNTIME_ATTR, runtime)
    if owner.pipeline is not None:
        setattr(owner.pipeline, _RUNTIME_ATTR, runtime)
    return True


def running_locals(model: torch.nn.Module) -> Mapping[str, Any] | None:
    """Locals of the innermost running frame on the stack whose ``self`` is ``model`` (its forward), or None."""
    for frame in _frames():
        if frame.f_locals.get("self") is model:
            return frame.f_locals
    return None
