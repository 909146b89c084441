"""kernels/int4_unpack.py's dequantize mode: the (N, K) weight of packed int4 codes and their group scales, bit for
bit what formats.quantization.dequantize_weight_int4(...).to(dtype) returns (the product is exact in fp32 and rounded
once). The 8-bit MMA modes are tested with the GEMM that reads them (test_w4a8_gemm.py)."""

import pytest
import torch

from qsparse_compiler.kernels.int4_unpack import dequantize_int4
from qsparse_compiler.formats.quantization import dequantize_weight_int4, quantize_weight_int4

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _check(n: int, k: int, group_size: int, dtype: torch.dtype, scale_dtype: str, device: str = "cpu") -> None:
    pw = quantize_weight_int4(torch.randn(n, k, device=device) * 0.1, group_size, scale_dtype)
    out = dequantize_int4(pw.qweight, pw.scale, group_size, dtype)
    assert out.shape == (n, k) and out.dtype == dtype and out.device == pw.qweight.device
    assert torch.equal(out, dequantize_weight_int4(pw.qweight, pw.scale, group_size).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group_size", [(40, 128, 0), (33, 320, 32), (7, 512, 64), (1, 64, 0)])
def test_dequantize_equals_reference_bits(n, k, group_size, dtype):
    """Row and column tails (33 rows of 32-row tiles, 160 packed columns of 128-column tiles), per-channel and
    grouped scales; under the CPU interpreter bf16 is rounded onto its grid first (its cast truncates)."""
    _check(n, k, group_size, dtype, "bfloat16")


def test_fp32_scales():
    _check(24, 256, 32, torch.bfloat16, "float32")


def test_empty_weight():
    out = dequantize_int4(torch.empty(0, 32, dtype=torch.uint8), torch.empty(0, 1), 0, torch.bfloat16)
    assert out.shape == (0, 64)


def test_rejects_what_it_cannot_do():
    pw = quantize_weight_int4(torch.randn(16, 128), 32)
    with pytest.raises(ValueError, match=r"scale \(16, 4\) does not fit a \(16, 128\) weight in groups of 64"):
        dequantize_int4(pw.qweight, pw.scale, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="int8"):
        dequantize_int4(pw.qweight, pw.scale, 32, torch.int8)
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_int4(pw.qweight.t(), pw.scale, 32, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group_size", [(18432, 3072, 0), (3072, 3072, 128), (333, 640, 32)])
def test_dequantize_equals_reference_bits_gpu(n, k, group_size, dtype):
    """The GPU cast rounds to nearest even without help (HunyuanVideo's modulation linears: 3072 -> 6 x 3072)."""
    _check(n, k, group_size, dtype, "bfloat16", device="cuda")
