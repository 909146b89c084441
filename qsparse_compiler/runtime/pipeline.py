"""``qs.optimize``: compile a diffusers pipeline's transformer with the backend and drive its residual cache.

    pipe = qs.optimize(pipe, plan="wan-plan/")      # or qs.optimize(pipe) for defaults
    video = pipe(prompt, num_inference_steps=50).frames

The transformer gets its own ``ResidualCacheRuntime``. With ``regional=True`` (the default when the plan allows it)
each repeated transformer block is compiled on its own, as diffusers' ``compile_repeated_blocks`` does: one graph
serves all blocks of a structure, so compiling takes seconds instead of minutes; the token grid of each forward and
the name of each block reach the shared graph through runtime/context.py. Step tracking hooks the pipeline's scheduler: every
``scheduler.set_timesteps`` (called once at the start of each generation) resets the caches, every
``scheduler.step`` advances the step. A transformer called several times in one step (CFG: conditional and
unconditional passes) keeps one residual per call position.

With diffusers' context parallelism (``parallel=ContextParallelConfig(ulysses_degree=W)``, or a transformer on which
``enable_parallelism`` was called) each rank compiles its blocks for its own heads: see runtime/parallel.py.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import Any, Mapping

import torch

from ..config import QuantSparseConfig
from ..ops.context import forward_timesteps, latent_grid, register_parameters, video_grid
from .parallel import prepare_context_parallel
from .residual_cache import ResidualCacheRuntime

__all__ = ["optimize", "runtime_of", "release_dense_weights", "StepSwitchingModel"]

_RUNTIME_ATTR = "_qsparse_runtime"


def runtime_of(pipe_or_model: Any) -> ResidualCacheRuntime:
    """The residual-cache runtime ``optimize`` attached to a pipeline or model."""
    runtime = getattr(pipe_or_model, _RUNTIME_ATTR, None)
    if runtime is None:
        raise ValueError("qsparse_compiler.runtime: this object was not prepared by qs.optimize(...)")
    return runtime


def _cuda_graph_model(transformer: torch.nn.Module, backend_options: dict[str, Any], cache: Any,
                      runtime: ResidualCacheRuntime, fullgraph: bool, mode: str) -> "StepSwitchingModel":
    from ..config import CacheConfig

    if not isinstance(cache, Mapping):
        raise ValueError(
            "qsparse_compiler.optimize: cuda_graphs=True needs one refresh schedule for every site: pass cache={...} "
            "(e.g. {'refresh_first': 2, 'refresh_every': 5, 'order': 2})"
        )
    schedule = CacheConfig(enabled=True, **{k: v for k, v in cache.items() if k != "mode"})
    graphs = {}
    for path in ("refresh", "reuse"):
        options = {**backend_options, "cache": {**backend_options["cache"], "mode": path}}
        graphs[path] = torch.compile(transformer, backend="quantsparse", options=_with_mode(options, mode),
                                     fullgraph=fullgraph)
    return StepSwitchingModel(transformer, graphs, runtime, schedule)


def release_dense_weights(pipe_or_model: Any) -> int:
    """After the first (compiling) call: free the bf16 weights of every linear that now runs on packed int4 weights.

    Cuts weight memory ~4x; afterwards the model can only run through its compiled graphs (an eager call, or a
    recompile that needs a new packing, fails loudly). Returns the bytes freed.
    """
    from .weights import default_store

    transformer = getattr(pipe_or_model, "transformer", pipe_or_model)
    module = getattr(transformer, "_orig_mod", transformer)
    freed = default_store.release_dense(module)
    if freed and hasattr(module, "save_pretrained"):
        module.save_pretrained = _refuse_save_after_release
    return freed


def _refuse_save_after_release(*args: Any, **kwargs: Any) -> None:
    """``save_pretrained`` of a model whose dense weights were released: they are gone, so it would write empty
    tensors (safetensors: "invalid shape, data type, or offset")."""
    raise RuntimeError(
        "qsparse_compiler: save_pretrained after release_dense_weights: the model's dense weights were freed and "
        "the packed int4 weights are not a diffusers checkpoint. Save the dense model before releasing (the packed "
        "weights are rebuilt from it at compile: round-to-nearest, or a calibrated plan's plan.safetensors)"
    )


def _uncompiled(transformer: torch.nn.Module) -> torch.nn.Module:
    """The transformer without an earlier ``torch.compile``: an ``OptimizedModule`` is unwrapped and an in-place
    ``module.compile()`` (of the model or of its blocks, e.g. ``compile_repeated_blocks``) undone - otherwise the
    earlier compile keeps running and this one is a silent no-op. Logged as a warning."""
    undone = []
    if isinstance(transformer, torch._dynamo.eval_frame.OptimizedModule):
        transformer = transformer._orig_mod
        undone.append("torch.compile(transformer)")
    for name, module in transformer.named_modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
            undone.append(f"{name or type(transformer).__name__}.compile()")
    if undone:
        logging.getLogger("qsparse_compiler").warning(
            "qsparse_compiler.optimize: the transformer was already compiled (%s%s); that compile is undone and the "
            "transformer compiled with backend='quantsparse' instead", ", ".join(undone[:3]),
            f" and {len(undone) - 3} more" if len(undone) > 3 else "")
    return transformer


def _summary(transformer: torch.nn.Module, config: QuantSparseConfig, blocks: list[torch.nn.Module], how: str) -> str:
    """qs.optimize's one-screen summary: how the transformer is compiled and with which settings."""
    kinds = sorted({type(block).__name__ for block in blocks})
    compile_line = {
        "regional": f"regional: {len(blocks)} blocks ({', '.join(kinds)}), one graph per block structure",
        "whole": "the whole transformer as one graph",
        "cuda graphs": "the whole transformer twice (refresh and reuse graphs), CUDA graphs",
    }[how]
    quant, sparsity, cache = config.quant, config.sparsity, config.cache
    if config.plan:
        weights, attention = f"the plan's ({config.plan})", f"the plan's per-head patterns ({config.plan})"
    else:
        weights = (f"int4 round-to-nearest, group {quant.group_size}, activations {quant.act_format}"
                   if quant.enabled else "kept (quant.enabled=False)")
        attention = (f"{sparsity.pattern} at density {sparsity.density:g}, {sparsity.block_q}x{sparsity.block_kv} "
                     "tiles" if sparsity.enabled else "dense (sparsity.enabled=False)")
    if not cache.enabled:
        cache_line = "off"
    elif cache.override_plan or not config.plan:
        cache_line = (f"refresh the first {cache.refresh_first} steps then every {cache.refresh_every}, order "
                      f"{cache.order}")
    else:
        cache_line = "the plan's per-site schedule"
    return "\n".join([
        f"qsparse_compiler.optimize: {type(transformer).__name__}",
        f"  compile     {compile_line}",
        f"  linears     {weights}",
        f"  attention   {attention}",
        f"  cache       {cache_line}",
        "  the first call compiles (minutes for a full-size model); a WARNING then names any site left dense, "
        "qsparse_compiler.backend.reports() holds every rewrite",
    ])


def _repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: what diffusers declares in ``_repeated_blocks``, else the members of its top-level
    ModuleLists (CogVideoX declares none)."""
    names = set(getattr(transformer, "_repeated_blocks", ()) or ())
    if names:
        return [module for module in transformer.modules() if type(module).__name__ in names]
    lists = [child for child in transformer.children() if isinstance(child, torch.nn.ModuleList) and len(child) > 1]
    return [block for blocks in lists for block in blocks]


def _install_forward_context_hooks(transformer: torch.nn.Module, timesteps: bool) -> None:
    """Per forward, for the blocks compiled on their own (runtime/context.py): set the token grid and, with
    ``timesteps`` (a plan with timestep-aware LoRA), the per-sample timesteps - float32 [B] on the latents' device,
    from the ``timestep`` argument wherever it sits in the call (bound by name: Wan has it second, CogVideoX third)."""
    signature = inspect.signature(transformer.forward)
    entered: list[contextlib.ExitStack] = []

    def before(module, args, kwargs):
        latents = kwargs.get("hidden_states", args[0] if args else None)
        stack = contextlib.ExitStack()
        stack.enter_context(video_grid(latent_grid(module, latents)))
        if timesteps:
            timestep = signature.bind_partial(*args, **kwargs).arguments.get("timestep")
            stack.enter_context(forward_timesteps(_per_sample_timesteps(timestep, latents)))
        entered.append(stack)

    def after(module, args, output):
        if entered:
            entered.pop().close()

    transformer.register_forward_pre_hook(before, with_kwargs=True)
    transformer.register_forward_hook(after, always_call=True)


def _per_sample_timesteps(timestep: Any, latents: torch.Tensor) -> torch.Tensor | None:
    """One timestep per sample of ``latents`` (a scalar or [1] timestep is every sample's), contiguous: the regional
    graph's timestep input has the batch size of its activations."""
    from ..ops.lora import sample_timesteps

    if timestep is None:
        return None
    per_sample = sample_timesteps(timestep).to(latents.device)
    return per_sample.expand(latents.shape[0]).contiguous() if per_sample.numel() == 1 else per_sample


def _plan_is_uniform(plan: str, transformer: torch.nn.Module) -> bool:
    from ..plan import PlanError, load_plan
    from ..plan.regional import check_uniform_across_blocks as _check_uniform_across_blocks

    loaded = load_plan(plan)
    for name, module in transformer.named_modules():
        if module in _repeated_blocks(transformer):
            try:
                _check_uniform_across_blocks(loaded, name + ".")
            except PlanError:
                return False
            return True
    return True


def _with_mode(options: dict[str, Any], mode: str | None) -> dict[str, Any]:
    """torch.compile takes either ``mode`` or ``options``: a mode becomes the Inductor patches it stands for."""
    if not mode or mode == "default":
        return options
    from torch._inductor import list_mode_options

    return {**options, "inductor": {**options.get("inductor", {}), **list_mode_options(mode)}}


class StepSwitchingModel(torch.nn.Module):
    """Two compiled graphs of one transformer - the refresh path and the reuse path of the residual cache - and the
    choice between them per call, on the host, from the runtime's step. Each graph has one fixed path, so CUDA graphs
    (mode="reduce-overhead") can capture both."""

    def __init__(self, transformer: torch.nn.Module, graphs: Mapping[str, Any], runtime: ResidualCacheRuntime,
                 schedule: Any) -> None:
        super().__init__()
        self.transformer = transformer
        self._graphs = dict(graphs)
        self._runtime, self._schedule = runtime, schedule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        path = "refresh" if self._runtime.needs_refresh(self._schedule) else "reuse"
        return self._graphs[path](*args, **kwargs)


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
    regional: bool | None = None,
    cuda_graphs: bool = False,
    parallel: Any = None,
    summary: bool = True,
) -> Any:
    """Compile ``pipe.transformer`` (or a bare transformer) with backend="quantsparse"; returns what it was given.

    plan      a calibrated plan directory; its fingerprint must match the transformer (checked now, before compiling).
    options   more backend options (see config.QuantSparseConfig).
    cache     True: residual cache, a plan's per-site settings where it has them, else the default schedule; a dict:
              CacheConfig fields applied to every sparsified site (over the plan's); False: no residual cache.
    regional  compile each repeated block on its own (fast compiles); None = when the model has repeated blocks
              and the plan (if any) treats them alike.
    cuda_graphs  compile the whole transformer twice with mode="reduce-overhead" - a refresh graph and a reuse
              graph of the residual cache - and pick one per call (StepSwitchingModel). Needs one schedule for
              every site: an explicit ``cache`` dict (it overrides a plan's per-site settings).
    parallel  a diffusers ``ContextParallelConfig(ulysses_degree=W)``: enable diffusers' context parallelism on the
              transformer (``enable_parallelism``; torch.distributed must be initialized) and compile this rank's
              blocks for its heads. A transformer already running under ``enable_parallelism`` is detected without
              it. Ring attention is refused (runtime/parallel.py).
    summary   print a one-screen summary of what will be compiled and how (the rewrites themselves are reported when
              the first call compiles: a logging WARNING names every site left dense, and why).
    """
    transformer = getattr(pipe_or_model, "transformer", pipe_or_model)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(
            f"qsparse_compiler.optimize: expected a diffusers pipeline with .transformer or an nn.Module, "
            f"got {type(pipe_or_model).__name__}"
        )
    if transformer is pipe_or_model:
        pipe_or_model = transformer = _uncompiled(transformer)
    else:
        transformer = _uncompiled(transformer)
    runtime = ResidualCacheRuntime()
    backend_options: dict[str, Any] = dict(options or {})
    backend_options["runtime"] = runtime
    lora = False
    if plan is not None:
        from ..plan import ModelFingerprint, load_plan

        loaded = load_plan(plan)
        loaded.fingerprint.check(ModelFingerprint.of(transformer))
        lora = loaded.lora_edges is not None
        backend_options["plan"] = str(plan)
    if cache:
        # An explicit schedule (a dict) applies everywhere; True keeps a plan's per-site settings.
        explicit = dict(cache, override_plan=True) if isinstance(cache, Mapping) else {}
        backend_options["cache"] = {"enabled": True, **explicit}
    else:
        # The runtime passed above would otherwise let a plan's per-site cache settings apply: False overrides them.
        backend_options["cache"] = {"enabled": False, "override_plan": True}
    # Checked now, not at the first call: a bad option would otherwise surface from inside Dynamo as a
    # BackendCompilerFailed at the first forward.
    config = QuantSparseConfig.from_options(backend_options)
    blocks = _repeated_blocks(transformer)
    if regional is None:
        regional = not cuda_graphs and bool(blocks) and (plan is None or _plan_is_uniform(str(plan), transformer))
    shard = prepare_context_parallel(transformer, parallel)
    if shard is not None:
        backend_options["parallel"] = shard
    if cuda_graphs:
        compiled = _cuda_graph_model(transformer, backend_options, cache, runtime, fullgraph, mode or "reduce-overhead")
    elif regional:
        if not blocks:
            raise ValueError(
                f"qsparse_compiler.optimize: {type(transformer).__name__} declares no repeated blocks "
                "(_repeated_blocks); use regional=False"
            )
        register_parameters(transformer)
        _install_forward_context_hooks(transformer, timesteps=lora)
        for block in blocks:
            block.compile(backend="quantsparse", options=_with_mode(backend_options, mode), fullgraph=fullgraph)
        compiled = transformer
    else:
        compiled = torch.compile(transformer, backend="quantsparse", options=_with_mode(backend_options, mode),
                                 fullgraph=fullgraph)
    setattr(compiled, _RUNTIME_ATTR, runtime)
    if summary:
        how = "cuda graphs" if cuda_graphs else "regional" if regional else "whole"
        print(_summary(transformer, config, blocks, how))
    if transformer is pipe_or_model:
        return compiled
    pipe_or_model.transformer = compiled
    setattr(pipe_or_model, _RUNTIME_ATTR, runtime)
    scheduler = getattr(pipe_or_model, "scheduler", None)
    if scheduler is not None:
        _hook_scheduler(scheduler, runtime)
    return pipe_or_model
