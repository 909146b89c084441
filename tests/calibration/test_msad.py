"""MSAD lowers the distillation loss of a block below round-to-nearest's, and packs what it learned."""

import torch

from qsparse_compiler.calibration.hooks import block_linear_names
from qsparse_compiler.calibration.msad import _salient_weights, capture_block_inputs, distill_block
from qsparse_compiler.formats.quantization import quantize_weight_int4
from qsparse_compiler.plan.schema import LinearPlan
from qsparse_compiler.formats.patterns import TokenGrid

from ._tiny import tiny_config, wan_and_samples


def test_msad_reduces_the_distillation_loss_vs_rtn():
    tiny, samples = wan_and_samples(count=3)
    config = tiny_config(msad_steps=30)
    linears = {fqn: LinearPlan(32, "fp8_e4m3", "bfloat16") for fqn in block_linear_names(tiny.model, config.site_pattern)}
    packed, lora, result = distill_block(tiny.model, "blocks.0", tiny.model.blocks[0], samples, [0, 1, 2], linears,
                                   {"blocks.0.attn1": "local3d:0.3"}, config, 16, 16)
    assert result.kept == "msad" and result.steps == 30
    assert lora == {} and result.loss_lora is None  # timestep-aware LoRA is off by default
    assert result.loss_msad < 0.9 * result.loss_rtn, result
    assert set(result.terms_rtn) == {"output", "global", "local", "total"}
    assert set(packed) == set(linears)
    changed = 0
    for fqn, weight in packed.items():
        rtn = quantize_weight_int4(tiny.model.get_submodule(fqn).weight, 32)
        assert weight.qweight.shape == rtn.qweight.shape and weight.scale.dtype == torch.bfloat16
        changed += int(not torch.equal(weight.scale, rtn.scale))
    assert changed > 0  # the learned scales are what gets packed


def test_zero_steps_keep_round_to_nearest():
    tiny, samples = wan_and_samples(count=2)
    config = tiny_config(msad_steps=0)
    linears = {"blocks.0.ffn.net.2": LinearPlan(32, "uint8_msfp", "bfloat16")}
    packed, lora, result = distill_block(tiny.model, "blocks.0", tiny.model.blocks[0], samples, [0, 1], linears,
                                   {"blocks.0.attn1": "dense"}, config, 16, 16)
    rtn = quantize_weight_int4(tiny.model.blocks[0].ffn.net[2].weight, 32)
    assert torch.equal(packed["blocks.0.ffn.net.2"].qweight, rtn.qweight)
    assert result.loss_msad == result.loss_rtn


def test_block_inputs_are_captured_without_running_the_rest():
    tiny, samples = wan_and_samples(num_layers=2, count=2)
    calls = []
    handle = tiny.model.proj_out.register_forward_hook(lambda *args: calls.append(1))
    captured = capture_block_inputs(tiny.model, tiny.model.blocks[1], samples, [0, 1])
    handle.remove()
    assert len(captured) == 2 and calls == []  # the forward stops at the block
    args, kwargs = captured[0]
    assert args[0].shape == (1, 192, 64)


def test_salient_token_weights_pick_the_most_attended_tokens():
    out = torch.zeros(1, 10, 4)
    received = torch.arange(10.0).view(1, 10)
    weights = _salient_weights(out, [(received, TokenGrid(1, 2, 5, 10))], fraction=0.2)
    assert weights.nonzero()[:, 1].tolist() == [8, 9]
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def test_timestep_aware_lora_lowers_the_loss_further_with_the_scales_frozen():
    tiny, samples = wan_and_samples(count=3)  # timesteps 100, 500, 900: buckets 0, 2, 3 of edges (250, 500, 750)
    config = tiny_config(msad_steps=10, lora_rank=2, lora_steps=40, lora_lr=1e-2)
    names = ["blocks.0.attn1.to_out.0", "blocks.0.ffn.net.2"]
    linears = {fqn: LinearPlan(32, "int8", "bfloat16") for fqn in names}
    common = (tiny.model, "blocks.0", tiny.model.blocks[0], samples, [0, 1, 2], linears, {"blocks.0.attn1": "dense"})
    packed, lora, result = distill_block(*common, config, 16, 16)
    scales_only, _, _ = distill_block(*common, tiny_config(msad_steps=10), 16, 16)
    assert result.kept_lora and result.loss_lora < min(result.loss_msad, result.loss_rtn), result
    for fqn in names:  # the LoRA stage does not move the scales: the weights are right without LoRA too
        assert torch.equal(packed[fqn].scale, scales_only[fqn].scale)
    a, b = lora["blocks.0.ffn.net.2.lora_a"], lora["blocks.0.ffn.net.2.lora_b"]
    assert a.shape == (4, 2, 128) and b.shape == (4, 64, 2) and a.dtype == torch.bfloat16
    assert b[1].abs().sum() == 0 and b[0].abs().sum() > 0  # no sample in bucket 1 (250..500): untouched, a no-op


def test_dfa_weights_follow_the_squared_denoising_factor():
    import pytest

    from qsparse_compiler.calibration.dfa import denoising_factor, dfa_weights

    # shift 3: f(t) ~ (3 - 2 sigma)^2 / 3; at t = 900 (sigma 0.9) 1.2^2 / 3 = 0.48, at t = 100: 2.8^2 / 3 = 2.6133
    torch.testing.assert_close(denoising_factor(torch.tensor([900.0, 100.0]), 3.0),
                               torch.tensor([0.48, 2.8**2 / 3], dtype=torch.float64))
    weights = dfa_weights([torch.tensor([900.0]), torch.tensor([100.0])], 3.0)
    assert weights[1] / weights[0] == pytest.approx((2.8**2 / 1.2**2) ** 2)  # squared factors: the loss is an MSE
    assert sum(weights) / 2 == pytest.approx(1.0)
    # a batch's rows at different timesteps: the mean of their squared factors
    both = dfa_weights([torch.tensor([900.0, 100.0]), torch.tensor([500.0])], 3.0)
    raw = [(0.48**2 + (2.8**2 / 3) ** 2) / 2, (2.0**2 / 3) ** 2]
    assert both[0] / both[1] == pytest.approx(raw[0] / raw[1])
    assert dfa_weights([torch.tensor([900.0]), torch.tensor([100.0])], 1.0) == [1.0, 1.0]  # no shift: equal steps


def test_dfa_weights_each_samples_loss_by_its_factor():
    """With DFA the block's loss is the mean over samples of weight_j x (sample j's own loss)."""
    from qsparse_compiler.calibration.dfa import dfa_weights

    tiny, samples = wan_and_samples(count=2)  # timesteps 100 and 900
    names = block_linear_names(tiny.model, tiny_config().site_pattern)
    linears = {fqn: LinearPlan(32, "fp8_e4m3", "bfloat16") for fqn in names}
    specs = {"blocks.0.attn1": "local3d:0.3"}

    def loss(ids, **overrides):
        config = tiny_config(msad_steps=0, **overrides)
        return distill_block(tiny.model, "blocks.0", tiny.model.blocks[0], samples, ids, linears, specs, config, 16,
                             16)[2].loss_rtn

    own = [loss([0]), loss([1])]
    weights = dfa_weights([samples[0]["timestep"], samples[1]["timestep"]], 3.0)
    weighted = loss([0, 1], dfa=True, dfa_flow_shift=3.0)
    assert abs(weighted - (weights[0] * own[0] + weights[1] * own[1]) / 2) < 1e-6 * max(own)
    assert abs(loss([0, 1]) - (own[0] + own[1]) / 2) < 1e-6 * max(own)
    assert abs(weighted - loss([0, 1])) > 1e-3 * max(own)  # the option changes the loss
    assert loss([0, 1], dfa=True, dfa_flow_shift=1.0) == loss([0, 1])  # no shift: no change


def test_dfa_options_are_validated():
    import pytest

    from qsparse_compiler.config import ConfigError

    with pytest.raises(ConfigError, match="dfa="):
        tiny_config(dfa=1)
    for bad in (0.5, float("nan"), float("inf"), True):
        with pytest.raises(ConfigError, match="dfa_flow_shift"):
            tiny_config(dfa=True, dfa_flow_shift=bad)
