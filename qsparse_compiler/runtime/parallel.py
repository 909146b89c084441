"""The backend under diffusers' context parallelism (Ulysses): which heads a rank holds, and what is supported.

    dist.init_process_group(...)                                   # one process per GPU (torchrun)
    pipe = qs.optimize(pipe, plan="wan-plan/", parallel=ContextParallelConfig(ulysses_degree=2))
    # or: pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2)); qs.optimize(pipe, ...)

The backend composes with diffusers' context parallelism instead of replacing it: diffusers shards the sequence (its
``_cp_plan`` hooks split the hidden states entering the first block and gather the output of ``proj_out``) and wraps
each parallel attention in an all-to-all, which the Dynamo graph of a block keeps as functional collectives
(``_c10d_functional.all_to_all_single`` + ``wait_tensor``): q, k, v of ``attn1`` arrive as (B, H/W, S, D) - every
token of the video, the heads [r*H/W, (r+1)*H/W) of Ulysses rank r of W. So on each rank:
- linears quantize the local sequence shard (per-token activation scales: the same numbers as on one process);
- sparse attention uses the FULL token grid (the grid hook of ``qs.optimize`` reads it from the unsplit latents) and
  the per-head patterns of the local heads only: ``ParallelConfig`` (backend option ``parallel``) tells
  ``compiler/passes/sparsify_attention.py`` the degree and the rank, and it slices the pattern spec;
- residual caches hold the local heads only: each rank has its own ``ResidualCacheRuntime`` and the cache state
  follows the graph's (B, H/W, S, D) attention output; every rank takes the same refresh/reuse decisions (one step
  clock, driven by the same scheduler calls).

Supported: Ulysses (``ContextParallelConfig(ulysses_degree=W)``), regional or whole-model compilation (diffusers'
hooks are traced into the graphs: the input split into the first block's graph, the output gather into the whole
model's). Ring attention, Ulysses "anything" (uneven head splits) and tensor parallelism are refused with the reason
and the fix.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

__all__ = ["prepare_context_parallel"]


def prepare_context_parallel(transformer: torch.nn.Module, parallel: Any = None) -> dict[str, int] | None:
    """Enable diffusers' context parallelism on ``transformer`` with ``parallel`` (a ``ContextParallelConfig``) unless
    it is None, check what the transformer runs under, and return the backend's ``parallel`` option for this rank
    ({"ulysses_degree": W, "ulysses_rank": r}); None when the transformer has no context parallelism. A refused
    configuration raises before the transformer is changed.

    Call after ``torch.distributed.init_process_group`` on every rank, before compiling.
    """
    current = getattr(transformer, "_parallel_config", None)
    if parallel is not None:
        if not hasattr(transformer, "enable_parallelism"):
            raise TypeError(
                f"qsparse_compiler.optimize: parallel=... needs a diffusers model (ModelMixin.enable_parallelism); "
                f"{type(transformer).__name__} has none"
            )
        if current is None:
            _check_supported(parallel)
            transformer.enable_parallelism(config=parallel)
            current = transformer._parallel_config
        elif parallel is not current and parallel is not current.context_parallel_config:
            raise ValueError(
                f"qsparse_compiler.optimize: {type(transformer).__name__} already runs under another parallel config "
                "(enable_parallelism was called); pass parallel=None to use the one it has"
            )
    if current is None:
        return None
    _check_supported(current)
    config = current.context_parallel_config
    if config is None:
        return None
    _prepare_hooks_for_dynamo(transformer)
    return {"ulysses_degree": int(config.ulysses_degree), "ulysses_rank": int(config._ulysses_local_rank)}


def _check_supported(parallel: Any) -> None:
    """Refuse what the backend cannot follow, naming the fix. ``parallel``: diffusers' ParallelConfig,
    ContextParallelConfig or TensorParallelConfig."""
    if getattr(parallel, "tensor_parallel_config", None) is not None or hasattr(parallel, "tp_degree"):
        raise ValueError(
            "qsparse_compiler.optimize: tensor parallelism is not supported (its sharded linear weights are not "
            "packed to int4); use context parallelism: ContextParallelConfig(ulysses_degree=N)"
        )
    config = getattr(parallel, "context_parallel_config", parallel)
    if config is None:
        return
    if config.ring_degree > 1:
        raise ValueError(
            f"qsparse_compiler.optimize: ring attention (ring_degree={config.ring_degree}) is not supported: each rank "
            "attends its query shard to one key shard at a time, so no rank sees the whole token grid a 3D block "
            f"layout is built on; use ContextParallelConfig(ulysses_degree={config.ring_degree * config.ulysses_degree}"
            ")"
        )
    if config.ulysses_anything:
        raise ValueError(
            "qsparse_compiler.optimize: ContextParallelConfig(ulysses_anything=True) pads the heads to split them "
            "unevenly, so a rank's heads are not the contiguous slice a per-head plan is cut into; use "
            "ulysses_anything=False with a head count and a token count divisible by ulysses_degree"
        )


def _prepare_hooks_for_dynamo(transformer: torch.nn.Module) -> None:
    """Let Dynamo trace diffusers' context-parallel hooks in one graph (fullgraph=True), whole model or block:
    - the split hook looks up its module's forward signature on its first call with ``inspect.signature``, which
      Dynamo cannot trace: do that look-up now, outside any graph (the hook keeps the result);
    - the split hook logs (``logger.warning_once``) when an input has fewer dims than the plan expects (Wan 2.1's 1-D
      timestep, on every call), which Dynamo cannot put in a graph: the log is skipped inside compiled code."""
    from diffusers.hooks import context_parallel

    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in registry.hooks.values() if registry is not None else ():
            if not isinstance(hook, context_parallel.ContextParallelSplitHook):
                continue
            metadata = hook.module_forward_metadata
            if metadata.cached_parameter_indices is None:
                names = list(inspect.signature(metadata._cls.forward).parameters)[1:]  # without self
                metadata.cached_parameter_indices = {name: index for index, name in enumerate(names)}
    logger = context_parallel.logger
    if not hasattr(logger, "warning_once"):
        # diffusers 0.42 calls Logger.warning_once, which only transformers adds to logging.Logger: without
        # transformers installed the split hook raised AttributeError (eager too). Give its logger one.
        logger.warning_once = functools.lru_cache(maxsize=None)(logger.warning)
    torch._dynamo.config.ignore_logging_functions.add(logger.warning_once)
