"""The fuse_norm_quant pass: LayerNorm (+ adaLN modulation) feeding only W4A8 GEMMs becomes
``qsparse::layer_norm_modulate_quant``; anything else reading the normalized activation keeps the graph unfused.

On CPU the op runs its reference, which is the unfused graph's ops in their order: the fused graph's output must equal
the unfused graph's bit for bit. Graphs are rewritten without Inductor (``testing.capture``)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.normalization import FP32LayerNorm
from torch import nn
from torch._dynamo.utils import counters

from qsparse_compiler.config import QuantSparseConfig
from qsparse_compiler.compiler.passes import PassContext, default_passes, run_passes
from qsparse_compiler.compiler.passes.fuse_norm_quant import FuseNormQuant
from qsparse_compiler.compiler.passes.report import RewriteReport
from qsparse_compiler.compiler.backend import clear_reports, reports
from qsparse_compiler.eval.capture import capture_dynamo_graph, rewritten_reference_output
from qsparse_compiler.eval.metrics import relative_error
from qsparse_compiler.eval.models import TEST_OPTIONS, tiny_wan


def _rewritten_output(model, inputs, options, fuse=True):
    counters.clear()
    passes = [p for p in default_passes() if fuse or not isinstance(p, FuseNormQuant)]
    with torch.no_grad():
        gm, example_inputs = capture_dynamo_graph(model, inputs)
        ctx = PassContext(QuantSparseConfig.from_options(options), example_inputs, RewriteReport(0))
        gm = run_passes(gm, ctx, passes)
        out = gm(*ctx.example_inputs, *ctx.extra_example_inputs)[0]
    return out, gm, ctx


@pytest.mark.slow
@pytest.mark.parametrize("act_format", ["fp8_e4m3", "int8"])
def test_tiny_wan_norms_fused_and_bit_identical(act_format):
    tiny = tiny_wan(num_layers=1)
    inputs = tiny.make_inputs()
    options = {**TEST_OPTIONS, "quant": {**TEST_OPTIONS["quant"], "act_format": act_format}}
    unfused, _, _ = _rewritten_output(tiny.model, inputs, options, fuse=False)
    fused, gm, ctx = _rewritten_output(tiny.model, inputs, options)
    rows = {s.fqn: s for s in ctx.report.rewritten("layer_norm_modulate_quant")}
    assert set(rows) == {"blocks.0.norm1", "blocks.0.norm2", "blocks.0.norm3"}
    assert rows["blocks.0.norm1"].details == {"act": act_format, "modulation": "adaLN", "affine": False, "gemms": 3}
    assert rows["blocks.0.norm2"].details["affine"] and rows["blocks.0.norm2"].details["modulation"] == "none"
    assert counters["qsparse"]["layer_norm_modulate_quant"] == 3
    # norm_out feeds proj_out, a kept bf16 linear: no quantization reads it, so it is no candidate.
    assert not [s for s in ctx.report.sites if s.fqn == "norm_out"]
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(torch.ops.qsparse.layer_norm_modulate_quant.default) == 3
    assert targets.count(torch.nn.functional.layer_norm) == 1  # norm_out's
    assert torch.equal(fused, unfused)


class ToyModulatedBlock(nn.Module):
    """Wan's pre-norm: FP32LayerNorm, ``* (1 + scale) + shift`` from a table, ``type_as``, two linears reading it;
    ``reused`` also adds the normalized activation itself to the output."""

    def __init__(self, dim: int, reused: bool) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.table = nn.Parameter(torch.randn(1, 2, dim) * 0.3)
        self.to_a, self.to_b = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.reused = reused

    def forward(self, h):
        shift, scale = self.table.chunk(2, dim=1)
        x = (self.norm(h.float()) * (1 + scale) + shift).type_as(h)
        out = self.to_a(x) + self.to_b(x)
        return out + x if self.reused else out


class ToyModulatedDiT(nn.Module):
    def __init__(self, reused: bool = False, dim: int = 64) -> None:
        super().__init__()
        self.patch = nn.Conv3d(4, dim, (1, 2, 2), stride=(1, 2, 2))
        self.blocks = nn.ModuleList([ToyModulatedBlock(dim, reused)])

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            h = h + block(h)
        return h


@pytest.mark.parametrize("reused", [False, True])
def test_reused_activation_keeps_the_graph_with_a_reason(reused):
    model = ToyModulatedDiT(reused).eval()
    inputs = {"x": torch.randn(1, 4, 2, 8, 8)}
    unfused, _, _ = _rewritten_output(model, inputs, TEST_OPTIONS, fuse=False)
    fused, _, ctx = _rewritten_output(model, inputs, TEST_OPTIONS)
    (row,) = [s for s in ctx.report.sites if s.kind == "fusion"]
    assert row.fqn == "blocks.0.norm"
    if reused:
        assert row.action == "kept" and "also read by" in row.reason
        assert counters["qsparse"]["kept_norm_quant"] == 1
    else:
        assert row.action == "layer_norm_modulate_quant" and row.details["gemms"] == 2
    assert torch.equal(fused, unfused)


def test_no_quantization_in_the_graph_no_candidates():
    """act_quant_in_graph=False: the W4A8 op quantizes inside itself, so there is nothing to fuse or report."""
    model = ToyModulatedDiT().eval()
    options = {**TEST_OPTIONS, "quant": {**TEST_OPTIONS["quant"], "act_quant_in_graph": False}}
    _, _, ctx = _rewritten_output(model, {"x": torch.randn(1, 4, 2, 8, 8)}, options)
    assert not [s for s in ctx.report.sites if s.kind == "fusion"]


@pytest.mark.slow
def test_dynamic_compile_fuses_with_a_traced_eps():
    """torch.compile(dynamic=True) turns the norms' eps into traced floats: the LayerNorm fusion passes them on as
    graph values (the q/k fusion, whose q and k eps could then differ, reports why it keeps the graph)."""
    tiny = tiny_wan(num_layers=1)
    inputs = tiny.make_inputs()
    clear_reports()
    with torch.no_grad():
        out = torch.compile(tiny.model, backend="quantsparse", options=TEST_OPTIONS, dynamic=True)(**inputs)[0]
    report = reports()[0]
    assert report.counters["layer_norm_modulate_quant"] == 3
    (qk,) = [s for s in report.sites if s.fqn == "blocks.0.attn1.qk_norm_rope"]
    assert qk.action == "kept" and "dynamic=None" in qk.reason
    assert relative_error(out, rewritten_reference_output(tiny.model, inputs, TEST_OPTIONS)) < 1e-5
