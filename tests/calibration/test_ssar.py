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


def _noisy_low_rank_drift(steps: int = 7) -> list[torch.Tensor]:
    """R_t = R_0 + t * (a rank-1 drift per head) + independent noise per step: plain dR carries two steps' noise into
    every extrapolated step, the rank-1 denoised dR keeps the drift and drops most of the noise."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 2, 32, 16, generator=g)
    drift = (torch.randn(1, 2, 32, 1, generator=g) @ torch.randn(1, 2, 1, 16, generator=g)) * 0.5
    return [base + t * drift + 0.05 * torch.randn(1, 2, 32, 16, generator=g) for t in range(steps)]


def test_denoised_order_two_replays_the_hand_computed_prediction():
    steps = _noisy_low_rank_drift()
    # refresh_first=2, every 4: refreshes at steps 0, 1, 2, 6; steps 3-5 reuse with dR = R_2 - R_1 at rank 1
    u, sigma, vh = torch.linalg.svd((steps[2] - steps[1]).double(), full_matrices=False)
    delta = (u[..., :1] * sigma[..., None, :1]) @ vh[..., :1, :]
    expected = max(float((steps[2].double() + (t - 2) * delta - steps[t].double()).norm() / steps[t].double().norm())
                   for t in (3, 4, 5))
    assert abs(replay_error(steps, 2, 4, order=2, delta_rank=1) - expected) < 1e-5
    assert replay_error(steps, 2, 4, order=2, delta_rank=1) < 0.5 * replay_error(steps, 2, 4, order=2)
    assert replay_error(steps, 2, 4, order=2, delta_rank=16) == replay_error(steps, 2, 4, order=2)  # full rank


def test_calibration_keeps_the_denoised_second_order_where_it_wins():
    config = CalibrationConfig(ssar_tolerance=0.1, ssar_max_every=4, ssar_delta_ranks=(1,))
    noisy = choose_ssar([_noisy_low_rank_drift()], config)
    assert (noisy.order, noisy.delta_rank, noisy.refresh_every) == (2, 1, 4)
    plain = choose_ssar([_noisy_low_rank_drift()], CalibrationConfig(ssar_tolerance=0.1, ssar_max_every=4,
                                                                        ssar_delta_ranks=()))
    assert noisy.refreshes_nominal < plain.refreshes_nominal  # denoising lets the layer reuse longer
    assert noisy.cache()["delta_rank"] == 1
    # a noiseless linear drift: plain order 2 is exact, the denoised variant loses (it is kept only where it wins)
    linear = choose_ssar([_trajectory("linear")], CalibrationConfig(ssar_tolerance=0.05, ssar_max_every=4,
                                                                    ssar_delta_ranks=(1,)))
    assert (linear.order, linear.delta_rank) == (2, 0) and "delta_rank" not in linear.cache()
    # the settings are valid cache settings of a plan
    from qsparse_compiler.config import CacheConfig

    assert CacheConfig(enabled=True, **noisy.cache()).delta_rank == 1


def test_refresh_budget_shares_the_denoised_order_when_it_beats_order_one_everywhere():
    from qsparse_compiler.calibration.ssar import budget_schedules

    config = CalibrationConfig(ssar_delta_ranks=(1,), refresh_budget=0.4, ssar_step_size=200.0)
    residuals = {"blocks.0.attn1": [_noisy_low_rank_drift()], "blocks.1.attn1": [_noisy_low_rank_drift()]}
    caches = [entry["cache"] for entry in budget_schedules(residuals, config).values()]
    assert all(c["order"] == 2 and c["delta_rank"] == 1 and len(c["refresh_steps"]) == 2 for c in caches), caches


def test_delta_ranks_are_validated():
    import pytest

    from qsparse_compiler.calibration.config import CalibrationConfig as Config
    from qsparse_compiler.config import ConfigError

    for bad in ((0,), (4, 2), [4], (True,)):
        with pytest.raises(ConfigError, match="ssar_delta_ranks"):
            Config(ssar_delta_ranks=bad)
    assert Config.from_dict({"ssar_delta_ranks": [2, 4]}).ssar_delta_ranks == (2, 4)
