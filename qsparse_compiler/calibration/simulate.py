"""Run a model eagerly as a plan says, in plain torch: for fidelity checks and ablations without compiling.

``plan_applied(model, plan)`` swaps, while active,
- each linear listed in ``plan.linears`` for ``qsparse::w4a8_linear`` on its calibrated tensors (or round-to-nearest
  weights when the plan has none), in the site's activation format, plus its timestep-aware LoRA if the plan has one
  (bucket from the model's ``timestep`` argument); ``qsparse::int4_weight_only_linear`` for one listed as
  ``WEIGHT_ONLY`` (a conditioning linear);
- each attention listed in ``plan.attentions`` for attention on its per-head pattern's tiles (the reference math of
  ``qsparse::sparse_attention``), video tiles only, text tiles dense — what the backend's passes emit.
The residual cache is not simulated (it needs a sampling loop; see runtime/).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .. import ops  # noqa: F401  registers qsparse::
from ..config import WEIGHT_ONLY
from ..ops.lora import apply_lora
from ..formats.quantization import quantize_weight_int4
from ..plan.schema import Plan, PlanError
from .fake_quant import swap_linears
from .hooks import AttentionInterceptor
from .lora import TimestepState, timestep_hook
from .pattern_attention import SparsePatternAttention

__all__ = ["PlanLinear", "plan_applied"]


class PlanLinear(torch.nn.Module):
    """A linear computed by ``qsparse::w4a8_linear`` (or ``qsparse::int4_weight_only_linear`` for ``WEIGHT_ONLY``)
    from packed int4 weights (the op the backend emits), plus the plan's timestep-aware LoRA when it has one."""

    def __init__(self, linear: torch.nn.Linear, qweight: torch.Tensor, scale: torch.Tensor, group_size: int,
                 act_format: str, lora: tuple[torch.Tensor, torch.Tensor, TimestepState] | None = None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight.to(linear.weight.device))
        self.register_buffer("scale", scale.to(linear.weight.device))
        self.bias = linear.bias
        self.group_size, self.act_format = group_size, act_format
        self.lora = None if lora is None else (lora[0].to(linear.weight.device), lora[1].to(linear.weight.device), lora[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_format == WEIGHT_ONLY:
            out = torch.ops.qsparse.int4_weight_only_linear(x, self.qweight, self.scale, self.bias, self.group_size)
        else:
            out = torch.ops.qsparse.w4a8_linear(x, self.qweight, self.scale, self.bias, self.group_size,
                                                self.act_format)
        if self.lora is not None:
            a, b, state = self.lora
            if state.buckets is None:
                raise RuntimeError(
                    "qsparse_compiler.calibration.simulate: the plan has timestep-aware LoRA but the model was called "
                    "without a timestep; call it with `timestep=`"
                )
            out = apply_lora(out, x, a, b, state.buckets)
        return out


@contextlib.contextmanager
def plan_applied(
    model: torch.nn.Module, plan: Plan, quantize: bool = True, sparsify: bool = True, lora: bool = True
) -> Iterator[None]:
    """Context manager: ``model`` computes as the compiled plan would (no residual cache). ``quantize`` /
    ``sparsify`` / ``lora`` False leave that part out (for ablations; ``lora`` matters only for plans with
    timestep-aware LoRA)."""
    modules = dict(model.named_modules())
    replacements: dict[str, torch.nn.Module] = {}
    lora_meta = plan.metadata.get("lora") if lora else None
    state = TimestepState(lora_meta["bucket_edges"]) if lora_meta else None
    if quantize:
        for fqn, entry in plan.linears.items():
            linear = modules.get(fqn)
            if not isinstance(linear, torch.nn.Linear):
                raise PlanError(
                    f"qsparse_compiler.calibration.simulate: the plan lists linear {fqn}, which this "
                    f"{type(model).__name__} does not have (or is not an nn.Linear); the plan belongs to another model"
                )
            packed = plan.packed_weight(fqn) or quantize_weight_int4(linear.weight, entry.group_size, entry.scale_dtype)
            pair = None
            if state is not None and f"{fqn}.lora_a" in plan.tensors:
                pair = (plan.tensors[f"{fqn}.lora_a"], plan.tensors[f"{fqn}.lora_b"], state)
            replacements[fqn] = PlanLinear(linear, packed.qweight, packed.scale, entry.group_size, entry.act_format, pair)
    attentions = plan.attentions if sparsify else {}
    tiles = {(e.block_q, e.block_kv) for e in attentions.values()}
    handlers = [
        SparsePatternAttention({f: e.pattern_spec for f, e in attentions.items() if (e.block_q, e.block_kv) == bq_bkv},
                               *bq_bkv, record=False, pool_blocks=1)
        for bq_bkv in sorted(tiles)
    ]

    def handler(call):
        for h in handlers:
            out = h(call)
            if out is not None:
                return out
        return None

    with contextlib.ExitStack() as stack:
        stack.enter_context(swap_linears(model, replacements))
        if state is not None and quantize:
            stack.callback(timestep_hook(model, state).remove)
        if handlers:
            stack.enter_context(AttentionInterceptor(model, handler))
        yield
