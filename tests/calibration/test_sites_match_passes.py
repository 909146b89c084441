"""Calibration names sites as the passes do: the linears and video attentions a plan lists are exactly the ones the
backend rewrites (module FQNs from the Dynamo graph), on all three architectures."""

import pytest
import torch
from torch._dynamo.utils import counters

from qsparse_compiler.calibration.driver import linear_plans
from qsparse_compiler.calibration.statistics import collect_statistics
from qsparse_compiler.config import WEIGHT_ONLY, QuantSparseConfig
from qsparse_compiler.compiler.passes import PassContext, default_passes, run_passes
from qsparse_compiler.compiler.passes.report import RewriteReport
from qsparse_compiler.eval.capture import capture_dynamo_graph
from qsparse_compiler.eval.models import TEST_OPTIONS, tiny_cogvideox, tiny_hunyuan, tiny_wan

from ._tiny import tiny_config

FACTORIES = {"wan": lambda: tiny_wan(num_layers=1), "hunyuan": tiny_hunyuan, "cogvideox": lambda: tiny_cogvideox(num_layers=1)}


@pytest.mark.parametrize("conditioning", ["keep", "int4_weight_only"])
@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_calibration_sites_are_the_rewritten_sites(arch, conditioning):
    tiny = FACTORIES[arch]()
    inputs = tiny.make_inputs()
    config = tiny_config(conditioning_linears=conditioning)
    stats = collect_statistics(tiny.model, [inputs], config)
    linears, _ = linear_plans(stats.linears, config)
    weight_only = {fqn for fqn, entry in linears.items() if entry.act_format == WEIGHT_ONLY}

    counters.clear()
    options = {**TEST_OPTIONS, "quant": {**TEST_OPTIONS["quant"], "conditioning_linears": conditioning}}
    with torch.no_grad():
        gm, example_inputs = capture_dynamo_graph(tiny.model, inputs)
        ctx = PassContext(QuantSparseConfig.from_options(options), example_inputs, RewriteReport(0))
        run_passes(gm, ctx, default_passes())
    # (fusion rows - the q/k norm + rope of each sparsified attention - are not sites of the plan)
    rewritten = {site.fqn for site in ctx.report.sites if site.action != "kept" and site.kind != "fusion"}
    passes_linears = {site.fqn for site in ctx.report.sites if site.action == "w4a8_linear"}
    passes_weight_only = {site.fqn for site in ctx.report.sites if site.action == "int4_weight_only"}
    passes_attentions = {site.fqn for site in ctx.report.sites if site.action == "sparse_attention"}
    assert rewritten == passes_linears | passes_weight_only | passes_attentions
    assert set(linears) - weight_only == passes_linears and len(passes_linears) == tiny.block_linears
    assert weight_only == passes_weight_only
    assert len(weight_only) == (tiny.conditioning_linears if conditioning == "int4_weight_only" else 0)
    assert set(stats.attentions) == passes_attentions and len(passes_attentions) == tiny.video_attentions
