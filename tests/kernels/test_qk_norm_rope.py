"""q/k RMS-norm + rotary embedding: the Triton kernel and ``qsparse::qk_norm_rope`` vs the unfused graph.

The unfused graph is what diffusers' Wan attention runs (``_unfused``: ``F.rms_norm``, unflatten into heads, the
interleaved-pair rotation of ``WanAttnProcessor`` with ``freqs[..., 0::2]`` / ``freqs[..., 1::2]`` views of the
(1, S, 1, D) tables). Numerics follow the 2x rule (``testing.metrics.within_reference_error``): error against the
unfused graph in fp64 at most twice the error of the unfused graph in the inputs' dtype. Conventions that the math
fixes exactly (pair order, zero rows, strided inputs) are checked for equality. On CPU the kernel runs under
TRITON_INTERPRET=1 (tests/conftest.py) at tiny shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qsparse_compiler.ops  # noqa: F401  (registers qsparse::qk_norm_rope)
from qsparse_compiler.kernels.qk_norm_rope import LAUNCH_CONFIGS, launch_config, qk_norm_rope, unsupported_reason
from qsparse_compiler.ops.qk_norm_rope import qk_norm_rope_reference
from qsparse_compiler.eval.metrics import within_reference_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6


def _wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """diffusers' WanAttnProcessor rotation, as written there (x (B, S, H, D), tables (1, S, 1, D))."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _unfused(x, weight, freqs_cos, freqs_sin, heads, norm):
    """The graph the op replaces, in x's dtype (tables as given: the model keeps them in fp32)."""
    if norm == "across_heads":
        y = F.rms_norm(x, (x.shape[-1],), weight, EPS).unflatten(2, (heads, -1))
    else:
        y = x.unflatten(2, (heads, -1))
        y = F.rms_norm(y, (y.shape[-1],), weight, EPS)
    return _wan_rope(y, freqs_cos, freqs_sin)


def _tables(seq_len, head_dim, batch=1, gen=None):
    """Wan-style (B|1, S, 1, D) cos/sin tables: each angle repeated for the two features of its pair."""
    angles = torch.rand(batch, seq_len, 1, head_dim // 2, generator=gen, dtype=torch.float64) * 6.3
    return (torch.cos(angles).repeat_interleave(2, -1).to(torch.float32),
            torch.sin(angles).repeat_interleave(2, -1).to(torch.float32))


def _case(batch, seq_len, heads, head_dim, dtype, norm, weight=True, gen=None, table_batch=1):
    features = heads * head_dim
    q = (torch.randn(batch, seq_len, features, generator=gen) * 3).to(DEVICE, dtype)
    k = torch.randn(batch, seq_len, features, generator=gen).to(DEVICE, dtype)
    width = features if norm == "across_heads" else head_dim
    q_w = (1 + 0.5 * torch.randn(width, generator=gen)).to(DEVICE, dtype) if weight else None
    k_w = (1 + 0.5 * torch.randn(width, generator=gen)).to(DEVICE, dtype) if weight else None
    freqs_cos, freqs_sin = (t.to(DEVICE) for t in _tables(seq_len, head_dim, table_batch, gen))
    return q, k, q_w, k_w, freqs_cos, freqs_sin


def _check_2x(q, k, q_w, k_w, freqs_cos, freqs_sin, heads, norm, run):
    """``run(q, k, q_w, k_w, cos, sin)`` -> (q_out, k_out) must satisfy the 2x rule for both q and k."""
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]  # the strided views the graph holds
    q_out, k_out = run(q, k, q_w, k_w, cos, sin)
    for x, w, out in ((q, q_w, q_out), (k, k_w, k_out)):
        assert out.shape == (*x.shape[:2], heads, x.shape[-1] // heads) and out.dtype == x.dtype
        assert out.is_contiguous()
        exact = _unfused(x.double(), None if w is None else w.double(), freqs_cos.double(), freqs_sin.double(),
                         heads, norm)
        same_dtype = _unfused(x, w, freqs_cos, freqs_sin, heads, norm)
        ok, ours, theirs = within_reference_error(out, same_dtype, exact)
        assert ok, f"error {ours:.3g} > 2 x unfused {x.dtype} error {theirs:.3g}"


def _kernel(heads, norm):
    return lambda q, k, q_w, k_w, cos, sin: qk_norm_rope(q, k, q_w, k_w, cos, sin, heads, EPS, norm)


def _op(heads, norm):
    return lambda q, k, q_w, k_w, cos, sin: torch.ops.qsparse.qk_norm_rope(q, k, q_w, k_w, cos, sin, heads, EPS, norm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("norm", ["across_heads", "per_head"])
def test_kernel_matches_unfused_graph(dtype, norm):
    heads, head_dim = 3, 16  # 3 heads: a padded head tile; 37 tokens: a tail tile
    case = _case(2, 37, heads, head_dim, dtype, norm)
    _check_2x(*case, heads, norm, _kernel(heads, norm))


@pytest.mark.parametrize("norm", ["across_heads", "per_head"])
def test_op_reference_matches_unfused_graph(norm):
    heads = 4
    case = _case(2, 21, heads, 8, torch.bfloat16, norm)
    _check_2x(*case, heads, norm, _op(heads, norm))


def test_no_weight_per_batch_tables_and_2d_tables():
    heads, head_dim = 2, 8
    q, k, _, _, freqs_cos, freqs_sin = _case(2, 11, heads, head_dim, torch.bfloat16, "across_heads", weight=False,
                                             table_batch=2)
    _check_2x(q, k, None, None, freqs_cos, freqs_sin, heads, "across_heads", _kernel(heads, "across_heads"))
    # (S, D/2) tables give what the same (1, S, 1, D/2) tables give, bit for bit.
    cos, sin = freqs_cos[:1, :, :, 0::2], freqs_sin[:1, :, :, 1::2]
    four_d = qk_norm_rope(q, k, None, None, cos, sin, heads, EPS)
    two_d = qk_norm_rope(q, k, None, None, cos[0, :, 0].contiguous(), sin[0, :, 0].contiguous(), heads, EPS)
    assert torch.equal(four_d[0], two_d[0]) and torch.equal(four_d[1], two_d[1])


def test_pair_convention_is_interleaved():
    """cos=0, sin=1 turns pair (y0, y1) into (-y1, y0): against the identity rotation of the same rows, exactly.
    A half-split rotation (pairs (i, i + D/2)) fails this."""
    heads, head_dim = 2, 8
    q, k, q_w, k_w, _, _ = _case(1, 9, heads, head_dim, torch.float32, "across_heads")
    ones, zeros = torch.ones(9, head_dim // 2, device=DEVICE), torch.zeros(9, head_dim // 2, device=DEVICE)
    normed, _ = qk_norm_rope(q, k, q_w, k_w, ones, zeros, heads, EPS)
    turned, _ = qk_norm_rope(q, k, q_w, k_w, zeros, ones, heads, EPS)
    assert torch.equal(turned[..., 0::2], -normed[..., 1::2])
    assert torch.equal(turned[..., 1::2], normed[..., 0::2])


def test_zero_rows_and_strided_inputs():
    heads, head_dim = 2, 8
    q, k, q_w, k_w, freqs_cos, freqs_sin = _case(2, 13, heads, head_dim, torch.bfloat16, "across_heads")
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    q[1, 5] = 0
    q_out, _ = qk_norm_rope(q, k, q_w, k_w, cos, sin, heads, EPS)
    assert torch.all(q_out[1, 5] == 0), "a zero row stays zero (rsqrt(eps) is finite)"
    # q and k as column slices of one fused projection output (row stride 3 * H * D): the same bits as contiguous.
    fused = torch.cat([q, k, torch.randn_like(q)], dim=-1)
    features = heads * head_dim
    strided = qk_norm_rope(fused[..., :features], fused[..., features:2 * features], q_w, k_w, cos, sin, heads, EPS)
    contiguous = qk_norm_rope(q, k, q_w, k_w, cos, sin, heads, EPS)
    assert torch.equal(strided[0], contiguous[0]) and torch.equal(strided[1], contiguous[1])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2),
    seq_len=st.integers(1, 40),
    heads=st.integers(1, 5),
    head_dim=st.sampled_from([2, 6, 8, 12, 16]),
    norm=st.sampled_from(["across_heads", "per_head"]),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    weight=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_odd_shapes(batch, seq_len, heads, head_dim, norm, dtype, weight, seed):
    gen = torch.Generator().manual_seed(seed)
    case = _case(batch, seq_len, heads, head_dim, dtype, norm, weight=weight, gen=gen)
    _check_2x(*case, heads, norm, _kernel(heads, norm))


def test_refusals_name_the_cause():
    q = torch.randn(1, 4, 12)
    cos = torch.randn(4, 3)
    assert "heads" in unsupported_reason(q, q, None, None, cos, cos, 5, "across_heads")
    assert "both" in unsupported_reason(q, q, torch.ones(12), None, cos, cos, 2, "across_heads")
    assert "(6,)" in unsupported_reason(q, q, torch.ones(12), torch.ones(12), cos, cos, 2, "per_head")
    assert "cos" in unsupported_reason(q, q, None, None, torch.randn(5, 3), cos, 2, "across_heads")
    assert "norm" in unsupported_reason(q, q, None, None, cos, cos, 2, "layer")
    with pytest.raises(ValueError, match="qsparse::qk_norm_rope: q_weight has shape"):
        torch.ops.qsparse.qk_norm_rope(q, q, torch.ones(7), torch.ones(7), cos, cos, 2, EPS, "across_heads")


def test_launch_table_covers_the_row_widths():
    for heads, head_dim in ((12, 128), (40, 128), (24, 128), (2, 32)):
        assert launch_config(heads, head_dim)
    for width, launches in LAUNCH_CONFIGS.items():
        for launch in launches:  # <= 64 fp32 values per thread: no register spills
            assert width * launch.rows // (32 * launch.num_warps) <= 64, (width, launch)


def test_op_schema_and_fake():
    heads = 2
    q, k, q_w, k_w, freqs_cos, freqs_sin = _case(1, 6, heads, 8, torch.float32, "across_heads")
    args = (q, k, q_w, k_w, freqs_cos[..., 0::2], freqs_sin[..., 1::2], heads, EPS, "across_heads")
    torch.library.opcheck(torch.ops.qsparse.qk_norm_rope.default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["across_heads", "per_head"])
def test_cuda_op_matches_reference_at_wan_shapes(norm):
    """The CUDA path (Triton kernel through register_kernel) at Wan-1.3B's head layout, 4,096 tokens."""
    heads, head_dim = 12, 128
    case = _case(1, 4096, heads, head_dim, torch.bfloat16, norm)
    _check_2x(*case, heads, norm, _op(heads, norm))
    q, k, q_w, k_w, freqs_cos, freqs_sin = case
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    ours = torch.ops.qsparse.qk_norm_rope(q, k, q_w, k_w, cos, sin, heads, EPS, norm)
    reference = qk_norm_rope_reference(q, k, q_w, k_w, cos, sin, heads, EPS, norm)
    for a, b in zip(ours, reference):  # both fp32 then one rounding: at most one bf16 step apart
        assert (a.float() - b.float()).abs().max() <= 2 ** -7 * b.float().abs().max()
