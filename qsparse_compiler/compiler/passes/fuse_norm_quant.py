"""Fuse a LayerNorm (+ adaLN modulation) that only feeds W4A8 GEMMs into ``qsparse::layer_norm_modulate_quant``.

    pattern (diffusers' Wan block, after ``quantize_linears`` put the activation quantization in the graph):
        n = layer_norm(h.float(), (K,), w?, b?, eps)[.to(float32)]             FP32LayerNorm, affine or not
        a = n * (1 + scale) + shift                                            adaLN modulation (or a = n)
        x = a.type_as(h)
        codes_i, s_i = quantize_activation_symmetric(x, fmt)   for each GEMM i reading x (Wan's attn1: q, k, v)
    replacement:
        codes, s = qsparse.layer_norm_modulate_quant(h, w, b, scale, shift, eps, fmt)     one pass over h; every
        (codes_i, s_i) -> (codes, s)                                                     GEMM reads the same codes

Candidates are the activation quantizations whose input traces back to a ``layer_norm`` through the ops above. Checks,
each reported when it fails (site: the norm's module FQN, kind ``fusion``): every reader of x is such a quantization,
in one format (a bf16 reader - a kept linear, a LoRA - still needs x: the graph stays unfused); no intermediate is
read elsewhere; the norm is over the last dimension; x is rounded to h's own dtype (what the op does); the op accepts
the shapes. Why this is not left to Inductor: Inductor fuses this chain into one reduction kernel per norm already,
but the H200 profile of the Wan-1.3B reuse step shows those kernels at a fraction of the bandwidth; this op's kernel
reads h once and writes 1-byte codes once (``kernels/ln_modulate_quant.py``). ``benchmarks/bench_membound.py``
measures the two side by side.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ...ops.ln_modulate_quant import check_layer_norm_modulate_quant_args
from ...formats.quantization import quantize_activation_symmetric
from .graph_utils import fake_value, module_fqn, node_arg
from .pass_manager import PassContext, count_rewrite
from .rewrite_utils import call_op

__all__ = ["FuseNormQuant"]

_LAYER_NORM_TARGETS = {torch.nn.functional.layer_norm, torch.layer_norm}
_ADD, _MUL = {operator.add, torch.add}, {operator.mul, torch.mul}


class _NoMatch(Exception):
    """Why a norm feeding quantizations is not fused (becomes the report's reason)."""


def _is_method(node: Any, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def _is_call(node: Any, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _strip_fp32_casts(node: Any) -> Any:
    """x behind x.float() / x.to(torch.float32) casts."""
    while _is_method(node, "float") or (_is_method(node, "to") and node.args[1:] == (torch.float32,)
                                         and not node.kwargs):
        node = node.args[0]
    return node


def _find_layer_norm(x: fx.Node) -> fx.Node | None:
    """The layer_norm at the root of x = type_as(modulate(norm)), or None when x is not such a chain."""
    node = node_arg(x, 0, "input") if _is_method(x, "type_as") or _is_method(x, "to") else None
    if _is_call(node, _ADD) and _is_call(node.args[0], _MUL):
        node = node.args[0].args[0]
    node = _strip_fp32_casts(node)
    return node if _is_call(node, _LAYER_NORM_TARGETS) else None


class FuseNormQuant:
    name = "fuse_norm_quant"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        prefix = ctx.analysis.get("prefix", "")
        groups: dict[fx.Node, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if _is_call(node, {quantize_activation_symmetric}) and isinstance(node.args[0], fx.Node):
                groups.setdefault(node.args[0], []).append(node)
        rewrites = 0
        for x, quantizations in groups.items():
            norm = _find_layer_norm(x)
            if norm is None:
                continue  # not a norm's output: nothing for this pass
            fqn = prefix + (module_fqn(norm) or norm.name)
            try:
                args, chain = self._match(x, norm, quantizations)
            except _NoMatch as why:
                ctx.report.add(fqn, "fusion", "kept", str(why))
                count_rewrite(ctx, "kept_norm_quant")
                continue
            fused = call_op(gm, quantizations[0], torch.ops.qsparse.layer_norm_modulate_quant.default, args, x)
            for quantization in quantizations:
                quantization.replace_all_uses_with(fused)
            ctx.report.add(fqn, "fusion", "layer_norm_modulate_quant", "", act=args[-1],
                           modulation="adaLN" if args[3] is not None else "none",
                           affine=args[1] is not None, gemms=len(quantizations))
            count_rewrite(ctx, "layer_norm_modulate_quant")
            rewrites += 1
        return rewrites

    @staticmethod
    def _match(x: fx.Node, norm: fx.Node, quantizations: list[fx.Node]) -> tuple[tuple, list[fx.Node]]:
        formats = {node_arg(q, 1, "act_format") for q in quantizations}
        if len(formats) != 1:
            raise _NoMatch(f"the GEMMs reading it quantize to different formats {sorted(formats)}")
        others = [user.name for user in x.users if user not in quantizations]
        if others:
            raise _NoMatch(f"the normalized activation is also read by {', '.join(others)} (not a W4A8 GEMM's "
                           "quantization): it must stay in the graph")
        modulated = node_arg(x, 0, "input")
        chain = [modulated]
        scale = shift = None
        if _is_call(modulated, _ADD) and _is_call(modulated.args[0], _MUL):
            product, shift = modulated.args
            normed, one_plus = product.args
            if not (_is_call(one_plus, _ADD) and one_plus.args[0] == 1 and isinstance(one_plus.args[1], fx.Node)):
                raise _NoMatch("the modulation is not n * (1 + scale) + shift")
            scale = one_plus.args[1]
            chain += [product, one_plus]
        else:
            normed = modulated
        cast = normed
        while cast is not norm:
            chain.append(cast)
            cast = cast.args[0]
        chain.append(norm)
        for node in chain:
            outside = [user.name for user in node.users if user not in chain and user is not x]
            if outside:
                raise _NoMatch(f"{node.name} is also read by {', '.join(outside)}")
        source = _strip_fp32_casts(node_arg(norm, 0, "input"))
        shape, weight = node_arg(norm, 1, "normalized_shape"), node_arg(norm, 2, "weight")
        bias, eps = node_arg(norm, 3, "bias"), node_arg(norm, 4, "eps", 1e-5)
        x_value, source_value = fake_value(x), fake_value(source)
        if source_value is None or x_value is None:
            raise _NoMatch("no traced values for the norm's input or output")
        if not (isinstance(shape, (tuple, list)) and len(shape) == 1 and shape[0] == source_value.shape[-1]):
            raise _NoMatch(f"layer_norm over {shape}, not over the last dimension alone")
        if x_value.dtype != source_value.dtype:
            raise _NoMatch(f"the activation is rounded to {x_value.dtype}, the norm's input is {source_value.dtype} "
                           "(the op rounds to its input's dtype)")
        if not isinstance(eps, (int, float, fx.Node)):
            raise _NoMatch(f"the norm's eps is {eps!r}, neither a number nor a traced float")
        act_format = formats.pop()
        # A traced eps (torch.compile(dynamic=True) unspecializes float attributes) stays a graph value.
        args = (source, weight, bias, scale, shift, eps if isinstance(eps, fx.Node) else float(eps), act_format)
        try:
            check_layer_norm_modulate_quant_args(*(fake_value(a) for a in args[:5]), act_format)
        except ValueError as error:
            raise _NoMatch(str(error)) from None
        return args, chain
