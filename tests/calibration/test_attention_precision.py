"""The attention_precision stage: per-site SQNR of int8_fp8 vs bf16 attention on the tiny Wan, the plan's per-site
precision from the floor, resume (a new floor re-decides without measuring again), and bad config values."""

import math

import pytest
import torch
import torch.nn.functional as F

from qsparse_compiler.calibration import calibrate, driver
from qsparse_compiler.calibration.attention_precision import (RANGE_EDGES, measure_attention_sqnr,
                                                              precision_decisions, range_names)
from qsparse_compiler.calibration.config import CalibrationConfig
from qsparse_compiler.config import ConfigError
from qsparse_compiler.ops.attention_quantization import attention_int8_fp8_reference
from qsparse_compiler.plan import load_plan

from ._tiny import tiny_config, wan_and_samples

SITES = {"blocks.0.attn1", "blocks.1.attn1"}


def _config(**overrides):
    return tiny_config(msad_steps=0, selection="uniform", num_samples=0, **overrides)


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory):
    """A calibration with the stage on (floor 0 dB: every site passes), its plan dir and the measurement."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tiny, samples = wan_and_samples(num_layers=2, count=4)  # timesteps 100, 366, 633, 900: every third covered
    out = tmp_path_factory.mktemp("plan")
    plan = calibrate(tiny.model, samples, _config(attention_int8_min_sqnr_db=0.0), out=out)
    torch.set_num_threads(threads)
    return tiny, samples, out, plan


def test_stage_measures_every_site_in_every_timestep_range(measured_run):
    _, _, _, plan = measured_run
    info = plan.metadata["calibration"]["attention_precision"]
    assert plan.metadata["calibration"]["stages"]["attention_precision"] == "computed"
    assert info["ranges"] == range_names() and len(info["ranges"]) == len(RANGE_EDGES) + 1
    assert set(info["sites"]) == SITES
    for site in info["sites"].values():
        # one call per sample, the samples spread 1, 2, 1 over the thirds; random weights give 38-40 dB
        assert site["calls"] == [1, 2, 1]
        assert all(20.0 < db < 80.0 for db in site["range_sqnr_db"]), site
        assert min(site["range_sqnr_db"]) <= site["sqnr_db"] <= max(site["range_sqnr_db"])
    assert {fqn: entry.precision for fqn, entry in plan.attentions.items()} == dict.fromkeys(SITES, "int8_fp8")


def test_measured_sqnr_is_that_of_the_recipe_on_the_captured_attention(measured_run):
    """The stage's number for one call equals SQNR computed directly from the same q, k, v (no chunking artefact)."""
    tiny, samples, _, _ = measured_run
    from qsparse_compiler.calibration.hooks import AttentionInterceptor
    from qsparse_compiler.calibration.samples import run_model

    captured = {}

    def keep(call):
        captured.setdefault(call.fqn, (call.q.clone(), call.k.clone(), call.v.clone(), call.scale))

    with torch.no_grad(), AttentionInterceptor(tiny.model, keep):
        run_model(tiny.model, samples[0])
    q, k, v, scale = captured["blocks.1.attn1"]
    bf16 = F.scaled_dot_product_attention(q, k, v, scale=scale).double()
    eight_bit = attention_int8_fp8_reference(q, k, v, scale)[0].double()
    direct = 10 * math.log10(bf16.square().sum() / (eight_bit - bf16).square().sum())
    small_chunks = measure_attention_sqnr(tiny.model, samples, [0], max_elements=1024)  # 64-row query chunks
    assert small_chunks["sites"]["blocks.1.attn1"]["range_sqnr_db"][0] == pytest.approx(direct, abs=1e-3)


def test_a_site_below_the_floor_is_kept_bf16_and_a_new_floor_resumes_the_measurement(measured_run, tmp_path,
                                                                                     monkeypatch):
    import shutil

    tiny, samples, out, first = measured_run
    measured = first.metadata["calibration"]["attention_precision"]["sites"]
    worst = {fqn: min(site["range_sqnr_db"]) for fqn, site in measured.items()}
    low, high = sorted(worst, key=worst.get)
    assert worst[high] - worst[low] > 0.01  # the two layers differ: a floor between them splits them
    floor = (worst[low] + worst[high]) / 2
    copy = tmp_path / "plan"
    shutil.copytree(out, copy)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the measurement ran again")

    monkeypatch.setattr(driver, "measure_attention_sqnr", must_not_run)
    plan = calibrate(tiny.model, samples, _config(attention_int8_min_sqnr_db=floor), out=copy)
    assert plan.metadata["calibration"]["stages"]["attention_precision"] == "resumed"
    assert plan.attentions[low].precision == "bf16" and plan.attentions[high].precision == "int8_fp8"
    decision = plan.metadata["calibration"]["attention_precision"]["decisions"][low]
    assert decision["precision"] == "bf16" and f"< floor {floor:g} dB: kept bf16" in decision["why"]
    loaded = load_plan(copy)
    assert loaded.attentions == plan.attentions and loaded.metadata == plan.metadata


def test_without_a_floor_the_stage_is_off_and_the_plan_sets_no_precision():
    tiny, samples = wan_and_samples(num_layers=1, count=2)
    plan = calibrate(tiny.model, samples, _config())
    assert "attention_precision" not in plan.metadata["calibration"]["stages"]
    assert plan.metadata["calibration"]["attention_precision"] is None
    assert [entry.precision for entry in plan.attentions.values()] == [None]


def test_decision_uses_the_worst_covered_range():
    measured = {"ranges": range_names(), "sites": {
        "a": {"range_sqnr_db": [41.0, None, 29.0]},
        "b": {"range_sqnr_db": [None, 35.0, None]},
    }}
    decisions = precision_decisions(measured, 30.0)
    assert decisions["a"]["precision"] == "bf16" and decisions["a"]["worst_range"] == range_names()[2]
    assert decisions["b"]["precision"] == "int8_fp8" and decisions["b"]["worst_db"] == 35.0


def test_a_non_finite_attention_output_names_the_site_and_the_sample(monkeypatch):
    from qsparse_compiler.calibration import CalibrationError
    from qsparse_compiler.calibration import attention_precision

    tiny, samples = wan_and_samples(num_layers=1, count=2)
    monkeypatch.setattr(attention_precision, "attention_int8_fp8_reference",
                        lambda q, *args, **kwargs: (torch.full_like(q, float("nan")), None))
    with pytest.raises(CalibrationError, match="blocks.0.attn1 on sample 1 gives a non-finite output"):
        measure_attention_sqnr(tiny.model, samples, [1, 0], max_elements=1 << 20)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True, "30"])
def test_bad_floor_names_the_field(value):
    with pytest.raises(ConfigError, match="CalibrationConfig.attention_int8_min_sqnr_db"):
        CalibrationConfig(attention_int8_min_sqnr_db=value)
    with pytest.raises(ConfigError, match="attention_int8_min_sqnr_db"):
        CalibrationConfig.from_dict({"attention_int8_min_sqnr_db": value})


# ---- realistic activations: the trained reference DiT -------------------------------------------------------------


def _reference_dit_samples(sigmas=(0.15, 0.5, 0.85)):
    """The reference DiT in bf16 and one calibration sample per timestep third: its synthetic training video at 2
    frames x 64 x 64 (2,048 tokens, 8 layers x 4 heads of 64) noised to each sigma, with its text embedding."""
    from qsparse_compiler.eval.reference_model import data_config, initial_noise, load_reference_model
    from qsparse_compiler.eval.synthetic_video import SyntheticVideoConfig, SyntheticVideos

    model = load_reference_model(dtype=torch.bfloat16)
    data = SyntheticVideoConfig.from_dict({**data_config().to_dict(), "frames": 2, "height": 64, "width": 64})
    video, text = SyntheticVideos(data).batch(1, seed=0)
    noise = initial_noise([0], video.shape[1:])
    samples = [{"hidden_states": ((1 - s) * video + s * noise).to(torch.bfloat16),
                "timestep": torch.tensor([1000.0 * s]), "encoder_hidden_states": text.to(torch.bfloat16)}
               for s in sigmas]
    return model, samples


# Measured 2026-12-07 (CPU, torch 2.13 cpu, bf16 model, bf16 SDPA as the reference, quant_block 64): SQNR of int8_fp8
# vs bf16 attention (dB) per layer at t = 150 / 500 / 850 (one sample per third):
#   blocks.0.attn1 44.9 / 40.5 / 37.3    blocks.4.attn1 42.7 / 41.3 / 40.4
#   blocks.1.attn1 40.6 / 37.7 / 35.3    blocks.5.attn1 44.1 / 42.3 / 41.5
#   blocks.2.attn1 43.3 / 41.2 / 38.3    blocks.6.attn1 44.2 / 42.8 / 41.9
#   blocks.3.attn1 44.6 / 42.4 / 40.2    blocks.7.attn1 43.1 / 41.7 / 41.8
# Every layer loses SQNR as the input gets noisier (1.3-7.6 dB from t = 150 to t = 850), so the noisiest third
# decides; the worst value is 35.3 dB (layer 1, t = 850). The floor sits 3.3 dB under it, as the kernel
# tests' floor (tests/kernels/test_attention_int8_fp8.py, one mid-trajectory sample: 35.6-40.9 dB, floor 32).
REFERENCE_DIT_FLOOR_DB = 32.0


def test_reference_dit_every_layer_and_timestep_third_clears_the_floor():
    model, samples = _reference_dit_samples()
    measured = measure_attention_sqnr(model, samples, range(len(samples)), max_elements=1 << 24)
    assert set(measured["sites"]) == {f"blocks.{i}.attn1" for i in range(8)}
    for fqn, site in measured["sites"].items():
        print(fqn, site["range_sqnr_db"])  # the table above, with pytest -s
        assert site["calls"] == [1, 1, 1]
        assert min(site["range_sqnr_db"]) >= REFERENCE_DIT_FLOOR_DB, (fqn, site)
    decisions = precision_decisions(measured, REFERENCE_DIT_FLOOR_DB)
    assert {d["precision"] for d in decisions.values()} == {"int8_fp8"}
