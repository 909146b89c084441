"""CalibrationConfig.refresh_budget: per-layer refresh steps from measured residual drift, within the budget,
staggered across layers; stored in the plan as CacheConfig.refresh_steps."""

import math

import pytest
import torch

from qsparse_compiler.calibration.config import CalibrationConfig, CalibrationError
from qsparse_compiler.calibration.ssar import budget_schedules, drift_rate, ssar_settings
from qsparse_compiler.config import CacheConfig, ConfigError
from qsparse_compiler.plan import AttentionPlan, PlanError

RATES = {"blocks.0.attn1": 0.0, "blocks.1.attn1": 0.01, "blocks.2.attn1": 0.03, "blocks.3.attn1": 0.06,
         "blocks.4.attn1": 0.12, "blocks.5.attn1": 0.24}


def drifting_residuals(rates=RATES, steps=6, trajectories=2):
    """Residuals whose relative change per step is the given rate: R_t = R_0 + rate * t * ||R_0|| * u (u unit)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for fqn, rate in rates.items():
        out[fqn] = []
        for _ in range(trajectories):
            base, direction = torch.randn(1, 2, 16, 8, generator=g), torch.randn(1, 2, 16, 8, generator=g)
            direction = direction / direction.norm() * base.norm()
            out[fqn].append([base + rate * t * direction for t in range(steps)])
    return out


@pytest.mark.parametrize("budget", [0, 0.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_a_budget_outside_zero_one_is_refused_by_name(budget):
    with pytest.raises(ConfigError, match=r"CalibrationConfig.refresh_budget=.* must be None .* or a share of "
                                          r"layer-steps in \(0, 1\]"):
        CalibrationConfig(refresh_budget=budget)


def test_drift_rate_measures_the_relative_change_per_step():
    residuals = drifting_residuals({"a": 0.05}, steps=2, trajectories=1)["a"]
    assert drift_rate(residuals) == pytest.approx(0.05, rel=1e-5)


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.3])
def test_schedules_spend_the_budget_where_the_residual_drifts_and_stagger_the_layers(budget):
    config = CalibrationConfig(refresh_budget=budget, ssar_step_size=20.0)  # a nominal run of 50 steps
    out = budget_schedules(drifting_residuals(), config)
    steps = 50
    schedules = {fqn: entry["cache"]["refresh_steps"] for fqn, entry in out.items()}
    total = sum(len(s) for s in schedules.values())
    assert total <= math.floor(budget * len(RATES) * steps + 1e-9)
    # Every layer refreshes at step 0; a layer whose residual does not drift never again.
    assert all(s[0] == 0 for s in schedules.values()) and schedules["blocks.0.attn1"] == [0]
    # Faster drift, more refreshes; the budget is spent (nothing left that a drifting layer could use).
    counts = [len(schedules[fqn]) for fqn in sorted(RATES, key=RATES.get)]
    assert counts == sorted(counts) and counts[-1] > counts[1]
    assert total >= math.floor(budget * len(RATES) * steps + 1e-9) - 1
    # Staggered: after step 0, no step refreshes every layer; the fastest layer's refreshes are spread evenly.
    load = [sum(step in s for s in schedules.values()) for step in range(steps)]
    assert load[0] == len(RATES) and max(load[1:]) < len(RATES)
    fastest = schedules["blocks.5.attn1"]
    gaps = [b - a for a, b in zip(fastest, [*fastest[1:], steps])]
    assert max(gaps) - min(gaps) <= steps / len(fastest) / 2 + 2
    for entry in out.values():
        cache = CacheConfig(enabled=True, **entry["cache"])  # what the backend builds from the plan
        assert cache.num_steps == steps and entry["cache"]["order"] == out["blocks.5.attn1"]["cache"]["order"]


def test_linear_drift_measured_over_a_covered_interval_chooses_order_two():
    """Residuals that drift linearly are extrapolated exactly by order 2; with a budget whose reuse intervals the
    measured 6 steps cover, every layer gets order 2 (one order for all: it shapes the shared regional graph)."""
    rates = {"blocks.0.attn1": 0.1, "blocks.1.attn1": 0.2}
    config = CalibrationConfig(refresh_budget=0.3, ssar_step_size=100.0)  # 10 nominal steps, intervals ~3
    out = ssar_settings(drifting_residuals(rates), config)
    assert {entry["cache"]["order"] for entry in out.values()} == {2}


def test_a_budget_below_one_refresh_per_layer_is_refused():
    config = CalibrationConfig(refresh_budget=0.01, ssar_step_size=20.0)  # 0.5 refreshes per layer
    with pytest.raises(CalibrationError, match=r"refresh_budget=0.01 allows 3 dense layer-steps for 6 cached layers"):
        budget_schedules(drifting_residuals(), config)


def test_plans_hold_valid_per_layer_schedules_only():
    entry = AttentionPlan(["local3d:0.3"], block_q=16, block_kv=16,
                          cache={"refresh_steps": [0, 4, 9], "num_steps": 10, "order": 2, "rank": 0})
    assert CacheConfig(enabled=True, **entry.cache).is_refresh_step(4)
    for cache, message in (({"refresh_steps": [0, 12], "num_steps": 10}, "stay below num_steps=10"),
                           ({"refresh_steps": [3, 4], "num_steps": 10}, "ascend strictly from step 0"),
                           ({"refresh_steps": [0, 4]}, "CacheConfig.num_steps=0"),
                           ({"refresh_steps": [0], "num_steps": 10, "order": 2}, "needs two refresh steps")):
        with pytest.raises(PlanError, match=message):
            AttentionPlan(["local3d:0.3"], block_q=16, block_kv=16, cache=cache)
