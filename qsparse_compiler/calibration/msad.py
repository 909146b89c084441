"""MSAD (multi-scale salient attention distillation), one transformer block at a time.

For block b (memory-bounded: only this block's inputs, for the selected samples, are held):
1. inputs: run the dense model on each sample until block b starts and keep the block's arguments (the forward is
   cut there). This costs about L/2 forwards per sample for L blocks and needs no knowledge of how an architecture
   threads its blocks (Wan, HunyuanVideo's dual + single stream lists, CogVideoX's joint blocks all work).
2. teacher: the dense block (the model's own dtype) on those inputs: its output, the attention each token
   receives, and for each of its video attentions its attention map on the tiles the student computes (softmax
   restricted to the searched pattern), average-pooled to at most ``global_pool_blocks`` blocks per side. (Against
   the dense map, the mass a pattern drops would be a constant offset no weight scale can move, drowning the other
   terms; on the kept tiles the term measures the attention shift that quantization causes.)
3. student: an fp32 copy of the block whose listed linears are ``FakeQuantLinear`` (W4 with trainable per-group
   scales initialised by round-to-nearest, A8 per-token in the site's format; a conditioning linear listed as
   ``WEIGHT_ONLY`` has W4 only) and whose video attentions use the
   searched sparse pattern (the reference math of the sparse op, computed query chunk by query chunk with
   activation checkpointing, so training never holds S x S probabilities).
4. loss = ||out_s - out_t||^2 / ||out_t||^2
        + lambda_global * ||pool(A_s) - pool(A_t|tiles)||^2 / ||pool(A_t|tiles)||^2              (global structure)
        + lambda_local  * sum_j w_j ||out_s[j] - out_t[j]||^2 / mean_j ||out_t[j]||^2              (salient tokens)
   where j runs over the top ``salient_token_fraction`` tokens by attention received in the teacher and w_j is that
   attention, normalised (S²Q's sparse token distillation). Adam on the log scales for ``msad_steps`` steps.
   With ``dfa`` (MSFP's denoising-factor loss alignment, dfa.py) each sample's loss is multiplied by its weight
   f(t)^2 (mean 1 over the samples), in training and in every evaluation that decides what is kept.
5. the learned scales (rounded to their storage dtype) and the codes they give are packed for the plan; if training
   did not lower the loss below round-to-nearest's, round-to-nearest is kept (and the result says so).
6. optional (``lora_rank`` > 0): timestep-aware LoRA (MSFP's TALoRA, lora.py) trained with the scales frozen
   against dense attention (output and salient-token terms; DFA-weighted with ``dfa``), kept if it lowers that loss:
   it corrects the quantization error, while the residual cache corrects the sparsity's. W4A8 linears only.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..config import WEIGHT_ONLY
from ..formats.quantization import PackedInt4Weight
from ..plan.schema import LinearPlan
from ..formats.patterns import TokenGrid
from .attention_maps import attention_received, pooled_attention_mass
from .config import CalibrationConfig, CalibrationError
from .dfa import dfa_weights
from .fake_quant import FakeQuantLinear
from ..ops.context import latent_grid
from .hooks import AttentionCall, AttentionInterceptor
from .lora import TimestepLoRA, TimestepState
from .pattern_attention import SparsePatternAttention, pool_block, row_counts
from .samples import run_model

__all__ = ["BlockResult", "capture_block_inputs", "distill_block", "msad_loss"]


@dataclass
class BlockResult:
    block: str
    loss_rtn: float
    loss_msad: float
    kept: str  # "msad" or "rtn"
    steps: int
    terms_rtn: dict[str, float]
    terms_msad: dict[str, float]
    loss_lora: float | None = None  # after the timestep-aware LoRA stage (None: not run)
    kept_lora: bool = False


class _StopForward(Exception):
    pass


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _to_float32(value: Any) -> Any:
    return _map_tensors(value, lambda t: t.to(torch.float32) if t.is_floating_point() else t)


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise CalibrationError(f"qsparse_compiler.calibration.msad: a block returned {type(output).__name__}, expected a tensor or a tuple starting with one")


@torch.no_grad()
def capture_block_inputs(
    model: torch.nn.Module, block: torch.nn.Module, samples: Sequence[Mapping[str, Any]], ids: Sequence[int]
) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) ``block`` is called with on each sample, from the dense model (forward cut at the block)."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        captured.append((_map_tensors(args, torch.Tensor.detach), _map_tensors(kwargs, torch.Tensor.detach)))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for index in ids:
            try:
                run_model(model, samples[index])
            except _StopForward:
                continue
            raise CalibrationError(
                "qsparse_compiler.calibration.msad: the model finished a forward without calling the block being "
                f"distilled (sample {index}); is it one of the model's transformer blocks?"
            )
    finally:
        handle.remove()
    return captured


@dataclass
class _Target:
    out: torch.Tensor
    maps: dict[str, torch.Tensor]
    weights: torch.Tensor | None  # [B, S_out] salient token weights (zero outside the top-k), or None


def _teacher_targets(
    block: torch.nn.Module, inputs: tuple[tuple, dict], grid: tuple[int, int, int], prefix: str,
    patterns: SparsePatternAttention, config: CalibrationConfig, model_for_grid: torch.nn.Module,
) -> _Target:
    """Dense output, the teacher's attention on the student's tiles (pooled), attention received per token.

    The global target is the teacher's softmax restricted to the tiles the student computes: the mass a pattern
    drops cannot be recovered by any weight scale, and against the dense map it would be a constant offset that
    drowns the other terms; on the kept tiles the term measures the attention shift that quantization causes.
    """
    maps: dict[str, torch.Tensor] = {}
    received: list[tuple[torch.Tensor, TokenGrid]] = []

    def observe(call: AttentionCall) -> None:
        if call.fqn not in patterns.specs:
            return None
        block_q = pool_block(call.q.shape[2], config.global_pool_blocks)
        block_kv = pool_block(call.k.shape[2], config.global_pool_blocks)
        mass = pooled_attention_mass(call.q, call.k, block_q, block_kv, call.scale, call.key_padding_mask,
                                     config.attention_chunk_elements, patterns.tile_mask(call.fqn, call.grid))
        maps[call.fqn] = mass / row_counts(call.q.shape[2], block_q, mass.device)
        got = attention_received(call.q, call.k, call.scale, call.key_padding_mask, config.attention_chunk_elements)
        received.append((got.mean(1), call.grid))  # [B, Skv], averaged over heads
        return None

    with torch.no_grad(), AttentionInterceptor(block, observe, prefix=prefix, grid=grid, model_for_grid=model_for_grid):
        out = _first_tensor(block(*inputs[0], **inputs[1])).to(torch.float32)
    return _Target(out, maps, _salient_weights(out, received, config.salient_token_fraction))


def _salient_weights(out: torch.Tensor, received: list[tuple[torch.Tensor, TokenGrid]], fraction: float) -> torch.Tensor | None:
    """Top tokens of the block output by attention received (video part of the attention), weights summing to 1."""
    if out.ndim != 3:
        return None
    total = None
    for got, grid in received:
        video = got[:, grid.video_start : grid.video_end]
        if video.shape[1] != out.shape[1]:
            continue  # the output's tokens are not the attention's video tokens (layout unknown): no local term
        total = video if total is None else total + video
    if total is None:
        return None
    keep = max(1, math.ceil(fraction * total.shape[1]))
    top = total.topk(keep, dim=1)
    weights = torch.zeros_like(total)
    weights.scatter_(1, top.indices, top.values.clamp_min(0))
    return weights / weights.sum(1, keepdim=True).clamp_min(1e-30)


def msad_loss(
    out_s: torch.Tensor, target: _Target, maps_s: Mapping[str, torch.Tensor], config: CalibrationConfig,
    weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The MSAD loss of one sample and its terms (see the module docstring); ``weight`` (DFA) scales the total, the
    terms are reported unweighted."""
    t = target.out
    output = (out_s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)
    total = output
    terms = {"output": float(output.detach())}
    if config.lambda_global and target.maps:
        parts = [(maps_s[f] - m).pow(2).sum() / m.pow(2).sum().clamp_min(1e-30) for f, m in target.maps.items() if f in maps_s]
        if parts:
            global_term = torch.stack(parts).mean()
            total = total + config.lambda_global * global_term
            terms["global"] = float(global_term.detach())
    if config.lambda_local and target.weights is not None:
        per_token = (out_s - t).pow(2).sum(-1)  # [B, S]
        scale = t.pow(2).sum(-1).mean(1, keepdim=True).clamp_min(1e-30)  # mean token energy per sample
        local = (target.weights * per_token / scale).sum(1).mean()
        total = total + config.lambda_local * local
        terms["local"] = float(local.detach())
    if weight != 1.0:
        total = total * weight
        terms["dfa_weight"] = weight
    terms["total"] = float(total.detach())
    return total, terms


def distill_block(
    model: torch.nn.Module,
    block_fqn: str,
    block: torch.nn.Module,
    samples: Sequence[Mapping[str, Any]],
    ids: Sequence[int],
    linears: Mapping[str, LinearPlan],
    attention_specs: Mapping[str, str],
    config: CalibrationConfig,
    block_q: int,
    block_kv: int,
) -> tuple[dict[str, PackedInt4Weight], dict[str, torch.Tensor], BlockResult]:
    """Distill one block; returns the packed weights of its listed linears (full FQNs), the timestep-aware LoRA
    tensors (``<fqn>.lora_a``/``.lora_b``, empty unless ``lora_rank`` > 0) and the losses."""
    prefix = block_fqn + "."
    local_linears = {fqn[len(prefix):]: plan for fqn, plan in linears.items() if fqn.startswith(prefix)}
    sites = [fqn for fqn in attention_specs if fqn.startswith(prefix)]
    inputs = capture_block_inputs(model, block, samples, ids)
    grids = [latent_grid(model, samples[i]["hidden_states"]) for i in ids]
    def pattern_attention(specs: Mapping[str, str], record: bool) -> SparsePatternAttention:
        return SparsePatternAttention(specs, block_q, block_kv, record=record, pool_blocks=config.global_pool_blocks,
                                      max_elements=config.attention_chunk_elements)

    attention = pattern_attention({f: attention_specs[f] for f in sites}, record=bool(config.lambda_global))
    targets = [
        _teacher_targets(block, inp, grid, block_fqn, attention, config, model) for inp, grid in zip(inputs, grids)
    ]
    for index, target in zip(ids, targets):
        if not bool(torch.isfinite(target.out).all()):
            raise CalibrationError(f"qsparse_compiler.calibration.msad: the dense output of {block_fqn} holds NaN/inf on sample {index}")

    student = copy.deepcopy(block).to(torch.float32)
    fake: dict[str, FakeQuantLinear] = {}
    for name, plan in local_linears.items():
        parent_name, _, child = name.rpartition(".")
        parent = student.get_submodule(parent_name) if parent_name else student
        fake[name] = FakeQuantLinear(getattr(parent, child), plan.group_size, plan.act_format, plan.scale_dtype)
        setattr(parent, child, fake[name])
    for p in student.parameters():
        p.requires_grad_(False)
    scales = [m.log_scale for m in fake.values()]
    for s in scales:
        s.requires_grad_(True)
    student_inputs = [_to_float32(inp) for inp in inputs]
    state = TimestepState(config.lora_bucket_edges)
    timesteps = [samples[i]["timestep"] for i in ids]
    weights = dfa_weights(timesteps, config.dfa_flow_shift) if config.dfa else [1.0] * len(ids)

    def run_student(j: int) -> tuple[torch.Tensor, dict[str, float]]:
        # ``attention``: the plan's patterns, rebound to dense attention for the LoRA stage below.
        attention.maps.clear()
        state.set(timesteps[j])  # the bucket of the timestep-aware LoRA (when attached)
        with AttentionInterceptor(student, attention, prefix=block_fqn, grid=grids[j], model_for_grid=model):
            out = _first_tensor(student(*student_inputs[j][0], **student_inputs[j][1])).to(torch.float32)
        loss, terms = msad_loss(out, targets[j], attention.maps, config, weights[j])
        if not math.isfinite(terms["total"]):
            raise CalibrationError(
                f"qsparse_compiler.calibration.msad: the distillation loss of {block_fqn} is {terms['total']} on sample "
                f"{ids[j]} (terms {terms}); lower msad_lr or check the block's activations"
            )
        return loss, terms

    def evaluate() -> tuple[float, dict[str, float]]:
        with torch.no_grad():
            all_terms = [run_student(j)[1] for j in range(len(ids))]
        mean = {k: sum(t.get(k, 0.0) for t in all_terms) / len(all_terms) for k in all_terms[0] if k != "dfa_weight"}
        return mean["total"], mean

    def train(params: list[torch.nn.Parameter], steps: int, lr: float, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(params, lr=lr)
        order: list[int] = []
        with torch.enable_grad():  # calibrate() may be called under no_grad
            for _ in range(steps):
                if not order:
                    order = torch.randperm(len(ids), generator=generator).tolist()
                optimizer.zero_grad(set_to_none=True)
                loss, _ = run_student(order.pop())
                loss.backward()
                optimizer.step()

    loss_rtn, terms_rtn = evaluate()
    initial = [s.detach().clone() for s in scales]
    steps = config.msad_steps if scales else 0
    if steps:
        train(scales, steps, config.msad_lr, config.seed)
    loss_msad, terms_msad = evaluate() if steps else (loss_rtn, terms_rtn)
    kept = "msad"
    if loss_msad > loss_rtn:
        # Training made it worse (too high a learning rate, too few samples): keep round-to-nearest.
        with torch.no_grad():
            for s, s0 in zip(scales, initial):
                s.copy_(s0)
        kept = "rtn"
    packed = {prefix + name: module.packed() for name, module in fake.items()}
    result = BlockResult(block_fqn, loss_rtn, loss_msad, kept, steps, terms_rtn, terms_msad)
    lora_tensors: dict[str, torch.Tensor] = {}
    # W4A8 linears only: the backend applies TALoRA to those (compiler/passes/apply_lora.py), not to int4 weight-only ones.
    lora_linears = {name: module for name, module in fake.items() if module.act_format != WEIGHT_ONLY}
    if config.lora_rank and lora_linears and config.lora_steps:
        # The LoRA is to correct the quantization error only, so it trains against dense attention: at inference
        # the residual cache (or a dense refresh) puts back what sparsity drops. Trained with the sparse student it
        # learned the sparse attention's error too, which the cache then corrected a second time (FIDELITY.md).
        # The global term compares maps on the plan's tiles, so it is left out here (no maps recorded).
        attention = pattern_attention({f: "dense" for f in sites}, record=False)
        loss_dense, _ = evaluate()
        lora_tensors = _train_lora(lora_linears, prefix, state, train, evaluate, loss_dense, result, config)
    return packed, lora_tensors, result


def _train_lora(fake, prefix, state, train, evaluate, loss_before, result: BlockResult, config) -> dict[str, torch.Tensor]:
    """Second stage: scales frozen, one LoRA pair per timestep bucket per linear, trained on the same loss. Kept only
    if it lowers the loss (evaluated with the bf16 values the plan stores)."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    for module in fake.values():
        module.log_scale.requires_grad_(False)
        out_features, in_features = module.weight.shape
        module.lora = TimestepLoRA(in_features, out_features, config.lora_rank, state, generator).to(module.weight.device)
    params = [p for module in fake.values() for p in module.lora.parameters()]
    train(params, config.lora_steps, config.lora_lr, config.seed + 1)
    with torch.no_grad():
        for p in params:
            p.copy_(p.to(torch.bfloat16).to(torch.float32))  # what the plan stores
    loss_lora, _ = evaluate()
    result.loss_lora = loss_lora
    result.kept_lora = loss_lora < loss_before
    tensors: dict[str, torch.Tensor] = {}
    for name, module in fake.items():
        if result.kept_lora:
            tensors[f"{prefix}{name}.lora_a"] = module.lora.a.detach().to(torch.bfloat16).contiguous()
            tensors[f"{prefix}{name}.lora_b"] = module.lora.b.detach().to(torch.bfloat16).contiguous()
        module.lora = None
    return tensors
