"""Fuse the q/k RMS-norm and rotary embedding feeding a sparsified attention into ``qsparse::qk_norm_rope``.

    pattern (per q and per k; diffusers' WanAttnProcessor):
        n = rms_norm(x, (H*D,), w, eps);  u = n.unflatten(2, (H, -1))          (norm across heads), or
        u = rms_norm(x.unflatten(2, (H, -1)), (D,), w, eps)                    (norm per head)
        x1, x2 = u.unflatten(-1, (-1, 2)).unbind(-1)
        c = freqs_cos[..., 0::2];  s = freqs_sin[..., 1::2]
        out = empty_like(u);  out[..., 0::2] = x1 * c - x2 * s;  out[..., 1::2] = x1 * s + x2 * c
        r = out.type_as(u)                                     -> permute(0, 2, 1, 3) -> qsparse attention
    replacement:
        rq, rk = qsparse.qk_norm_rope(x_q, x_k, w_q, w_k, c, s, H, eps, norm)      (B, S, H, D) each; the permutes
                                                                                 and the attention stay as they are

Candidates are the q/k inputs of ``qsparse::sparse_attention`` nodes (the video self-attentions the earlier passes
rewrote), so this pass runs after ``sparsify_attention`` / ``insert_residual_cache``; the refresh path of
``qsparse::residual_attention`` reads the same permuted q/k nodes and gets the fused values too.
Checks, each reported when it fails (site ``<attention FQN>.qk_norm_rope``, kind ``fusion``): q and k each reach the
attention through layout ops only - the permute to (B, H, S, D), and under diffusers' Ulysses context parallelism the
reshapes and the ``_c10d_functional`` all-to-all before it (they stay; the op takes over the rotated value, so a
Ulysses group fuses what one process fuses); each is the rotation above of an RMS norm over the heads' features or
over each head; q and k use the same norm kind, head count, eps and rotation tables; no value inside the matched
subgraphs is read by anything else (a reused intermediate keeps the unfused graph); the op accepts the shapes.
The matcher reads the Dynamo graph's nodes (``call_method`` unflatten/unbind/type_as/permute, ``operator`` getitem /
setitem, ``torch.rms_norm``): what torch 2.11-2.13 and diffusers 0.42 trace.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from ...ops.qk_norm_rope import check_qk_norm_rope_args
from .graph_utils import fake_value, module_fqn, node_arg
from .pass_manager import PassContext, count_rewrite
from .rewrite_utils import call_op

__all__ = ["FuseQkNormRope", "RopeMatch"]

_RMS_NORM_TARGETS = {torch.rms_norm, torch.nn.functional.rms_norm}
_ATTENTION_OPS = (torch.ops.qsparse.sparse_attention.default,)
_EVEN, _ODD = (Ellipsis, slice(0, None, 2)), (Ellipsis, slice(1, None, 2))
_LAYOUT_METHODS = {"permute", "transpose", "contiguous", "reshape", "view", "flatten"}
_COLLECTIVES = {torch.ops._c10d_functional.all_to_all_single, torch.ops._c10d_functional.all_to_all_single.default,
                torch.ops._c10d_functional.wait_tensor, torch.ops._c10d_functional.wait_tensor.default}


class _NoMatch(Exception):
    """Why a q or k path is not the fusable subgraph (becomes the report's reason)."""


@dataclass
class RopeMatch:
    """One matched q or k path: its input, norm and tables, and every node the fused op makes dead."""

    source: fx.Node  # (B, S, H*D): the projection's output, read by the op
    weight: Any  # the norm's weight node, or None
    eps: float
    norm: str  # "across_heads" | "per_head"
    heads: int
    cos: fx.Node  # freqs_cos[..., 0::2]
    sin: fx.Node  # freqs_sin[..., 1::2]
    output: fx.Node  # the rotated (B, S, H, D) value (type_as), whose uses the op takes over
    nodes: list[fx.Node]  # the subgraph from the norm to ``output``


def _is_method(node: Any, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def _is_call(node: Any, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _describe(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({node.op} {target})"


def _require(condition: bool, why: str) -> None:
    if not condition:
        raise _NoMatch(why)


def _unflatten_args(node: fx.Node) -> tuple[Any, Any]:
    return node_arg(node, 1, "dim"), node_arg(node, 2, "sizes")


def _head_split(node: Any) -> Optional[int]:
    """H if ``node`` is x.unflatten(2, (H, -1)) of a 3-D x (the split into heads), else None."""
    if not _is_method(node, "unflatten"):
        return None
    dim, sizes = _unflatten_args(node)
    value = fake_value(node)
    if dim not in (2, -2) or value is None or value.ndim != 4 or not isinstance(sizes, (tuple, list)):
        return None
    heads = sizes[0]
    return heads if isinstance(heads, int) and heads > 0 else None


def _rms_norm(node: Any) -> tuple[fx.Node, Any, float]:
    _require(_is_call(node, _RMS_NORM_TARGETS), f"not an RMS norm ({getattr(node, 'target', node)})")
    x, shape = node_arg(node, 0, "input"), node_arg(node, 1, "normalized_shape")
    weight, eps = node_arg(node, 2, "weight"), node_arg(node, 3, "eps")
    value = fake_value(node)
    _require(value is not None, f"{node.name} has no traced value")
    _require(isinstance(shape, (tuple, list)) and len(shape) == 1 and shape[0] == value.shape[-1],
             f"RMS norm over {shape}, not over the last dimension alone")
    if eps is None:
        eps = torch.finfo(value.dtype).eps  # torch's default for eps=None
    _require(isinstance(eps, (int, float)),
             "the norm's eps is a traced value, not a constant (torch.compile(dynamic=True) unspecializes float "
             "attributes; q's and k's could differ): compile with dynamic=None, the default, to fuse")
    return x, weight, float(eps)


def _rotation_table(node: Any, half: tuple) -> fx.Node:
    _require(_is_call(node, {operator.getitem}) and node.args[1] == half,
             "a rotation table is not freqs[..., 0::2] / freqs[..., 1::2]")
    return node


def _pair_and_table(node: Any) -> tuple[fx.Node, fx.Node]:
    """(x, table) of a rotation term x * table, x being one half of the pairs' unbind (either operand order)."""
    _require(_is_call(node, {operator.mul, torch.mul}) and len(node.args) == 2
             and all(isinstance(a, fx.Node) for a in node.args), "a rotation term is not x * table")
    halves = [a for a in node.args if _is_call(a, {operator.getitem}) and _is_method(a.args[0], "unbind")]
    _require(len(halves) == 1, "a rotation term does not multiply one half of the pairs by a table")
    x = halves[0]
    return x, node.args[1] if node.args[0] is x else node.args[0]


def _match_rotation(output: fx.Node) -> RopeMatch:
    """Match ``output`` = the rotated value (see the module docstring) back to the norm."""
    out = output.args[0] if _is_method(output, "type_as") else output
    _require(_is_call(out, {torch.empty_like}),
             f"q/k comes from {_describe(out)}, not from the interleaved rotation of diffusers' Wan attention (a rope "
             "over part of a joint text + video sequence, as HunyuanVideo's and CogVideoX's, is not fused)")
    heads_value = out.args[0]
    setitems = [user for user in out.users if _is_call(user, {operator.setitem})]
    evens = [s.args[2] for s in setitems if s.args[1] == _EVEN]
    odds = [s.args[2] for s in setitems if s.args[1] == _ODD]
    _require(len(setitems) == 2 and len(evens) == 1 and len(odds) == 1,
             "the rotated tensor is not written as out[..., 0::2] and out[..., 1::2]")
    even, odd = evens[0], odds[0]
    _require(_is_call(even, {operator.sub, torch.sub}) and _is_call(odd, {operator.add, torch.add})
             and len(even.args) == 2 and len(odd.args) == 2, "the rotation is not (x1 c - x2 s, x1 s + x2 c)")
    (x1, cos), (x2, sin) = (_pair_and_table(term) for term in even.args)
    odd_terms = dict(_pair_and_table(term) for term in odd.args)  # {x1: sin, x2: cos}
    _require(x1.args[0] is x2.args[0] and (x1.args[1], x2.args[1]) == (0, 1),
             "the rotation's terms are not (pair[0] cos - pair[1] sin, ...)")
    _require(odd_terms == {x1: sin, x2: cos}, "the odd features are not pair[0] sin + pair[1] cos")
    unbind = x1.args[0]
    _require(node_arg(unbind, 1, "dim", 0) == -1, "the pairs are not unbind(-1) of one tensor")
    pairs_view = unbind.args[0]
    _require(_is_method(pairs_view, "unflatten") and _unflatten_args(pairs_view) == (-1, (-1, 2))
             and pairs_view.args[0] is heads_value, "x1, x2 are not the interleaved pairs of the normed heads")
    cos, sin = _rotation_table(cos, _EVEN), _rotation_table(sin, _ODD)

    nodes = [output, out, *setitems, even, odd, *even.args, *odd.args, x1, x2, unbind, pairs_view]
    heads = _head_split(heads_value)
    if heads is not None:  # u = rms_norm(x, (H*D,)).unflatten(2, (H, -1))
        norm_node = heads_value.args[0]
        source, weight, eps = _rms_norm(norm_node)
        norm, nodes = "across_heads", nodes + [heads_value, norm_node]
    else:  # u = rms_norm(x.unflatten(2, (H, -1)), (D,))
        split = node_arg(heads_value, 0, "input") if _is_call(heads_value, _RMS_NORM_TARGETS) else None
        heads = _head_split(split)
        _require(heads is not None,
                 "the rotated heads are not an RMS norm of the split projection (across or per head)")
        _, weight, eps = _rms_norm(heads_value)
        source, norm, nodes = split.args[0], "per_head", nodes + [heads_value, split]
    _require(fake_value(source) is not None and fake_value(source).ndim == 3,
             "the projection output is not (B, S, H*D)")
    if output is out:
        nodes = nodes[1:]
    return RopeMatch(source, weight, eps, norm, heads, cos, sin, output, nodes)


def _check_private(match: RopeMatch) -> None:
    """Every matched node but the output must be read only inside the match (else fusing would compute it twice
    or leave a reader without it)."""
    inside = set(match.nodes)
    for node in match.nodes:
        if node is match.output:
            continue
        outside = [user.name for user in node.users if user not in inside]
        _require(not outside, f"{node.name} is also read by {', '.join(outside)}: the unfused graph is kept")


def _attention_input(value: Any) -> fx.Node:
    """The (B, S, H, D) value behind an attention input: before its permute(0, 2, 1, 3) / transpose(1, 2), and under
    diffusers' Ulysses attention before the all-to-all that trades the sequence shard for a head shard (reshapes,
    permutes, ``_c10d_functional.all_to_all_single`` + ``wait_tensor``). Those nodes stay in the graph and the fused
    op replaces only the rotated value they start from, so one process and a Ulysses group fuse the same subgraph."""
    node = value
    while _moves_data(node):
        node = node.args[0]
    if node is value:
        raise _NoMatch("q/k reach the attention through something else than layout ops (a permute to (B, H, S, D), "
                       "Ulysses' all-to-all)")
    return node


def _moves_data(node: Any) -> bool:
    """A node that only reorders or transports its first argument's elements (layout ops, Ulysses collectives)."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return node.target in _LAYOUT_METHODS
    return node.op == "call_function" and node.target in _COLLECTIVES


def _same_table(a: fx.Node, b: fx.Node) -> bool:
    return a is b or (a.args[0] is b.args[0] and a.args[1] == b.args[1])


class FuseQkNormRope:
    name = "fuse_qk_norm_rope"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        prefix = ctx.analysis.get("prefix", "")
        rewrites = 0
        attentions = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ATTENTION_OPS]
        for attention in attentions:
            fqn = f"{prefix}{module_fqn(attention) or attention.name}.qk_norm_rope"
            try:
                q_match, k_match = self._match(gm, attention)
            except _NoMatch as why:
                ctx.report.add(fqn, "fusion", "kept", str(why))
                count_rewrite(ctx, "kept_qk_norm_rope")
                continue
            self._rewrite(gm, q_match, k_match)
            ctx.report.add(fqn, "fusion", "qk_norm_rope", "", norm=q_match.norm, heads=q_match.heads,
                           rope="interleaved pairs", eps=q_match.eps)
            count_rewrite(ctx, "qk_norm_rope")
            rewrites += 1
        return rewrites

    @staticmethod
    def _match(gm: fx.GraphModule, attention: fx.Node) -> tuple[RopeMatch, RopeMatch]:
        q, k = (_match_rotation(_attention_input(attention.args[i])) for i in (0, 1))
        _require(q.output is not k.output, "q and k are the same tensor")
        _require((q.norm, q.heads, q.eps) == (k.norm, k.heads, k.eps),
                 f"q and k are normalized differently ({q.norm}/{q.heads} heads/eps {q.eps} vs "
                 f"{k.norm}/{k.heads} heads/eps {k.eps})")
        _require((q.weight is None) == (k.weight is None), "one of the q/k norms has a weight, the other has none")
        _require(_same_table(q.cos, k.cos) and _same_table(q.sin, k.sin), "q and k are rotated by different tables")
        for match in (q, k):
            _check_private(match)
        values = [fake_value(n) for n in (q.source, k.source, q.weight, k.weight, q.cos, q.sin)]
        try:
            check_qk_norm_rope_args(*values, q.heads, q.norm)
        except ValueError as error:
            raise _NoMatch(str(error)) from None
        # The op goes right after its last input; every reader of q/k must come after that.
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        last_input = max(_op_inputs(q, k), key=order.__getitem__)
        early = [user.name for m in (q, k) for user in m.output.users if order[user] <= order[last_input]]
        _require(not early, f"{', '.join(early)} read q/k before {last_input.name} (the op's last input) exists")
        return q, k

    @staticmethod
    def _rewrite(gm: fx.GraphModule, q: RopeMatch, k: RopeMatch) -> None:
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        anchor = max(_op_inputs(q, k), key=order.__getitem__).next
        fused = call_op(gm, anchor, torch.ops.qsparse.qk_norm_rope.default,
                        (q.source, k.source, q.weight, k.weight, q.cos, q.sin, q.heads, q.eps, q.norm), q.output)
        for index, match in enumerate((q, k)):
            value = call_op(gm, anchor, operator.getitem, (fused, index), match.output)
            match.output.replace_all_uses_with(value)
        for node in sorted(set(q.nodes) | set(k.nodes), key=order.__getitem__, reverse=True):
            gm.graph.erase_node(node)


def _op_inputs(q: RopeMatch, k: RopeMatch) -> list[fx.Node]:
    return [n for n in (q.source, k.source, q.weight, k.weight, q.cos, q.sin) if isinstance(n, fx.Node)]
