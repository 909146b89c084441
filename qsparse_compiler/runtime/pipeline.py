"""``qs.optimize``: compile a diffusers pipeline's transformer with the backend and drive its residual cache.

    pipe = qs.optimize(pipe, plan="wan-plan/")      # or qs.optimize(pipe) for defaults
    video = pipe(prompt, num_inference_steps=50).frames

The transformer gets its own ``ResidualCacheRuntime``. With ``regional=True`` (the default when the plan allows it)
each repeated transformer block is compiled on its own, as diffusers' ``compile_repeated_blocks`` does: one graph
serves all blocks of a structure, so compiling takes seconds instead of minutes; the token grid of each forward and
the name of each block reach the shared graph through ops/context.py. Everything ``optimize`` puts on the model
is a named diffusers hook (runtime/hooks.py): the compiled forwards, and the hook that reads the denoising step from
the pipeline's ``cache_context`` or scheduler (nothing is patched) and names the CFG branch after the cache context.
One exception: an attention processor that breaks Dynamo's graph (Mochi's per-sample loop) is swapped for its
compile-friendly equivalent (runtime/attention_processors.py: same function, one graph). ``restore`` removes the
hooks and puts the model's own processors back: the model runs eagerly again, as before ``optimize``.

Step caches: ``pipe.transformer.enable_cache(FirstBlockCacheConfig(...))`` (or MagCache, SeaCache, TaylorSeer's lite
mode) after ``optimize`` wraps the compiled blocks; a skipped step is a gap in the residual cache's clock (a refresh
it skipped is owed, order 2 extrapolates over the true distance). Caches whose hooks sit inside the blocks are refused
at the first forward, naming the config and why (runtime/hooks.py ``check_step_cache``).

With diffusers' context parallelism (``parallel=ContextParallelConfig(ulysses_degree=W)``, or a transformer on which
``enable_parallelism`` was called) each rank compiles its blocks for its own heads: see runtime/parallel.py.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from diffusers.hooks import HookRegistry

from ..config import QuantSparseConfig
from ..ops.context import register_parameters
from .attention_processors import restore_attention, use_compile_friendly_attention
from .hooks import COMPILED_HOOK, RUNTIME_HOOK, CompiledForwardHook, StepClockHook
from .parallel import prepare_context_parallel
from .residual_cache import ResidualCacheRuntime

__all__ = ["optimize", "restore", "runtime_of", "release_dense_weights"]

_RUNTIME_ATTR = "_qsparse_runtime"


def runtime_of(pipe_or_model: Any) -> ResidualCacheRuntime:
    """The residual-cache runtime ``optimize`` attached to a pipeline or model."""
    runtime = getattr(pipe_or_model, _RUNTIME_ATTR, None)
    if runtime is None:
        raise ValueError("qsparse_compiler.runtime: this object was not prepared by qs.optimize(...)")
    return runtime


def _path_graphs(backend_options: dict[str, Any], fullgraph: bool, mode: str) -> dict[str, dict[str, Any]]:
    """torch.compile arguments of a refresh graph and a reuse graph: each with one fixed residual-cache path, so CUDA
    graphs (mode="reduce-overhead") can capture both; the choice between them is made per call on the host."""
    graphs = {}
    for path in ("refresh", "reuse"):
        options = {**backend_options, "cache": {**backend_options["cache"], "mode": path}}
        graphs[path] = dict(backend="quantsparse", options=_with_mode(options, mode), fullgraph=fullgraph)
    return graphs


def _whole_model_cuda_graphs(backend_options: dict[str, Any], cache: Any, runtime: ResidualCacheRuntime,
                             fullgraph: bool, mode: str) -> CompiledForwardHook:
    """The whole transformer as a refresh graph and a reuse graph, picked per call from one schedule for every site."""
    from ..config import CacheConfig

    if not isinstance(cache, Mapping):
        raise ValueError(
            "qsparse_compiler.optimize: cuda_graphs=True on a transformer compiled as one graph needs one refresh "
            "schedule for every site: pass cache={...} (e.g. {'refresh_first': 2, 'refresh_every': 5, 'order': 2}), "
            "or compile regionally (per-layer schedules of a plan: each block picks its own graph)"
        )
    schedule = CacheConfig(enabled=True, **{k: v for k, v in cache.items() if k != "mode"})
    return CompiledForwardHook(_path_graphs(backend_options, fullgraph, mode),
                               choose=lambda: "refresh" if runtime.needs_refresh(schedule) else "reuse")


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


def _summary(transformer: torch.nn.Module, config: QuantSparseConfig, blocks: list[torch.nn.Module],
             cuda_graphs: bool) -> str:
    """qs.optimize's one-screen summary: how the transformer is compiled and with which settings (``blocks``: the
    regionally compiled blocks, none for a whole-model graph)."""
    kinds = sorted({type(block).__name__ for block in blocks})
    compile_line = (f"regional: {len(blocks)} blocks ({', '.join(kinds)}), one graph per block structure" if blocks
                    else "the whole transformer as one graph")
    if cuda_graphs:
        compile_line += "; CUDA graphs (a refresh and a reuse graph)"
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
        "qsparse_compiler.compiler.backend.reports() holds every rewrite",
    ])


def _repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: what diffusers declares in ``_repeated_blocks``, else the members of its top-level
    ModuleLists (CogVideoX declares none)."""
    names = set(getattr(transformer, "_repeated_blocks", ()) or ())
    if names:
        return [module for module in transformer.modules() if type(module).__name__ in names]
    lists = [child for child in transformer.children() if isinstance(child, torch.nn.ModuleList) and len(child) > 1]
    return [block for blocks in lists for block in blocks]


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
    """Compile ``pipe.transformer`` (or a bare transformer) with backend="quantsparse", in place, through diffusers
    hooks (``restore`` is the inverse); returns what it was given.

    plan      a calibrated plan directory; its fingerprint must match the transformer (checked now, before compiling).
    options   more backend options (see config.QuantSparseConfig).
    cache     True: residual cache, a plan's per-site settings where it has them, else the default schedule; a dict:
              CacheConfig fields applied to every sparsified site (over the plan's); False: no residual cache.
    regional  compile each repeated block on its own (fast compiles); None = when the model has repeated blocks
              and the plan (if any) treats them alike.
    cuda_graphs  compile twice with mode="reduce-overhead" - a refresh graph and a reuse graph of the residual
              cache, each with one fixed path that a CUDA graph can capture - and pick one per call on the host
              (runtime/hooks.py CompiledForwardHook). Regionally (the default with ``cache=True``), each block picks
              its own from its own sites' schedules: a plan's per-layer refresh steps (calibration's refresh_budget)
              run under CUDA graphs without recompiles, a block refreshing while its neighbours reuse. Compiled as
              one graph (the default with a ``cache`` dict, or regional=False) the whole model picks one, so it
              needs one schedule for every site: an explicit ``cache`` dict (it overrides a plan's settings).
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
    unwrapped = _uncompiled(transformer)
    if transformer is pipe_or_model:
        pipe_or_model = unwrapped
    elif unwrapped is not transformer:
        pipe_or_model.transformer = unwrapped
    transformer = unwrapped
    if getattr(transformer, _RUNTIME_ATTR, None) is not None:
        restore(pipe_or_model)  # optimizing again replaces the previous options, hooks and caches
    _check_hookable(transformer)
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
        regional = bool(blocks) and not (cuda_graphs and isinstance(cache, Mapping)) \
            and (plan is None or _plan_is_uniform(str(plan), transformer))
    shard = prepare_context_parallel(transformer, parallel)
    if shard is not None:
        backend_options["parallel"] = shard
    compile_kwargs = dict(backend="quantsparse", options=_with_mode(backend_options, mode), fullgraph=fullgraph)
    use_compile_friendly_attention(transformer)
    if regional:
        if not blocks:
            raise ValueError(
                f"qsparse_compiler.optimize: {type(transformer).__name__} declares no repeated blocks "
                "(_repeated_blocks); use regional=False"
            )
        register_parameters(transformer)
        names = {module: name for name, module in transformer.named_modules()}
        for block in blocks:
            hook = CompiledForwardHook(
                _path_graphs(backend_options, fullgraph, mode or "reduce-overhead"),
                choose=lambda prefix=names[block] + ".": "refresh" if runtime.will_refresh_under(prefix) else "reuse",
            ) if cuda_graphs else CompiledForwardHook({"auto": compile_kwargs})
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, COMPILED_HOOK)
    else:
        compiled = _whole_model_cuda_graphs(backend_options, cache, runtime, fullgraph, mode or "reduce-overhead") \
            if cuda_graphs else CompiledForwardHook({"auto": compile_kwargs})
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(compiled, COMPILED_HOOK)
        blocks = []
    pipeline = None if transformer is pipe_or_model else pipe_or_model
    clock = StepClockHook(runtime, pipeline, timesteps=lora and bool(blocks), compiled_blocks=tuple(blocks))
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(clock, RUNTIME_HOOK)
    _invalidate_child_registries(registry)
    setattr(transformer, _RUNTIME_ATTR, runtime)
    if pipeline is not None:
        setattr(pipeline, _RUNTIME_ATTR, runtime)
    if summary:
        print(_summary(transformer, config, blocks, cuda_graphs))
    return pipe_or_model


def restore(pipe_or_model: Any) -> Any:
    """Undo ``optimize``: remove its hooks, so the transformer runs its eager forward again (a diffusers step cache
    enabled since stays, now around the eager blocks), and free the residual caches. Returns what it was given.

    Not after ``release_dense_weights``: the eager forward needs the bf16 weights it freed.
    """
    transformer = getattr(pipe_or_model, "transformer", pipe_or_model)
    runtime = runtime_of(transformer)
    released = [name for name, p in transformer.named_parameters() if p.numel() and not p.untyped_storage().nbytes()]
    if released:
        raise ValueError(
            f"qsparse_compiler.restore: release_dense_weights() freed the dense weights of {len(released)} parameters "
            f"(e.g. {released[0]}); the eager model cannot run without them - reload the model instead"
        )
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.remove_hook(RUNTIME_HOOK, recurse=False)
    registry.remove_hook(COMPILED_HOOK, recurse=True)
    _invalidate_child_registries(registry)
    restore_attention(transformer)
    runtime.clear()
    for owner in (transformer, pipe_or_model):
        if getattr(owner, _RUNTIME_ATTR, None) is runtime:
            delattr(owner, _RUNTIME_ATTR)
    return pipe_or_model


def _invalidate_child_registries(registry: HookRegistry) -> None:
    """cache_context reaches hooks through a cached list of the child registries (diffusers 0.42; 0.41 walks the
    modules every time): rebuild it after adding or removing hooks below the transformer."""
    if hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


def _check_hookable(transformer: torch.nn.Module) -> None:
    config = getattr(transformer, "_cache_config", None)
    if config is not None:
        raise ValueError(
            f"qsparse_compiler.optimize: {type(config).__name__} is enabled on the transformer; its hooks would end up "
            "inside the compiled blocks. Call transformer.disable_cache(), then qs.optimize(pipe), then "
            "transformer.enable_cache(config): the step cache then wraps the compiled blocks"
        )
