"""Plans: round trip, strict loading (clear errors before compute, never unpickle), and use by the backend."""

import json

import pytest
import torch
from torch._dynamo.utils import counters

from qsparse_compiler.config import WEIGHT_ONLY, QuantSparseConfig
from qsparse_compiler.formats.quantization import quantize_weight_int4
from qsparse_compiler.compiler.passes import PassContext, default_passes, run_passes
from qsparse_compiler.compiler.passes.report import RewriteReport
from qsparse_compiler.plan import (
    PLAN_SCHEMA_VERSION, AttentionPlan, LinearPlan, ModelFingerprint, Plan, PlanError, load_plan, save_plan,
)
from qsparse_compiler.eval.capture import capture_dynamo_graph
from qsparse_compiler.eval.models import tiny_wan


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


def test_schema_1_plans_load_and_weight_only_entries_round_trip(tmp_path):
    """Schema 2 only added WEIGHT_ONLY linears (int4 weights, activations not quantized): a schema 1 plan loads as
    is, and a WEIGHT_ONLY entry with its tensors survives a round trip."""
    model = tiny_wan(num_layers=1).model
    save_plan(make_plan(model), tmp_path / "v1")
    _edit(tmp_path / "v1", schema_version=1)
    assert load_plan(tmp_path / "v1").schema_version == 1
    plan = make_plan(model)
    plan.linears["blocks.0.attn1.to_q"] = LinearPlan(group_size=32, act_format=WEIGHT_ONLY)
    save_plan(plan, tmp_path / "v2")
    loaded = load_plan(tmp_path / "v2")
    assert loaded.schema_version == PLAN_SCHEMA_VERSION == 5 and loaded.linears == plan.linears
    assert torch.equal(loaded.packed_weight("blocks.0.attn1.to_q").scale, plan.tensors["blocks.0.attn1.to_q.scale"])


def test_schema_4_plans_load_and_site_precisions_round_trip(tmp_path):
    """Schema 5 only added an attention's ``precision``: a schema 4 plan (no such key) loads with every site left to
    the compile option, and a set precision survives a round trip."""
    model = tiny_wan(num_layers=1).model
    save_plan(make_plan(model), tmp_path / "v4")
    data = json.loads((tmp_path / "v4" / "plan.json").read_text())
    for entry in data["attentions"].values():
        del entry["precision"]
    _edit(tmp_path / "v4", schema_version=4, attentions=data["attentions"])
    old = load_plan(tmp_path / "v4")
    assert old.schema_version == 4 and old.attentions["blocks.0.attn1"].precision is None
    plan = make_plan(model)
    plan.attentions["blocks.0.attn1"] = AttentionPlan(["local3d:0.3", "dense"], 16, 16, precision="int8_fp8")
    save_plan(plan, tmp_path / "v5")
    assert load_plan(tmp_path / "v5").attentions == plan.attentions


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
        (lambda d: _truncate(d / "plan.safetensors"), "not a readable safetensors file"),
        (lambda d: (d / "plan.safetensors").unlink(), "plan.safetensors not found but plan.json lists tensors"),
        (lambda d: _edit(d, linears=["blocks.0.attn1.to_q"]), "'linears' is a list, not a JSON object"),
        (lambda d: _edit(d, tensors="blocks.0.attn1.to_q.qweight"), "'tensors' is a str, not a JSON array"),
        (lambda d: _edit_entry(d, "linears", act_format="fp4"), "invalid linear entry"),
        (lambda d: (_edit(d, schema_version=1), _edit_entry(d, "linears", act_format="none")),
         "lists blocks.0.attn1.to_q as act_format 'none', which schema 2 introduced"),
        (lambda d: _edit_entry(d, "attentions", head_patterns="dense"), "head_patterns must be a non-empty list"),
        (lambda d: _edit_entry(d, "attentions", head_patterns=["local9d:0.3"]), "unknown pattern 'local9d'"),
        (lambda d: _edit_entry(d, "attentions", block_q=0), "block_q/block_kv positive integers"),
        (lambda d: _edit_entry(d, "attentions", precision="fp8"), r"precision='fp8' must be one of \('bf16', "),
        (lambda d: (_edit(d, schema_version=4), _edit_entry(d, "attentions", precision="int8_fp8")),
         "sets a precision for attention blocks.0.attn1, which schema 5 introduced"),
        (lambda d: _edit_tensor(d, "qweight", lambda t: t[:, :16]), r"to_q.qweight is \[64, 16\] .* needs \[64, 32\]"),
        (lambda d: _edit_tensor(d, "qweight", lambda t: t.float()), r"to_q.qweight is \[64, 32\] torch.float32"),
        (lambda d: _edit_tensor(d, "scale", lambda t: t[:, :1]), r"to_q.scale is \[64, 1\] .* needs \[64, 2\]"),
        (lambda d: _edit_tensor(d, "scale", None), "has blocks.0.attn1.to_q.qweight but not blocks.0.attn1.to_q.scale"),
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


def _edit_entry(folder, section, **changes):
    """Change the fields of the first entry of plan.json's "linears" or "attentions"."""
    data = json.loads((folder / "plan.json").read_text())
    next(iter(data[section].values())).update(changes)
    (folder / "plan.json").write_text(json.dumps(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_tensor(folder, name, change):
    """Replace blocks.0.attn1.to_q.<name> in plan.safetensors by change(tensor), or drop it (change=None, and from
    plan.json's list too, so that only the pairing check can catch it)."""
    from safetensors.torch import load_file, save_file

    key = f"blocks.0.attn1.to_q.{name}"
    tensors = load_file(str(folder / "plan.safetensors"))
    if change is None:
        del tensors[key]
        data = json.loads((folder / "plan.json").read_text())
        _edit(folder, tensors=[t for t in data["tensors"] if t != key])
    else:
        tensors[key] = change(tensors[key]).contiguous()
    save_file(tensors, str(folder / "plan.safetensors"))


def make_lora_plan(model, rank=3, edges=(250.0, 500.0, 750.0)):
    """make_plan with a timestep-aware LoRA on blocks.0.attn1.to_q (64 -> 64): A [4, 3, 64], B [4, 64, 3]."""
    plan = make_plan(model)
    buckets = len(edges) + 1
    plan.tensors["blocks.0.attn1.to_q.lora_a"] = torch.randn(buckets, rank, 64).bfloat16()
    plan.tensors["blocks.0.attn1.to_q.lora_b"] = torch.randn(buckets, 64, rank).bfloat16()
    plan.metadata["lora"] = {"rank": rank, "bucket_edges": list(edges)}
    return plan


def test_lora_round_trips(tmp_path):
    save_plan(make_lora_plan(tiny_wan(num_layers=1).model), tmp_path)
    loaded = load_plan(tmp_path)
    a, b = loaded.lora("blocks.0.attn1.to_q")
    assert list(a.shape) == [4, 3, 64] and list(b.shape) == [4, 64, 3]
    assert loaded.lora("blocks.0.ffn.net.0.proj") is None and loaded.lora_edges == (250.0, 500.0, 750.0)


def _edit_lora(folder, change):
    """Apply change(tensors, data) to plan.safetensors' tensors and plan.json's data (both dicts, edited in place)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "plan.safetensors"))
    data = json.loads((folder / "plan.json").read_text())
    change(tensors, data)
    data["tensors"] = sorted(tensors)
    save_file({k: v.clone() for k, v in tensors.items()}, str(folder / "plan.safetensors"))
    (folder / "plan.json").write_text(json.dumps(data))


_Q = "blocks.0.attn1.to_q"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, d: t.update({f"{_Q}.lora_a": t[f"{_Q}.lora_a"][:, :2]}),
         rf"{_Q}.lora_a is \[4, 2, 64\] torch.bfloat16, but the 64x64 weight with metadata\['lora'\] rank=3 and 4 "
         r"timestep buckets .* needs \[4, 3, 64\] float"),
        (lambda t, d: t.update({f"{_Q}.lora_b": t[f"{_Q}.lora_b"][:, :32]}),
         rf"{_Q}.lora_b is \[4, 32, 3\] .* needs \[4, 64, 3\]"),
        (lambda t, d: d["metadata"]["lora"].update(bucket_edges=[500.0]),
         r"lora_a is \[4, 3, 64\] .* 2 timestep buckets .* needs \[2, 3, 64\]"),
        (lambda t, d: d["metadata"]["lora"].update(rank=2), r"lora_a is \[4, 3, 64\] .* rank=2 .* needs \[4, 2, 64\]"),
        (lambda t, d: t.update({f"{_Q}.lora_a": t[f"{_Q}.lora_a"].to(torch.int16)}),
         r"lora_a is \[4, 3, 64\] torch.int16"),
        (lambda t, d: t.pop(f"{_Q}.lora_b"), rf"has {_Q}.lora_a but not {_Q}.lora_b"),
        (lambda t, d: d["metadata"].pop("lora"), r"holds timestep-aware LoRA tensors .* metadata\['lora'\] is None"),
        (lambda t, d: d["metadata"]["lora"].update(bucket_edges=[750.0, 250.0]), r"strictly ascending timesteps"),
        (lambda t, d: t.update({"blocks.0.attn1.to_k.lora_a": t[f"{_Q}.lora_a"],
                                "blocks.0.attn1.to_k.lora_b": t[f"{_Q}.lora_b"]}),
         r"LoRA for blocks.0.attn1.to_k, which is not a quantized linear of the plan"),
    ],
)
def test_lora_that_does_not_fit_is_rejected_at_load(tmp_path, change, message):
    save_plan(make_lora_plan(tiny_wan(num_layers=1).model), tmp_path)
    _edit_lora(tmp_path, change)
    with pytest.raises(PlanError, match=message):
        load_plan(tmp_path)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    """Plans are JSON + safetensors: loading one, checking it against a model (qs.optimize) or against a graph (the
    backend) must never reach pickle or torch.load, whether the plan is sound or damaged."""
    import pickle

    import qsparse_compiler as qs
    from qsparse_compiler.compiler.backend import _load_checked_plan

    tiny = tiny_wan(num_layers=1)
    save_plan(make_plan(tiny.model), tmp_path / "good")
    save_plan(make_plan(tiny.model), tmp_path / "bad")
    _truncate(tmp_path / "bad" / "plan.safetensors")
    with torch.no_grad():
        gm, example_inputs = capture_dynamo_graph(tiny.model, tiny.make_inputs())

    def refuse(*args, **kwargs):
        raise AssertionError("a plan was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    assert load_plan(tmp_path / "good").linears == make_plan(tiny.model).linears
    _load_checked_plan(str(tmp_path / "good"), gm, example_inputs)
    qs.optimize(tiny.model, plan=str(tmp_path / "good"))  # loads and checks now; compiles lazily
    with pytest.raises(PlanError, match="not a readable safetensors file"):
        load_plan(tmp_path / "bad")


def test_no_module_of_the_package_can_unpickle():
    """The promise of plans and calibration checkpoints, for every module: no pickle-family import, no torch.load."""
    import ast
    from pathlib import Path

    import qsparse_compiler

    offenders = []
    for path in Path(qsparse_compiler.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib") for n in names):
                offenders.append(f"{path.name}:{node.lineno} imports {names}")
            if isinstance(node, ast.Attribute) and node.attr == "load" and getattr(node.value, "id", None) == "torch":
                offenders.append(f"{path.name}:{node.lineno} calls torch.load")
    assert not offenders, offenders


def test_backend_follows_the_plan(tmp_path):
    tiny = tiny_wan(num_layers=1)
    save_plan(make_plan(tiny.model), tmp_path)
    counters.clear()
    with torch.no_grad():
        gm, example_inputs = capture_dynamo_graph(tiny.model, tiny.make_inputs())
    from qsparse_compiler.compiler.backend import _load_checked_plan

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
    other.model.blocks[0].ffn.net[0].proj = torch.nn.Linear(64, 96)  # a narrower FFN: other parameter shapes
    other.model.blocks[0].ffn.net[2] = torch.nn.Linear(96, 64)
    with torch.no_grad():
        gm, example_inputs = capture_dynamo_graph(other.model, other.make_inputs())
    from qsparse_compiler.compiler.backend import _load_checked_plan

    with pytest.raises(PlanError, match=r"parameter blocks\.0\.ffn\.net\.\S+ has shape \[.*\] but the plan expects"):
        _load_checked_plan(str(tmp_path), gm, example_inputs)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with torch.no_grad():
        mlp_gm, mlp_inputs = capture_dynamo_graph(mlp, {"input": torch.randn(2, 8)})
    with pytest.raises(PlanError, match="none of the plan's 3 sites"):
        _load_checked_plan(str(tmp_path), mlp_gm, mlp_inputs)


def test_plan_for_another_config_or_class_is_refused_by_optimize_before_compiling(tmp_path):
    import qsparse_compiler as qs
    from qsparse_compiler.eval.models import tiny_cogvideox

    save_plan(make_plan(tiny_wan(num_layers=1).model), tmp_path)
    with pytest.raises(PlanError, match="another .*config"):
        qs.optimize(tiny_wan(num_layers=2).model, plan=str(tmp_path))
    with pytest.raises(PlanError, match="plan was made for .*WanTransformer3DModel, not .*CogVideoXTransformer3DModel"):
        qs.optimize(tiny_cogvideox(num_layers=1).model, plan=str(tmp_path))


@pytest.mark.slow
def test_a_bad_plan_stops_torch_compile_before_inductor_runs(tmp_path, monkeypatch):
    """Plain torch.compile: the plan is checked when the backend gets the graph, before Inductor compiles anything or
    any op runs; the error Dynamo raises names the plan's problem."""
    import torch._inductor.compile_fx

    save_plan(make_plan(tiny_wan(num_layers=1).model), tmp_path)
    _edit_tensor(tmp_path, "qweight", lambda t: t[:, :16])
    calls = []
    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", lambda *args, **kwargs: calls.append(args))
    tiny = tiny_wan(num_layers=1)
    torch._dynamo.reset()
    compiled = torch.compile(tiny.model, backend="quantsparse", options={"plan": str(tmp_path)}, fullgraph=True)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"to_q.qweight is \[64, 16\]") as info:
        with torch.no_grad():
            compiled(**tiny.make_inputs())
    assert isinstance(info.value.inner_exception, PlanError)
    assert not calls


def test_a_plan_calibrated_on_other_weights_is_refused_by_name(tmp_path):
    """Same class, config and shapes (the fingerprint matches) but other weights - another checkpoint, or another
    random initialisation: the plan's int4 weights are no rounding of this model's, so using them would silently
    swap weights. Refused at compile (the graph's own linears) and at run time (a regional graph's other blocks)."""
    import qsparse_compiler as qs
    from qsparse_compiler.eval.models import TEST_OPTIONS

    source = tiny_wan(num_layers=2)
    save_plan(make_plan(source.model), tmp_path)  # calibrated weights for blocks.0.attn1.to_q
    other = tiny_wan(num_layers=2)
    inputs = other.make_inputs()
    options = {**TEST_OPTIONS, "plan": str(tmp_path)}
    for model in (other.model, source.model):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="quantsparse", options=options, fullgraph=True)
        with torch.no_grad():
            if model is source.model:
                assert torch.isfinite(compiled(**inputs)[0]).all()
                continue
            with pytest.raises(torch._dynamo.exc.BackendCompilerFailed,
                               match=r"blocks\.0\.attn1\.to_q\.weight that differ from the model's by 1\d\d% ") as info:
                compiled(**inputs)
            assert isinstance(info.value.inner_exception, PlanError)

    # Regional: one graph for both blocks, compiled with block 0 (which matches); block 1's plan weights are met at
    # run time.
    plan = make_plan(source.model)
    to_q = source.model.blocks[1].attn1.to_q.weight
    packed = quantize_weight_int4(torch.randn_like(to_q), 32)
    plan.linears["blocks.1.attn1.to_q"] = plan.linears["blocks.0.attn1.to_q"]
    plan.tensors.update({"blocks.1.attn1.to_q.qweight": packed.qweight, "blocks.1.attn1.to_q.scale": packed.scale})
    save_plan(plan, tmp_path / "regional")
    model = qs.optimize(source.model, options=TEST_OPTIONS, plan=str(tmp_path / "regional"), cache=False,
                        regional=True)
    with torch.no_grad(), pytest.raises(PlanError, match=r"blocks\.1\.attn1\.to_q\.weight that differ"):
        model(**inputs)
