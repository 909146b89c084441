"""How much of a video DiT the backend rewrites, why it keeps the rest, and whether the rewrite computes what it
should: the coverage matrix (``qsparse compile --coverage``, tests/backend/test_coverage_matrix.py, README).

For one model and one input, ``measure_coverage`` runs
1. eager, with a forward hook on every ``nn.Linear``: the *block linears* are the linears inside the transformer
   blocks (``QuantConfig.site_pattern``) that ran on tokens (input of 3 or more dims); the linears an adaptive norm
   runs on one row per sample are conditioning linears and do not count;
2. ``torch.compile(backend=quantsparse)`` without ``fullgraph``, as a user would: every graph Dynamo hands over is
   rewritten and reported; Dynamo's graph-break reasons are collected. Before it, attention processors that break
   the graph are swapped for their compile-friendly equivalents (``runtime/attention_processors.py``, what
   ``qs.optimize`` does and README tells a ``torch.compile`` user to call); step 1 ran the model's own;
3. the same compile with the rewritten graphs run on the ops' plain-torch references instead of Inductor.

Where a graph without a token grid held a video attention (a block compiled on its own after the model's forward
broke the graph), step 3 runs again with each forward's grid in the runtime context, as ``qs.optimize``'s hook sets
it (ops/context.py): the share it sparsifies then is reported next to the plain one.

It reports the share of block linears quantized (W4A8), the share of *video attentions* (self or joint attention
over video tokens; ``attention`` sites in a graph without a token grid count too: they are video attentions the
backend could not place; so does a block's self-attention module that put no SDPA in any graph - Sana's linear
attention, an attention run eagerly) sparsified, a reason for every block linear and video attention kept, and two
SQNRs: compiled vs the same rewrite on the references (the compiler's error: should be fp32 noise) and that rewrite vs
eager (the quantization's and sparsity's error). Nothing raises: an exception is the row's ``error``.
"""

from __future__ import annotations

import functools
import re
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .metrics import sqnr_db
from .models import TinyModel

__all__ = ["KeptSite", "Coverage", "measure_coverage", "coverage_markdown", "VIDEO_ATTENTION_KINDS"]

VIDEO_ATTENTION_KINDS = ("self_attention", "joint_attention", "attention", "spatial_attention", "temporal_attention")
_NOT_TOKEN_BEARING = ("int4_weight_only",)
_ATTENTION_SITE_KINDS = VIDEO_ATTENTION_KINDS + ("cross_attention", "text_attention", "fused_attention")
_NO_GRID = "no video token grid in this graph"  # find_sites' reason for an attention in a graph without a grid


@dataclass
class KeptSite:
    fqn: str
    kind: str  # "linear" or the attention kind
    reason: str


@dataclass
class Coverage:
    model: str
    model_class: str
    graphs: int = 0
    graph_breaks: list[str] = field(default_factory=list)  # Dynamo's reasons, one entry per distinct reason
    block_linears: int = 0
    quantized: int = 0
    video_attentions: int = 0
    sparsified: int = 0
    kept: list[KeptSite] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the reports' notes (grid source, regional graphs, ...)
    # Where a graph without a grid held a video attention: the sparse count with each forward's grid in the runtime
    # context, as qs.optimize's step-clock hook sets it (None: not needed), and that run vs eager.
    sparsified_with_forward_grid: int | None = None
    sqnr_with_forward_grid_db: float | None = None
    sqnr_vs_reference_db: float | None = None  # compiled vs the same rewrite on the op references
    sqnr_vs_eager_db: float | None = None  # the rewrite on the op references vs eager
    error: str | None = None

    @property
    def linear_share(self) -> float:
        return self.quantized / self.block_linears if self.block_linears else 0.0

    @property
    def attention_share(self) -> float:
        return self.sparsified / self.video_attentions if self.video_attentions else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["linear_share"], data["attention_share"] = self.linear_share, self.attention_share
        return data


def _first_tensor(output: Any) -> torch.Tensor:
    while isinstance(output, (tuple, list)):
        output = output[0]
    if hasattr(output, "sample"):
        output = output.sample
    return output


def _eager_run(model: torch.nn.Module, inputs: dict[str, Any],
               site_pattern: str) -> tuple[set[str], dict[str, str], Any]:
    """(FQNs of the block linears that ran on tokens, {FQN: processor class} of the block attention modules that ran
    as self-attention on tokens - no encoder states -, eager output)."""
    in_blocks = re.compile(site_pattern)
    seen: set[str] = set()
    attentions: dict[str, str] = {}
    handles = []
    for name, module in model.named_modules():
        if not in_blocks.search(name):
            continue
        if isinstance(module, torch.nn.Linear):
            def hook(_module, args, _name=name):
                if args and isinstance(args[0], torch.Tensor) and args[0].ndim >= 3:
                    seen.add(_name)
            handles.append(module.register_forward_pre_hook(hook))
        elif getattr(module, "processor", None) is not None:
            def attention_hook(_module, args, kwargs, _name=name):
                tokens = args[0] if args else kwargs.get("hidden_states")
                if (isinstance(tokens, torch.Tensor) and tokens.ndim == 3
                        and (args[1:2] or (kwargs.get("encoder_hidden_states"),))[0] is None):
                    attentions[_name] = type(_module.processor).__name__
            handles.append(module.register_forward_pre_hook(attention_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            out = _first_tensor(model(**inputs))
    finally:
        for handle in handles:
            handle.remove()
    return seen, attentions, out


def _compile_and_run(model: torch.nn.Module, inputs: dict[str, Any], options: dict[str, Any], backend: Any):
    from torch._dynamo.utils import counters

    from ..compiler.backend import clear_reports, reports

    torch._dynamo.reset()
    counters.clear()
    clear_reports()
    compiled = torch.compile(model, backend=backend, options=options)
    with torch.no_grad():
        torch.manual_seed(0)
        out = _first_tensor(compiled(**inputs))
    breaks = sorted(counters["graph_break"])
    return out, reports(), breaks


def _graph_itself(gm: torch.fx.GraphModule, _inputs: list[Any]):
    return gm


def measure_coverage(tiny: TinyModel, options: dict[str, Any], compile_with_inductor: bool = True) -> Coverage:
    """The coverage of ``tiny.model`` on ``tiny.make_inputs()`` under backend ``options`` (see the module doc).
    ``compile_with_inductor=False`` skips step 2 (the counts come from the reference run; no compiled SQNR)."""
    from ..compiler.backend import quantsparse
    from ..config import QuantSparseConfig
    from ..ops.context import latent_grid, video_grid
    from ..runtime.attention_processors import restore_attention, use_compile_friendly_attention

    model, inputs = tiny.model, tiny.make_inputs()
    row = Coverage(tiny.name, type(model).__name__)
    try:
        site_pattern = QuantSparseConfig.from_options(options).quant.site_pattern
        token_linears, self_attentions, eager = _eager_run(model, inputs, site_pattern)
        # As README tells a torch.compile user (and qs.optimize does): processors that break the graph are swapped
        # for their compile-friendly equivalents; eager above ran the model's own, so "rewrite vs eager" covers it.
        swapped = use_compile_friendly_attention(model)
        if swapped:
            row.notes.append(f"compile-friendly attention processor on {len(swapped)} module(s) "
                             f"({type(model.get_submodule(swapped[0]).processor).__name__})")
        reference_backend = functools.partial(quantsparse, compile_graph=_graph_itself)
        reference, reports, breaks = _compile_and_run(model, inputs, options, reference_backend)
        row.sqnr_vs_eager_db = sqnr_db(reference, eager)
        if compile_with_inductor:
            compiled, reports, breaks = _compile_and_run(model, inputs, options, "quantsparse")
            row.sqnr_vs_reference_db = sqnr_db(compiled, reference)
        row.graphs, row.graph_breaks = len(reports), breaks
        _count(row, reports, token_linears)
        _count_unseen_attentions(row, reports, self_attentions)
        if any(site.reason == _NO_GRID for site in row.kept):
            with video_grid(latent_grid(model, inputs["hidden_states"])):
                with_grid, grid_reports, _ = _compile_and_run(model, inputs, options, reference_backend)
            row.sparsified_with_forward_grid = sum(site.action == "sparse_attention" for report in grid_reports
                                                   for site in report.sites if site.kind in VIDEO_ATTENTION_KINDS)
            row.sqnr_with_forward_grid_db = sqnr_db(with_grid, eager)
    except Exception as error:  # the matrix reports a failure, it does not stop at it
        row.error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        row.notes.append(traceback.format_exc(limit=3))
    finally:
        restore_attention(model)
    return row


def _relative_site(fqn: str, sites: dict[str, Any]) -> Any:
    """The site of a graph Dynamo traced from a nested frame (after a graph break, a block's forward is a frame of
    its own and its names start at the block: ``attn1.to_q`` for ``transformer_blocks.0.attn1.to_q``)."""
    matches = [site for name, site in sites.items() if fqn.endswith("." + name)]
    return max(matches, key=lambda site: (site.action == "w4a8_linear", len(site.fqn)), default=None)


def _count(row: Coverage, reports: list[Any], token_linears: set[str]) -> None:
    linear_sites: dict[str, Any] = {}
    for report in reports:
        row.notes.extend(note for note in report.notes if note not in row.notes and not note.startswith("no plan"))
        for site in report.sites:
            if site.kind == "linear":
                # A linear traced in several graphs counts as quantized if any of them quantized it.
                if site.fqn not in linear_sites or site.action == "w4a8_linear":
                    linear_sites[site.fqn] = site
            elif site.kind in VIDEO_ATTENTION_KINDS:
                row.video_attentions += 1
                if site.action == "sparse_attention":
                    row.sparsified += 1
                else:
                    row.kept.append(KeptSite(site.fqn, site.kind, site.reason))
    for fqn in sorted(token_linears):
        site = linear_sites.get(fqn) or _relative_site(fqn, linear_sites)
        if site is not None and site.action in _NOT_TOKEN_BEARING:
            continue
        row.block_linears += 1
        if site is None:
            row.kept.append(KeptSite(fqn, "linear", "ran outside every graph the backend compiled (eager fallback)"))
        elif site.action == "w4a8_linear":
            row.quantized += 1
        else:
            row.kept.append(KeptSite(fqn, "linear", site.reason))


def _count_unseen_attentions(row: Coverage, reports: list[Any], self_attentions: dict[str, str]) -> None:
    """A block's self-attention module that put no attention site in any graph: a video attention the backend never
    saw - its processor computes attention without SDPA (Sana's linear attention), or it ran eagerly."""
    sites = {site.fqn for report in reports for site in report.sites if site.kind in _ATTENTION_SITE_KINDS}
    for fqn, processor in sorted(self_attentions.items()):
        if fqn in sites or any(fqn.endswith("." + site) for site in sites):
            continue
        row.video_attentions += 1
        if "Linear" in processor:
            reason = (f"{processor}: linear attention (ReLU feature maps, K^T V first: O(N), no N x N scores, no "
                      "SDPA): nothing to skip")
        else:
            reason = f"{processor}: no scaled_dot_product_attention of it reached the backend (ran eagerly)"
        row.kept.append(KeptSite(fqn, "attention", reason))


def _grid_source(row: Coverage) -> str:
    for note in row.notes:
        if note.startswith("video token grid"):
            return note.split(" from ", 1)[1].split(" (")[0].split(" num_frames")[0]
    return "-"


def coverage_markdown(rows: list[Coverage]) -> str:
    """The matrix as a Markdown table, then the distinct reasons for what each class keeps."""
    lines = [
        "| class | graphs | block linears W4A8 | video attentions sparse | grid from | SQNR compiled vs reference (dB) "
        "| SQNR rewrite vs eager (dB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.error:
            lines.append(f"| {row.model_class} | - | - | - | - | error: {row.error} | - |")
            continue
        ref = "-" if row.sqnr_vs_reference_db is None else f"{row.sqnr_vs_reference_db:.0f}"
        sparse = f"{row.sparsified}/{row.video_attentions} ({row.attention_share:.0%})"
        if row.sparsified_with_forward_grid is not None:
            sparse += (f"; {row.sparsified_with_forward_grid}/{row.video_attentions} with the forward's grid "
                       f"(qs.optimize: {row.sqnr_with_forward_grid_db:.1f} dB vs eager)")
        lines.append(
            f"| {row.model_class} | {row.graphs} | {row.quantized}/{row.block_linears} ({row.linear_share:.0%}) "
            f"| {sparse} | {_grid_source(row)} | {ref} | {row.sqnr_vs_eager_db:.1f} |"
        )
    kept = [(row.model_class, site) for row in rows for site in row.kept]
    if kept or any(row.graph_breaks for row in rows):
        lines += ["", "Kept, and graph breaks:"]
    for row in rows:
        reasons = sorted({f"{site.kind}: {site.reason}" for site in row.kept})
        reasons += [f"graph break: {reason.splitlines()[0]}" for reason in row.graph_breaks]
        for reason in reasons:
            count = sum(f"{site.kind}: {site.reason}" == reason for site in row.kept)
            lines.append(f"- {row.model_class}: " + (f"{count}x " if count > 1 else "") + reason)
    return "\n".join(lines)
