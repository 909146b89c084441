"""Insert a residual-cache node after each sparsified attention (SSAR).

    pattern:      n, idx = qsparse.video_block_layout(q, grid..., pattern, density, BQ, BKV)
                  o, lse = qsparse.sparse_attention(q, k, v, n, idx, BQ, BKV, scale, mask, precision);  uses of o
    replacement:  n_c, idx_c = qsparse.video_block_layout(q, grid..., pattern, density, BQ, BKV, True)  # complement
                  o_hat = qsparse.residual_attention(o, q, k, v, mask, scale, [state...], refresh, mode, order,
                                                     precision, delta_rank, lse, n, idx, BQ, BKV, n_c, idx_c)
                  uses of o -> o_hat

A refresh computes O_dense from what the sparse attention already did: the complement tiles (the layout's
complement, built and cached with the layout by the layout op) merged with ``o`` through ``lse``
(ops/refresh_attention.py) - never a second dense attention (issue #16). A ``reuse``-mode graph (the reuse graph of
CUDA graphs) never refreshes and gets none of these arguments: its op reads only ``o`` and the cache. For a layout that
does not come from ``qsparse::video_block_layout`` the op gets the layout without a complement and builds it on a
refresh.

The cache state (``[R, dR, steps]`` or its rank-r factors) and, in ``auto`` mode, the refresh flag become graph inputs
that the backend's runtime wrapper takes from the model's ``ResidualCacheRuntime`` on every call (per site and CFG
branch; allocated on first use, reallocated when the shape changes). The op declares the mutation of its state.
Sites are enabled by ``CacheConfig.enabled`` (every sparsified site, one schedule) or per site by the plan
(``AttentionPlan.cache``) when a runtime drives the steps (``qs.optimize`` or ``options["runtime"]``).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from ...config import CacheConfig, ConfigError
from ...formats.pattern_spec import parse_pattern_spec
from ...ops.residual_attention import MODE_AUTO, MODE_REFRESH, MODE_REUSE
from ...runtime.residual_cache import state_layout
from .graph_inputs import CacheSlot
from .graph_utils import fake_value, module_fqn
from .pass_manager import PassContext, count_rewrite
from .rewrite_utils import call_op, graph_fake_mode

__all__ = ["InsertResidualCache"]

_MODES = {"auto": MODE_AUTO, "refresh": MODE_REFRESH, "reuse": MODE_REUSE}


def _site_schedule(ctx: PassContext, fqn: str) -> CacheConfig | None:
    # A plan's cache settings need someone to drive the steps: qs.optimize (which passes a runtime) or an explicit
    # cache option. A plain torch.compile with a plan runs the plan's sparse attention without a cache.
    driven = ctx.config.runtime is not None or ctx.config.cache.enabled
    if ctx.plan is not None and not driven:
        return None
    if ctx.plan is not None and not ctx.config.cache.override_plan:
        entry = ctx.plan.attentions.get(fqn)
        if entry is None or not entry.cache:
            return None
        return dataclasses.replace(ctx.config.cache, enabled=True, **entry.cache)
    return ctx.config.cache if ctx.config.cache.enabled else None


def _refuse_skip_heads(sparse_attention: fx.Node, fqn: str) -> None:
    """A ``skip`` head computes nothing: its output is the residual cache's. Without a cache it would be zeros."""
    layout = sparse_attention.args[3].args[0]  # getitem(video_block_layout(...), 0)
    pattern, density = layout.args[5], layout.args[6]
    skipped = [head for head, (name, _) in enumerate(parse_pattern_spec(pattern, density)) if name == "skip"]
    if skipped:
        raise ConfigError(
            f"qsparse_compiler: {fqn} has skip heads {skipped} (pattern {pattern!r}) but no residual cache, so they "
            "would output zeros; compile through qs.optimize(pipe, plan=..., cache=True), or pass "
            "options['cache'] = {'enabled': True} with options['runtime'] driving the steps"
        )


class InsertResidualCache:
    name = "insert_residual_cache"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        if ctx.plan is not None and ctx.config.runtime is None and not ctx.config.cache.enabled:
            cached = [fqn for fqn, entry in ctx.plan.attentions.items() if entry.cache]
            if cached:
                ctx.report.notes.append(
                    f"the plan has residual-cache settings for {len(cached)} attention(s), but nothing drives the "
                    "denoising steps: no cache nodes (compile through qs.optimize, or pass options['runtime'])"
                )
        rewrites = 0
        sparse_nodes = [n for n in gm.graph.nodes if n.target is torch.ops.qsparse.sparse_attention.default]
        for node in sparse_nodes:
            fqn = ctx.analysis.get("prefix", "") + (module_fqn(node) or node.name)
            schedule = _site_schedule(ctx, fqn)
            if schedule is None:
                _refuse_skip_heads(node, fqn)
                continue
            (out,) = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
            q, k, v = node.args[:3]
            scale, mask = node.args[7], node.args[8]
            precision = node.args[9] if len(node.args) > 9 else "bf16"  # the refresh's dense attention follows it
            value = fake_value(out)
            examples = _state_examples(gm, tuple(value.shape), schedule, value.dtype, value.device)
            index = len(ctx.cache_slots)
            named = [(f"qsparse_cache_{index}_{i}", t) for i, t in enumerate(examples)]
            if schedule.mode == "auto":
                named.append((f"qsparse_cache_{index}_refresh", torch.tensor(True)))
            slot = CacheSlot(fqn, schedule, tuple(value.shape), value.dtype, value.device, len(examples))
            nodes = ctx.inputs.add(gm, slot, named)
            state, refresh = nodes[: len(examples)], (nodes[-1] if schedule.mode == "auto" else None)
            users = list(out.users)
            anchor = users[0] if users else out.next
            refresh_layout = () if schedule.mode == "reuse" else _refresh_layout(gm, node, anchor)
            cached = call_op(
                gm, anchor, torch.ops.qsparse.residual_attention.default,
                (out, q, k, v, mask, scale, state, refresh, _MODES[schedule.mode], schedule.order, precision,
                 schedule.delta_rank, *refresh_layout), node,
            )
            for user in users:
                user.replace_input_with(out, cached)
            denoised = f" (dR denoised to rank {schedule.delta_rank})" if schedule.delta_rank else ""
            ctx.report.add(
                fqn, "residual_cache", "residual_attention",
                f"order {schedule.order}{denoised}, refresh first {schedule.refresh_first} "
                f"then every {schedule.refresh_every}, "
                f"rank {schedule.rank or 'full'}, storage {schedule.storage}, mode {schedule.mode}",
                precision=precision,
            )
            count_rewrite(ctx, "residual_attention")
            rewrites += 1
        return rewrites


def _refresh_layout(gm: fx.GraphModule, sparse_attention: fx.Node, anchor: fx.Node) -> tuple:
    """The residual op's refresh arguments (lse, kv_num_blocks, kv_indices, block_q, block_kv, complement pair),
    their nodes inserted before ``anchor``: the sparse attention's lse and layout, and the layout op's complement."""
    (kv_num_blocks, kv_indices, block_q, block_kv) = sparse_attention.args[3:7]
    lse = next((u for u in sparse_attention.users if u.target is operator.getitem and u.args[1] == 1), None)
    if lse is None:
        lse = call_op(gm, anchor, operator.getitem, (sparse_attention, 1), sparse_attention)
    from_op = isinstance(kv_num_blocks, fx.Node) and kv_num_blocks.target is operator.getitem
    layout = kv_num_blocks.args[0] if from_op else None
    if getattr(layout, "target", None) is not torch.ops.qsparse.video_block_layout.default:
        return lse, kv_num_blocks, kv_indices, block_q, block_kv
    complement = call_op(gm, anchor, torch.ops.qsparse.video_block_layout.default, (*layout.args[:9], True), layout)
    pair = tuple(call_op(gm, anchor, operator.getitem, (complement, i), layout) for i in range(2))
    return (lse, kv_num_blocks, kv_indices, block_q, block_kv, *pair)


def _state_examples(gm, shape: tuple[Any, ...], schedule: CacheConfig, dtype: torch.dtype,
                    device) -> list[torch.Tensor]:
    """Fake tensors (the graph's fake mode, its symbolic sizes) shaped like the state the runtime will pass."""
    with graph_fake_mode(gm):
        return [torch.empty(s, dtype=d, device=device) for s, d in state_layout(shape, schedule, dtype)]
