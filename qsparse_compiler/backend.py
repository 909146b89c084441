"""The ``quantsparse`` torch.compile backend: Dynamo FX graph -> our passes -> Inductor.

    torch.compile(model, backend="quantsparse", options={"sparsity": {"density": 0.15}, "report": True})

The backend is registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so it works
without importing this package first. Each graph Dynamo hands over (one per compile or recompile) gets:
1. the passes of ``passes.default_passes()`` (find sites -> W4A8 linears -> sparse attention),
2. a rewrite report (``reports()``; printed with ``report=True``; saved as JSON with ``dump_dir``),
3. Inductor's ``compile_fx`` (``mode`` and ``options["inductor"]`` become its config patches),
4. a thin runtime wrapper that appends the packed int4 weights of the quantized linears to the inputs.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from .config import QuantSparseConfig
from .passes import PassContext, default_passes, run_passes
from .passes.graph_utils import fake_value
from .passes.report import RewriteReport
from .runtime.residual_cache import ResidualCacheRuntime, default_runtime
from .runtime.weights import default_store

__all__ = ["quantsparse", "reports", "clear_reports"]

log = logging.getLogger(__name__)
_graph_counter = itertools.count()
_reports: list[RewriteReport] = []


def reports() -> list[RewriteReport]:
    """Rewrite reports of every graph compiled in this process, oldest first."""
    return list(_reports)


def clear_reports() -> None:
    _reports.clear()


def _inductor_patches(mode: str | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    patches: dict[str, Any] = {}
    if mode and mode != "default":
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode))
    patches.update(extra)
    return patches


class _RuntimeInputs:
    """Calls the Inductor-compiled graph with the inputs the passes added, appended in placeholder order: the packed
    weights of each quantized linear, then the residual-cache state (and refresh flag) of each cached site."""

    _FLAGS = (torch.tensor(False), torch.tensor(True))

    def __init__(self, compiled: Callable, ctx: PassContext, runtime: ResidualCacheRuntime,
                 input_fakes: Sequence[Any]) -> None:
        self.compiled = compiled
        self.weight_slots = list(ctx.packed_weight_slots)
        self.cache_slots = list(ctx.cache_slots)
        self.runtime = runtime
        self.store = default_store
        # Symbolic sizes (dynamic shapes) are bound per call from the runtime arguments.
        self.symbolic = [(i, fake) for i, fake in enumerate(input_fakes) if _has_symbols(fake)]

    def __call__(self, *args: Any) -> Any:
        full = list(args)
        for slot in self.weight_slots:
            packed = self.store.get(args[slot.param_index], slot.group_size, slot.scale_dtype)
            full += [packed.qweight, packed.scale]
        if self.cache_slots:
            env = _bind_symbols(self.symbolic, args)
            for slot in self.cache_slots:
                shape = tuple(_evaluate(dim, env) for dim in slot.shape)
                state, refresh = self.runtime.acquire(slot.fqn, slot.schedule, shape, slot.dtype, slot.device)
                full += state
                if slot.schedule.mode == "auto":
                    full.append(self._FLAGS[refresh])
        return self.compiled(*full)


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


def _load_checked_plan(path: str, gm: fx.GraphModule):
    """Load a plan and check it against the graph's parameters before any compile work."""
    from .passes.graph_utils import source_fqn
    from .plan import PlanError, load_plan

    plan = load_plan(path)
    shapes = {}
    modules = set()
    for node in gm.graph.nodes:
        fqn = source_fqn(node) if node.op == "placeholder" else None
        if fqn and isinstance(fake_value(node), torch.Tensor):
            shapes[fqn] = list(fake_value(node).shape)
            modules.add(fqn.rsplit(".", 1)[0])
    plan.fingerprint.check_shapes(shapes)
    sites = set(plan.linears) | set(plan.attentions)
    if sites and not sites & (modules | {fqn.rsplit(".", 1)[0] for fqn in modules}):
        example = sorted(sites)[0]
        raise PlanError(
            f"qsparse_compiler.plan: none of the plan's {len(sites)} sites (e.g. {example}) is in this graph; the plan "
            "belongs to another model, or this graph is a region compiled on its own (use qs.optimize)"
        )
    return plan


def quantsparse(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """Dynamo backend entry point (``torch.compile(..., backend="quantsparse", options=..., mode=...)``)."""
    from torch._inductor.compile_fx import compile_fx

    from . import ops  # noqa: F401  registers the qsparse:: ops

    config = QuantSparseConfig.from_options(options)
    report = RewriteReport(graph_index=next(_graph_counter))
    plan = None
    if config.plan is not None:
        plan = _load_checked_plan(config.plan, gm)
        report.notes.append(f"plan: {config.plan}")
    else:
        report.notes.append(
            "no plan: round-to-nearest int4 weights and the static "
            f"'{config.sparsity.pattern}' pattern at density {config.sparsity.density:g} (defaults)"
        )
    ctx = PassContext(config=config, example_inputs=list(example_inputs), report=report, plan=plan)
    gm = run_passes(gm, ctx, default_passes())
    _reports.append(report)
    if config.report:
        report.print_table()
    if any(site.reason.startswith("autograd") for site in report.kept()):
        warnings.warn("qsparse_compiler: graph traced with autograd enabled; nothing was rewritten. "
                      "Run inference under torch.no_grad().", stacklevel=2)
    log.info(report.summary())
    input_fakes = [fake_value(n) for n in gm.graph.nodes if n.op == "placeholder"][: len(example_inputs)]
    compiled = compile_fx(
        gm, [*example_inputs, *ctx.extra_example_inputs], config_patches=_inductor_patches(mode, config.inductor)
    )
    if not ctx.packed_weight_slots and not ctx.cache_slots:
        return compiled
    return _RuntimeInputs(compiled, ctx, config.runtime or default_runtime, input_fakes)
