"""Rewrite block linears into ``qsparse::w4a8_linear``.

    pattern:      y = linear(x, W, b)                         W a parameter placeholder, x (..., tokens, K)
    replacement:  codes, s = quantize_activation_symmetric(x, act_format)      (plain torch ops: Inductor fuses
                  y = qsparse.w4a8_gemm(codes, s, Wq, Ws, b, G, x.dtype)         them into x's producer)
    or, with QuantConfig.act_quant_in_graph=False or act_format "uint8_msfp":
                  y = qsparse.w4a8_linear(x, Wq, Ws, b, G, act_format)
    and for a linear fed only by a tanh GELU (a DiT FFN's down-projection), x = gelu(h):
                  y = qsparse.w4a8_linear(h, Wq, Ws, b, G, act_format, "gelu_tanh")
                  (the quantization kernel applies the GELU as it loads h: on the H100 Inductor's fused
                  GELU + quantization of a 32,760 x 8,960 activation took 1.1 ms, our one-pass kernel ~0.45 ms)

    and for a conditioning linear (input (B, D): no token dimension, an adaptive norm's modulation) under
    ``QuantConfig.conditioning_linears="int4_weight_only"``, or any linear the plan lists with act_format
    ``config.WEIGHT_ONLY`` (calibrated conditioning linears):
                  y = qsparse.int4_weight_only_linear(x, Wq, Ws, b, G)   (the int4 weight dequantized to x.dtype,
                  then F.linear; x is not quantized)

``Wq``/``Ws`` (packed int4 codes and scales) become new graph inputs; the backend's runtime wrapper supplies them per
call from the packed-weight store (see runtime/weights.py for why they are not constants). Checks, each reported
when it fails: the linear is inside a transformer block (``QuantConfig.site_pattern``), its weight is a parameter,
its input has a token dimension (the conditioning/modulation linears of a block see one row per sample: sensitive,
and too small to matter for speed; they are kept, or weight-only int4 with ``conditioning_linears``), dtypes are
bf16/fp16/fp32, K divides into groups, no autograd is needed.
Each W4A8 linear is listed in ``ctx.analysis["quantized_linears"]`` (``QuantizedLinear``) for the passes after this
one (``apply_lora`` adds a plan's timestep-aware LoRA to the new output).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from ...config import WEIGHT_ONLY
from ...formats.quantization import effective_group_size, quantize_activation_symmetric
from .find_sites import LinearSite
from .graph_utils import fake_value, node_arg, placeholder_index, source_fqn
from .graph_inputs import PackedWeightSlot
from .pass_manager import PassContext, count_rewrite
from .rewrite_utils import autograd_reason, call_op, call_op_like

__all__ = ["QuantizeLinears", "QuantizedLinear"]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SYMMETRIC_ACT_FORMATS = ("fp8_e4m3", "int8")


_GELU_TARGETS = {torch._C._nn.gelu, torch.nn.functional.gelu}
_DROPOUT_TARGETS = {torch.nn.functional.dropout, torch.dropout}


def _is_conditioning(x: fx.Node) -> bool:
    """The linear's input has no token dimension: (B, D), one row per sample (an adaptive norm's modulation)."""
    return fake_value(x).ndim < 3


def _is_identity_dropout(node: fx.Node) -> bool:
    """diffusers' FeedForward puts an inference-time dropout (p=0 or training=False) between GELU and the linear."""
    if node.op != "call_function" or node.target not in _DROPOUT_TARGETS:
        return False
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return p == 0 or training is False


def _tanh_gelu_feeding(x: fx.Node, linear: fx.Node) -> list[fx.Node]:
    """[gelu, identity dropouts...] if the linear's input is gelu(h, approximate="tanh") (through inference-time
    dropouts) and nothing else uses those nodes: the GELU can then move into the linear's quantization. Else []."""
    chain = []
    node, user = x, linear
    while isinstance(node, fx.Node) and list(node.users) == [user]:
        chain.append(node)
        if _is_identity_dropout(node):
            node, user = node_arg(node, 0, "input"), node
            continue
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        if node.op == "call_function" and node.target in _GELU_TARGETS and approximate == "tanh":
            return chain[::-1]
        break
    return []


@dataclass(frozen=True)
class QuantizedLinear:
    """A linear this pass rewrote: the node that now computes its output, the node its quantization reads and the
    activation the op applies to that first ("gelu_tanh": the linear's own input was gelu(input), fused away)."""

    fqn: str
    output: fx.Node
    input: fx.Node
    activation: str
    param_index: int  # the weight parameter's position in the graph inputs


class QuantizeLinears:
    name = "quantize_linears"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        cfg = ctx.config.quant
        in_blocks = re.compile(cfg.site_pattern)
        positions = placeholder_index(gm)
        grad_reason = autograd_reason(ctx.example_inputs)
        quantized_params: dict[fx.Node, int] = {}
        rewritten: list[QuantizedLinear] = []
        rewrites = 0
        for site in ctx.analysis["linears"]:
            reason = self._check(site, ctx, in_blocks, grad_reason)
            if reason:
                ctx.report.add(site.fqn, "linear", "kept", reason)
                count_rewrite(ctx, "kept_linear")
                continue
            param = ctx.example_inputs[positions[site.weight]]
            group_size, act_format, scale_dtype = self._settings(site.fqn, ctx)
            source = "rtn"
            if ctx.plan is not None and site.fqn in ctx.plan.linears:
                calibrated = ctx.plan.packed_weight(site.fqn)
                if calibrated is not None:
                    source = ctx.config.plan
                    ctx.session.weights.seed(param, calibrated, scale_dtype, source, name=f"{site.fqn}.weight")
            packed = ctx.session.weights.get(param, group_size, scale_dtype, source)
            slot = PackedWeightSlot(positions[site.weight], site.fqn, group_size, scale_dtype, source)
            index = len(ctx.packed_weight_slots)
            qweight, scale = ctx.inputs.add(gm, slot, [(f"qsparse_qweight_{index}", packed.qweight),
                                                       (f"qsparse_wscale_{index}", packed.scale)])
            quantized_params[site.weight] = packed.nbytes
            n, k = packed.shape
            x, bias = node_arg(site.node, 0, "input"), node_arg(site.node, 2, "bias")
            if _is_conditioning(x) or act_format == WEIGHT_ONLY:
                call_op_like(gm, site.node, torch.ops.qsparse.int4_weight_only_linear.default,
                             (x, qweight, scale, bias, packed.group_size))
                ctx.report.add(site.fqn, "linear", "int4_weight_only", "", shape=f"{k}->{n}",
                               group=packed.group_size, weights=source)
                count_rewrite(ctx, "int4_weight_only")
                rewrites += 1
                continue
            gelu_chain = _tanh_gelu_feeding(x, site.node)
            activation = "gelu_tanh" if gelu_chain else "none"
            if gelu_chain:
                x = node_arg(gelu_chain[0], 0, "input")
                output = call_op_like(
                    gm, site.node, torch.ops.qsparse.w4a8_linear.default,
                    (x, qweight, scale, bias, group_size, act_format, activation),
                )
                for dead in reversed(gelu_chain):
                    gm.graph.erase_node(dead)
                count_rewrite(ctx, "gelu_into_act_quant")
            elif cfg.act_quant_in_graph and act_format in SYMMETRIC_ACT_FORMATS:
                quantized = call_op(gm, site.node, quantize_activation_symmetric, (x, act_format), site.node)
                codes = call_op(gm, site.node, operator.getitem, (quantized, 0), site.node)
                act_scale = call_op(gm, site.node, operator.getitem, (quantized, 1), site.node)
                output = call_op_like(
                    gm, site.node, torch.ops.qsparse.w4a8_gemm.default,
                    (codes, act_scale, qweight, scale, bias, group_size, fake_value(x).dtype),
                )
                count_rewrite(ctx, "act_quant_in_graph")
            else:
                output = call_op_like(
                    gm, site.node, torch.ops.qsparse.w4a8_linear.default,
                    (x, qweight, scale, bias, group_size, act_format),
                )
            rewritten.append(QuantizedLinear(site.fqn, output, x, activation, positions[site.weight]))
            ctx.report.add(site.fqn, "linear", "w4a8_linear", "", shape=f"{k}->{n}",
                           group=packed.group_size, act=act_format)
            count_rewrite(ctx, "w4a8_linear")
            rewrites += 1
        ctx.analysis["quantized_linears"] = rewritten
        self._account_weight_bytes(gm, ctx, in_blocks, quantized_params)
        return rewrites

    @staticmethod
    def _settings(fqn: str, ctx: PassContext) -> tuple[int, str, str]:
        """(group_size, act_format, scale_dtype) of a linear: the plan's entry if it lists the linear, else the
        config's (a conditioning linear under ``conditioning_linears="int4_weight_only"`` that the plan leaves out:
        calibration lists those only when calibrated with the same setting)."""
        entry = ctx.plan.linears.get(fqn) if ctx.plan is not None else None
        cfg = ctx.config.quant
        if entry is None:
            return cfg.group_size, cfg.act_format, cfg.scale_dtype
        return entry.group_size, entry.act_format, entry.scale_dtype

    @staticmethod
    def _check(site: LinearSite, ctx: PassContext, in_blocks: re.Pattern, grad_reason: str) -> str:
        cfg = ctx.config.quant
        if not cfg.enabled:
            return "quantization disabled (quant.enabled=False)"
        if not in_blocks.search(site.fqn):
            return "outside the transformer blocks (QuantConfig.site_pattern)"
        if site.weight is None:
            return "weight is computed in the graph, not a parameter"
        x = node_arg(site.node, 0, "input")
        conditioning = _is_conditioning(x)
        listed = ctx.plan is not None and site.fqn in ctx.plan.linears  # the plan decides for the sites it lists
        if conditioning and cfg.conditioning_linears == "keep" and not listed:
            return (f"conditioning linear (input {tuple(fake_value(x).shape)} has no token dimension): kept in its "
                    "dtype (quant.conditioning_linears='int4_weight_only' stores its weight as int4)")
        if ctx.plan is not None and not listed and not conditioning:
            return "the plan keeps this linear in its dtype"
        if grad_reason:
            return grad_reason
        x, weight = fake_value(x), fake_value(site.weight)
        if weight is None or weight.ndim != 2:
            return "weight is not a 2-D (out_features, in_features) tensor"
        if x.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
            return f"dtype {x.dtype}/{weight.dtype} not supported (bf16, fp16, fp32)"
        k = weight.shape[1]
        group_size = QuantizeLinears._settings(site.fqn, ctx)[0]
        group = effective_group_size(k, group_size)
        if k % 2:
            return f"in_features={k} is odd: int4 weights pack two input features per byte (kept in its dtype)"
        if k % group:
            return f"in_features={k} is not a multiple of group_size={group_size} (use a divisor of K or 0)"
        return ""

    @staticmethod
    def _account_weight_bytes(gm, ctx: PassContext, in_blocks: re.Pattern, quantized: dict[fx.Node, int]) -> None:
        """Bytes of every parameter inside the blocks, as bf16 and as stored by qsparse. Only parameters: a regional
        graph's activations (hidden_states, temb, ...) are inputs named inside the block too, with symbolic sizes once
        the batch or the grid is dynamic."""
        bf16 = ours = 0
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and not n.meta.get("qsparse_extra")]
        for node, example in zip(placeholders, ctx.example_inputs):
            if not isinstance(example, torch.nn.Parameter):
                continue
            fqn, value = source_fqn(node), fake_value(node)
            if not fqn or not isinstance(value, torch.Tensor) or not value.is_floating_point():
                continue
            fqn = ctx.analysis.get("prefix", "") + fqn
            if not in_blocks.search(fqn):
                continue
            as_bf16 = value.numel() * 2
            bf16 += as_bf16
            ours += quantized.get(node, as_bf16)
        if bf16:
            ctx.report.weight_bytes = {"bf16": bf16, "qsparse": ours}
