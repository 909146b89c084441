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
    worst = {fqn: min(s["range_sqnr_db"]) for fqn, s in first.metadata["calibration"]["attention_precision"]["sites"].items()}
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


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True, "30"])
def test_bad_floor_names_the_field(value):
    with pytest.raises(ConfigError, match="CalibrationConfig.attention_int8_min_sqnr_db"):
        CalibrationConfig(attention_int8_min_sqnr_db=value)
    with pytest.raises(ConfigError, match="attention_int8_min_sqnr_db"):
        CalibrationConfig.from_dict({"attention_int8_min_sqnr_db": value})
