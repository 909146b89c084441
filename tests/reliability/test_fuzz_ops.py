"""Fuzzing the qsparse:: ops against exact references over shapes, groups, densities, head dims, batches and
non-contiguous inputs. CPU cases run in CI: the ops' references, and the Triton kernels and the op's kernel path
under TRITON_INTERPRET=1 (tests/conftest.py); the same properties at larger sizes run on the GPU against the kernels.
Every case draws a ``seed`` for its tensors: a failure reports it in the falsifying example, with a reproduction
blob (print_blob=True) - test_a_failing_case_reports_its_seed_and_a_reproduction_blob checks that it does."""

import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qsparse_compiler.ops  # noqa: F401
from qsparse_compiler.formats.quantization import dequantize_activation, dequantize_weight_int4, quantize_activation, quantize_weight_int4
from qsparse_compiler.ops.w4a8_linear import w4a8_linear_reference
from qsparse_compiler.formats.layout import BlockSparseLayout
from qsparse_compiler.eval.metrics import relative_error, sqnr_db, within_reference_error

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


def _attention_case(seed, batch, heads, seq, head_dim, block, density, strided, device, dtype, padded=False,
                    attention=torch.ops.qsparse.sparse_attention):
    """``attention`` (the op, or the Triton kernel itself) on random q, k, v and a random layout; with ``padded`` a
    random key-padding mask (B, 1, 1, S) drops about a fifth of the keys."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, seq, heads, head_dim) if strided else (batch, heads, seq, head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    if strided:  # (B, S, H, D) memory viewed as (B, H, S, D), as diffusers hands it over
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    blocks = math.ceil(seq / block)
    bitmap = torch.rand(batch, heads, blocks, blocks, generator=g) < density
    layout = BlockSparseLayout.from_bitmap(bitmap.to(device), block, block, seq, seq)
    key_padding = (torch.rand(batch, 1, 1, seq, generator=g) < 0.8).to(device) if padded else None
    out, lse = attention(q, k, v, layout.kv_num_blocks, layout.kv_indices, block, block, head_dim**-0.5, key_padding)
    mask = layout.to_token_mask()
    if key_padding is not None:
        mask = mask & key_padding
    empty = ~mask.any(-1)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=head_dim**-0.5)
    same_dtype = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=head_dim**-0.5)
    return out, lse, exact, same_dtype, empty


def _assert_kernel_attention(out, lse, exact, same_dtype, empty):
    """Empty rows exactly 0 / -inf; attended rows within 2x the error of torch's same-dtype attention vs fp64 (plus a
    floor for rows torch gets exactly right)."""
    assert bool((out[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all())
    assert not torch.isnan(out).any()
    if (~empty).any():
        ok, ours, torchs = within_reference_error(out[~empty], same_dtype[~empty], exact[~empty], floor=1e-3)
        assert ok, (ours, torchs)


@CPU
@given(
    seed=st.integers(0, 2**16), batch=st.integers(1, 2), heads=st.integers(1, 3), seq=st.integers(1, 70),
    head_dim=st.sampled_from([16, 32]), block=st.sampled_from([16, 32]), density=st.floats(0.0, 1.0),
    strided=st.booleans(), padded=st.booleans(),
)
def test_sparse_attention_reference_fuzz(seed, batch, heads, seq, head_dim, block, density, strided, padded):
    out, lse, exact, _, empty = _attention_case(seed, batch, heads, seq, head_dim, block, density, strided, "cpu",
                                                torch.float32, padded)
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
    _assert_kernel_attention(*_attention_case(seed, batch, heads, seq, head_dim, block, density, strided, "cuda",
                                              torch.bfloat16))


@CPU
@given(
    seed=st.integers(0, 2**16), batch=st.integers(1, 2), heads=st.integers(1, 3), seq=st.integers(1, 70),
    head_dim=st.sampled_from([16, 32, 64]), block=st.sampled_from([16, 32]), density=st.floats(0.0, 1.0),
    strided=st.booleans(), padded=st.booleans(), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
)
def test_sparse_attention_triton_kernel_fuzz_interpreter(seed, batch, heads, seq, head_dim, block, density, strided,
                                                         padded, dtype):
    """The Triton kernel itself (TRITON_INTERPRET=1 on CPU): head dims, both half dtypes, (B, S, H, D) strided views
    and key-padding masks, which the kernel's own fuzz test (tests/kernels, unequal layout blocks) does not vary."""
    from qsparse_compiler.kernels.block_sparse_attention import block_sparse_attention

    _assert_kernel_attention(*_attention_case(seed, batch, heads, seq, head_dim, block, density, strided, "cpu",
                                              dtype, padded, block_sparse_attention))


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


@CPU
@given(
    seed=st.integers(0, 2**16), batch=st.integers(1, 2), tokens=st.integers(1, 24), k_groups=st.integers(1, 3),
    n_blocks=st.integers(1, 3), group=st.sampled_from([32, 64, 0]), fmt=st.sampled_from(["fp8_e4m3", "int8", "uint8_msfp"]),
    activation=st.sampled_from(["none", "gelu_tanh"]), layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_w4a8_linear_kernel_path_fuzz_interpreter(seed, batch, tokens, k_groups, n_blocks, group, fmt, activation,
                                                  layout, dtype):
    """What qsparse::w4a8_linear runs on the GPU (ops/w4a8_cuda.py: reshape, act-quant kernel, GEMM kernel), under
    TRITON_INTERPRET=1: batched (B, S, K) inputs, non-contiguous views, the folded GELU, all formats, vs the op's
    reference (the same quantized math in plain torch)."""
    from qsparse_compiler.ops.w4a8_cuda import w4a8_linear_cuda

    g = torch.Generator().manual_seed(seed)
    k, n = k_groups * 64, n_blocks * 32
    if layout == "transposed":  # tokens and features swapped in memory: K-stride != 1
        x = torch.randn(batch, k, tokens, generator=g).transpose(1, 2)
    elif layout == "strided":  # every other feature of a wider tensor
        x = torch.randn(batch, tokens, 2 * k, generator=g)[..., ::2]
    else:
        x = torch.randn(batch, tokens, k, generator=g)
    x = x.to(dtype)
    packed = quantize_weight_int4(torch.randn(n, k, generator=g) * k**-0.5, group)
    bias = torch.randn(n, generator=g).to(dtype)
    out = w4a8_linear_cuda(x, packed.qweight, packed.scale, bias, group, fmt, activation)
    expected = w4a8_linear_reference(x, packed.qweight, packed.scale, bias, group, fmt, activation)
    assert out is not None and out.shape == (batch, tokens, n) and out.dtype == dtype
    # The same codes up to accumulation order (~140 dB in fp32); a folded GELU may land an activation one code step
    # away (~60 dB), bf16 output rounding ~50 dB. A wrong scale, group or nibble order is below 20 dB.
    assert sqnr_db(out, expected) > 40


def test_a_failing_case_reports_its_seed_and_a_reproduction_blob(monkeypatch):
    """A fuzz failure is only useful if it can be replayed: the falsifying example must name the tensor seed (with the
    shapes) and print_blob must add the @reproduce_failure line. Checked on a real fuzz test, made to fail."""
    monkeypatch.setattr(sys.modules[__name__], "relative_error", lambda actual, expected: math.inf)
    # Fewer cases and no example database, so the forced failure is not stored and replayed by the real test.
    monkeypatch.setattr(test_w4a8_linear_reference_fuzz, "_hypothesis_internal_use_settings",
                        settings(CPU, max_examples=3, database=None))
    with pytest.raises(AssertionError) as info:
        test_w4a8_linear_reference_fuzz()
    report = "\n".join(getattr(info.value, "__notes__", []))
    assert re.search(r"seed=\d+", report) and re.search(r"\bm=\d+", report), report
    assert "@reproduce_failure(" in report, report
