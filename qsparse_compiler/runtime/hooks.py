"""The diffusers hooks through which ``qs.optimize`` runs a transformer, and ``qs.restore`` takes them off again.

Two kinds, registered by name in diffusers' ``HookRegistry`` (so ``HookRegistry.remove_hook`` undoes them and
``transformer.cache_context`` reaches them):

``qsparse_compiled`` (``CompiledForwardHook``) - on each repeated block (regional compilation) or on the transformer
    (whole-model compilation): the module's own forward, compiled with backend="quantsparse", replaces the eager one.
    Being the innermost hook of its module, whatever diffusers registers later on the same module (a step cache's
    block hooks) wraps the compiled forward and runs eagerly: it may skip the compiled call, never gets traced into it.
    With CUDA graphs it holds a refresh graph and a reuse graph of the residual cache and picks one per call on the
    host: a block from its own sites' schedules (``runtime.will_refresh_under``: per-layer refresh steps, no
    recompiles - each graph keeps one fixed path, which is what lets a CUDA graph capture it), a whole-model graph
    from the one schedule of every site.

``qsparse_runtime`` (``StepClockHook``) - on the transformer, outermost of qsparse's (the backend adds it too, to a
    transformer whose blocks ``compile_repeated_blocks`` compiled in place: runtime/repeated.py): per forward it
    - moves the residual cache's step clock (runtime/residual_cache.py): the step is the ``step_index`` of the
      pipeline's ``cache_context`` where it gives one (WanPipeline does), else the step of the pipeline's scheduler
      (``scheduler.step_index`` less its ``begin_index``; None before the first ``scheduler.step`` = step 0) - read,
      not patched. A new generation starts the caches over: the scheduler holds a new ``timesteps`` tensor (every
      ``set_timesteps`` makes one), the step went back, or diffusers resets the stateful hooks
      (``reset_state``, which every pipeline calls at the end through ``maybe_free_model_hooks``). The step is read at
      every forward that runs, so steps a step cache skips whole are seen as a gap, never miscounted;
    - names the CFG branch after the cache context ("cond" / "uncond"); a pipeline that sets none gets branches by
      call position within the step (ops/context.py ``forward_branch``);
    - sets the token grid and (timestep-aware LoRA) the per-sample timesteps of the forward for the regional graphs;
    - refuses, with the reason, a diffusers step cache that cannot compose with the compiled blocks
      (``check_step_cache``).

Stateful (``_is_stateful``) because diffusers hands the cache context only to stateful hooks' ``StateManager``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
import weakref
from typing import Any, Callable, Mapping

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..ops.context import forward_branch, forward_timesteps, latent_grid, video_grid
from .residual_cache import CacheError, ResidualCacheRuntime

__all__ = ["COMPILED_HOOK", "RUNTIME_HOOK", "CompiledForwardHook", "StepClockHook", "check_step_cache",
           "per_sample_timesteps"]

COMPILED_HOOK = "qsparse_compiled"
RUNTIME_HOOK = "qsparse_runtime"


class CompiledForwardHook(ModelHook):
    """Runs the module's forward through ``torch.compile`` graphs. ``graphs``: {path: torch.compile kwargs};
    ``choose``: which path this call takes (None: the only one)."""

    def __init__(self, graphs: Mapping[str, Mapping[str, Any]], choose: Callable[[], str] | None = None) -> None:
        super().__init__()
        self._graph_kwargs = dict(graphs)
        self._choose = choose
        self._graphs: dict[str, Callable] = {}

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        # The forward as it is now - with the hooks registered before (diffusers' context-parallel split and gather
        # hooks), which Dynamo traces as it would for torch.compile(module) - and none registered after. A hook's
        # wrapper is partial(new_forward, module): compiled as a method of the module, so that Dynamo's paths to
        # the parameters start at the module (compiler/passes/graph_utils.py normalize_path), not at the partial.
        forward = module.forward
        if isinstance(forward, functools.partial) and forward.args == (module,) and not forward.keywords:
            forward = types.MethodType(forward.func, module)
        self._graphs = {path: torch.compile(forward, **kwargs) for path, kwargs in self._graph_kwargs.items()}
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        path = self._choose() if self._choose is not None else next(iter(self._graphs))
        return self._graphs[path](*args, **kwargs)


class _NoState(BaseState):
    """The clock keeps its facts on the hook; the StateManager is only diffusers' channel for the cache context."""

    def reset(self, *args: Any, **kwargs: Any) -> None:
        return None


class StepClockHook(ModelHook):
    _is_stateful = True

    def __init__(self, runtime: ResidualCacheRuntime, pipeline: Any = None, timesteps: bool = False,
                 compiled_blocks: tuple[torch.nn.Module, ...] = (), in_place: bool = False) -> None:
        super().__init__()
        self.runtime = runtime
        self.state_manager = StateManager(_NoState)
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._timesteps_input = timesteps
        self._compiled_blocks = compiled_blocks  # empty: the whole transformer is one compiled graph
        self._signature: inspect.Signature | None = None
        self._schedule_of: torch.Tensor | None = None  # the scheduler's timesteps of the current generation
        self._last_step: int | None = None
        self._checked_config: Any = None
        # in_place: added by runtime/repeated.py, during a forward, to a model whose blocks were compiled in place
        # (compile_repeated_blocks). (1) The hook did not name that forward's CFG branch: its residuals went to a
        # branch by call position, one too many once the pipeline names its branches, so the first named forward
        # starts the caches over (that branch's next step refreshes, whatever the schedule). (2) The user did not ask
        # for qsparse's hook: a forward whose latents give no grid (an image model, flattened latents) runs on
        # without one - its blocks then read the grid from the forward's frame, or their attention stays dense.
        self._in_place = in_place
        self._restart = in_place

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._signature = inspect.signature(type(module).forward.__get__(module))
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        config = getattr(module, "_cache_config", None)
        if config is not self._checked_config:
            check_step_cache(module, config, self._compiled_blocks)
            self._checked_config = config
        name, step_index, num_steps = self._cache_context()
        if self._restart:
            self._restart = False
            if name is not None:
                self.runtime.reset()
        self._advance_clock(step_index, num_steps)
        latents = kwargs.get("hidden_states", args[0] if args else None)
        with contextlib.ExitStack() as stack:
            stack.enter_context(forward_branch(name))
            grid = self._grid(module, latents)
            if grid is not None:
                stack.enter_context(video_grid(grid))
            if self._timesteps_input:
                timestep = self._signature.bind_partial(*args, **kwargs).arguments.get("timestep")
                stack.enter_context(forward_timesteps(per_sample_timesteps(timestep, latents)))
            return self.fn_ref.original_forward(*args, **kwargs)

    def _grid(self, module: torch.nn.Module, latents: Any) -> tuple[int, int, int] | None:
        if not self._in_place:
            return latent_grid(module, latents)
        try:
            return latent_grid(module, latents)
        except (ValueError, TypeError, AttributeError):  # no patch size, latents not 5-D (or not a tensor)
            return None

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        self.runtime.reset()
        self._schedule_of, self._last_step = None, None
        return module

    def _cache_context(self) -> tuple[str | None, int | None, int | None]:
        """(name, step_index, num_inference_steps) of the pipeline's ``cache_context``, as diffusers' own cache hooks
        read it: a ``CacheContext`` (diffusers 0.42) or a bare name (0.41: no step facts)."""
        context = getattr(self.state_manager, "_context", None)
        if context is None:
            return getattr(self.state_manager, "_current_context", None), None, None
        return context.name, context.step_index, context.num_inference_steps

    def _advance_clock(self, step_index: int | None, num_steps: int | None) -> None:
        pipeline = self._pipeline() if self._pipeline is not None else None
        scheduler = getattr(pipeline, "scheduler", None)
        new_generation = False
        timesteps = getattr(scheduler, "timesteps", None)
        if isinstance(timesteps, torch.Tensor) and timesteps is not self._schedule_of:
            new_generation, self._schedule_of = True, timesteps
        step = None
        if step_index is not None:
            step = int(step_index)
        elif scheduler is not None and hasattr(scheduler, "step_index"):
            index = scheduler.step_index
            step = 0 if index is None else int(index) - int(getattr(scheduler, "begin_index", None) or 0)
        if step is not None and self._last_step is not None and step < self._last_step:
            new_generation = True
        if new_generation:
            self.runtime.reset()
        if step is not None and step != self.runtime.current_step:
            self.runtime.step(step)
        self._last_step = step
        if num_steps is None and scheduler is not None:
            num_steps = getattr(scheduler, "num_inference_steps", None)
        self.runtime.set_num_steps(num_steps)


def check_step_cache(transformer: torch.nn.Module, config: Any, compiled_blocks: tuple[torch.nn.Module, ...]) -> None:
    """Raise CacheError when the diffusers cache ``config`` enabled on ``transformer`` cannot run around the compiled
    graphs: its hooks must sit on the transformer or on whole blocks (FirstBlockCache, MagCache, SeaCache,
    TaylorSeer's lite mode), where they run eagerly and may skip a compiled block. A hook on a module inside a
    compiled block (PyramidAttentionBroadcast, FasterCache, TaylorSeer's default attention hooks) would be traced by
    Dynamo into the block's graph, where its per-step Python decisions become guards (a recompile every step) or
    graph breaks - and the attention it replaces is the one qsparse rewrote."""
    if config is None:
        return
    name = type(config).__name__
    if not compiled_blocks:
        raise CacheError(
            f"qsparse_compiler: {name} cannot compose with a transformer compiled as one graph "
            "(qs.optimize(regional=False) or cuda_graphs=True): its hooks would run inside the compiled graph; "
            "compile regionally (qs.optimize(pipe), the default) to use diffusers' step caches"
        )
    inner = []
    for block in compiled_blocks:
        for child_name, child in block.named_modules():
            registry = getattr(child, "_diffusers_hook", None)
            if child_name and registry is not None and registry.hooks:
                inner.append(f"{type(child).__name__} ({', '.join(registry.hooks)})")
    if inner:
        raise CacheError(
            f"qsparse_compiler: {name} cannot compose with qs.optimize: it hooks modules inside the transformer "
            f"blocks that qsparse compiles as one graph each ({inner[0]}, {len(inner)} in all); Dynamo would trace "
            "its per-step decisions into the block's graph. Use a block-level step cache (FirstBlockCacheConfig, "
            "MagCacheConfig, SeaCacheConfig, TaylorSeerCacheConfig(use_lite_mode=True)), or qs.restore(pipe) to run "
            f"{name} on the eager model"
        )


def per_sample_timesteps(timestep: Any, latents: torch.Tensor) -> torch.Tensor | None:
    """One timestep per sample of ``latents`` (a scalar or [1] timestep is every sample's), contiguous: the regional
    graph's timestep input has the batch size of its activations."""
    from ..ops.lora import sample_timesteps

    if timestep is None:
        return None
    per_sample = sample_timesteps(timestep).to(latents.device)
    return per_sample.expand(latents.shape[0]).contiguous() if per_sample.numel() == 1 else per_sample

