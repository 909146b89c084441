"""Salient data selection: scores on a tiny model, top-N vs uniform selections, the report of both."""

import math

import torch

from qsparse_compiler.calibration.salient import SampleScore, score_samples, select_samples, selection_report

from qsparse_compiler.formats.quantization import quantize_weight_int4

from ._tiny import tiny_config, wan_and_samples


def _scores(values, timesteps=None):
    timesteps = timesteps or [100.0 * i for i in range(len(values))]
    return [SampleScore(i, t, 1.0, v, v) for i, (v, t) in enumerate(zip(values, timesteps))]


def test_salient_keeps_the_top_scores_and_uniform_spreads_over_timesteps():
    scores = _scores([0.1, 0.9, 0.2, 0.8, 0.05, 0.7], timesteps=[900, 100, 500, 300, 700, 0])
    assert select_samples(scores, 3, "salient") == [1, 3, 5]
    # sorted by timestep: 5(0) 1(100) 3(300) 2(500) 4(700) 0(900); evenly spaced positions 0, 2, 5 -> 5, 3, 0
    assert select_samples(scores, 3, "uniform") == [0, 3, 5]
    assert select_samples(scores, 0, "salient") == list(range(6))
    report = selection_report(scores, 3)
    assert report["salient"]["indices"] == [1, 3, 5] and report["uniform"]["indices"] == [0, 3, 5]
    assert report["salient"]["score_share"] > report["uniform"]["score_share"]


def test_scores_on_a_tiny_model_are_positive_and_finite():
    tiny, samples = wan_and_samples(count=3)
    scores = score_samples(tiny.model, samples, tiny_config())
    assert [s.index for s in scores] == [0, 1, 2]
    for s in scores:
        assert math.isfinite(s.score) and s.diffusion > 0 and s.quantization > 0
        assert s.score == s.diffusion * s.quantization
    assert [s.timestep for s in scores] == [100.0, 500.0, 900.0]


def test_the_quantization_term_treats_conditioning_linears_as_the_plan_will():
    """HunyuanVideo's modulation linears (no token dimension): kept as they are under conditioning_linears="keep",
    int4 weight-only under "int4_weight_only" - never W4A8 - so the second quantizes more and scores higher."""
    from qsparse_compiler.calibration.salient import RTNLinear
    from qsparse_compiler.eval.models import tiny_hunyuan

    linear = torch.nn.Linear(64, 32)
    x = torch.randn(2, 64)
    assert torch.equal(RTNLinear(linear, 32, "int8", "bfloat16", "keep")(x), linear(x))
    packed = quantize_weight_int4(linear.weight, 32)
    expected = torch.ops.qsparse.int4_weight_only_linear(x, packed.qweight, packed.scale, linear.bias, 32)
    torch.testing.assert_close(RTNLinear(linear, 32, "int8", "bfloat16", "int4_weight_only")(x), expected)

    tiny = tiny_hunyuan()
    samples = [{**tiny.make_inputs(), "timestep": torch.tensor([500])}]
    terms = {mode: score_samples(tiny.model, samples, tiny_config(conditioning_linears=mode))[0].quantization
             for mode in ("keep", "int4_weight_only")}
    assert 0 < terms["keep"] < terms["int4_weight_only"], terms
