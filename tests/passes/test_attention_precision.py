"""sparsity.attention_precision: config validation, the op argument the pass emits, the report column and counters,
the residual cache's refresh in the site's precision, and sites that cannot run int8_fp8 staying bf16 with a reason."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from qsparse_compiler.config import ConfigError, QuantSparseConfig
from qsparse_compiler.ops.attention_int8_fp8_cuda import static_unsupported_reason
from qsparse_compiler.ops.attention_quantization import attention_int8_fp8_reference
from qsparse_compiler.ops.residual_attention import MODE_REFRESH
from qsparse_compiler.eval.capture import rewrite_with_default_passes
from qsparse_compiler.eval.metrics import sqnr_db
from qsparse_compiler.eval.models import EXACT_OPTIONS, TEST_OPTIONS, ToyVideoDiT

INT8 = {**TEST_OPTIONS, "sparsity": {**TEST_OPTIONS["sparsity"], "attention_precision": "int8_fp8"}}


def _nodes(gm, op):
    return [n for n in gm.graph.nodes if n.target is op]


def test_config_names_the_field_and_the_choices():
    assert QuantSparseConfig.from_options(INT8).sparsity.attention_precision == "int8_fp8"
    assert QuantSparseConfig.from_options(None).sparsity.attention_precision == "bf16"
    with pytest.raises(ConfigError, match=r"SparsityConfig.attention_precision='fp8' must be one of \('bf16', "):
        QuantSparseConfig.from_options({"sparsity": {"attention_precision": "fp8"}})


def test_pass_emits_the_precision_report_column_counter_and_refresh_precision():
    options = {**INT8, "cache": {"enabled": True, "mode": "refresh"}}
    gm, sites, ctx = rewrite_with_default_passes(ToyVideoDiT(), {"x": torch.randn(1, 4, 3, 16, 16)}, options)
    (sparse,) = _nodes(gm, torch.ops.qsparse.sparse_attention.default)
    assert sparse.args[9] == "int8_fp8"
    (cached,) = _nodes(gm, torch.ops.qsparse.residual_attention.default)
    assert cached.args[10] == "int8_fp8"
    assert sites["blocks.0"].details["precision"] == "int8_fp8"
    assert counters["qsparse"]["attention_int8_fp8"] == 1 and ctx.report.counters["attention_int8_fp8"] == 1
    bf16_gm, bf16_sites, _ = rewrite_with_default_passes(ToyVideoDiT(), {"x": torch.randn(1, 4, 3, 16, 16)},
                                                         TEST_OPTIONS)
    assert _nodes(bf16_gm, torch.ops.qsparse.sparse_attention.default)[0].args[9] == "bf16"
    assert "attention_int8_fp8" not in counters["qsparse"]


def test_a_site_the_kernel_cannot_run_stays_bf16_with_the_reason(monkeypatch):
    import qsparse_compiler.compiler.passes.sparsify_attention as sparsify

    monkeypatch.setattr(sparsify, "int8_fp8_unsupported_reason", lambda *a: "head dim 96 not in (32, 64, 128)")
    gm, sites, ctx = rewrite_with_default_passes(ToyVideoDiT(), {"x": torch.randn(1, 4, 3, 16, 16)}, INT8)
    assert _nodes(gm, torch.ops.qsparse.sparse_attention.default)[0].args[9] == "bf16"
    assert sites["blocks.0"].details["precision"] == "bf16"
    assert "int8_fp8 not possible here, kept bf16: head dim 96" in sites["blocks.0"].reason
    assert ctx.report.counters["attention_int8_fp8_kept_bf16"] == 1


def test_static_reasons_on_cuda_devices():
    cuda = torch.device("cuda")
    assert static_unsupported_reason(torch.bfloat16, 64, 128, 128, torch.device("cpu")) is None  # the reference
    assert "head dim 96" in static_unsupported_reason(torch.bfloat16, 96, 128, 128, cuda)
    assert "layout blocks 16x16" in static_unsupported_reason(torch.bfloat16, 64, 16, 16, cuda)
    assert "dtype" in static_unsupported_reason(torch.int8, 64, 128, 128, cuda)


def test_rewritten_model_runs_the_8bit_recipe():
    """Every tile, no weight quantization: the rewrite's output differs from eager by the attention recipe alone."""
    model = ToyVideoDiT()
    x = {"x": torch.randn(1, 4, 3, 16, 16)}
    options = {**EXACT_OPTIONS, "sparsity": {**EXACT_OPTIONS["sparsity"], "attention_precision": "int8_fp8"}}
    gm, _, ctx = rewrite_with_default_passes(model, x, options)
    with torch.no_grad():
        eager = model(**x)
        out = gm(*ctx.example_inputs, *ctx.extra_example_inputs)[0]
        exact_gm, _, exact_ctx = rewrite_with_default_passes(model, x, EXACT_OPTIONS)
        exact = exact_gm(*exact_ctx.example_inputs, *exact_ctx.extra_example_inputs)[0]
    assert sqnr_db(exact, eager) > 100  # the bf16 rewrite computes what the model does (fp32 model)
    assert 25 < sqnr_db(out, eager) < 100  # the 8-bit one is close, but not that close: the recipe ran


def test_refresh_computes_dense_attention_in_the_sites_precision():
    b, h, s, d = 1, 2, 40, 32
    q, k, v = torch.randn(3, b, h, s, d).unbind(0)
    o_sparse = torch.randn(b, h, s, d)
    expected = attention_int8_fp8_reference(q, k, v, 0.2)[0]
    for precision, dense in (("int8_fp8", expected), ("bf16", torch.softmax(q @ k.transpose(-1, -2) * 0.2, -1) @ v)):
        state = [torch.zeros(b, h, s, d), torch.zeros(b, h, s, d), torch.full((1,), -1.0)]
        out = torch.ops.qsparse.residual_attention(o_sparse, q, k, v, None, 0.2, state, None, MODE_REFRESH, 2,
                                                   precision)
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state[0], dense - o_sparse, rtol=1e-5, atol=1e-5)


def _rewrite_with_plan(tmp_path, precision, option="bf16", cache=None):
    """The tiny Wan's one attention through the default passes with a plan that sets ``precision`` for it (and
    ``cache`` settings: then the compile turns the residual cache on)."""
    from qsparse_compiler.compiler.backend import _load_checked_plan
    from qsparse_compiler.compiler.passes import PassContext, default_passes, run_passes
    from qsparse_compiler.compiler.passes.report import RewriteReport
    from qsparse_compiler.eval.capture import capture_dynamo_graph
    from qsparse_compiler.eval.models import tiny_wan
    from qsparse_compiler.plan import AttentionPlan, ModelFingerprint, Plan, save_plan

    tiny = tiny_wan(num_layers=1)
    attention = AttentionPlan(["local3d:0.3", "dense"], 16, 16, cache=cache or {}, precision=precision)
    save_plan(Plan(ModelFingerprint.of(tiny.model), attentions={"blocks.0.attn1": attention}), tmp_path)
    with torch.no_grad():
        gm, example_inputs = capture_dynamo_graph(tiny.model, tiny.make_inputs())
    plan = _load_checked_plan(str(tmp_path), gm, example_inputs)
    options = {"plan": str(tmp_path), "sparsity": {"attention_precision": option}, "cache": {"enabled": bool(cache)}}
    ctx = PassContext(QuantSparseConfig.from_options(options), example_inputs, RewriteReport(0), plan=plan)
    with torch.no_grad():
        gm = run_passes(gm, ctx, default_passes())
    site = next(s for s in ctx.report.sites if s.fqn == "blocks.0.attn1")  # the sparsify row (then the cache's)
    return gm, site, ctx.report.counters


@pytest.mark.parametrize("precision, option", [("int8_fp8", "bf16"), ("bf16", "int8_fp8"), (None, "int8_fp8")])
def test_the_plans_site_precision_wins_over_the_option(tmp_path, precision, option):
    gm, site, report_counters = _rewrite_with_plan(tmp_path, precision, option)
    expected = precision or option
    assert _nodes(gm, torch.ops.qsparse.sparse_attention.default)[0].args[9] == expected
    assert site.details["precision"] == expected
    assert site.details["precision_from"] == ("plan" if precision else "option")
    assert report_counters.get("attention_precision_from_plan", 0) == (1 if precision else 0)
    assert report_counters.get("attention_int8_fp8", 0) == (1 if expected == "int8_fp8" else 0)


def test_the_refresh_follows_the_plans_site_precision(tmp_path):
    gm, _, _ = _rewrite_with_plan(tmp_path, "int8_fp8", "bf16", cache={"refresh_first": 1, "refresh_every": 2})
    (cached,) = _nodes(gm, torch.ops.qsparse.residual_attention.default)
    assert cached.args[10] == "int8_fp8"


def test_a_plan_asking_for_int8_where_the_kernel_cannot_run_warns_at_compile(tmp_path, monkeypatch):
    import qsparse_compiler.compiler.passes.sparsify_attention as sparsify

    monkeypatch.setattr(sparsify, "int8_fp8_unsupported_reason", lambda *a: "head dim 96 not in (32, 64, 128)")
    with pytest.warns(UserWarning, match=r"plan asks for attention_precision 'int8_fp8' at blocks.0.attn1, but its "
                                         r"8-bit kernel cannot run there \(head dim 96"):
        gm, site, report_counters = _rewrite_with_plan(tmp_path, "int8_fp8")
    assert _nodes(gm, torch.ops.qsparse.sparse_attention.default)[0].args[9] == "bf16"
    assert "int8_fp8 not possible here, kept bf16: head dim 96" in site.reason and "from the plan" in site.reason
    assert report_counters["attention_int8_fp8_kept_bf16"] == 1
