"""The differentiable W4A8 student computes what qsparse::w4a8_linear computes with the packed plan tensors."""

import pytest
import torch

from qsparse_compiler.calibration.fake_quant import FakeQuantLinear, fake_quant_activation, swap_linears
from qsparse_compiler.config import WEIGHT_ONLY
from qsparse_compiler.formats.quantization import dequantize_activation, quantize_activation, quantize_weight_int4
from qsparse_compiler.ops.w4a8_linear import w4a8_linear_reference


@pytest.mark.parametrize("act_format", ["fp8_e4m3", "int8", "uint8_msfp"])
def test_activation_fake_quant_matches_the_op_formats(act_format):
    x = torch.randn(3, 17, 64) * 3
    expected = dequantize_activation(*quantize_activation(x, act_format))
    torch.testing.assert_close(fake_quant_activation(x, act_format), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("group_size", [32, 0])
@pytest.mark.parametrize("act_format", ["fp8_e4m3", "int8"])
def test_initial_student_is_round_to_nearest_and_packs_to_the_same_numbers(group_size, act_format):
    linear = torch.nn.Linear(64, 48)
    fake = FakeQuantLinear(linear, group_size, act_format)
    rtn = quantize_weight_int4(linear.weight, group_size)
    packed = fake.packed()
    assert torch.equal(packed.qweight, rtn.qweight) and torch.equal(packed.scale, rtn.scale)
    x = torch.randn(2, 10, 64)
    expected = w4a8_linear_reference(x, packed.qweight, packed.scale, linear.bias.detach(), group_size, act_format)
    torch.testing.assert_close(fake(x), expected, atol=1e-5, rtol=1e-5)


def test_trained_scales_pack_to_what_the_student_computes():
    linear = torch.nn.Linear(64, 32)
    fake = FakeQuantLinear(linear, 32, "int8")
    with torch.no_grad():
        fake.log_scale.add_(torch.randn_like(fake.log_scale) * 0.05)  # as if trained
    x = torch.randn(4, 64)
    packed = fake.packed()
    expected = w4a8_linear_reference(x, packed.qweight, packed.scale, linear.bias.detach(), 32, "int8")
    torch.testing.assert_close(fake(x), expected, atol=1e-5, rtol=1e-5)


def test_weight_only_student_computes_the_weight_only_op_and_trains():
    """A conditioning linear's student (WEIGHT_ONLY): int4 weights, the activation as it is - the op the backend
    emits for it - and its scales still learn."""
    linear = torch.nn.Linear(64, 32)
    fake = FakeQuantLinear(linear, 32, WEIGHT_ONLY)
    with torch.no_grad():
        fake.log_scale.add_(torch.randn_like(fake.log_scale) * 0.05)
    x = torch.randn(2, 64) * 5
    packed = fake.packed()
    expected = torch.ops.qsparse.int4_weight_only_linear(x, packed.qweight, packed.scale, linear.bias.detach(), 32)
    torch.testing.assert_close(fake(x), expected, atol=1e-5, rtol=1e-5)
    fake(x).pow(2).sum().backward()
    assert fake.log_scale.grad.abs().sum() > 0


def test_scales_receive_gradients_through_the_rounding():
    fake = FakeQuantLinear(torch.nn.Linear(64, 16), 32, "fp8_e4m3")
    fake(torch.randn(5, 64)).pow(2).sum().backward()
    assert fake.log_scale.grad is not None and fake.log_scale.grad.abs().sum() > 0


def test_swap_linears_restores_the_originals_even_on_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    original = model[0]
    with pytest.raises(RuntimeError):
        with swap_linears(model, {"0": torch.nn.Identity()}):
            assert isinstance(model[0], torch.nn.Identity)
            raise RuntimeError("boom")
    assert model[0] is original
