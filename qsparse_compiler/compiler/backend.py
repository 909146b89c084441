"""The ``quantsparse`` torch.compile backend: Dynamo FX graph -> our passes -> Inductor.

    torch.compile(model, backend="quantsparse", options={"sparsity": {"density": 0.15}, "report": True})

The backend is registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so it works
without importing this package first. Each graph Dynamo hands over (one per compile or recompile) gets:
1. the passes of ``passes.default_passes()`` (find sites -> W4A8 linears -> a plan's LoRA on them -> sparse attention
   -> residual cache),
2. a rewrite report (kept by the graph's ``Session``, ``reports()`` for the default one; printed with
   ``report=True``; saved as JSON with ``dump_dir``),
3. Inductor's ``compile_fx`` (``mode`` and ``options["inductor"]`` become its config patches),
4. a thin runtime wrapper that appends the inputs the passes added: packed int4 weights, a plan's timestep-aware
   LoRA (and, for a regional graph, the forward's timesteps), residual-cache state.

A block compiled in place (``transformer.compile_repeated_blocks(backend="quantsparse")``: ``block.compile()`` per
block, one graph for all) is met inside its model's forward: the backend registers the model's parameter names and
adds qs.optimize's step-clock hook to the model (runtime/repeated.py), so the graph is a regional graph like
qs.optimize's, rewritten the same way; the forward that compiled it reads its grid from the model's running frame.

What the compiled graphs read at run time (packed weights, LoRA tensors, residual caches) and the reports belong to
the ``Session`` named by ``options["session"]`` (runtime/session.py), else to the process's default session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from ..config import SCHEDULE_KEYS, ConfigError, QuantSparseConfig
from ..ops.context import (current_timesteps, current_video_grid, forward_timesteps, parameter_name,
                           register_parameters, video_grid)
from .passes import PassContext, default_passes, run_passes
from .passes.discovery import forward_grid
from .passes.graph_inputs import CacheSlot, LoraSlot, PackedWeightSlot, TimestepSlot
from .passes.graph_utils import fake_value
from .passes.report import RewriteReport
from ..runtime.residual_cache import ResidualCacheRuntime
from ..runtime.session import Session, default_session

if TYPE_CHECKING:  # runtime/repeated.py imports diffusers, which only blocks compiled in place need
    from ..runtime.repeated import InPlaceOwner

__all__ = ["quantsparse", "reports", "clear_reports"]

log = logging.getLogger(__name__)
_graph_counter = itertools.count()  # numbers graphs in dumps and reports; only ever increases


def reports() -> list[RewriteReport]:
    """Rewrite reports of every graph compiled with the default session, oldest first (a ``Session`` of your own
    keeps its graphs' reports in ``session.reports``)."""
    return list(default_session().reports)


def clear_reports() -> None:
    default_session().reports.clear()


def _inductor_patches(mode: str | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    patches: dict[str, Any] = {}
    if mode and mode != "default":
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode))
    patches.update(extra)
    return patches


class _RuntimeInputs:
    """Calls the Inductor-compiled graph with the inputs the passes added: for each slot of ``ctx.inputs``
    (passes/graph_inputs.py), in placeholder order, the packed weights of a quantized linear, the forward's
    per-sample timesteps (a regional graph with LoRA), the LoRA tensors (A, B) of a linear, or the residual-cache
    state (and refresh flag) of a cached site."""

    _FLAGS = (torch.tensor(False), torch.tensor(True))

    def __init__(self, compiled: Callable, ctx: PassContext, runtime: ResidualCacheRuntime,
                 input_fakes: Sequence[Any], in_place_model: torch.nn.Module | None = None) -> None:
        self.compiled = compiled
        self.slots = list(ctx.inputs.slots)
        self.has_cache = bool(ctx.cache_slots)
        # Only CUDA needs the layouts built ahead (outside any CUDA-graph memory pool, see ops/video_layout.py).
        self.layout_slots = [slot for slot in ctx.layout_slots if slot.device.type == "cuda"]
        self.runtime = runtime
        self.store = ctx.session.weights
        self.lora_store = ctx.session.lora
        # A regional graph: the block of each call is found from one of its parameters' registered names.
        self.prefix = ctx.analysis.get("prefix", "")
        self.anchor = _anchor(ctx) if self.prefix else None
        self.plan = ctx.plan
        # The residual caches of a model are told apart from another model's of the same FQNs by one of its
        # parameters: the regional block's anchor, else the graph's first parameter input.
        self.owner_index = self.anchor[0] if self.anchor else next(
            (i for i, value in enumerate(ctx.example_inputs) if isinstance(value, torch.nn.Parameter)), None)
        # Symbolic sizes (dynamic shapes) are bound per call from the runtime arguments.
        self.symbolic = [(i, fake) for i, fake in enumerate(input_fakes) if _has_symbols(fake)]
        # A block compiled in place: the model whose hook gives later forwards their grid (see _running_forward).
        self.in_place_model = weakref.ref(in_place_model) if in_place_model is not None else None

    def __call__(self, *args: Any) -> Any:
        if self.in_place_model is not None and current_video_grid() is None:
            with self._running_forward():
                return self._call(args)
        return self._call(args)

    def _running_forward(self) -> contextlib.AbstractContextManager:
        """The grid (and, with LoRA, the timesteps) of the model forward running this block compiled in place, from
        the forward's frame: for the forward that compiled the block, which began before qsparse's hook was on the
        model (runtime/repeated.py). Outside any forward of the model nothing is set: the layout op then raises
        the error that names the fix."""
        from ..runtime.repeated import running_locals

        model = self.in_place_model()
        locals_ = running_locals(model) if model is not None else None
        return _forward_from_frame(locals_, any(isinstance(slot, TimestepSlot) for slot in self.slots))

    def _call(self, args: Sequence[Any]) -> Any:
        self._build_layouts()
        full = list(args)
        if self.has_cache:
            env = _bind_symbols(self.symbolic, args)
            prefix = self._call_prefix(args)
            owner = None if self.owner_index is None else args[self.owner_index]
        for slot in self.slots:
            if isinstance(slot, PackedWeightSlot):
                param = args[slot.param_index]
                packed = self.store.get(param, slot.group_size, slot.scale_dtype, slot.source,
                                        calibrated=lambda: self._calibrated(param))
                full += [packed.qweight, packed.scale]
            elif isinstance(slot, TimestepSlot):
                full.append(self._timesteps())
            elif isinstance(slot, LoraSlot):
                param = args[slot.param_index]
                full += self.lora_store.get(param, slot.source, lambda: self._lora(param, slot))
            elif isinstance(slot, CacheSlot):
                shape = tuple(_evaluate(dim, env) for dim in slot.shape)
                fqn = prefix + slot.fqn[len(self.prefix):]
                schedule = self._schedule_of(slot, fqn)
                state, refresh = self.runtime.acquire(fqn, schedule, shape, slot.dtype, slot.device, owner)
                full += state
                if slot.schedule.mode == "auto":
                    full.append(self._FLAGS[refresh])
            else:
                raise TypeError(f"qsparse_compiler.compiler.backend: no runtime input for graph-input slot {slot!r}")
        return self.compiled(*full)

    def _build_layouts(self) -> None:
        from ..ops.video_layout import cached_video_layout

        for slot in self.layout_slots:
            grid = slot.grid if slot.grid != (0, 0, 0) else current_video_grid()
            if grid is None:  # the op itself raises the error that names the fix
                continue
            cached_video_layout(slot.seq_len, slot.device, *grid, slot.video_start, slot.pattern, slot.density,
                                slot.block_q, slot.block_kv)

    def _calibrated(self, param: torch.Tensor):
        """A plan's calibrated weights for a parameter met at run time (another block of a regional graph)."""
        name = parameter_name(param)
        if self.plan is None or name is None:
            return None
        return self.plan.packed_weight(name.removesuffix(".weight"))

    @staticmethod
    def _timesteps() -> torch.Tensor:
        timesteps = current_timesteps()
        if timesteps is None:
            raise RuntimeError(
                "qsparse_compiler.compiler.backend: a regionally compiled block with timestep-aware LoRA ran outside a "
                "transformer forward with a timestep; call the transformer (not its blocks) with timestep=..."
            )
        return timesteps

    def _lora(self, param: torch.Tensor, slot: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The plan's LoRA of the linear ``param`` belongs to (another block of a regional graph: found by the
        parameter's registered name), or zeros where that block has none (a correction of exactly 0)."""
        name = parameter_name(param)
        pair = self.plan.lora(name.removesuffix(".weight") if name else slot.fqn)
        if pair is None:
            return torch.zeros(slot.a_shape, dtype=slot.dtype), torch.zeros(slot.b_shape, dtype=slot.dtype)
        return pair[0].to(slot.dtype), pair[1].to(slot.dtype)

    def _schedule_of(self, slot: Any, fqn: str) -> Any:
        """The calling block's own refresh steps: a regional graph serves blocks whose plan entries differ only in
        the host-side schedule (``SCHEDULE_KEYS``); the graph holds the first block's."""
        if self.plan is None or not self.prefix or fqn == slot.fqn or slot.schedule.override_plan:
            return slot.schedule
        entry = self.plan.attentions.get(fqn)
        own = {k: v for k, v in (entry.cache if entry is not None else {}).items() if k in SCHEDULE_KEYS}
        return dataclasses.replace(slot.schedule, **own) if own else slot.schedule

    def _call_prefix(self, args: Sequence[Any]) -> str:
        if self.anchor is None:
            return self.prefix
        index, relative = self.anchor
        name = parameter_name(args[index])
        if name is None or not name.endswith(relative):
            raise RuntimeError(
                "qsparse_compiler.compiler.backend: a regionally compiled block was called with parameters qs.optimize did not "
                "register; compile the model through qs.optimize(...)"
            )
        return name[: -len(relative)]


@contextlib.contextmanager
def _forward_from_frame(locals_: Mapping[str, Any] | None, timesteps: bool):
    """Set, where the runtime context has none, the token grid (discovery.forward_grid) and, if ``timesteps``, the
    per-sample timesteps of the model forward whose frame has ``locals_`` (None: set nothing)."""
    from ..runtime.hooks import per_sample_timesteps

    with contextlib.ExitStack() as stack:
        grid = forward_grid(locals_) if locals_ is not None else None
        if grid is not None and current_video_grid() is None:
            stack.enter_context(video_grid((grid.frames, grid.height, grid.width)))
        timestep = locals_.get("timestep") if locals_ is not None else None
        if timesteps and isinstance(timestep, torch.Tensor) and current_timesteps() is None:
            stack.enter_context(forward_timesteps(per_sample_timesteps(timestep, locals_["hidden_states"])))
        yield


def _in_place_owner() -> InPlaceOwner | None:
    """The model running this graph's frame when the frame is a block compiled in place (``module.compile``, as
    ``compile_repeated_blocks`` does) inside a diffusers model's forward; None otherwise (a model compiled whole, a
    function, a block compiled by qs.optimize's hooks)."""
    from .passes.discovery import frame_locals
    from .passes.graph_utils import is_diffusers_model

    block = frame_locals().get("self")
    if not isinstance(block, torch.nn.Module) or getattr(block, "_compiled_call_impl", None) is None \
            or is_diffusers_model(type(block)):
        return None
    from ..runtime.repeated import find_owner

    return find_owner(block)


def _adopt(owner: InPlaceOwner, runtime: ResidualCacheRuntime, plan: Any, report: RewriteReport) -> bool:
    """Give a block compiled in place what qs.optimize's hooks give its regional graphs (runtime/repeated.py), and
    say so in the report; returns whether the model got its hook now (its first compiled block)."""
    from ..runtime.hooks import RUNTIME_HOOK
    from ..runtime.repeated import attach_runtime

    model = owner.model
    added = attach_runtime(owner, runtime, timesteps=plan is not None and plan.lora_edges is not None)
    if not added:
        return False
    if owner.pipeline is not None:
        clock = f"the step from {type(owner.pipeline).__name__}'s cache_context or scheduler"
    else:
        clock = "the step from the pipeline's cache_context(step_index=...) or runtime.step()"
    report.notes.append(
        f"a block compiled in place (module.compile, e.g. compile_repeated_blocks) in {type(model).__name__}'s "
        f"forward: qsparse's '{RUNTIME_HOOK}' hook added to the model (each forward's token grid, CFG branch and "
        f"{clock}); qs.runtime_of(model) is its residual-cache runtime"
    )
    return True


def _anchor(ctx: PassContext) -> tuple[int, str] | None:
    """(argument index, relative name) of a registered parameter of a regional graph."""
    for index, value in enumerate(ctx.example_inputs):
        name = parameter_name(value)
        if name is not None and name.startswith(ctx.analysis["prefix"]):
            return index, name[len(ctx.analysis["prefix"]):]
    return None


def _has_symbols(value: Any) -> bool:
    if isinstance(value, torch.SymInt):
        return True
    return isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape)


def _bind_symbols(symbolic: Sequence[tuple[int, Any]], args: Sequence[Any]) -> dict[Any, int]:
    env: dict[Any, int] = {}
    for index, fake in symbolic:
        if isinstance(fake, torch.SymInt):
            env[fake.node.expr] = int(args[index])
            continue
        for dim, size in zip(fake.shape, args[index].shape):
            if isinstance(dim, torch.SymInt) and dim.node.expr.is_Symbol:
                env[dim.node.expr] = int(size)
    return env


def _evaluate(dim: Any, env: dict[Any, int]) -> int:
    return dim if isinstance(dim, int) else int(dim.node.expr.xreplace(env))


def _load_checked_plan(path: str, gm: fx.GraphModule, example_inputs: Sequence[Any]):
    """Load a plan and check it against the graph's parameters before any compile work."""
    from .passes.find_sites import _fqn_prefix
    from .passes.graph_utils import source_fqn
    from ..plan import PlanError, load_plan
    from ..plan.regional import check_uniform_across_blocks

    plan = load_plan(path)
    prefix = _fqn_prefix(gm, list(example_inputs))
    shapes = {}
    modules = set()
    for node in gm.graph.nodes:
        fqn = source_fqn(node) if node.op == "placeholder" else None
        if fqn and isinstance(fake_value(node), torch.Tensor):
            shapes[prefix + fqn] = list(fake_value(node).shape)
            modules.add((prefix + fqn).rsplit(".", 1)[0])
    plan.fingerprint.check_shapes(shapes)
    sites = set(plan.linears) | set(plan.attentions)
    if sites and not sites & (modules | {fqn.rsplit(".", 1)[0] for fqn in modules}):
        example = sorted(sites)[0]
        raise PlanError(
            f"qsparse_compiler.plan: none of the plan's {len(sites)} sites (e.g. {example}) is in this graph; the plan "
            "belongs to another model, or this graph is a block compiled on its own without qs.optimize"
        )
    if prefix:
        check_uniform_across_blocks(plan, prefix)
    return plan


def quantsparse(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
    *,
    compile_graph: Callable[[fx.GraphModule, list[Any]], Callable] | None = None,
) -> Callable:
    """Dynamo backend entry point (``torch.compile(..., backend="quantsparse", options=..., mode=...)``).

    ``compile_graph(gm, inputs)`` compiles the rewritten graph, Inductor's ``compile_fx`` by default;
    ``eval.coverage`` passes one that returns ``gm`` itself, to run the same rewrite on the ops' plain-torch
    references (``functools.partial(quantsparse, compile_graph=...)`` as the backend)."""
    from torch._inductor.compile_fx import compile_fx

    from .. import ops  # noqa: F401  registers the qsparse:: ops

    config = QuantSparseConfig.from_options(options)
    session = _session(config)
    runtime = config.runtime or session.cache
    report = RewriteReport(graph_index=next(_graph_counter))
    owner = _in_place_owner()
    if owner is not None:
        register_parameters(owner.model)  # before the plan's checks, which need the block's prefix
    plan = None
    if config.plan is not None:
        plan = _load_checked_plan(config.plan, gm, example_inputs)
        report.notes.append(f"plan: {config.plan}")
    else:
        report.notes.append(
            "no plan: round-to-nearest int4 weights and the static "
            f"'{config.sparsity.pattern}' pattern at density {config.sparsity.density:g} (defaults)"
        )
    # A block compiled in place: the forward compiling it began before the hook, its grid and timesteps are its frame's.
    forward_scope, hooked = contextlib.nullcontext(), False
    if owner is not None:
        hooked = _adopt(owner, runtime, plan, report)
        forward_scope = _forward_from_frame(owner.frame_locals, plan is not None and plan.lora_edges is not None)
    ctx = PassContext(config=config, example_inputs=list(example_inputs), report=report, plan=plan, session=session)
    with forward_scope:
        gm = run_passes(gm, ctx, default_passes())
    session.reports.append(report)
    if config.report:
        report.print_table()
    if any(site.reason.startswith("autograd") for site in report.kept()):
        warnings.warn("qsparse_compiler: graph traced with autograd enabled; nothing was rewritten. "
                      "Run inference under torch.no_grad().", stacklevel=2)
    log.info(report.summary())
    shortfalls = report.shortfalls()
    if shortfalls:
        log.warning("\n".join(shortfalls))
    if hooked and ctx.cache_slots and owner.pipeline is None:
        log.warning(
            "qsparse_compiler: residual cache on blocks compiled in place in a %s called outside a pipeline: the "
            "denoising step comes only from cache_context(..., step_index=i) or qs.runtime_of(model).step(i) - "
            "without either every call refreshes; qs.optimize(pipe) follows the pipeline's scheduler",
            type(owner.model).__name__)
    input_fakes = [fake_value(n) for n in gm.graph.nodes if n.op == "placeholder"][: len(example_inputs)]
    compile_inputs = [*example_inputs, *ctx.inputs.examples]
    if compile_graph is None:
        # The added inputs go to Inductor as their placeholders' fake values (static shapes, or the graph's own
        # symbols): a real tensor Dynamo never saw would be fakeified with fresh symbols that have no source, and
        # a guard on one that does not reduce to a constant (a 3-head unflatten of a packed linear's output:
        # N % 3 == 0) fails when Dynamo builds its guards.
        # GraphInputs.add appends every added input through add_placeholder, in the order of ctx.inputs.examples.
        compile_inputs = [*example_inputs, *(n.meta["example_value"] for n in gm.graph.nodes
                                             if n.op == "placeholder" and n.meta.get("qsparse_extra"))]
        compiled = compile_fx(
            gm, compile_inputs, config_patches=_inductor_patches(mode or config.mode, config.inductor)
        )
    else:
        compiled = compile_graph(gm, compile_inputs)
    if not ctx.inputs.slots and not any(s.device.type == "cuda" for s in ctx.layout_slots) and owner is None:
        return compiled
    return _RuntimeInputs(compiled, ctx, runtime, input_fakes, owner.model if owner is not None else None)


def _session(config: QuantSparseConfig) -> Session:
    if config.session is None:
        return default_session()
    if not isinstance(config.session, Session):
        raise ConfigError(
            f"qsparse_compiler.config: QuantSparseConfig.session={config.session!r} is not a Session; pass "
            "options={'session': qs.Session()} (one per model) or leave it out for the process's default session"
        )
    return config.session


def _register() -> None:
    """Make backend="quantsparse" resolvable even where the package is importable but not installed (no entry
    point, e.g. a source checkout on PYTHONPATH): importing qsparse_compiler registers it with Dynamo."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if any(entry.name == "quantsparse" for entry in entry_points(group="torch_dynamo_backends")):
        return  # installed: Dynamo registers it from the entry point on first lookup
    if "quantsparse" not in _COMPILER_FNS:
        register_backend(compiler_fn=quantsparse, name="quantsparse")


_register()
