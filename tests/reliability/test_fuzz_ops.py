"""Fuzzing the qsparse:: ops against exact references over shapes, groups, densities, head dims, batches and
non-contiguous inputs. CPU cases run in CI (the ops' references; the Triton kernels' own fuzz tests run under
TRITON_INTERPRET=1 in tests/kernels); the same properties at larger sizes run on the GPU against the kernels.
Hypothesis prints the falsifying example and a reproduction blob on failure (print_blob=True)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qsparse_compiler.ops  # noqa: F401
from qsparse_compiler.ops.quantization import dequantize_activation, dequantize_weight_int4, quantize_activation, quantize_weight_int4
from qsparse_compiler.sparsity.layout import BlockSparseLayout
from qsparse_compiler.testing.metrics import relative_error, sqnr_db

CPU = settings(max_examples=25, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
GPU = settings(max_examples=40, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])


def _linear_case(seed, m, k_groups, n_groups, group, act_format, transpose_x, device, dtype):
    g = torch.Generator().manual_seed(seed)
    k, n = k_groups * group, n_groups * 16
    x = torch.randn(k, m, generator=g).t() if transpose_x else torch.randn(m, k, generator=g)  # non-contiguous
    weight, bias = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    packed = quantize_weight_int4(weight.to(device), group)
    x = x.to(device, dtype)
    out = torch.ops.qsparse.w4a8_linear(x, packed.qweight, packed.scale, bias.to(device), group, act_format)
    x_hat = dequantize_activation(*quantize_activation(x, act_format)).double()
    exact = x_hat @ dequantize_weight_int4(packed.qweight, packed.scale, group).double().t() + bias.to(device).double()
    return out, exact


@CPU
@given(
    seed=st.integers(0, 2**16), m=st.integers(1, 40), k_groups=st.integers(1, 4), n_groups=st.integers(1, 4),
    group=st.sampled_from([32, 64]), act_format=st.sampled_from(["fp8_e4m3", "int8", "uint8_msfp"]),
    transpose_x=st.booleans(),
)
def test_w4a8_linear_reference_fuzz(seed, m, k_groups, n_groups, group, act_format, transpose_x):
    out, exact = _linear_case(seed, m, k_groups, n_groups, group, act_format, transpose_x, "cpu", torch.bfloat16)
    assert out.shape == exact.shape and relative_error(out, exact) < 5e-3


@pytest.mark.gpu
@GPU
@given(
    seed=st.integers(0, 2**16), m=st.integers(1, 3000), k_groups=st.integers(1, 12), n_groups=st.integers(1, 40),
    group=st.sampled_from([128]), act_format=st.sampled_from(["fp8_e4m3", "int8"]), transpose_x=st.booleans(),
)
def test_w4a8_linear_kernel_fuzz(seed, m, k_groups, n_groups, group, act_format, transpose_x):
    out, exact = _linear_case(seed, m, k_groups, n_groups, group, act_format, transpose_x, "cuda", torch.bfloat16)
    assert sqnr_db(out, exact) > 35  # the kernel computes the same quantized math (bf16 output rounding)


def _attention_case(seed, batch, heads, seq, head_dim, block, density, strided, device, dtype):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, seq, heads, head_dim) if strided else (batch, heads, seq, head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    if strided:  # (B, S, H, D) memory viewed as (B, H, S, D), as diffusers hands it over
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    blocks = math.ceil(seq / block)
    bitmap = torch.rand(batch, heads, blocks, blocks, generator=g) < density
    layout = BlockSparseLayout.from_bitmap(bitmap.to(device), block, block, seq, seq)
    out, lse = torch.ops.qsparse.sparse_attention(q, k, v, layout.kv_num_blocks, layout.kv_indices, block, block,
                                                  head_dim**-0.5, None)
    mask = layout.to_token_mask()
    empty = ~mask.any(-1)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=head_dim**-0.5)
    same_dtype = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=head_dim**-0.5)
    return out, lse, exact, same_dtype, empty


@CPU
@given(
    seed=st.integers(0, 2**16), batch=st.integers(1, 2), heads=st.integers(1, 3), seq=st.integers(1, 70),
    head_dim=st.sampled_from([16, 32]), block=st.sampled_from([16, 32]), density=st.floats(0.0, 1.0),
    strided=st.booleans(),
)
def test_sparse_attention_reference_fuzz(seed, batch, heads, seq, head_dim, block, density, strided):
    out, lse, exact, _, empty = _attention_case(seed, batch, heads, seq, head_dim, block, density, strided, "cpu",
                                                torch.float32)
    assert bool((out[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all())
    if (~empty).any():
        assert relative_error(out[~empty], exact[~empty]) < 1e-5


@pytest.mark.gpu
@GPU
@given(
    seed=st.integers(0, 2**16), batch=st.integers(1, 2), heads=st.integers(1, 6), seq=st.integers(1, 2000),
    head_dim=st.sampled_from([64, 128]), block=st.sampled_from([64, 128]), density=st.floats(0.0, 1.0),
    strided=st.booleans(),
)
def test_sparse_attention_kernel_fuzz(seed, batch, heads, seq, head_dim, block, density, strided):
    out, lse, exact, same_dtype, empty = _attention_case(seed, batch, heads, seq, head_dim, block, density, strided,
                                                         "cuda", torch.bfloat16)
    assert bool((out[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all())
    if (~empty).any():
        # 2x the error of torch's bf16 attention against fp64 (plus a floor for rows torch gets exactly right).
        assert relative_error(out[~empty], exact[~empty]) <= 2 * relative_error(same_dtype[~empty], exact[~empty]) + 1e-3


@CPU
@given(
    seed=st.integers(0, 2**16), m=st.integers(1, 40), k_groups=st.integers(1, 3), n_blocks=st.integers(1, 3),
    group=st.sampled_from([32, 64, 0]), fmt=st.sampled_from(["fp8_e4m3", "int8"]), with_bias=st.booleans(),
)
def test_w4a8_triton_kernel_fuzz_interpreter(seed, m, k_groups, n_blocks, group, fmt, with_bias):
    """The Triton GEMM itself (TRITON_INTERPRET=1 on CPU, plain-Triton unpack) vs the exact quantized math."""
    from qsparse_compiler.kernels.act_quant import act_quant
    from qsparse_compiler.kernels.w4a8_gemm import w4a8_gemm

    g = torch.Generator().manual_seed(seed)
    k, n = k_groups * 64, n_blocks * 32
    x = torch.randn(m, k, generator=g)
    weight = torch.randn(n, k, generator=g) * k**-0.5
    bias = torch.randn(n, generator=g) if with_bias else None
    packed = quantize_weight_int4(weight, group)
    codes, scale = act_quant(x, fmt)
    out = w4a8_gemm(codes, scale, packed.qweight, packed.scale, bias, group, torch.float32, unpack_asm=False)
    exact = (codes.double() * scale.double()[:, None]) @ dequantize_weight_int4(packed.qweight, packed.scale, group).double().t()
    if bias is not None:
        exact = exact + bias.double()
    assert relative_error(out, exact) < 1e-5
