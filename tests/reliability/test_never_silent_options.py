"""Never slow silently, the options (issue #17 item 5): skip heads without a residual cache, bools given for numbers,
``mode`` together with ``options``. Fast: no Inductor compile."""

import pytest
import torch

from qsparse_compiler.config import ConfigError, QuantSparseConfig
from qsparse_compiler.compiler.passes import PassContext, default_passes, run_passes
from qsparse_compiler.compiler.passes.report import RewriteReport
from qsparse_compiler.plan import AttentionPlan, ModelFingerprint, Plan, save_plan
from qsparse_compiler.eval.capture import capture_dynamo_graph
from qsparse_compiler.eval.models import tiny_wan


@pytest.mark.parametrize("section, field", [
    ("sparsity", "density"), ("sparsity", "block_q"), ("quant", "group_size"), ("cache", "refresh_first"),
    ("cache", "refresh_every"), ("cache", "order"), ("cache", "rank"), ("parallel", "ulysses_degree"),
])
def test_bools_are_refused_for_numeric_options(section, field):
    """Scenario 4: ``density=True`` was accepted as density 1 (True is an int to Python), and so was every numeric
    field; each now names the field and says it takes a number."""
    with pytest.raises(ConfigError, match=rf"{field}=True must be a number, not a bool"):
        QuantSparseConfig.from_options({section: {field: True}})


def test_skip_pattern_without_a_cache_is_refused():
    """Scenario 4: ``pattern="skip"`` (or a per-head spec with skip heads) with the residual cache off computed
    zeros for those heads, silently."""
    for pattern in ("skip", "local3d:0.3;skip"):
        with pytest.raises(ConfigError, match="skip heads.*enable the cache"):
            QuantSparseConfig.from_options({"sparsity": {"pattern": pattern}})
        QuantSparseConfig.from_options({"sparsity": {"pattern": pattern}, "cache": {"enabled": True}})


def test_plan_with_skip_heads_without_a_cache_is_refused_at_compile(tmp_path):
    """Scenario 4: a plan whose head_patterns skip a head, compiled where no residual cache runs (plain torch.compile
    without a runtime, or qs.optimize(..., cache=False)): an error at compile time naming the site, the heads and
    the fix, not zeros."""
    from qsparse_compiler.compiler.backend import _load_checked_plan

    tiny = tiny_wan(num_layers=1)
    plan = Plan(fingerprint=ModelFingerprint.of(tiny.model), linears={},
                attentions={"blocks.0.attn1": AttentionPlan(head_patterns=["local3d:0.5", "skip"], block_q=16,
                                                            block_kv=16)},
                tensors={}, metadata={"made_by": "test"})
    save_plan(plan, tmp_path)
    with torch.no_grad():
        gm, example_inputs = capture_dynamo_graph(tiny.model, tiny.make_inputs())
    config = QuantSparseConfig.from_options({"plan": str(tmp_path), "cache": {"enabled": False, "override_plan": True}})
    ctx = PassContext(config, example_inputs, RewriteReport(0), plan=_load_checked_plan(str(tmp_path), gm,
                                                                                          example_inputs))
    with torch.no_grad(), pytest.raises(ConfigError, match=r"blocks.0.attn1 has skip heads \[1\].*qs.optimize"):
        run_passes(gm, ctx, default_passes())


def test_mode_goes_with_options(monkeypatch):
    """Scenario 5: the README promised ``mode=`` together with ``options=``, which torch.compile refuses ("Either
    mode or options can be specified"). The mode is now a backend option: its Inductor patches reach compile_fx
    under any ``inductor`` patches."""
    import torch._inductor.compile_fx as compile_fx_module
    from torch._inductor import list_mode_options

    from qsparse_compiler.compiler.backend import quantsparse

    with pytest.raises(ConfigError, match="mode='fastest' must be one of"):
        QuantSparseConfig.from_options({"mode": "fastest"})
    patches = []

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        patches.append(config_patches)
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    model = torch.nn.Linear(4, 4)
    torch._dynamo.reset()
    options = {"mode": "max-autotune-no-cudagraphs", "inductor": {"max_autotune_gemm": False}}
    with torch.no_grad():
        torch.compile(model, backend=quantsparse, options=options)(torch.randn(2, 4))
    expected = {**list_mode_options("max-autotune-no-cudagraphs"), "max_autotune_gemm": False}
    assert patches == [expected]
