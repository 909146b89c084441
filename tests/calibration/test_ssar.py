"""SSAR settings from measured residual drift: replay of the runtime schedule, order and rank choices."""

import torch

from qsparse_compiler.calibration.config import CalibrationConfig
from qsparse_compiler.calibration.ssar import choose_ssar, replay_error, ssar_settings

CONFIG = CalibrationConfig(ssar_tolerance=0.05, ssar_max_every=4, ssar_refresh_first=1, ssar_step_size=20.0)


def _trajectory(kind: str, steps: int = 7) -> list[torch.Tensor]:
    torch.manual_seed(0)
    base, drift = torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16) * 0.3
    if kind == "constant":
        return [base.clone() for _ in range(steps)]
    if kind == "linear":
        return [base + t * drift for t in range(steps)]
    return [torch.randn(1, 2, 32, 16) for _ in range(steps)]  # no temporal structure


def test_replay_is_exact_for_the_matching_order():
    assert replay_error(_trajectory("constant"), 1, 3, order=1) == 0.0
    linear = _trajectory("linear")
    assert replay_error(linear, 2, 3, order=1) > 0.1
    assert replay_error(linear, 2, 3, order=2) < 1e-5  # dR from two refreshes extrapolates a linear drift exactly


def test_refresh_every_step_never_reuses():
    assert replay_error(_trajectory("noise"), 1, 1, order=1) == 0.0


def test_stable_layers_get_long_intervals_and_drifting_layers_order_two():
    constant = choose_ssar([_trajectory("constant")], CONFIG)
    assert (constant.refresh_first, constant.refresh_every, constant.order) == (1, 4, 1)
    linear = choose_ssar([_trajectory("linear")], CONFIG)
    # refreshes at steps 0, 1 (k = 1, then every 4th from step 1) give dR; steps 2-4 are extrapolated exactly
    assert (linear.refresh_first, linear.refresh_every, linear.order) == (1, 4, 2)
    noise = choose_ssar([_trajectory("noise")], CONFIG)
    assert noise.refresh_every == 1  # unpredictable: refresh every step
    assert noise.refreshes_nominal == 50


def test_rank_is_the_energy_rank_and_zero_when_not_worth_it():
    low = torch.randn(1, 2, 32, 2) @ torch.randn(1, 2, 2, 16)  # rank 2 per head, head_dim 16
    choice = choose_ssar([[low] * 4], CONFIG)
    assert choice.rank == 2
    full = choose_ssar([[torch.randn(1, 2, 32, 16)] * 4], CONFIG)
    assert full.rank == 0  # rank >= head_dim / 2: store the full residual


def test_settings_per_layer_and_no_cache_for_dense_layers():
    settings = ssar_settings({"blocks.0.attn1": [_trajectory("constant")], "blocks.1.attn1": []}, CONFIG)
    assert set(settings["blocks.0.attn1"]["cache"]) == {"refresh_first", "refresh_every", "order", "rank"}
    assert settings["blocks.1.attn1"]["cache"] == {}


def test_residuals_are_measured_along_a_trajectory_on_a_token_sample():
    from qsparse_compiler.calibration.ssar import measure_residuals

    from ._tiny import tiny_config, wan_and_samples

    tiny, samples = wan_and_samples(num_layers=2, count=2)
    config = tiny_config(ssar_steps=3, ssar_max_tokens=64)
    specs = {"blocks.0.attn1": "local3d:0.2", "blocks.1.attn1": "dense"}
    residuals = measure_residuals(tiny.model, samples, [1], specs, 16, 16, config)
    (steps,) = residuals["blocks.0.attn1"]
    assert len(steps) == 3 and steps[0].shape == (1, 2, 64, 32)  # 192 tokens sampled down to 64
    assert all(r.abs().max() > 0 for r in steps)  # local3d drops mass: a residual
    assert not torch.equal(steps[0], steps[1])  # the latents move along the trajectory
    assert residuals["blocks.1.attn1"] == []  # all heads dense: no residual, nothing measured
    assert ssar_settings(residuals, config)["blocks.1.attn1"]["cache"] == {}
