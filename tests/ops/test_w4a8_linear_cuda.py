"""The CUDA path of qsparse::w4a8_linear (ops/w4a8_cuda.py): glue (reshape, act quant, GEMM, fallbacks) and graphs.

CPU: ``w4a8_linear_cuda`` runs on CPU tensors under TRITON_INTERPRET=1 (same kernels, plain-Triton unpack).
GPU: the registered op, eager and under torch.compile(fullgraph=True), including mode="reduce-overhead" (CUDA graphs).
"""

import pytest
import torch

import qsparse_compiler.ops  # noqa: F401  (registers qsparse:: ops and, with CUDA, the kernel path)
from qsparse_compiler.ops import w4a8_cuda
from qsparse_compiler.formats.quantization import quantize_weight_int4
from qsparse_compiler.formats.quantization import quantize_activation_symmetric
from qsparse_compiler.ops.w4a8_cuda import w4a8_gemm_cuda, w4a8_linear_cuda
from qsparse_compiler.ops.w4a8_linear import w4a8_gemm_reference, w4a8_linear_reference


def sqnr_db(x, ref):
    x, ref = x.double(), ref.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum().clamp_min(1e-300)))


def make(shape, n, group_size, device="cpu", dtype=torch.float32, with_bias=True):
    k = shape[-1]
    x = torch.randn(*shape, device=device).to(dtype)
    pw = quantize_weight_int4(torch.randn(n, k, device=device) * k**-0.5, group_size)
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    return x, pw, bias


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "uint8_msfp"])
@pytest.mark.parametrize("shape,group_size", [((2, 5, 64), 32), ((1, 1, 96), 0), ((3, 64), 64)])
def test_cuda_path_matches_reference_cpu(fmt, shape, group_size):
    x, pw, bias = make(shape, 48, group_size)
    out = w4a8_linear_cuda(x, pw.qweight, pw.scale, bias, group_size, fmt)
    ref = w4a8_linear_reference(x, pw.qweight, pw.scale, bias, group_size, fmt)
    assert out is not None and out.shape == (*shape[:-1], 48) and out.dtype == x.dtype
    assert sqnr_db(out, ref) > 100  # fp32 output: same quantized math up to accumulation order


def test_non_contiguous_input_cpu():
    x, pw, bias = make((4, 128), 32, 32)
    xt = x[:, ::2]  # K-stride 2: the glue must make it contiguous
    pw2 = quantize_weight_int4(torch.randn(32, 64), 32)
    out = w4a8_linear_cuda(xt, pw2.qweight, pw2.scale, None, 32, "int8")
    ref = w4a8_linear_reference(xt, pw2.qweight, pw2.scale, None, 32, "int8")
    assert sqnr_db(out, ref) > 100


def test_pre_unpacked_path_cpu(monkeypatch):
    monkeypatch.setattr(w4a8_cuda, "PRE_UNPACK_MIN_TOKENS", 4)
    for fmt in ("fp8_e4m3", "int8"):
        x, pw, bias = make((2, 3, 128), 32, 64)
        out = w4a8_linear_cuda(x, pw.qweight, pw.scale, bias, 64, fmt)
        ref = w4a8_linear_reference(x, pw.qweight, pw.scale, bias, 64, fmt)
        assert sqnr_db(out, ref) > 100


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("pre_unpack", [False, True])
@pytest.mark.parametrize("group_size", [0, 128])
def test_gemm_on_graph_quantized_codes_cpu(monkeypatch, fmt, pre_unpack, group_size):
    """qsparse::w4a8_gemm's CUDA path (codes from quantize_activation_symmetric, natural layout) == its reference."""
    monkeypatch.setattr(w4a8_cuda, "PRE_UNPACK_MIN_TOKENS", 4 if pre_unpack else 1 << 30)
    x, pw, bias = make((2, 3, 256), 48, group_size)
    codes, scale = quantize_activation_symmetric(x, fmt)
    out = w4a8_gemm_cuda(codes, scale, pw.qweight, pw.scale, bias, group_size, torch.float32)
    ref = w4a8_gemm_reference(codes, scale, pw.qweight, pw.scale, bias, group_size, torch.float32)
    assert out is not None and out.shape == (2, 3, 48)
    assert sqnr_db(out, ref) > 100
    # ... and the two halves together compute what the one-op form computes.
    assert sqnr_db(ref, w4a8_linear_reference(x, pw.qweight, pw.scale, bias, group_size, fmt)) > 100


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "uint8_msfp"])
def test_gelu_folded_into_the_quantization_cpu(fmt):
    x, pw, bias = make((2, 3, 128), 32, 64)
    out = w4a8_linear_cuda(x, pw.qweight, pw.scale, bias, 64, fmt, "gelu_tanh")
    ref = w4a8_linear_reference(x, pw.qweight, pw.scale, bias, 64, fmt, "gelu_tanh")
    assert sqnr_db(out, ref) > 40  # a code may differ by a step (tanh via sigmoid in the kernel)
    unfused = w4a8_linear_reference(torch.nn.functional.gelu(x, approximate="tanh"), pw.qweight, pw.scale, bias, 64, fmt)
    assert sqnr_db(ref, unfused) > 40


def test_unsupported_returns_none_cpu():
    x, pw, bias = make((3, 64), 32, 32)
    assert w4a8_linear_cuda(x, pw.qweight, pw.scale, bias, 32, "nf8") is None
    x16, pw16, _ = make((3, 64), 32, 16)  # group 16 < the 32-wide 8-bit MMA step
    assert w4a8_linear_cuda(x16, pw16.qweight, pw16.scale, None, 16, "int8") is None
    assert w4a8_linear_cuda(x.to(torch.float64), pw.qweight, pw.scale, None, 32, "int8") is None


def test_registered_as_the_ops_cuda_kernels():
    assert w4a8_cuda.REGISTERED  # triton imports here (the interpreter runs the kernels' tests)
    for op in ("w4a8_linear", "w4a8_gemm", "int4_weight_only_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qsparse::{op}", "CUDA"), op
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"qsparse::{op}", "CPU") or op  # CPU: the body


# ---- GPU -----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("lead", [(1, 1), (1, 7), (2, 2049)])  # single token, odd M, larger M
def test_op_uses_kernel_gpu(fmt, lead):
    x, pw, bias = make((*lead, 1536), 1536, 128, "cuda", torch.bfloat16)
    out = torch.ops.qsparse.w4a8_linear(x, pw.qweight, pw.scale, bias, 128, fmt)
    direct = w4a8_linear_cuda(x, pw.qweight, pw.scale, bias, 128, fmt)
    assert torch.equal(out, direct)  # the op dispatched to the kernel
    ref = w4a8_linear_reference(x, pw.qweight, pw.scale, bias, 128, fmt)
    assert sqnr_db(out, ref) >= 40


def test_weight_row_sums_cpu():
    from qsparse_compiler.formats.quantization import dequantize_weight_int4

    for g in (32, 0):
        _, pw, _ = make((1, 128), 24, g)
        ref = dequantize_weight_int4(pw.qweight, pw.scale, g).sum(-1)
        torch.testing.assert_close(w4a8_cuda.weight_row_sums(pw.qweight, pw.scale, g), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [128, 0])
def test_op_msfp_gpu(group_size):
    x, pw, bias = make((5, 1536), 640, group_size, "cuda", torch.bfloat16)
    x = torch.nn.functional.gelu(x * 2)  # MSFP's use case: near non-negative
    out = torch.ops.qsparse.w4a8_linear(x, pw.qweight, pw.scale, bias, group_size, "uint8_msfp")
    ref = w4a8_linear_reference(x, pw.qweight, pw.scale, bias, group_size, "uint8_msfp")
    assert sqnr_db(out, ref) >= 40


class _TwoLinears(torch.nn.Module):
    def __init__(self, k, hidden, fmt):
        super().__init__()
        self.fmt = fmt
        a = quantize_weight_int4(torch.randn(hidden, k, device="cuda") * k**-0.5, 128)
        b = quantize_weight_int4(torch.randn(k, hidden, device="cuda") * hidden**-0.5, 0)
        self.register_buffer("qa", a.qweight)
        self.register_buffer("sa", a.scale)
        self.register_buffer("qb", b.qweight)
        self.register_buffer("sb", b.scale)
        self.register_buffer("bias", torch.randn(hidden, device="cuda", dtype=torch.bfloat16))

    def forward(self, x):
        h = torch.nn.functional.gelu(torch.ops.qsparse.w4a8_linear(x, self.qa, self.sa, self.bias, 128, self.fmt))
        return torch.ops.qsparse.w4a8_linear(h, self.qb, self.sb, None, 0, self.fmt) + x


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("tokens", [77, 1100])  # 2 x 1100 >= PRE_UNPACK_MIN_TOKENS: the pre-unpacked path
def test_compiled_fullgraph_gpu(mode, fmt, tokens):
    torch._dynamo.reset()
    model = _TwoLinears(256, 512, fmt)
    compiled = torch.compile(model, fullgraph=True, mode=mode, dynamic=False)
    with torch.no_grad():
        for step in range(4):  # warm-up, record, then replays (reduce-overhead) on fresh inputs each time
            x = torch.randn(2, tokens, 256, device="cuda", dtype=torch.bfloat16)
            out = compiled(x).clone()
            ref = model(x)
            assert sqnr_db(out, ref) >= 40, f"step {step}"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("with_bias", [True, False])
def test_per_channel_fp8_cublas_path_gpu(monkeypatch, with_bias):
    """Per-channel fp8 at video token counts runs cuBLAS's row-scaled fp8 GEMM on the unpacked weight: as accurate
    as our Triton GEMM on the same codes (both vs the exact quantized math), through both ops."""
    x, pw, bias = make((2, 2100, 1536), 1536, 0, "cuda", torch.bfloat16, with_bias=with_bias)
    codes, scale = quantize_activation_symmetric(x, "fp8_e4m3")
    exact = w4a8_gemm_reference(codes, scale, pw.qweight, pw.scale, bias, 0, torch.float32)
    cublas = torch.ops.qsparse.w4a8_gemm(codes, scale, pw.qweight, pw.scale, bias, 0, torch.bfloat16)
    one_op = torch.ops.qsparse.w4a8_linear(x, pw.qweight, pw.scale, bias, 0, "fp8_e4m3")
    monkeypatch.setattr(w4a8_cuda, "_cublas_fp8_ok", lambda *args: False)
    triton_out = torch.ops.qsparse.w4a8_gemm(codes, scale, pw.qweight, pw.scale, bias, 0, torch.bfloat16)
    assert sqnr_db(triton_out, exact) >= 45
    assert sqnr_db(cublas, exact) >= sqnr_db(triton_out, exact) - 3  # fast accumulation costs at most 3 dB here
    assert sqnr_db(one_op, exact) >= 40  # the kernel's codes may sit a step from the graph quantizer's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,group_size", [((2, 96), 0), ((1, 3, 64), 32)])
def test_int4_weight_only_cuda_path_matches_reference_cpu(shape, group_size, dtype):
    """The weight dequantized by the Triton pass is the reference's, bit for bit, so the linear is too."""
    from qsparse_compiler.formats.quantization import linear_int4_weight_only
    from qsparse_compiler.ops.w4a8_cuda import int4_weight_only_linear_cuda

    x, pw, bias = make(shape, 40, group_size, dtype=dtype)
    out = int4_weight_only_linear_cuda(x, pw.qweight, pw.scale, bias, group_size)
    assert out is not None and torch.equal(out, linear_int4_weight_only(x, pw.qweight, pw.scale, bias, group_size))
    assert int4_weight_only_linear_cuda(x.to(torch.float64), pw.qweight, pw.scale, None, group_size) is None


@pytest.mark.gpu
def test_int4_weight_only_op_uses_kernel_gpu():
    from qsparse_compiler.formats.quantization import linear_int4_weight_only

    assert torch._C._dispatch_has_kernel_for_dispatch_key("qsparse::int4_weight_only_linear", "CUDA")
    x, pw, bias = make((2, 3072), 18432, 0, device="cuda", dtype=torch.bfloat16)
    out = torch.ops.qsparse.int4_weight_only_linear(x, pw.qweight, pw.scale, bias, 0)
    assert torch.equal(out, linear_int4_weight_only(x, pw.qweight, pw.scale, bias, 0))
