"""kernels/act_quant.py vs ops/quantization.quantize_activation (the reference).

CPU: the same kernel source under TRITON_INTERPRET=1 (set by tests/conftest.py) at tiny shapes.
GPU (@gpu): DiT-sized rows; codes must equal the reference's or sit one code step away.
"""

import pytest
import torch

from qsparse_compiler.kernels.act_quant import act_quant
from qsparse_compiler.formats.quantization import apply_activation, quantize_activation

FORMATS = ("fp8_e4m3", "int8")


def _code_steps(codes: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Distance in code steps between two code tensors of the same format (fp8: neighbours on the e4m3 grid)."""
    if codes.dtype == torch.float8_e4m3fn:
        # e4m3 bit patterns are sign-magnitude and monotone in the magnitude: map to a signed integer line.
        def line(c):
            bits = c.view(torch.uint8).to(torch.int32)
            mag = bits & 0x7F
            return torch.where(bits >= 0x80, -mag, mag)

        return (line(codes) - line(ref)).abs()
    return (codes.to(torch.int32) - ref.to(torch.int32)).abs()


def _check(x: torch.Tensor, fmt: str, min_exact: float = 0.998) -> None:
    """The kernel multiplies by 1/scale where the reference divides by scale: one fp32 ulp apart, so a code on a
    rounding boundary may move one step (measured: <= 0.08% of fp32 codes at K=200)."""
    codes, scale = act_quant(x, fmt)
    ref_codes, ref_scale, zero = quantize_activation(x, fmt)
    assert zero is None
    assert codes.dtype == ref_codes.dtype and codes.shape == x.shape and scale.shape == (x.shape[0],)
    torch.testing.assert_close(scale, ref_scale[:, 0], rtol=0, atol=0)
    steps = _code_steps(codes, ref_codes)
    assert int(steps.max()) <= 1, f"{fmt}: a code is {int(steps.max())} steps from the reference"
    exact = float((steps == 0).float().mean())
    assert exact >= min_exact, f"{fmt}: only {exact:.5f} of the codes equal the reference"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,k", [(1, 32), (7, 96), (33, 200)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matches_reference_cpu(fmt, m, k, dtype):
    x = (torch.randn(m, k) * 3).to(dtype)
    _check(x, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_edge_rows_cpu(fmt):
    """A zero row (eps scale, zero codes), an outlier row, ties at half a step, tiny values (fp8 subnormals)."""
    x = torch.randn(6, 64)
    x[0] = 0
    x[1, 5] = 1e4
    x[2] = torch.arange(64) * 0.5 - 16  # many exact .5 ties for int8 after scaling by 127/amax
    x[3] = x[3] * 1e-5
    x[3, 0] = 1.0  # everything else lands in the e4m3 subnormal range
    x[4] = -x[4].abs()
    _check(x, fmt)
    codes, scale = act_quant(x, fmt)
    assert torch.all(codes[0].float() == 0) and scale[0] > 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_strided_rows_and_preallocated_cpu(fmt):
    big = torch.randn(5, 80)
    x = big[:, :64]  # row stride 80, unit K-stride
    out = torch.empty((5, 64), dtype=torch.float8_e4m3fn if fmt == "fp8_e4m3" else torch.int8)
    scale = torch.empty(5)
    codes, s = act_quant(x, fmt, out=out, scale_out=scale)
    assert codes is out and s is scale
    _check(x.contiguous(), fmt)
    assert torch.equal(codes.view(torch.uint8), act_quant(x.contiguous(), fmt)[0].view(torch.uint8))


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="uint8_msfp"):
        act_quant(torch.randn(2, 32), "uint8_msfp")
    with pytest.raises(ValueError, match="reshape"):
        act_quant(torch.randn(2, 3, 32), "int8")


def test_empty_rows():
    codes, scale = act_quant(torch.randn(0, 32), "int8")
    assert codes.shape == (0, 32) and scale.shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,k", [(1, 1536), (4097, 1536), (513, 8960), (129, 13824), (3, 5120)])
def test_matches_reference_gpu(fmt, m, k):
    x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
    x[0, 7] = 40.0  # an outlier, as in DiT activations
    # GPU division may round differently from torch's in rare cases: one step allowed, and almost all exact.
    _check(x, fmt, min_exact=0.999)


def _check_asym(x: torch.Tensor, min_exact: float = 1.0) -> None:
    from qsparse_compiler.kernels.act_quant import act_quant_asym

    codes, scale, zero = act_quant_asym(x)
    ref_codes, ref_scale, ref_zero = quantize_activation(x, "uint8_msfp")
    assert codes.dtype == torch.uint8
    torch.testing.assert_close(zero, ref_zero[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(scale, ref_scale[:, 0], rtol=0, atol=0)
    steps = _code_steps(codes, ref_codes)
    assert int(steps.max()) <= 1
    assert float((steps == 0).float().mean()) >= min_exact


@pytest.mark.parametrize("m,k", [(1, 32), (9, 200)])
def test_msfp_matches_reference_cpu(m, k):
    x = torch.nn.functional.gelu(torch.randn(m, k) * 2).to(torch.bfloat16)  # near non-negative, as after GELU
    _check_asym(x)


@pytest.mark.gpu
def test_msfp_matches_reference_gpu():
    x = torch.nn.functional.gelu(torch.randn(1031, 8960, device="cuda") * 2).to(torch.bfloat16)
    _check_asym(x, min_exact=0.999)


def test_chunked_layout_cpu():
    x = torch.randn(3, 256)
    codes, _ = act_quant(x, "int8")
    split, _ = act_quant(x, "int8", chunk=64)
    perm = torch.arange(256).reshape(4, 32, 2).transpose(1, 2).reshape(256)
    assert torch.equal(split, codes[:, perm])
    with pytest.raises(ValueError, match="chunk"):
        act_quant(x[:, :96].contiguous(), "int8", chunk=64)


def _check_gelu(x: torch.Tensor, fmt: str) -> None:
    codes, scale = act_quant(x, fmt, activation="gelu_tanh")
    ref_codes, ref_scale, _ = quantize_activation(apply_activation(x.float(), "gelu_tanh"), fmt)
    # tanh via sigmoid vs torch's tanh GELU: a few fp32 ulps apart, so a code may sit one step over.
    torch.testing.assert_close(scale, ref_scale[:, 0], rtol=1e-5, atol=0)
    assert int(_code_steps(codes, ref_codes).max()) <= 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_gelu_prologue_quantizes_gelu_of_the_input(fmt):
    """activation="gelu_tanh": the codes of gelu(x) (the FFN down-projection's input), x read once."""
    x = torch.randn(19, 96) * 3
    _check_gelu(x, fmt)
    with pytest.raises(ValueError, match="activation='relu'"):
        act_quant(x, fmt, activation="relu")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,k", [(513, 8960), (129, 13824)])
def test_gelu_prologue_long_rows_gpu(fmt, m, k):
    """The tiled two-pass form with the GELU prologue, compiled for the GPU (the interpreter runs what a GPU compile
    can refuse)."""
    _check_gelu((torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16), fmt)


@pytest.mark.parametrize("k,pieces,masked", [
    (8960, (8192, 512, 256), False), (1536, (1024, 512), False), (13824, (8192, 4096, 1024, 512), False),
    (200, (128, 64, 16), True), (96, (64, 32), False), (7, (16,), True), (1000, (512, 256, 128, 128), True),
    (32768, (32768,), False),
])
def test_row_pieces(k, pieces, masked):
    from qsparse_compiler.kernels.act_quant import MAX_PIECES, row_pieces

    got, last_masked = row_pieces(k)
    assert (got, last_masked) == (pieces, masked)
    assert len(got) <= MAX_PIECES and sum(got[:-1]) < k <= sum(got)
    assert all(p & (p - 1) == 0 for p in got)


# The interpreter evaluates the GELU's 2**z in numpy, which warns where z overflows (x = -40: 2**z = inf, gelu -> -0,
# the intended saturation); the compiled ex2 returns inf silently.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("fmt", [*FORMATS, "uint8_msfp"])
@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
@pytest.mark.parametrize("m,k", [(3, 448), (5, 200), (2, 1000)])
def test_pieces_cover_the_row_cpu(fmt, activation, m, k):
    """Rows held as several pieces (448 = 256 + 128 + 64; 200 with a masked last piece; 1000 in four pieces, the last
    masked), with a partial last group of rows (m not a multiple of rows per program): the reference's codes, and the
    row's amax found in whichever piece holds it."""
    from qsparse_compiler.kernels import act_quant as module

    x = torch.randn(m, k) * 2
    x[0, k - 1] = 40.0  # the amax in the last piece
    x[-1, 0] = -40.0  # and in the first
    assert module.launch_shape(k, m).row_mask
    if fmt == "uint8_msfp":
        codes, scale, zero = module.act_quant_asym(x, activation)
        ref_codes, ref_scale, ref_zero = quantize_activation(_activated(x, activation), "uint8_msfp")
        exact = 0 if activation == "none" else 1e-5  # the kernel's GELU is a few fp32 ulps from torch's
        torch.testing.assert_close(zero, ref_zero[:, 0], rtol=exact, atol=exact)
        torch.testing.assert_close(scale, ref_scale[:, 0], rtol=exact, atol=0)
        assert int(_code_steps(codes, ref_codes).max()) <= 1
    elif activation == "gelu_tanh":
        _check_gelu(x, fmt)
    else:
        _check(x, fmt)
    if fmt == "int8" and k % 64 == 0:
        codes, _ = act_quant(x, fmt, activation=activation)
        split, _ = act_quant(x, fmt, activation=activation, chunk=64)
        perm = torch.arange(k).reshape(k // 64, 32, 2).transpose(1, 2).reshape(k)
        assert torch.equal(split, codes[:, perm])


def _activated(x: torch.Tensor, activation: str) -> torch.Tensor:
    return x if activation == "none" else apply_activation(x.float(), activation)
