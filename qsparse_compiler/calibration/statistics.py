"""Statistics of the dense model on the calibration samples: what the search and the quantizer decide from.

- per video attention site (module FQN, e.g. ``blocks.0.attn1``) and video grid it ran on: the block-pooled
  attention mass [H, QB, KVB], summed over samples and batch (attention_maps.pooled_attention_mass, chunk-wise);
- per block linear (``named_modules()`` FQN): per-token amax (mean and max over tokens), min, max, the fraction of
  non-negative input values (MSFP's criterion) and whether the input has a token dimension (conditioning linears
  with one row per sample stay in their dtype, as in the quantize pass).

Any non-finite activation stops calibration with an error naming the module and the sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..formats.patterns import TokenGrid
from .attention_maps import pooled_attention_mass
from .config import CalibrationConfig, CalibrationError
from .hooks import AttentionCall, AttentionInterceptor, block_linear_names
from .progress import track
from .samples import run_model

__all__ = ["LinearStats", "AttentionStats", "CalibrationStats", "collect_statistics"]


@dataclass
class LinearStats:
    in_features: int
    out_features: int
    has_tokens: bool = False
    tokens: int = 0
    values: int = 0
    nonneg: int = 0
    amax_sum: float = 0.0
    amax_max: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")

    @property
    def nonneg_fraction(self) -> float:
        return self.nonneg / max(self.values, 1)

    @property
    def amax_mean(self) -> float:
        return self.amax_sum / max(self.tokens, 1)

    def update(self, x: torch.Tensor) -> None:
        xf = x.detach().to(torch.float32)
        rows = xf.reshape(-1, xf.shape[-1])
        amax = rows.abs().amax(dim=-1)
        self.has_tokens = self.has_tokens or x.ndim >= 3
        self.tokens += rows.shape[0]
        self.values += rows.numel()
        self.nonneg += int((rows >= 0).sum())
        self.amax_sum += float(amax.sum())
        self.amax_max = max(self.amax_max, float(amax.max()))
        self.min = min(self.min, float(rows.min()))
        self.max = max(self.max, float(rows.max()))


@dataclass
class AttentionStats:
    grid: TokenGrid
    heads: int
    head_dim: int
    mass: torch.Tensor  # [H, QB, KVB] float64, summed over samples and batch
    calls: int = 0


@dataclass
class CalibrationStats:
    block_q: int
    block_kv: int
    linears: dict[str, LinearStats] = field(default_factory=dict)
    attentions: dict[str, list[AttentionStats]] = field(default_factory=dict)  # one entry per video grid seen

    # -- checkpoint record (json + tensors; see checkpoint.py) -------------------------------------------------------
    def to_record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {
            f"{fqn}.mass.{i}": s.mass.contiguous() for fqn, entries in self.attentions.items() for i, s in enumerate(entries)
        }
        data = {
            "block_q": self.block_q,
            "block_kv": self.block_kv,
            "linears": {fqn: _finite_json(asdict(s)) for fqn, s in self.linears.items()},
            "attentions": {
                fqn: [{"grid": asdict(s.grid), "heads": s.heads, "head_dim": s.head_dim, "calls": s.calls} for s in entries]
                for fqn, entries in self.attentions.items()
            },
        }
        return data, tensors

    @classmethod
    def from_record(cls, data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> "CalibrationStats":
        stats = cls(data["block_q"], data["block_kv"])
        for fqn, entry in data["linears"].items():
            stats.linears[fqn] = LinearStats(**{k: (float(v) if v in ("inf", "-inf") else v) for k, v in entry.items()})
        for fqn, entries in data["attentions"].items():
            stats.attentions[fqn] = [
                AttentionStats(TokenGrid(**e["grid"]), e["heads"], e["head_dim"], tensors[f"{fqn}.mass.{i}"], e["calls"])
                for i, e in enumerate(entries)
            ]
        return stats


def _finite_json(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, float) and v in (float("inf"), float("-inf")) else v) for k, v in entry.items()}


def _check_finite(what: str, fqn: str, sample: int, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CalibrationError(
            f"qsparse_compiler.calibration: {what} of {fqn} {tuple(tensor.shape)} holds {bad} NaN/inf value(s) on "
            f"sample {sample}; the dense model overflows there (try float32/bfloat16 instead of float16, or drop that "
            "sample)"
        )


@torch.no_grad()
def collect_statistics(
    model: torch.nn.Module,
    samples: Sequence[Mapping[str, Any]],
    config: CalibrationConfig,
    sample_ids: Sequence[int] | None = None,
) -> CalibrationStats:
    """Run the dense model on ``samples`` with hooks; see the module docstring for what is collected."""
    stats = CalibrationStats(config.block_q, config.block_kv)
    ids = list(sample_ids) if sample_ids is not None else list(range(len(samples)))
    current = {"sample": -1}
    modules = dict(model.named_modules())
    handles = []

    def linear_hook(fqn: str):
        def hook(_module, args):
            x = args[0]
            _check_finite("the input", fqn, current["sample"], x)
            stats.linears[fqn].update(x)

        return hook

    for fqn in block_linear_names(model, config.site_pattern):
        linear = modules[fqn]
        stats.linears[fqn] = LinearStats(linear.in_features, linear.out_features)
        handles.append(linear.register_forward_pre_hook(linear_hook(fqn)))

    def on_attention(call: AttentionCall) -> None:
        for name, tensor in (("q", call.q), ("k", call.k), ("v", call.v)):
            _check_finite(f"attention {name}", call.fqn, current["sample"], tensor)
        mass = pooled_attention_mass(
            call.q, call.k, config.block_q, config.block_kv, call.scale, call.key_padding_mask,
            config.attention_chunk_elements,
        ).sum(0).to("cpu", torch.float64)  # small ([H, QB, KVB]); the search reads it on the host
        entries = stats.attentions.setdefault(call.fqn, [])
        entry = next((e for e in entries if e.grid == call.grid), None)
        if entry is None:  # a new video size: its own map (tile grids of different sizes do not add up)
            entry = AttentionStats(call.grid, call.q.shape[1], call.q.shape[3], torch.zeros_like(mass))
            entries.append(entry)
        entry.mass += mass
        entry.calls += 1
        return None

    try:
        with AttentionInterceptor(model, on_attention):
            for index in track(ids, "statistics", config.progress):
                current["sample"] = index
                out = run_model(model, samples[index])
                _check_finite("the output", type(model).__name__, index, out)
    finally:
        for handle in handles:
            handle.remove()
    return stats
