"""Add a plan's timestep-aware LoRA (MSFP's TALoRA, calibration/lora.py) to the quantized linears.

    pattern:      y = qsparse.w4a8_gemm(...) / qsparse.w4a8_linear(x, ...)   a linear quantize_linears rewrote, with
                                                                           <fqn>.lora_a / <fqn>.lora_b in the plan
    replacement:  buckets = ops.lora.bucket_index(t, edges)               once per graph (t: the timestep input)
                  y' = ops.lora.apply_lora(y, x, A, B, buckets)          y + (x @ A[bucket]^T) @ B[bucket]^T, in fp32
                  uses of y -> y'
    (for a down-projection whose GELU is fused into its quantization, x = gelu(h) is recomputed for the correction;
    Inductor fuses it into the correction's fp32 cast)

``bucket_index`` and ``apply_lora`` are the functions calibration trained with (ops/lora.py), traced by Inductor into
plain ops: bucket = number of edges <= t per sample (torch.bucketize against the edges, a graph constant), then a
per-sample gather of A and B. The timestep's value is never read on the host nor guarded on, so nothing syncs and
nothing recompiles from one denoising step to the next (the graph is also CUDA-graph safe). The timestep is:
- a whole-model graph: the model's own ``timestep`` input (diffusers: a tensor [B], or [B, tokens] for Wan 2.2:
  the per-sample mean, as in calibration);
- a regional graph (qs.optimize: one block compiled on its own, which sees only the timestep's embedding): a new graph
  input, the running forward's per-sample timesteps [B] (float32), recorded by qs.optimize's forward hook
  (ops/context.py) and appended by the backend's runtime wrapper on every call.
A and B are per-call inputs like the packed weights (``LoraSlot``; runtime/weights.py ``lora_store``): each call of a
regional graph brings its own block's tensors. Calibration keeps a block's LoRA only where it lowered that block's
loss, so some blocks of a family may have none: the graph applies LoRA to a site if any block of its family has it,
and the others get zeros (their correction is exactly 0), so one graph still serves every block.

Fallbacks are reported, never silent: when a plan has LoRA but the graph has no tensor timestep (a Python-number
timestep, which Dynamo turns into a constant or a guarded int; a model whose forward takes none), or the timestep's
batch does not match the linear's, the linear stays quantized without its LoRA - the plan's int4 scales were distilled
before LoRA was trained (with the scales frozen), so they stand on their own - and its report row, a note and a
warning say why.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
import torch.fx as fx

from ...ops.context import current_timesteps
from ...ops.lora import apply_lora, bucket_index
from ...plan.regional import block_family
from .graph_utils import fake_value, same_size, source_fqn
from .graph_inputs import LoraSlot, TimestepSlot
from .pass_manager import PassContext, count_rewrite
from .quantize_linears import QuantizedLinear
from .rewrite_utils import call_op, graph_fake_mode

__all__ = ["ApplyLoRA"]


class ApplyLoRA:
    name = "apply_lora"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        plan = ctx.plan
        edges = plan.lora_edges if plan is not None else None
        if edges is None:
            return 0
        sites = [(q, lora) for q in ctx.analysis["quantized_linears"]
                 if (lora := self._example(gm, ctx, q)) is not None]
        if not sites:
            ctx.report.notes.append(
                "timestep-aware LoRA: the plan has some, but for none of this graph's quantized linears")
            return 0
        timestep, missing = self._timestep(gm, ctx, fake_value(sites[0][0].input).shape[0])
        buckets = None
        if timestep is not None:
            first = next(n for n in gm.graph.nodes if n.op != "placeholder")
            buckets = call_op(gm, first, bucket_index, (timestep, edges), timestep)
        rows = {(s.fqn, s.kind): s for s in ctx.report.sites}
        fallbacks: dict[str, str] = {}
        # A linear's input may be another corrected linear's output (an FFN's down-projection reads the
        # up-projection through the fused GELU): read it through the corrections made so far (graph order).
        corrected_outputs: dict[fx.Node, fx.Node] = {}
        for q, (a_example, b_example, own) in sites:
            row = rows[(q.fqn, "linear")]
            reason = missing or self._batch_mismatch(timestep, q)
            if reason:
                row.reason = f"timestep-aware LoRA not applied: {reason}"
                fallbacks[q.fqn] = reason
                count_rewrite(ctx, "lora_fallback")
                continue
            index = len(ctx.lora_slots)
            slot = LoraSlot(q.param_index, q.fqn, tuple(a_example.shape), tuple(b_example.shape), a_example.dtype,
                            ctx.config.plan)
            a, b = ctx.inputs.add(gm, slot, [(f"qsparse_lora_a_{index}", a_example),
                                             (f"qsparse_lora_b_{index}", b_example)])
            x = corrected_outputs.get(q.input, q.input)
            if q.activation == "gelu_tanh":
                x = call_op(gm, q.output, torch.nn.functional.gelu, (x,), q.output, {"approximate": "tanh"})
            corrected = call_op(gm, q.output.next, apply_lora, (q.output, x, a, b, buckets), q.output)
            q.output.replace_all_uses_with(corrected, delete_user_cb=lambda user: user is not corrected)
            corrected_outputs[q.output] = corrected
            row.details["lora"] = f"rank {a_example.shape[1]} x {a_example.shape[0]} buckets" + (
                "" if own else " (none for this block: zeros; other blocks of the family have one)")
            count_rewrite(ctx, "lora_linear")
        applied = len(sites) - len(fallbacks)
        source = ("the forward's per-sample timesteps (regional graph)" if ctx.timestep_input
                  else f"graph input {source_fqn(timestep)!r}" if timestep is not None else "")
        note = (f"timestep-aware LoRA: {applied} of {len(sites)} quantized linears with LoRA in the plan "
                f"(rank {plan.metadata['lora'].get('rank')}, {len(edges) + 1} buckets, edges {list(edges)})")
        if applied:
            note += f", timestep from {source}"
        if fallbacks:
            reasons = sorted(set(fallbacks.values()))
            note += f"; {len(fallbacks)} kept without LoRA: {'; '.join(reasons)}"
            warnings.warn(f"qsparse_compiler: {len(fallbacks)} linear(s) run without the plan's timestep-aware LoRA: "
                          f"{'; '.join(reasons)}", stacklevel=2)
        ctx.report.notes.append(note)
        return applied

    @staticmethod
    def _example(gm: fx.GraphModule, ctx: PassContext,
                 q: QuantizedLinear) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
        """Fake (A, B) on the weight's device shaped like the plan's LoRA of this site, and whether this very block
        has one; None when no block this graph serves has LoRA there."""
        plan, prefix = ctx.plan, ctx.analysis.get("prefix", "")
        pair, own = plan.lora(q.fqn), True
        if pair is None and prefix:
            family, relative = block_family(prefix), q.fqn[len(prefix):]
            others = (plan.lora(fqn) for fqn in plan.linears
                      if (match := family.match(fqn)) is not None and fqn[match.end():] == relative)
            pair, own = next((p for p in others if p is not None), None), False
        if pair is None:
            return None
        device = ctx.example_inputs[q.param_index].device
        with graph_fake_mode(gm):
            return (torch.empty(pair[0].shape, dtype=pair[0].dtype, device=device),
                    torch.empty(pair[1].shape, dtype=pair[0].dtype, device=device), own)

    @staticmethod
    def _timestep(gm: fx.GraphModule, ctx: PassContext, batch: Any) -> tuple[fx.Node | None, str]:
        """The graph's timestep (a tensor node) or None and why there is none."""
        if ctx.analysis.get("prefix"):
            current = current_timesteps()
            if current is None:
                return None, ("a regional graph takes the timestep from the transformer's forward, and this one has "
                              "none: call the transformer with timestep=..., through qs.optimize")
            with graph_fake_mode(gm):
                example = torch.empty((batch,), dtype=torch.float32, device=current.device)
            (node,) = ctx.inputs.add(gm, TimestepSlot(), [("qsparse_timesteps", example)])
            return node, ""
        node = _timestep_input(gm)
        if node is None:
            return None, ("no `timestep` tensor input in this graph (a Python-number timestep is a constant to Dynamo, "
                          "or the model's forward takes none): pass timestep as a tensor")
        value = fake_value(node)
        if not isinstance(value, torch.Tensor):
            return None, (f"the model's timestep is a {type(value).__name__}, not a tensor (Dynamo guards on a Python "
                          "number's value): pass timestep as a tensor")
        return node, ""

    @staticmethod
    def _batch_mismatch(timestep: fx.Node, q: QuantizedLinear) -> str:
        t, x = fake_value(timestep), fake_value(q.input)
        samples = 1 if t.ndim == 0 else t.shape[0]
        if same_size(samples, 1) or same_size(samples, x.shape[0]):
            return ""
        return f"{samples} timesteps for an input of batch {x.shape[0]} (shape {tuple(x.shape)})"


# How Dynamo names the model's ``timestep`` argument: by name when the compiled frame is the forward itself, under
# kwargs when it came by keyword through a wrapper (nn.Module.__call__, diffusers' decorators), and only by position
# (args.1) when it came positionally through such a wrapper - then it is recognised by where it goes: straight into
# diffusers' sinusoidal ``Timesteps`` projection (every diffusers video DiT embeds its timestep that way). HunyuanVideo
# embeds its ``guidance`` the same way; diffusers' signatures put ``timestep`` first, so the lowest position wins.
_TIMESTEP_NAMES = ("timestep", "kwargs.timestep")
_TIMESTEP_EMBEDDING = "Timesteps"


def _timestep_input(gm: fx.GraphModule) -> fx.Node | None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    named = [n for n in placeholders if source_fqn(n) in _TIMESTEP_NAMES]
    if named:
        return named[0]
    positional = [n for n in placeholders
                  if re.fullmatch(r"args\.\d+", source_fqn(n) or "") and _feeds_timestep_embedding(n)]
    return min(positional, key=lambda n: int(source_fqn(n).split(".")[1]), default=None)


def _feeds_timestep_embedding(node: fx.Node, depth: int = 2) -> bool:
    for user in node.users:
        stack = user.meta.get("nn_module_stack") or {}
        if any(getattr(kind, "__name__", None) == _TIMESTEP_EMBEDDING for _, kind in stack.values()):
            return True
        if depth > 1 and _feeds_timestep_embedding(user, depth - 1):
            return True
    return False
