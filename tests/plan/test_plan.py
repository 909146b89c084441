"""Plans: round trip, strict loading (clear errors before compute, never unpickle), and use by the backend."""

import json

import pytest
import torch
from torch._dynamo.utils import counters

from qsparse_compiler.config import QuantSparseConfig
from qsparse_compiler.ops.quantization import quantize_weight_int4
from qsparse_compiler.passes import PassContext, default_passes, run_passes
from qsparse_compiler.passes.report import RewriteReport
from qsparse_compiler.plan import AttentionPlan, LinearPlan, ModelFingerprint, Plan, PlanError, load_plan, save_plan
from qsparse_compiler.testing.capture import capture_dynamo_graph
from qsparse_compiler.testing.models import tiny_wan


def make_plan(model):
    q_weight = model.blocks[0].attn1.to_q.weight
    packed = quantize_weight_int4(q_weight, 32)
    return Plan(
        fingerprint=ModelFingerprint.of(model),
        linears={"blocks.0.attn1.to_q": LinearPlan(group_size=32, act_format="int8"),
                 "blocks.0.ffn.net.0.proj": LinearPlan(group_size=0)},
        attentions={"blocks.0.attn1": AttentionPlan(head_patterns=["local3d:0.3", "dense"], block_q=16, block_kv=16)},
        tensors={"blocks.0.attn1.to_q.qweight": packed.qweight, "blocks.0.attn1.to_q.scale": packed.scale},
        metadata={"made_by": "test"},
    )


def test_round_trip(tmp_path):
    model = tiny_wan(num_layers=1).model
    plan = make_plan(model)
    save_plan(plan, tmp_path)
    loaded = load_plan(tmp_path)
    assert loaded.linears == plan.linears and loaded.attentions == plan.attentions
    assert loaded.fingerprint == plan.fingerprint
    assert torch.equal(loaded.tensors["blocks.0.attn1.to_q.qweight"], plan.tensors["blocks.0.attn1.to_q.qweight"])
    ModelFingerprint.of(model).check(loaded.fingerprint)


def test_fingerprint_mismatch_names_the_difference():
    plan = make_plan(tiny_wan(num_layers=1).model)
    with pytest.raises(PlanError, match="another .*config"):
        plan.fingerprint.check(ModelFingerprint.of(tiny_wan(num_layers=2).model))
    with pytest.raises(PlanError, match="not torch.nn.modules.linear.Linear"):
        plan.fingerprint.check(ModelFingerprint.of(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "plan.json").write_text('{"schema_version": 1, "finger'), "not valid JSON"),
        (lambda d: (d / "plan.json").unlink(), "plan.json not found"),
        (lambda d: (d / "plan.safetensors").write_bytes(b"\x00" * 10), "not a readable safetensors file"),
        (lambda d: _edit(d, schema_version=99), "schema version 99 is newer"),
        (lambda d: _edit(d, tensors=["blocks.0.attn1.to_q.qweight", "missing.qweight"]), "lacks 1 tensor"),
        (lambda d: _edit(d, fingerprint={"model_class": "x"}), "does not follow schema"),
    ],
)
def test_damaged_plans_are_rejected_before_compute(tmp_path, damage, message):
    save_plan(make_plan(tiny_wan(num_layers=1).model), tmp_path)
    damage(tmp_path)
    with pytest.raises(PlanError, match=message):
        load_plan(tmp_path)


def _edit(folder, **changes):
    data = json.loads((folder / "plan.json").read_text())
    data.update(changes)
    (folder / "plan.json").write_text(json.dumps(data))


def test_backend_follows_the_plan(tmp_path):
    tiny = tiny_wan(num_layers=1)
    save_plan(make_plan(tiny.model), tmp_path)
    counters.clear()
    with torch.no_grad():
        gm, example_inputs = capture_dynamo_graph(tiny.model, tiny.make_inputs())
    from qsparse_compiler.backend import _load_checked_plan

    plan = _load_checked_plan(str(tmp_path), gm, example_inputs)
    ctx = PassContext(QuantSparseConfig.from_options({"plan": str(tmp_path)}), example_inputs, RewriteReport(0), plan=plan)
    with torch.no_grad():
        gm = run_passes(gm, ctx, default_passes())
    sites = {(s.fqn, s.kind): s for s in ctx.report.sites}
    assert sites[("blocks.0.attn1.to_q", "linear")].details["act"] == "int8"
    assert sites[("blocks.0.ffn.net.0.proj", "linear")].details["group"] == 64  # per-channel: K
    assert sites[("blocks.0.attn1.to_k", "linear")].reason == "the plan keeps this linear in its dtype"
    assert sites[("blocks.0.attn1", "self_attention")].action == "sparse_attention"
    assert counters["qsparse"]["w4a8_linear"] == 2
    code = gm.code
    assert "'local3d:0.3;dense'" in code


def test_plan_for_another_model_is_rejected_at_compile(tmp_path):
    save_plan(make_plan(tiny_wan(num_layers=1).model), tmp_path)
    other = tiny_wan(num_layers=1)
    other.model.blocks[0].attn1.to_q = torch.nn.Linear(64, 32)  # a different shape
    with torch.no_grad():
        gm, _ = capture_dynamo_graph(tiny_wan(num_layers=1).model, tiny_wan(num_layers=1).make_inputs())
    from qsparse_compiler.backend import _load_checked_plan

    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with torch.no_grad():
        mlp_gm, mlp_inputs = capture_dynamo_graph(mlp, {"input": torch.randn(2, 8)})
    with pytest.raises(PlanError, match="none of the plan's 3 sites"):
        _load_checked_plan(str(tmp_path), mlp_gm, mlp_inputs)
