"""Rewrite video self-attention (and the video part of joint attention) into ``qsparse::sparse_attention``.

    pattern:      o = sdpa(q, k, v, attn_mask=None | key padding, dropout_p=0, is_causal=False, scale=s)
    replacement:  n, idx = qsparse.video_block_layout(q, frames, height, width, video_start, pattern, density, BQ, BKV)
                  o, lse = qsparse.sparse_attention(q, k, v, n, idx, BQ, BKV, s, attn_mask, precision)

Only sites that ``find_sites`` classified as ``self_attention``, ``joint_attention`` or one axis group of a factorized
attention are candidates: ``spatial_attention`` (within each frame) gets the layout of a one-frame grid (1, h, w),
``temporal_attention`` (across frames) that of (f, 1, 1) - the grid each batch entry of it holds. Checks, each reported
when it fails: sparsity enabled, no autograd, no dropout, not causal, no GQA, the mask (if any) is a boolean key-padding
mask (B|1, 1, 1, S) or the pair mask p_i & p_j of one (``_pair_padding``: the op takes p, and the rows of padded queries
are zeroed, as SDPA leaves an all-masked row), float dtype, the sequence spans more than one query block, and the
pattern spec has one entry or one per head.

Precision: a plan's per-site ``AttentionPlan.precision`` (calibration's attention_precision stage) where it sets one,
else ``sparsity.attention_precision``. "int8_fp8" becomes the op's precision (and so the residual cache's refresh's,
insert_residual_cache.py) where the 8-bit kernel can run the site; elsewhere the site stays bf16 with the reason in
its report row (counter ``attention_int8_fp8`` / ``attention_int8_fp8_kept_bf16``) - and when the plan asked for it,
a compile-time warning too, since the plan's fidelity numbers assumed the 8-bit kernel would run. Report rows carry
``precision`` and ``precision_from`` ("plan" or "option"); sites whose precision the plan set count as
``attention_precision_from_plan``.

Context parallelism (``ctx.config.parallel``, diffusers' Ulysses): the attention of rank r of a Ulysses group of W
sees every token (q is (B, H/W, S, D) after the all-to-all) and heads [r*H/W, (r+1)*H/W) of the model. A per-head
spec of H entries (a plan's ``head_patterns``) is sliced to those entries; the grid stays the full video grid.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ...config import ParallelConfig
from ...ops.attention_int8_fp8_cuda import static_unsupported_reason as int8_fp8_unsupported_reason
from ...ops.sparse_attention_cuda import static_unsupported_reason
from .find_sites import AttentionSite
from .graph_utils import fake_value, node_arg, same_size
from .pass_manager import PassContext, count_rewrite
from .rewrite_utils import autograd_reason, call_op

__all__ = ["SparsifyAttention", "LayoutSlot"]


@dataclass(frozen=True)
class LayoutSlot:
    """A layout the graph will ask ``qsparse::video_block_layout`` for, known at compile time except for a grid of
    (0, 0, 0) (a regional graph: the grid of each forward). The backend builds it before the graph runs."""

    seq_len: int
    device: torch.device
    grid: tuple[int, int, int]
    video_start: int
    pattern: str
    density: float
    block_q: int
    block_kv: int

_SPARSIFIABLE = ("self_attention", "joint_attention", "spatial_attention", "temporal_attention")
_FACTORIZED = {"spatial_attention": "within each frame", "temporal_attention": "across frames"}


def _is_key_padding_mask(mask, batch) -> bool:
    return (
        mask.dtype == torch.bool
        and mask.ndim == 4
        and mask.shape[1] == 1
        and mask.shape[2] == 1
        and (mask.shape[0] == 1 or mask.shape[0] == batch)
    )


class SparsifyAttention:
    name = "sparsify_attention"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        cfg = ctx.config.sparsity
        grid = ctx.analysis["grid"]
        grad_reason = autograd_reason(ctx.example_inputs)
        grid_values = None
        rewrites = 0
        for site in ctx.analysis["attentions"]:
            reason = site.why if site.kind not in _SPARSIFIABLE else self._check(site, ctx, grad_reason)
            if reason:
                ctx.report.add(site.fqn, site.kind, "kept", reason)
                count_rewrite(ctx, "kept_attention")
                continue
            node = site.node
            q, k, v = (node_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
            mask = node_arg(node, 3, "attn_mask")
            head_dim = fake_value(q).shape[-1]
            scale = node_arg(node, 6, "scale")
            scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
            pattern, density, block_q, block_kv = cfg.pattern, float(cfg.density), cfg.block_q, cfg.block_kv
            requested, precision_from = cfg.attention_precision, "option"
            if ctx.plan is not None:
                entry = ctx.plan.attentions[site.fqn]
                pattern, block_q, block_kv = entry.pattern_spec, entry.block_q, entry.block_kv
                if entry.precision is not None:
                    requested, precision_from = entry.precision, "plan"
            pattern, heads_note = _local_pattern(pattern, fake_value(q).shape[1], ctx.config.parallel)
            if pattern is None:
                ctx.report.add(site.fqn, site.kind, "kept", heads_note)
                count_rewrite(ctx, "kept_attention")
                continue
            if site.kind in _FACTORIZED and grid.source == "runtime context":
                # The layout op reads the whole video's grid of the current forward; one frame's or one position's
                # is not in the context.
                ctx.report.add(site.fqn, site.kind, "kept", f"attention {_FACTORIZED[site.kind]} in a block compiled "
                               "on its own: the runtime grid is the whole video's, its per-frame or per-position "
                               "layout is built only where the graph holds the grid (compile the whole model)")
                count_rewrite(ctx, "kept_attention")
                continue
            if grid_values is None:
                # Emitted once, before the first attention, and shared by every site.
                with gm.graph.inserting_before(node):
                    grid_values = grid.emit(gm.graph)
            site_grid = _site_grid(site.kind, grid_values)
            layout = call_op(
                gm, node, torch.ops.qsparse.video_block_layout.default,
                (q, *site_grid, site.video_start, pattern, density, block_q, block_kv),
                node,
            )
            seq_len = fake_value(q).shape[2]
            if all(isinstance(v, int) for v in (*site_grid, seq_len)):
                ctx.layout_slots.append(LayoutSlot(seq_len, fake_value(q).device, tuple(site_grid),
                                                   site.video_start, pattern, density, block_q, block_kv))
            kv_num_blocks = call_op(gm, node, operator.getitem, (layout, 0), node)
            kv_indices = call_op(gm, node, operator.getitem, (layout, 1), node)
            precision, why_not = _site_precision(requested, fake_value(q), block_q, block_kv)
            precision_note = f"; attention_precision {requested} not possible here, kept bf16: {why_not}" if why_not \
                else ""
            if precision_from == "plan":
                count_rewrite(ctx, "attention_precision_from_plan")
                precision_note += f"; precision {requested} from the plan"
                if why_not:
                    warnings.warn(f"qsparse_compiler: the plan asks for attention_precision {requested!r} at "
                                  f"{site.fqn}, but its 8-bit kernel cannot run there ({why_not}); it runs in bf16",
                                  stacklevel=2)
            padding = _pair_padding(mask) if mask is not None else None
            result = call_op(
                gm, node, torch.ops.qsparse.sparse_attention.default,
                (q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, scale,
                 mask if padding is None else padding, precision), node,
            )
            out = call_op(gm, node, operator.getitem, (result, 0), node)
            if padding is not None:
                # The rows of padded queries attend nothing under the pair mask: zero, as SDPA returns them.
                rows = call_op(gm, node, torch.ops.aten.transpose.int, (padding, -1, -2), node)
                out = call_op(gm, node, torch.ops.aten.masked_fill.Scalar,
                              (out, call_op(gm, node, torch.ops.aten.logical_not.default, (rows,), node), 0.0), node)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            ctx.report.add(
                site.fqn, site.kind, "sparse_attention",
                f"{pattern} @ density {density:g} of the video x video tiles"
                + ("; text rows/cols dense" if site.kind == "joint_attention" else "")
                + (f"; {_FACTORIZED[site.kind]}, grid {'x'.join(map(str, site.grid))} per batch entry"
                   if site.kind in _FACTORIZED else "") + heads_note + precision_note,
                seq_len=str(site.seq_len), video_start=str(site.video_start), precision=precision,
                precision_from=precision_from,
            )
            count_rewrite(ctx, "sparse_attention")
            if requested == "int8_fp8":
                count_rewrite(ctx, "attention_int8_fp8" if precision == "int8_fp8" else "attention_int8_fp8_kept_bf16")
            rewrites += 1
        return rewrites

    @staticmethod
    def _check(site: AttentionSite, ctx: PassContext, grad_reason: str) -> str:
        cfg = ctx.config.sparsity
        node = site.node
        if not cfg.enabled:
            return "sparsity disabled (sparsity.enabled=False)"
        if grad_reason:
            return grad_reason
        if ctx.plan is not None and site.fqn not in ctx.plan.attentions:
            return "the plan keeps this attention dense"
        q, k = fake_value(node_arg(node, 0, "query")), fake_value(node_arg(node, 1, "key"))
        dropout = node_arg(node, 4, "dropout_p", 0.0)
        if not isinstance(dropout, (int, float)) or dropout != 0.0:
            return f"dropout_p={dropout} (training-style attention)"
        if node_arg(node, 5, "is_causal", False) is not False:
            return "causal attention"
        if node_arg(node, 7, "enable_gqa", False) or q.shape[1] != k.shape[1]:
            return f"grouped-query attention (q heads {q.shape[1]}, kv heads {k.shape[1]})"
        if q.ndim != 4:
            return f"q has shape {tuple(q.shape)}, expected (B, H, S, D)"
        mask_node = node_arg(node, 3, "attn_mask")
        mask = fake_value(mask_node)
        if mask is not None and not _is_key_padding_mask(mask, q.shape[0]) and _pair_padding(mask_node) is None:
            return f"attention mask {tuple(mask.shape)} {mask.dtype} is not a boolean key-padding mask (B, 1, 1, S)"
        if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return f"dtype {q.dtype} not supported"
        seq_len = q.shape[2]
        block_q = ctx.plan.attentions[site.fqn].block_q if ctx.plan is not None else cfg.block_q
        block_kv = ctx.plan.attentions[site.fqn].block_kv if ctx.plan is not None else cfg.block_kv
        if q.is_cuda:
            reason = static_unsupported_reason(q.dtype, q.shape[-1], block_q, block_kv)
            if reason:
                return f"no CUDA kernel for this site ({reason})"
        if isinstance(seq_len, int) and seq_len <= block_q:
            return f"S={seq_len} fits in one query block (block_q={block_q}): nothing to skip"
        return ""


def _pair_padding(mask: Any) -> fx.Node | None:
    """The (B|1, 1, 1, S) boolean key-padding mask p of an attention mask built as m[i, j] = p[j] & p[i] - a padded
    token neither attends nor is attended to (HunyuanVideo 1.5's processor: ``m1 = p.repeat(1, 1, S, 1);
    m1 & m1.transpose(2, 3)``) - or None. Under it a valid query sees exactly the keys p lets through, and a padded
    query's row is all-masked (SDPA returns zeros there): the sparse op with p as key-padding mask, its padded rows
    zeroed, computes the same."""
    node = mask
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target == "bool":
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target in (operator.and_, torch.logical_and, torch.bitwise_and) and len(node.args) == 2):
        return None
    for rows, cols in (node.args, node.args[::-1]):
        if not (isinstance(cols, fx.Node) and cols.op == "call_method" and cols.target == "transpose"
                and cols.args[0] is rows and {int(d) % 4 for d in cols.args[1:3]} == {2, 3}):
            continue
        source = rows
        # Rows of p broadcast over the query axis: repeat / expand of a (B|1, 1, 1, S) tensor.
        while isinstance(source, fx.Node) and source.op == "call_method" and source.target in ("repeat", "expand"):
            source = source.args[0]
        value, full = fake_value(source), fake_value(rows)
        if (isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.ndim == 4
                and value.shape[1] == 1 and value.shape[2] == 1 and isinstance(full, torch.Tensor)
                and full.ndim == 4 and same_size(full.shape[-1], value.shape[-1])):
            return source
    return None


def _site_grid(kind: str, grid_values: tuple) -> tuple:
    """The grid one batch entry of the attention sees, from the graph's (frames, height, width) values: one frame
    (1, h, w) for attention within each frame, one position (f, 1, 1) for attention across frames."""
    frames, height, width = grid_values
    if kind == "spatial_attention":
        return 1, height, width
    if kind == "temporal_attention":
        return frames, 1, 1
    return grid_values


def _site_precision(requested: str, q, block_q: int, block_kv: int) -> tuple[str, str]:
    """The attention precision a site gets, and why not the requested one ("" when it is)."""
    if requested != "int8_fp8":
        return requested, ""
    reason = int8_fp8_unsupported_reason(q.dtype, q.shape[-1], block_q, block_kv, q.device)
    return ("bf16", reason) if reason else ("int8_fp8", "")


def _local_pattern(spec: str, heads: int, parallel: ParallelConfig) -> tuple[str | None, str]:
    """The pattern spec for the ``heads`` heads this attention holds, and a note for the report; (None, why) when the
    spec does not fit. One entry serves every head; one entry per head of the model is sliced to this Ulysses rank's
    heads [rank * heads, (rank + 1) * heads)."""
    entries = spec.split(";")
    if len(entries) in (1, heads):
        return spec, ""
    degree, rank = parallel.ulysses_degree, parallel.ulysses_rank
    if degree > 1 and len(entries) == heads * degree:
        first = rank * heads
        return ";".join(entries[first:first + heads]), (
            f"; heads {first}..{first + heads - 1} of {len(entries)} (Ulysses rank {rank} of {degree})"
        )
    why = f"the pattern lists {len(entries)} head patterns for {heads} heads"
    if degree == 1 and len(entries) % heads == 0:
        why += (
            f" - if the heads are split across {len(entries) // heads} ranks (diffusers context parallelism), compile "
            "through qs.optimize(...) or pass options['parallel'] = {'ulysses_degree': ..., 'ulysses_rank': ...}"
        )
    elif degree > 1:
        why += f" (Ulysses degree {degree}: expected {heads * degree} entries, {heads} per rank)"
    return None, why
