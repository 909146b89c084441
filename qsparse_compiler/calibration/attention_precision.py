"""Per-site attention precision: how much each attention layer loses to 8-bit attention, and what the plan says.

Measurement (calibration stage ``attention_precision``): the dense model runs on the selected calibration samples;
at every video attention the interceptor (hooks.py) hands over q, k, v, and both

    bf16      SDPA in the model's dtype (what ``attention_precision="bf16"`` computes)
    int8_fp8  the 8-bit recipe's plain-torch reference (ops/attention_quantization.py: the math of the CUDA kernels)

run dense on the same inputs, query chunk by query chunk (chunks of whole ``QUANT_BLOCK`` tiles, so Q's per-tile
scales are those of the whole sequence; K's smoothing and V's per-channel scales always see every key), so S x S
is never held at once. Per site and timestep range the stage sums ||bf16||^2 and ||int8_fp8 - bf16||^2 over every
element of every call; SQNR = 10 log10 of their ratio. The model goes on with the bf16 output: each layer sees the
dense model's inputs, so a layer's number is its own error, not the accumulation of earlier layers'.

Timestep ranges: thirds of the diffusion timestep axis [0, 1000] (``RANGE_EDGES``; a sample's range is the number
of edges <= its timestep, as calibration.lora's buckets), so a layer that is only sensitive at the noisy start or
the clean end of sampling shows it.

Decision (``precision_decisions``): a site gets "int8_fp8" when its *worst* range (of those the samples cover) is
at least ``CalibrationConfig.attention_int8_min_sqnr_db``, else "bf16". Per site, not per (site, range): the
precision is a compile-time argument of ``qsparse::sparse_attention`` (a string baked into the graph), and switching
it per step would need a host-side flag per call (as the residual cache's refresh flag) and both kernels behind
every site - not built. The per-range numbers stay in the plan's metadata, so a range-aware runtime can use them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from ..ops.attention_quantization import QUANT_BLOCK, attention_int8_fp8_reference
from .attention_maps import query_chunk_rows
from .config import CalibrationError
from .hooks import AttentionCall, AttentionInterceptor
from .progress import track
from .samples import run_model, timestep_of

__all__ = ["RANGE_EDGES", "range_names", "measure_attention_sqnr", "precision_decisions"]

RANGE_EDGES = (1000.0 / 3.0, 2000.0 / 3.0)
_NOISE_FLOOR = 1e-30  # an error of exactly 0 (never seen in practice) reads as ~300 dB above the signal, not inf


def range_names() -> list[str]:
    bounds = (0.0, *RANGE_EDGES, 1000.0)
    return [f"t {lo:.0f}-{hi:.0f}" for lo, hi in zip(bounds[:-1], bounds[1:])]


def _range_index(timestep: float) -> int:
    return sum(edge <= timestep for edge in RANGE_EDGES)


def _sqnr_db(signal: float, noise: float) -> float:
    return round(10.0 * math.log10(max(signal, _NOISE_FLOOR) / max(noise, _NOISE_FLOOR)), 3)


def _compare(call: AttentionCall, max_elements: int) -> tuple[torch.Tensor, float, float]:
    """(the bf16 output, sum of its squares, sum of squared int8_fp8 - bf16 differences) of one attention call."""
    batch, heads, q_len, _ = call.q.shape
    rows = query_chunk_rows(batch * heads, call.k.shape[2], QUANT_BLOCK, max_elements)
    outs, signal, noise = [], 0.0, 0.0
    for start in range(0, q_len, rows):
        q = call.q[:, :, start:start + rows]
        dense = AttentionCall(call.fqn, q, call.k, call.v, call.key_padding_mask, call.scale, call.grid).dense()
        eight_bit, _ = attention_int8_fp8_reference(q, call.k, call.v, call.scale,
                                                    key_padding_mask=call.key_padding_mask, quant_block=QUANT_BLOCK)
        reference = dense.to(torch.float64)
        signal += float(reference.square().sum())
        noise += float((eight_bit.to(torch.float64) - reference).square().sum())
        outs.append(dense)
    return torch.cat(outs, dim=2), signal, noise


@torch.no_grad()
def measure_attention_sqnr(
    model: torch.nn.Module,
    samples: Sequence[Mapping[str, Any]],
    sample_ids: Sequence[int],
    max_elements: int,
    progress: bool = False,
) -> dict[str, Any]:
    """SQNR (dB) of int8_fp8 vs bf16 attention per video attention site, overall and per timestep range.

    Returns {"ranges": [names], "recipe": {...}, "sites": {fqn: {"sqnr_db": overall, "range_sqnr_db": [dB or None
    per range], "calls": [calls per range]}}}; a range no sample falls in has None."""
    sums: dict[str, list[list[float]]] = {}  # fqn -> per range [signal, noise, calls]
    current = {"range": 0, "sample": -1}

    def on_attention(call: AttentionCall) -> torch.Tensor:
        out, signal, noise = _compare(call, max_elements)
        if not (math.isfinite(signal) and math.isfinite(noise)):
            raise CalibrationError(
                f"qsparse_compiler.calibration: attention_precision: {call.fqn} on sample {current['sample']} gives a "
                f"non-finite output (||bf16||^2 = {signal}, ||int8_fp8 - bf16||^2 = {noise}); the dense model "
                "overflows there (try float32/bfloat16 instead of float16, or drop that sample)"
            )
        per_range = sums.setdefault(call.fqn, [[0.0, 0.0, 0] for _ in range(len(RANGE_EDGES) + 1)])
        entry = per_range[current["range"]]
        entry[0] += signal
        entry[1] += noise
        entry[2] += 1
        return out

    with AttentionInterceptor(model, on_attention):
        for index in track(list(sample_ids), "attention precision", progress):
            current["range"], current["sample"] = _range_index(timestep_of(samples[index])), index
            run_model(model, samples[index])
    sites = {}
    for fqn, per_range in sums.items():
        signal, noise = sum(r[0] for r in per_range), sum(r[1] for r in per_range)
        sites[fqn] = {
            "sqnr_db": _sqnr_db(signal, noise),
            "range_sqnr_db": [_sqnr_db(r[0], r[1]) if r[2] else None for r in per_range],
            "calls": [int(r[2]) for r in per_range],
        }
    return {
        "ranges": range_names(),
        "recipe": {"quant_block": QUANT_BLOCK, "compared_with": "SDPA in the model's dtype", "dense": True},
        "sites": dict(sorted(sites.items())),
    }


def precision_decisions(measured: Mapping[str, Any], floor_db: float) -> dict[str, dict[str, Any]]:
    """fqn -> {"precision", "worst_db", "worst_range", "why"}: int8_fp8 where the worst covered range's SQNR is at
    least ``floor_db``, else bf16."""
    decisions = {}
    for fqn, site in measured["sites"].items():
        covered = [(db, name) for db, name in zip(site["range_sqnr_db"], measured["ranges"]) if db is not None]
        worst_db, worst_range = min(covered)
        keep = worst_db < floor_db
        decisions[fqn] = {
            "precision": "bf16" if keep else "int8_fp8",
            "worst_db": worst_db,
            "worst_range": worst_range,
            "why": f"SQNR {worst_db:.1f} dB at {worst_range} " + (
                f"< floor {floor_db:g} dB: kept bf16" if keep else f">= floor {floor_db:g} dB"),
        }
    return decisions
