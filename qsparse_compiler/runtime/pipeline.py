"""``qs.optimize``: compile a diffusers pipeline's transformer with the backend and drive its residual cache.

    pipe = qs.optimize(pipe, plan="wan-plan/")      # or qs.optimize(pipe) for defaults
    video = pipe(prompt, num_inference_steps=50).frames

The transformer gets its own ``ResidualCacheRuntime``. Step tracking hooks the pipeline's scheduler: every
``scheduler.set_timesteps`` (called once at the start of each generation) resets the caches, every
``scheduler.step`` advances the step. A transformer called several times in one step (CFG: conditional and
unconditional passes) keeps one residual per call position.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch

from .residual_cache import ResidualCacheRuntime

__all__ = ["optimize", "runtime_of", "release_dense_weights"]

_RUNTIME_ATTR = "_qsparse_runtime"


def runtime_of(pipe_or_model: Any) -> ResidualCacheRuntime:
    """The residual-cache runtime ``optimize`` attached to a pipeline or model."""
    runtime = getattr(pipe_or_model, _RUNTIME_ATTR, None)
    if runtime is None:
        raise ValueError("qsparse_compiler.runtime: this object was not prepared by qs.optimize(...)")
    return runtime


def release_dense_weights(pipe_or_model: Any) -> int:
    """After the first (compiling) call: free the bf16 weights of every linear that now runs on packed int4 weights.

    Cuts weight memory ~4x; afterwards the model can only run through its compiled graphs (an eager call, or a
    recompile that needs a new packing, fails loudly). Returns the bytes freed.
    """
    from .weights import default_store

    transformer = getattr(pipe_or_model, "transformer", pipe_or_model)
    module = getattr(transformer, "_orig_mod", transformer)
    return default_store.release_dense(module)


def _hook_scheduler(scheduler: Any, runtime: ResidualCacheRuntime) -> None:
    if getattr(scheduler, _RUNTIME_ATTR, None) is runtime:
        return
    set_timesteps, step = scheduler.set_timesteps, scheduler.step

    @functools.wraps(set_timesteps)
    def set_timesteps_and_reset(*args: Any, **kwargs: Any) -> Any:
        runtime.reset()
        return set_timesteps(*args, **kwargs)

    @functools.wraps(step)
    def step_and_advance(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        runtime.step()
        return result

    scheduler.set_timesteps = set_timesteps_and_reset
    scheduler.step = step_and_advance
    setattr(scheduler, _RUNTIME_ATTR, runtime)


def optimize(
    pipe_or_model: Any,
    plan: str | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    cache: bool | Mapping[str, Any] = True,
    mode: str | None = None,
    fullgraph: bool = True,
) -> Any:
    """Compile ``pipe.transformer`` (or a bare transformer) with backend="quantsparse"; returns what it was given.

    plan      a calibrated plan directory; its fingerprint must match the transformer (checked now, before compiling).
    options   more backend options (see config.QuantSparseConfig).
    cache     True: residual cache with the default schedule (a plan's per-site settings win); a dict: CacheConfig
              fields; False: no residual cache.
    """
    transformer = getattr(pipe_or_model, "transformer", pipe_or_model)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(
            f"qsparse_compiler.optimize: expected a diffusers pipeline with .transformer or an nn.Module, "
            f"got {type(pipe_or_model).__name__}"
        )
    runtime = ResidualCacheRuntime()
    backend_options: dict[str, Any] = dict(options or {})
    backend_options["runtime"] = runtime
    if plan is not None:
        from ..plan import ModelFingerprint, load_plan

        load_plan(plan).fingerprint.check(ModelFingerprint.of(transformer))
        backend_options["plan"] = str(plan)
    if cache:
        backend_options["cache"] = {"enabled": True, **(cache if isinstance(cache, Mapping) else {})}
    compiled = torch.compile(transformer, backend="quantsparse", options=backend_options, mode=mode, fullgraph=fullgraph)
    setattr(compiled, _RUNTIME_ATTR, runtime)
    if transformer is pipe_or_model:
        return compiled
    pipe_or_model.transformer = compiled
    setattr(pipe_or_model, _RUNTIME_ATTR, runtime)
    scheduler = getattr(pipe_or_model, "scheduler", None)
    if scheduler is not None:
        _hook_scheduler(scheduler, runtime)
    return pipe_or_model
