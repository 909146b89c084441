"""LayerNorm + adaLN modulation + per-token quantization: ``qsparse::layer_norm_modulate_quant`` and its Triton kernel
vs the unfused graph of a Wan block (diffusers' FP32LayerNorm, ``* (1 + scale) + shift``, ``.type_as(h)``, then
``quantize_activation_symmetric``).

The op's reference must equal the unfused graph bit for bit (same ops, same order). The kernel's codes must equal the
reference's or sit one code step away (its LayerNorm reduces in another order and it multiplies by 1/scale, so a value
on a rounding boundary may move), and its dequantized activation must meet the 2x rule against an fp64 evaluation.
On CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) at tiny shapes.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.normalization import FP32LayerNorm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qsparse_compiler.ops  # noqa: F401  (registers qsparse::layer_norm_modulate_quant)
from qsparse_compiler.kernels.ln_modulate_quant import LAUNCH_CONFIGS, ln_modulate_quant, unsupported_reason
from qsparse_compiler.ops.ln_modulate_quant import layer_norm_modulate_quant_reference
from qsparse_compiler.formats.quantization import quantize_activation_symmetric
from qsparse_compiler.eval.metrics import within_reference_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = ("fp8_e4m3", "int8")
EPS = 1e-6


def _code_steps(codes: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Distance in code steps (fp8: neighbours on the e4m3 grid, via its sign-magnitude bit patterns)."""
    if codes.dtype == torch.float8_e4m3fn:
        def line(c):
            bits = c.view(torch.uint8).to(torch.int32)
            return torch.where(bits >= 0x80, -(bits & 0x7F), bits & 0x7F)

        return (line(codes) - line(ref)).abs()
    return (codes.to(torch.int32) - ref.to(torch.int32)).abs()


def _unfused(h, norm, scale, shift, act_format):
    """Wan's ``(norm(h.float()) * (1 + scale) + shift).type_as(h)`` and the quantization in front of the GEMM."""
    y = norm(h.float())
    if scale is not None:
        y = y * (1 + scale) + shift
    return quantize_activation_symmetric(y.type_as(h), act_format)


def _case(batch, seq_len, k, dtype, affine, modulate, per_token=False, gen=None):
    h = (torch.randn(batch, seq_len, k, generator=gen) * 4 + 1).to(DEVICE, dtype)
    norm = FP32LayerNorm(k, eps=EPS, elementwise_affine=affine).to(DEVICE)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(k, generator=gen))
            norm.bias.copy_(0.2 * torch.randn(k, generator=gen))
    scale = shift = None
    if modulate:  # fp32, as Wan's scale_shift_table + temb.float() chunks are
        rows = seq_len if per_token else 1
        scale = (0.5 * torch.randn(batch, rows, k, generator=gen)).to(DEVICE)
        shift = (0.5 * torch.randn(batch, rows, k, generator=gen)).to(DEVICE)
    return h, norm, scale, shift


def _params(norm):
    return (norm.weight, norm.bias) if norm.elementwise_affine else (None, None)


def _check_kernel(h, norm, scale, shift, act_format, min_exact=0.99):
    weight, bias = _params(norm)
    with torch.no_grad():
        codes, act_scale = ln_modulate_quant(h, weight, bias, scale, shift, EPS, act_format)
        ref_codes, ref_scale = _unfused(h, norm, scale, shift, act_format)
    m, k = h.shape[0] * h.shape[1], h.shape[2]
    assert codes.shape == (m, k) and codes.dtype == ref_codes.dtype and act_scale.shape == (m,)
    ref_codes, ref_scale = ref_codes.reshape(m, k), ref_scale.reshape(m)
    # The row amax is of the activation rounded to h's dtype: one ulp of that dtype at most.
    torch.testing.assert_close(act_scale, ref_scale, rtol=2 ** -7, atol=0)
    steps = _code_steps(codes, ref_codes)
    assert int(steps.max()) <= 1, f"a code is {int(steps.max())} steps from the unfused graph's"
    assert float((steps == 0).float().mean()) >= min_exact
    # Dequantized: the 2x rule against fp64 LayerNorm + modulation.
    with torch.no_grad():
        y64 = torch.nn.functional.layer_norm(h.double(), (k,), None if weight is None else weight.double(),
                                             None if bias is None else bias.double(), EPS)
        if scale is not None:
            y64 = y64 * (1 + scale.double()) + shift.double()
    ours = codes.float() * act_scale[:, None]
    theirs = ref_codes.float() * ref_scale[:, None]
    ok, error, reference_error = within_reference_error(ours, theirs, y64.reshape(m, k))
    assert ok, f"dequantized error {error:.3g} > 2 x unfused {reference_error:.3g}"


@pytest.mark.parametrize("act_format", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("affine, modulate", [(False, True), (True, False), (True, True)])
def test_kernel_matches_unfused_graph(act_format, dtype, affine, modulate):
    h, norm, scale, shift = _case(2, 19, 96, dtype, affine, modulate)
    _check_kernel(h, norm, scale, shift, act_format)


def test_per_token_modulation_and_strided_rows():
    """Wan 2.2's per-token (B, S, K) modulation; x as a column slice of a wider tensor (row stride 2K)."""
    h, norm, scale, shift = _case(2, 9, 64, torch.bfloat16, False, True, per_token=True)
    _check_kernel(h, norm, scale, shift, "fp8_e4m3")
    wide = torch.cat([h, torch.randn_like(h)], dim=-1)[..., :64]
    assert torch.equal(ln_modulate_quant(wide, None, None, scale, shift, EPS, "fp8_e4m3")[0].view(torch.uint8),
                       ln_modulate_quant(h, None, None, scale, shift, EPS, "fp8_e4m3")[0].view(torch.uint8))


@pytest.mark.parametrize("act_format", FORMATS)
def test_reference_is_the_unfused_graph_bit_for_bit(act_format):
    for affine, modulate in ((False, True), (True, False), (True, True), (False, False)):
        h, norm, scale, shift = _case(2, 7, 48, torch.bfloat16, affine, modulate)
        with torch.no_grad():
            codes, act_scale = torch.ops.qsparse.layer_norm_modulate_quant(h, *_params(norm), scale, shift, EPS,
                                                                          act_format)
            ref_codes, ref_scale = _unfused(h, norm, scale, shift, act_format)
        assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8)) and torch.equal(act_scale, ref_scale)


def test_constant_row_gives_zero_codes():
    """A constant row normalizes to 0: without bias or shift the codes are 0 and the scale is 1e-12 / QMAX."""
    h = torch.full((1, 3, 32), 2.5, device=DEVICE, dtype=torch.bfloat16)
    codes, act_scale = ln_modulate_quant(h, None, None, None, None, EPS, "int8")
    assert torch.all(codes == 0) and torch.all(act_scale == torch.tensor(1e-12 / 127.0))


@pytest.mark.parametrize("k", [240, 1000, 1536])
@pytest.mark.parametrize("per_token", [False, True])
def test_row_pieces_and_partial_programs(k, per_token):
    """Rows held as several pieces (240 = 128 + 64 + 32 + 16; 1,000 with a masked fourth piece; Wan's 1,536 =
    1,024 + 512) and 7 rows, not a multiple of the rows per program: the unfused graph's codes and scales."""
    from qsparse_compiler.kernels.ln_modulate_quant import block_constexprs, launch_config

    assert block_constexprs(7, k, launch_config(k)[0])["ROW_MASK"]
    gen = torch.Generator().manual_seed(k)
    h, norm, scale, shift = _case(1, 7, k, torch.bfloat16, True, True, per_token=per_token, gen=gen)
    _check_kernel(h, norm, scale, shift, "fp8_e4m3")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2),
    seq_len=st.integers(1, 12),
    k=st.integers(2, 300),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    act_format=st.sampled_from(FORMATS),
    affine=st.booleans(),
    modulate=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_odd_shapes(batch, seq_len, k, dtype, act_format, affine, modulate, seed):
    gen = torch.Generator().manual_seed(seed)
    h, norm, scale, shift = _case(batch, seq_len, k, dtype, affine, modulate, gen=gen)
    _check_kernel(h, norm, scale, shift, act_format, min_exact=0.97)


def test_refusals_and_schema():
    x = torch.randn(1, 4, 8)
    assert "both" in unsupported_reason(x, None, None, torch.randn(1, 1, 8), None, "int8")
    assert "(B|1, S|1, 8)" in unsupported_reason(x, None, None, torch.randn(3, 1, 8), torch.randn(3, 1, 8), "int8")
    assert "uint8_msfp" in unsupported_reason(x, None, None, None, None, "uint8_msfp")
    assert "K=16384" in unsupported_reason(torch.randn(1, 1, 16384), None, None, None, None, "int8")
    for width, launches in LAUNCH_CONFIGS.items():
        assert all(width * launch.rows // (32 * launch.num_warps) <= 64 for launch in launches)
    args = (x, torch.randn(8), torch.randn(8), torch.randn(1, 1, 8), torch.randn(1, 1, 8), EPS, "fp8_e4m3")
    torch.library.opcheck(torch.ops.qsparse.layer_norm_modulate_quant.default, args)
    with pytest.raises(ValueError, match="qsparse::layer_norm_modulate_quant: bias has shape"):
        layer_norm_modulate_quant_reference(x, None, torch.randn(7), None, None, EPS, "int8")


@pytest.mark.gpu
@pytest.mark.parametrize("act_format", FORMATS)
def test_cuda_op_matches_unfused_at_wan_shapes(act_format):
    """The CUDA path (Triton kernel through register_kernel) at Wan-1.3B's width, 4,096 tokens."""
    h, norm, scale, shift = _case(1, 4096, 1536, torch.bfloat16, False, True)
    with torch.no_grad():
        codes, act_scale = torch.ops.qsparse.layer_norm_modulate_quant(h, None, None, scale, shift, EPS, act_format)
        ref_codes, ref_scale = _unfused(h, norm, scale, shift, act_format)
    assert codes.shape == h.shape and act_scale.shape == (1, 4096, 1)
    torch.testing.assert_close(act_scale, ref_scale, rtol=2 ** -7, atol=0)
    steps = _code_steps(codes, ref_codes)
    assert int(steps.max()) <= 1 and float((steps == 0).float().mean()) >= 0.99
