"""Salient data selection (S²Q-VDiT): keep the calibration samples where the model is most sensitive.

For a candidate sample (latents x at timestep t), with f the dense model and f_q the round-to-nearest W4A8 model:

    diffusion term     d = ||f(x, t) - f(x, t - dt)|| / ||f(x, t)||      how much the prediction moves at this step
    quantization term  q = ||f_q(x, t) - f(x, t)||^2 / ||f(x, t)||^2     the output error W4A8 causes on this sample
    score              d * q

(S²Q's Hessian proxy weighs the quantization error by the loss curvature; the output error of RTN W4A8 on the
sample is the measurable stand-in used here: it is the squared first-order error the distillation has to remove.)
``uniform`` selection (evenly spaced over the candidates sorted by timestep) is the baseline; ``selection_report``
gives both, with the scores, for the plan's metadata.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch

from ..formats.quantization import dequantize_weight_int4, effective_group_size, quantize_weight_int4
from .config import CalibrationConfig, CalibrationError
from .fake_quant import fake_quant_activation, swap_linears
from .hooks import block_linear_names
from .progress import track
from .samples import run_model, timestep_of

__all__ = ["SampleScore", "score_samples", "select_samples", "selection_report", "RTNLinear"]


@dataclass
class SampleScore:
    index: int
    timestep: float
    diffusion: float
    quantization: float
    score: float


class RTNLinear(torch.nn.Module):
    """Round-to-nearest W4A8 of a linear, quantized on each call: no second copy of the model's weights is held. A
    call without a token dimension (a conditioning linear) is computed as the plan will have it: as is under
    ``conditioning_linears="keep"``, int4 weights with the activation unquantized under "int4_weight_only"."""

    def __init__(self, linear: torch.nn.Linear, group_size: int, act_format: str, scale_dtype: str,
                 conditioning_linears: str) -> None:
        super().__init__()
        self.linear = linear
        self.group_size, self.act_format, self.scale_dtype = group_size, act_format, scale_dtype
        self.conditioning_linears = conditioning_linears

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conditioning = x.ndim < 3  # statistics.py's criterion (LinearStats.has_tokens)
        if conditioning and self.conditioning_linears == "keep":
            return self.linear(x)
        packed = quantize_weight_int4(self.linear.weight, self.group_size, self.scale_dtype)
        weight = dequantize_weight_int4(packed.qweight, packed.scale, self.group_size)
        bias = None if self.linear.bias is None else self.linear.bias.to(torch.float32)
        x_used = x.to(torch.float32) if conditioning else fake_quant_activation(x, self.act_format)
        return torch.nn.functional.linear(x_used, weight, bias).to(x.dtype)


def _rtn_replacements(model: torch.nn.Module, config: CalibrationConfig) -> dict[str, torch.nn.Module]:
    modules = dict(model.named_modules())
    out = {}
    for fqn in block_linear_names(model, config.site_pattern):
        linear = modules[fqn]
        k = linear.in_features
        group = config.group_size if k % effective_group_size(k, config.group_size) == 0 else 0
        out[fqn] = RTNLinear(linear, group, config.act_format, config.scale_dtype, config.conditioning_linears)
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@torch.no_grad()
def score_samples(model: torch.nn.Module, samples: Sequence[Mapping[str, Any]], config: CalibrationConfig) -> list[SampleScore]:
    replacements = _rtn_replacements(model, config)
    scores = []
    for index in track(range(len(samples)), "salient scores", config.progress):
        sample = samples[index]
        t = sample["timestep"]
        earlier = (t - config.salient_dt).clamp_min(0) if isinstance(t, torch.Tensor) else max(0.0, t - config.salient_dt)
        dense = run_model(model, sample)
        moved = run_model(model, sample, timestep=earlier)
        with swap_linears(model, replacements):
            quantized = run_model(model, sample)
        diffusion, quant = _relative(moved, dense), _relative(quantized, dense) ** 2
        if not (math.isfinite(diffusion) and math.isfinite(quant)):
            raise CalibrationError(
                f"qsparse_compiler.calibration: the salient score of sample {index} is not finite (diffusion term "
                f"{diffusion}, quantization term {quant}); the model output overflows on it"
            )
        scores.append(SampleScore(index, timestep_of(sample), diffusion, quant, diffusion * quant))
    return scores


def select_samples(scores: Sequence[SampleScore], count: int, method: str) -> list[int]:
    """Indices of the kept samples, ascending. ``count`` 0 or >= len keeps all."""
    if count <= 0 or count >= len(scores) or method == "all":
        return sorted(s.index for s in scores)
    if method == "salient":
        ranked = sorted(scores, key=lambda s: (-s.score, s.index))
        return sorted(s.index for s in ranked[:count])
    if method == "uniform":
        by_time = sorted(scores, key=lambda s: (s.timestep, s.index))
        picks = {round(i * (len(by_time) - 1) / max(count - 1, 1)) for i in range(count)} if count > 1 else {len(by_time) // 2}
        return sorted(by_time[i].index for i in picks)
    raise CalibrationError(f"qsparse_compiler.calibration: unknown selection {method!r}; use 'salient', 'uniform' or 'all'")


def selection_report(scores: Sequence[SampleScore], count: int) -> dict[str, Any]:
    """Both selections side by side, and how much salience each keeps (share of the total score)."""
    total = sum(s.score for s in scores) or 1.0
    report: dict[str, Any] = {"scores": [asdict(s) for s in scores], "count": count}
    for method in ("salient", "uniform"):
        picked = select_samples(scores, count, method)
        report[method] = {"indices": picked, "score_share": sum(scores[i].score for i in _positions(scores, picked)) / total}
    return report


def _positions(scores: Sequence[SampleScore], indices: Sequence[int]) -> list[int]:
    where = {s.index: pos for pos, s in enumerate(scores)}
    return [where[i] for i in indices]
