"""SSAR settings per attention layer, measured: how fast does the sparse residual R = O_dense - O_sparse drift?

Measurement: from a few selected samples, the dense model takes ``ssar_steps`` flow-matching Euler steps
(x <- x + (sigma' - sigma) * v, sigma = t / 1000, t decreasing by ``ssar_step_size``: the sampler of Wan and
HunyuanVideo). At every step, each searched attention computes its dense output and its output under the searched
pattern (the reference math of the sparse op) and R is kept per layer.

Choice: the runtime schedule is "refresh the first k steps, then every n-th"; between refreshes it predicts
    order 1:  R_hat = R_last
    order 2:  R_hat = R_last + (steps since refresh) * dR,  dR = (R_last - R_prev) / (steps between the two refreshes)
(order 2 with a single refresh so far falls back to order 1), and for each r in ``ssar_delta_ranks`` QuantSparse's
denoised second order (CacheConfig.delta_rank = r)
    order 2, rank r:  R_hat = R_last + (steps since refresh) * SVD_r(dR)
with SVD_r the best rank-r approximation per (batch, head) over the measured tokens (the runtime's is over all tokens).
Each (k, n, order, r) with k >= ``ssar_refresh_first`` and
n <= ``ssar_max_every`` is replayed on the measured residuals; it is admissible when the worst relative prediction
error ||R_hat - R|| / ||R|| over the reuse steps stays within ``ssar_tolerance``. Among admissible schedules the one
with the fewest refreshes over a nominal run of 1000 / ``ssar_step_size`` steps wins (ties: lower error, then the
cheaper variant: order 1, plain order 2, then the lowest denoising rank).
An interval counts only if the measured trajectory contains one whole reuse interval after the first k steps
(k + n - 1 < ``ssar_steps``): a schedule the measurement cannot see fail is not admissible.
Rank: the smallest r whose truncated SVD keeps ``ssar_rank_energy`` of R's energy for every head and step; r >= D / 2
is stored as 0 (the full residual: low rank would not save memory).

Stored in ``AttentionPlan.cache`` as {"refresh_first": k, "refresh_every": n, "order": 1|2, "rank": r}, plus
"delta_rank" where the denoised variant won.

Refresh budget (``CalibrationConfig.refresh_budget`` = b): the schedules above let every layer refresh at the same
steps, and each refresh step pays dense attention in every layer at once. With a budget, the run of N = 1000 /
``ssar_step_size`` steps may spend at most floor(b * L * N) dense layer-steps over the L cached layers:
- each layer's drift rate d is measured: the mean of ||R_{t+1} - R_t|| / ||R_t|| over the measured steps (one
  measured step is one nominal step);
- every layer refreshes at step 0 (nothing to reuse yet); the other refreshes go, one at a time, to the layer with the
  largest d / m (m: its refreshes so far) - a residual reused over N / m steps drifts by about d * N / m, so this
  evens out the worst drift across layers;
- a layer's m refreshes are spread N / m apart, each layer with its own phase (golden-ratio offsets within a quarter
  of its interval), and each one
  placed on the least loaded step near its ideal position, never on a step where every other layer already
  refreshes: no step after step 0 runs every layer dense (with more than one layer and b < 1);
- one order and one rank for every layer (they shape the compiled graph, and regional compilation shares one graph
  between the blocks; the refresh steps are host-side and differ freely): an order-2 variant (plain or denoised to a
  rank of ``ssar_delta_ranks``) where every layer refreshes at least twice, the measured trajectory covers one reuse
  interval of each layer and the variant predicts each better than order 1 (of several such, the lowest summed
  error), else order 1 (extrapolating dR over more steps than were measured is not verified); the full residual if
  any layer needs it, else the largest rank.
Stored as {"refresh_steps": [0, ...], "num_steps": N, "order": 1|2, "rank": r} (+ "delta_rank"): the runtime follows
each layer's steps (config.CacheConfig.refresh_steps) and refuses a generation of another length.
Memory: the residuals of every searched layer for every measured step, on the host, each B x H x T x D fp32 with
T = min(S, ``ssar_max_tokens``) evenly spaced tokens (30 layers x 6 steps x 12 heads x 1024 tokens x 128: 1.1 GB).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch

from ..formats.pattern_spec import parse_pattern_spec
from ..ops.residual_attention import denoise_delta
from .attention_maps import sparse_attention_chunked
from .config import CalibrationConfig, CalibrationError
from .hooks import AttentionCall, AttentionInterceptor
from .pattern_attention import SparsePatternAttention
from .progress import track
from .samples import run_model

__all__ = ["SSARChoice", "measure_residuals", "replay_error", "choose_ssar", "drift_rate", "budget_schedules",
           "ssar_settings"]

_GOLDEN = (5 ** 0.5 - 1) / 2  # phase step between layers: consecutive layers' refreshes land far apart


@dataclass
class SSARChoice:
    refresh_first: int
    refresh_every: int
    order: int
    rank: int
    max_error: float
    refreshes_nominal: int
    delta_rank: int = 0

    def cache(self) -> dict[str, int]:
        cache = {"refresh_first": self.refresh_first, "refresh_every": self.refresh_every, "order": self.order,
                 "rank": self.rank}
        return {**cache, "delta_rank": self.delta_rank} if self.delta_rank else cache


@torch.no_grad()
def measure_residuals(
    model: torch.nn.Module,
    samples: Sequence[Mapping[str, Any]],
    ids: Sequence[int],
    specs: Mapping[str, str],
    block_q: int,
    block_kv: int,
    config: CalibrationConfig,
) -> dict[str, list[list[torch.Tensor]]]:
    """R per layer, per trajectory, per step: {fqn: [[R_0, R_1, ...], ...]} (fp32 on the host, B x H x T x D)."""
    residuals: dict[str, list[list[torch.Tensor]]] = {fqn: [] for fqn in specs}
    # Layers whose heads are all dense have no residual by construction (measuring it would only see float noise).
    specs = {fqn: spec for fqn, spec in specs.items() if not _all_dense(spec)}
    patterns = SparsePatternAttention(specs, block_q, block_kv, record=False, pool_blocks=1)
    current: dict[str, list[torch.Tensor]] = {}

    def observe(call: AttentionCall) -> torch.Tensor | None:
        if call.fqn not in specs:
            return None
        dense = call.dense()
        sparse, _ = sparse_attention_chunked(call.q, call.k, call.v, patterns.tile_mask(call.fqn, call.grid), call.scale,
                                             call.key_padding_mask, config.attention_chunk_elements)
        residual = dense.to(torch.float32) - sparse
        seq_len = residual.shape[2]
        if seq_len > config.ssar_max_tokens:
            # Evenly spaced tokens (all frames, all of the frame): the drift statistics need a sample, not all S.
            keep = torch.linspace(0, seq_len - 1, config.ssar_max_tokens, device=residual.device).round().long()
            residual = residual.index_select(2, keep)
        current.setdefault(call.fqn, []).append(residual.cpu())
        return dense  # the trajectory follows the dense model

    with AttentionInterceptor(model, observe):
        for index in track(list(ids), "residual drift", config.progress):
            sample = dict(samples[index])
            current.clear()
            t = sample["timestep"]
            t = t.to(torch.float32) if isinstance(t, torch.Tensor) else torch.tensor([float(t)])
            x = sample["hidden_states"]
            for _ in range(config.ssar_steps):
                v = run_model(model, {**sample, "hidden_states": x, "timestep": t})
                if not bool(torch.isfinite(v).all()):
                    raise CalibrationError(
                        f"qsparse_compiler.calibration.ssar: the model output {tuple(v.shape)} is not finite at timestep "
                        f"{float(t.float().mean()):g} of the trajectory from sample {index}; lower ssar_step_size or "
                        "ssar_steps, or start from another sample"
                    )
                t_next = (t - config.ssar_step_size).clamp_min(0.0)
                x = (x.to(torch.float32) + (t_next - t).view(-1, *([1] * (x.ndim - 1))) / 1000.0 * v.to(torch.float32)).to(x.dtype)
                t = t_next
            for fqn in specs:
                if current.get(fqn):
                    residuals[fqn].append(current[fqn])
    return residuals


def _all_dense(spec: str) -> bool:
    return all(name == "dense" for name, _ in parse_pattern_spec(spec, 1.0))


def _relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    ref = float(reference.norm())
    return float(error.norm()) / ref if ref > 0 else 0.0


def replay_error(steps: Sequence[torch.Tensor], refresh_first: int, refresh_every: int, order: int,
                 delta_rank: int = 0) -> float:
    """Worst relative error of the predicted residual over the reuse steps of one measured trajectory (order 2 with
    ``delta_rank`` r > 0: dR denoised to rank r, as the op does)."""
    worst = 0.0
    last: tuple[int, torch.Tensor] | None = None
    prev: tuple[int, torch.Tensor] | None = None
    for step, r in enumerate(steps):
        if step < refresh_first or (step - refresh_first) % refresh_every == 0 or last is None:
            prev, last = last, (step, r)
            continue
        predicted = last[1]
        if order == 2 and prev is not None:
            slope = denoise_delta((last[1] - prev[1]) / (last[0] - prev[0]), delta_rank)
            predicted = last[1] + (step - last[0]) * slope
        worst = max(worst, _relative(predicted - r, r))
    return worst


def _rank(trajectories: Sequence[Sequence[torch.Tensor]], energy: float) -> int:
    needed = 0
    head_dim = trajectories[0][0].shape[-1]
    for steps in trajectories:
        for r in steps:
            values = torch.linalg.svdvals(r.reshape(-1, *r.shape[-2:]).to(torch.float64)).pow(2)  # [B*H, D]
            share = values.cumsum(-1) / values.sum(-1, keepdim=True).clamp_min(1e-300)
            per_head = (share < energy - 1e-12).sum(-1) + 1
            needed = max(needed, int(per_head.max()))
    return 0 if 2 * needed >= head_dim else needed


def _order_variants(trajectories: Sequence[Sequence[torch.Tensor]], config: CalibrationConfig,
                    rank: int) -> list[tuple[int, int]]:
    """(order, delta_rank) to replay, cheapest first. A denoising rank >= min(T, D) would change nothing, and a
    low-rank cache (``rank`` > 0) already stores dR as a truncated SVD: neither replays a denoised variant."""
    tokens, head_dim = trajectories[0][0].shape[-2:]
    ranks = () if rank else config.ssar_delta_ranks
    return [(1, 0), (2, 0), *((2, r) for r in ranks if r < min(tokens, head_dim))]


def choose_ssar(trajectories: Sequence[Sequence[torch.Tensor]], config: CalibrationConfig) -> SSARChoice:
    nominal = max(1, round(1000.0 / config.ssar_step_size))
    length = min(len(steps) for steps in trajectories)
    rank = _rank(trajectories, config.ssar_rank_energy)
    variants = _order_variants(trajectories, config, rank)
    best: tuple[tuple, SSARChoice] | None = None
    for k in range(config.ssar_refresh_first, max(config.ssar_refresh_first, length - 1) + 1):
        for n in range(1, config.ssar_max_every + 1):
            if n > 1 and k + n - 1 > length - 1:
                continue  # the measured steps would not show a full reuse interval: unverified, not admissible
            for cost, (order, delta_rank) in enumerate(variants):
                error = max(replay_error(steps, k, n, order, delta_rank) for steps in trajectories)
                if error > config.ssar_tolerance:
                    continue
                refreshes = min(k, nominal) + math.ceil(max(nominal - k, 0) / n)
                key = (refreshes, error, cost)
                if best is None or key < best[0]:
                    best = (key, SSARChoice(k, n, order, rank, error, refreshes, delta_rank))
    assert best is not None  # n = 1 refreshes every step: error 0, always admissible
    return best[1]


def drift_rate(trajectories: Sequence[Sequence[torch.Tensor]]) -> float:
    """Mean relative change of the residual per measured step, ||R_{t+1} - R_t|| / ||R_t||."""
    rates = [_relative(after - before, before) for steps in trajectories for before, after in zip(steps, steps[1:])]
    return sum(rates) / len(rates) if rates else 0.0


def _allocate(drifts: Mapping[str, float], total: int, steps: int) -> dict[str, int]:
    """Refreshes per layer: one each (step 0), then one at a time to the layer whose d / m is largest."""
    counts = {fqn: 1 for fqn in drifts}
    for _ in range(total - len(counts)):
        fqn = max(sorted(counts), key=lambda f: drifts[f] / counts[f])
        if drifts[fqn] <= 0 or counts[fqn] >= steps:
            break  # nothing drifts any more (or every step of the layer refreshes): the rest of the budget is unused
        counts[fqn] += 1
    return counts


def _stagger(counts: Mapping[str, int], steps: int) -> dict[str, list[int]]:
    """Each layer's refresh steps: step 0, then its other refreshes about steps / m apart with a per-layer phase, each
    on the least loaded step of a window around its ideal position, avoiding steps every other layer refreshes."""
    layers = len(counts)
    load = [0] * steps
    load[0] = layers
    schedules = {}
    for index, fqn in enumerate(sorted(counts, key=lambda f: (-counts[f], f))):
        interval = steps / counts[fqn]
        phase = ((index * _GOLDEN) % 1.0 - 0.5) * interval / 2  # within a quarter interval of even spacing
        chosen = [0]
        for j in range(1, counts[fqn]):
            target = min(j * interval + phase, steps - 1)
            free = [s for s in range(1, steps) if s not in chosen]
            window = [s for s in free if abs(s - target) <= interval / 2] or free
            best = min(window, key=lambda s: (layers > 1 and load[s] + 1 >= layers, load[s], abs(s - target)))
            if layers > 1 and load[best] + 1 >= layers:
                best = min(free, key=lambda s: (load[s] + 1 >= layers, abs(s - target)))
            chosen.append(best)
            load[best] += 1
        schedules[fqn] = sorted(chosen)
    return schedules


def _order_errors(trajectories: Sequence[Sequence[torch.Tensor]], refreshes: int, steps: int,
                  config: CalibrationConfig, rank: int) -> dict[tuple[int, int], float] | None:
    """Replay error of each (order, delta_rank) at the layer's mean reuse interval; None where order 2 cannot be
    judged (fewer than two refreshes, or an interval longer than the measurement: its extrapolation is unverified)."""
    if refreshes < 2:
        return None
    interval = max(1, round(steps / refreshes))
    length = min(len(t) for t in trajectories)
    if interval > length - 1:
        return None
    return {variant: max(replay_error(t, 1, interval, *variant) for t in trajectories)
            for variant in _order_variants(trajectories, config, rank)}


def _shared_order(residuals: Mapping[str, Sequence[Sequence[torch.Tensor]]], counts: Mapping[str, int], steps: int,
                  config: CalibrationConfig, rank: int) -> tuple[int, int]:
    """One (order, delta_rank) for every layer: the order-2 variant that beats order 1 on every layer (of several,
    the lowest summed error), else order 1."""
    errors = [_order_errors(residuals[fqn], counts[fqn], steps, config, rank) for fqn in counts]
    if not errors or any(e is None for e in errors):
        return 1, 0
    shared = set.intersection(*(set(e) for e in errors))  # layers may differ in head_dim: ranks valid for all
    winners = [v for v in sorted(shared) if v[0] == 2 and all(e[v] < e[(1, 0)] for e in errors)]
    if not winners:
        return 1, 0
    return min(winners, key=lambda v: sum(e[v] for e in errors))


def budget_schedules(residuals: Mapping[str, Sequence[Sequence[torch.Tensor]]],
                     config: CalibrationConfig) -> dict[str, dict[str, Any]]:
    """Per-layer refresh steps under ``config.refresh_budget`` (see the module docstring)."""
    steps = max(1, round(1000.0 / config.ssar_step_size))
    drifts = {fqn: drift_rate(t) for fqn, t in residuals.items() if t}
    total = math.floor(config.refresh_budget * len(drifts) * steps + 1e-9)
    if total < len(drifts):
        raise CalibrationError(
            f"qsparse_compiler.calibration: refresh_budget={config.refresh_budget} allows {total} dense layer-steps "
            f"for {len(drifts)} cached layers x {steps} steps, fewer than the one refresh per layer that step 0 needs "
            f"(no residual exists yet); raise refresh_budget to at least {1 / steps:.4g}"
        )
    counts = _allocate(drifts, total, steps)
    schedules = _stagger(counts, steps)
    ranks = [_rank(residuals[fqn], config.ssar_rank_energy) for fqn in drifts]
    rank = 0 if not ranks or 0 in ranks else max(ranks)
    order, delta_rank = _shared_order(residuals, counts, steps, config, rank)
    out: dict[str, dict[str, Any]] = {}
    for fqn in residuals:
        if fqn not in drifts:
            out[fqn] = {"cache": {}, "why": "no residual: every head computes every tile"}
            continue
        refresh_steps = schedules[fqn]
        gaps = [b - a for a, b in zip(refresh_steps, [*refresh_steps[1:], steps])]
        cache = {"refresh_steps": refresh_steps, "num_steps": steps, "order": order, "rank": rank}
        if delta_rank:
            cache["delta_rank"] = delta_rank
        out[fqn] = {"cache": cache, "drift_per_step": drifts[fqn], "refreshes_nominal": len(refresh_steps),
                    "longest_reuse": max(gaps) - 1}
    return out


def ssar_settings(residuals: Mapping[str, Sequence[Sequence[torch.Tensor]]], config: CalibrationConfig) -> dict[str, dict[str, Any]]:
    """{fqn: {"cache": {...}, "max_error": e, "refreshes_nominal": m}} (with a refresh budget: ``budget_schedules``);
    layers without a residual get no cache."""
    if config.refresh_budget is not None:
        return budget_schedules(residuals, config)
    out: dict[str, dict[str, Any]] = {}
    for fqn, trajectories in residuals.items():
        if not trajectories:
            out[fqn] = {"cache": {}, "why": "no residual: every head computes every tile"}
            continue
        choice = choose_ssar(trajectories, config)
        out[fqn] = {"cache": choice.cache(), **{k: v for k, v in asdict(choice).items() if k in ("max_error", "refreshes_nominal")}}
    return out
