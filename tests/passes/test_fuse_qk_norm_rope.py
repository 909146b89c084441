"""The fuse_qk_norm_rope pass: which q/k norm + rope subgraphs become ``qsparse::qk_norm_rope``, which stay (and why),
and that the fused graph equals the unfused one (fp32: to rounding; bf16: the 2x rule against an fp32 run of the
unfused graph). Graphs are rewritten without Inductor (``testing.capture``); ops run their references."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from qsparse_compiler.config import QuantSparseConfig
from qsparse_compiler.compiler.passes import PassContext, default_passes, run_passes
from qsparse_compiler.compiler.passes.fuse_qk_norm_rope import FuseQkNormRope
from qsparse_compiler.compiler.passes.report import RewriteReport
from qsparse_compiler.eval.capture import capture_dynamo_graph, rewrite_with_default_passes
from qsparse_compiler.eval.metrics import relative_error, within_reference_error
from qsparse_compiler.eval.models import EXACT_OPTIONS, tiny_wan

# What the toy attention can do differently from Wan: the pass fuses "wan" and "per_head", and keeps the others.
VARIANTS = {
    "wan": "",
    "per_head": "",
    "half_split": "not from the interleaved rotation",
    "reused_norm": "is also read by",
    "sin_cos_swapped": "the odd features are not pair[0] sin + pair[1] cos",
}


def _wan_rope(x, freqs_cos, freqs_sin, variant):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = (x1 * cos + x2 * sin) if variant == "sin_cos_swapped" else (x1 * sin + x2 * cos)
    return out.type_as(x)


def _ulysses_all_to_all(x):
    """diffusers' Ulysses attention before the SDPA (TemplatedUlyssesAttention): (B, S/W, H, D) of the rank's sequence
    shard -> (B, S, H/W, D) of its head shard, through one all-to-all of the default group (W = its size)."""
    world = dist.get_world_size()
    b, s, h, d = x.shape
    x = x.reshape(b, s, world, h // world, d).permute(2, 1, 0, 3, 4).contiguous()
    shape = x.shape
    x = funcol.wait_tensor(funcol.all_to_all_single(x.flatten(), None, None, dist.group.WORLD).reshape(shape))
    return x.flatten(0, 1).permute(1, 0, 2, 3).contiguous()


def _half_split_rope(x, freqs_cos, freqs_sin):
    x1, x2 = x.chunk(2, dim=-1)
    return (x * freqs_cos + torch.cat([-x2, x1], dim=-1) * freqs_sin).type_as(x)


class ToyRopeAttention(nn.Module):
    """Wan's self-attention with its q/k RMS norm and rope, written as diffusers writes them, in a ``VARIANTS`` form."""

    def __init__(self, dim: int, heads: int, variant: str) -> None:
        super().__init__()
        self.heads, self.variant = heads, variant
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))
        width = dim // heads if variant == "per_head" else dim
        self.norm_q, self.norm_k = nn.RMSNorm(width, eps=1e-6), nn.RMSNorm(width, eps=1e-6)
        with torch.no_grad():
            self.norm_q.weight.uniform_(0.5, 1.5)
            self.norm_k.weight.uniform_(0.5, 1.5)

    def forward(self, x, freqs_cos, freqs_sin):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if self.variant == "per_head":
            q, k = self.norm_q(q.unflatten(2, (self.heads, -1))), self.norm_k(k.unflatten(2, (self.heads, -1)))
        else:
            q, k = self.norm_q(q), self.norm_k(k)
            extra = q.mean() if self.variant == "reused_norm" else 0.0
            q, k = q.unflatten(2, (self.heads, -1)), k.unflatten(2, (self.heads, -1))
        v = v.unflatten(2, (self.heads, -1))
        if self.variant == "half_split":
            q, k = _half_split_rope(q, freqs_cos, freqs_sin), _half_split_rope(k, freqs_cos, freqs_sin)
        else:
            q, k = (_wan_rope(t, freqs_cos, freqs_sin, self.variant) for t in (q, k))
        if self.variant == "ulysses":
            q, k, v = (_ulysses_all_to_all(t) for t in (q, k, v))
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).flatten(2, 3)
        out = self.to_out(out)
        return out + extra if self.variant == "reused_norm" else out


class ToyRopeDiT(nn.Module):
    """Conv3d patchify (the video grid), Wan-style (1, S, 1, D) rope tables, one attention block."""

    def __init__(self, variant: str = "wan", dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv3d(4, dim, (1, 2, 2), stride=(1, 2, 2))
        self.blocks = nn.ModuleList([ToyRopeAttention(dim, heads, variant)])
        angles = torch.rand(256, dim // heads // 2) * 6.3
        self.register_buffer("freqs_cos", torch.cos(angles).repeat_interleave(2, -1), persistent=False)
        self.register_buffer("freqs_sin", torch.sin(angles).repeat_interleave(2, -1), persistent=False)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        s = h.shape[1]
        freqs_cos, freqs_sin = self.freqs_cos[:s].reshape(1, s, 1, -1), self.freqs_sin[:s].reshape(1, s, 1, -1)
        for block in self.blocks:
            h = h + block(h, freqs_cos, freqs_sin)
        return h


def _toy_inputs(dtype=torch.float32):
    return {"x": torch.randn(1, 4, 3, 8, 8, dtype=dtype)}


def _fused_output(model, inputs, options=EXACT_OPTIONS, fuse=True):
    """Output of the default passes' rewrite (with or without this pass) run eagerly, and its report."""
    counters.clear()
    passes = [p for p in default_passes() if fuse or not isinstance(p, FuseQkNormRope)]
    with torch.no_grad():
        gm, example_inputs = capture_dynamo_graph(model, inputs)
        ctx = PassContext(QuantSparseConfig.from_options(options), example_inputs, RewriteReport(0))
        gm = run_passes(gm, ctx, passes)
        out = gm(*ctx.example_inputs, *ctx.extra_example_inputs)[0]
    return out, gm, ctx


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_toy_variants_fused_or_kept_with_reason(variant):
    model = ToyRopeDiT(variant).eval()
    inputs = _toy_inputs()
    out, gm, ctx = _fused_output(model, inputs)
    site = next(s for s in ctx.report.sites if s.kind == "fusion")
    assert site.fqn == "blocks.0.qk_norm_rope"
    if VARIANTS[variant]:
        assert site.action == "kept" and VARIANTS[variant] in site.reason, site.reason
        assert counters["qsparse"]["kept_qk_norm_rope"] == 1 and counters["qsparse"]["qk_norm_rope"] == 0
    else:
        assert site.action == "qk_norm_rope" and site.details["norm"] == variant.replace("wan", "across_heads")
        assert counters["qsparse"]["qk_norm_rope"] == 1
        targets = [n.target for n in gm.graph.nodes]
        assert torch.rms_norm not in targets and torch.empty_like not in targets
        assert targets.count(torch.ops.qsparse.qk_norm_rope.default) == 1
    with torch.no_grad():
        expected = model(**inputs)
    assert relative_error(out, expected) < 1e-5


@pytest.mark.slow
def test_tiny_wan_every_block_fused_and_bf16_within_2x_of_unfused():
    tiny = tiny_wan(num_layers=2)
    inputs = tiny.make_inputs()
    exact, _, _ = _fused_output(tiny.model, inputs, fuse=False)
    fused32, _, ctx = _fused_output(tiny.model, inputs)
    assert [s.fqn for s in ctx.report.rewritten("qk_norm_rope")] == ["blocks.0.attn1.qk_norm_rope",
                                                                    "blocks.1.attn1.qk_norm_rope"]
    assert counters["qsparse"]["qk_norm_rope"] == 2  # cross-attention (attn2) q/k norms are not candidates
    assert relative_error(fused32, exact) < 1e-5

    model16 = tiny.model.to(torch.bfloat16)
    inputs16 = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in inputs.items()}
    unfused16, _, _ = _fused_output(model16, inputs16, fuse=False)
    fused16, _, _ = _fused_output(model16, inputs16)
    ok, ours, theirs = within_reference_error(fused16, unfused16, exact)
    assert ok, f"fused bf16 error {ours:.3g} > 2 x unfused bf16 error {theirs:.3g}"


def test_dense_attention_is_not_a_candidate():
    """Sparsity off: no qsparse attention, so nothing to fuse and nothing to report."""
    model = ToyRopeDiT("wan").eval()
    _, _, ctx = _fused_output(model, _toy_inputs(), {**EXACT_OPTIONS, "sparsity": {"enabled": False}})
    assert not [s for s in ctx.report.sites if s.kind == "fusion"]


def test_fused_graph_rewrites_with_default_options():
    """With W4A8 linears in front (the default pipeline), the norm reads the w4a8 GEMM's output and still fuses."""
    model = ToyRopeDiT("wan").eval()
    options = {"quant": {"group_size": 32}, "sparsity": {"block_q": 16, "block_kv": 16}}
    _, sites, _ = rewrite_with_default_passes(model, _toy_inputs(), options)
    assert sites["blocks.0.qk_norm_rope"].action == "qk_norm_rope"
    assert sites["blocks.0.to_q"].action == "w4a8_linear"


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fuses_through_the_ulysses_all_to_all(one_process_group):
    """Under diffusers' context parallelism q/k reach the attention through the all-to-all that trades the sequence
    shard for a head shard. The pass fuses there as on one process (else a Ulysses group and one process would run
    different q/k arithmetic), and the collectives stay in the graph."""
    model = ToyRopeDiT("ulysses").eval()
    inputs = _toy_inputs()
    out, gm, ctx = _fused_output(model, inputs)
    site = next(s for s in ctx.report.sites if s.kind == "fusion")
    assert site.action == "qk_norm_rope", site.reason
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(torch.ops.qsparse.qk_norm_rope.default) == 1 and torch.rms_norm not in targets
    collectives = [t for t in targets if "all_to_all_single" in str(t)]
    assert len(collectives) == 3  # q, k, v: the fused op replaces only the rotation the all-to-all reads
    with torch.no_grad():
        expected = model(**inputs)
    assert relative_error(out, expected) < 1e-5
