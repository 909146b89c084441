"""apply_lora: a plan's timestep-aware LoRA in the compiled graph - the eager math per sample, no recompile per step,
regional graphs with per-block tensors, and reported fallbacks."""

import copy
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import qsparse_compiler as qs
from qsparse_compiler.compiler.backend import clear_reports, reports
from qsparse_compiler.calibration.simulate import plan_applied
from qsparse_compiler.config import QuantSparseConfig
from qsparse_compiler.compiler.passes import PassContext, default_passes, run_passes
from qsparse_compiler.compiler.passes.pass_manager import private_copy
from qsparse_compiler.compiler.passes.report import RewriteReport
from qsparse_compiler.plan import LinearPlan, ModelFingerprint, Plan, save_plan
from qsparse_compiler.eval.capture import capture_dynamo_graph
from qsparse_compiler.eval.metrics import relative_error
from qsparse_compiler.eval.models import tiny_wan

EDGES = [250.0, 500.0, 750.0]
RANK = 3
NO_SPARSITY = {"sparsity": {"enabled": False}}


def lora_plan(model, skip=()):
    """Every block linear quantized (group 32), with random non-zero LoRA except on the FQNs in ``skip``."""
    generator = torch.Generator().manual_seed(1)
    linears, tensors = {}, {}
    for fqn, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and fqn.startswith("blocks.") and (".attn" in fqn or ".ffn" in fqn):
            linears[fqn] = LinearPlan(group_size=32)
            if fqn in skip:
                continue
            n, k = module.weight.shape
            buckets = len(EDGES) + 1
            tensors[f"{fqn}.lora_a"] = (torch.randn(buckets, RANK, k, generator=generator) / k**0.5).bfloat16()
            tensors[f"{fqn}.lora_b"] = (torch.randn(buckets, n, RANK, generator=generator) * 0.1).bfloat16()
    return Plan(ModelFingerprint.of(model), linears, {}, tensors, {"lora": {"rank": RANK, "bucket_edges": EDGES}})


def reference(model, plan, inputs):
    """``model`` (not the compiled one: plan_applied swaps its linears) run eagerly: the plan's W4A8 linears
    (qsparse::w4a8_linear's reference) plus, per linear and per sample, the LoRA of that sample's bucket (number of
    edges <= t), written out here rather than taken from ops/lora.py."""
    buckets = [sum(edge <= float(t) for edge in EDGES) for t in inputs["timestep"]]

    def add_lora(fqn):
        a, b = (t.float() for t in plan.lora(fqn))

        def hook(_module, args, out):
            rows = [args[0][i].float() @ a[bucket].t() @ b[bucket].t() for i, bucket in enumerate(buckets)]
            return (out.float() + torch.stack(rows)).to(out.dtype)

        return hook

    with torch.no_grad(), plan_applied(model, plan, sparsify=False, lora=False):
        handles = [model.get_submodule(fqn).register_forward_hook(add_lora(fqn))
                   for fqn in plan.linears if plan.lora(fqn) is not None]
        try:
            return model(**inputs)[0]
        finally:
            for handle in handles:
                handle.remove()


def assert_lora_applied(actual, model, plan, inputs):
    """Per sample: the compiled output is the eager reference's up to Inductor's float reordering - now and then an
    activation code rounds the other way, ~1e-4 - while the LoRA itself moves the output by ~5%, so a missing LoRA or
    one of another bucket is 50x over the bound."""
    expected = reference(model, plan, inputs)
    with torch.no_grad(), plan_applied(model, plan, sparsify=False, lora=False):
        without = model(**inputs)[0]
    for i, t in enumerate(inputs["timestep"].tolist()):
        assert relative_error(expected[i], without[i]) > 2e-2, (t, relative_error(expected[i], without[i]))
        assert relative_error(actual[i], expected[i]) < 1e-3, (t, relative_error(actual[i], expected[i]))


# Timesteps per sample of a batch of 2: both in bucket 0, both in bucket 3, and the two samples in different buckets.
STEPS = ([100, 100], [900, 900], [100, 900])


@pytest.mark.slow
def test_compiled_lora_matches_the_eager_math_per_sample_without_recompiling(tmp_path):
    tiny = tiny_wan(num_layers=1)
    eager = copy.deepcopy(tiny.model)
    plan = lora_plan(tiny.model)
    save_plan(plan, tmp_path)
    inputs = tiny.make_inputs(batch=2)
    torch._dynamo.reset()
    counters.clear()
    clear_reports()
    compiled = torch.compile(tiny.model, backend="quantsparse", options={"plan": str(tmp_path), **NO_SPARSITY},
                             fullgraph=True)
    for steps in STEPS:
        inputs["timestep"] = torch.tensor(steps)
        with torch.no_grad():
            actual = compiled(**inputs)[0]
        assert_lora_applied(actual, eager, plan, inputs)
    # One graph, compiled once: the timestep's value is data in the graph, not a guard.
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["qsparse"]["lora_linear"] == tiny.block_linears == 10
    (report,) = reports()
    assert all(site.details.get("lora") == "rank 3 x 4 buckets" for site in report.rewritten("w4a8_linear"))
    assert any(note.startswith("timestep-aware LoRA: 10 of 10") and "graph input 'kwargs.timestep'" in note
               for note in report.notes)


def _two_blocks_block0_without_to_q_lora(tmp_path):
    """A 2-block tiny Wan, its eager copy, and a plan saved to tmp_path whose block 0 has no LoRA on to_q (calibration
    keeps a block's LoRA only where it helped); batch-2 inputs; Dynamo reset."""
    tiny = tiny_wan(num_layers=2)
    eager = copy.deepcopy(tiny.model)
    plan = lora_plan(tiny.model, skip={"blocks.0.attn1.to_q"})
    save_plan(plan, tmp_path)
    torch._dynamo.reset()
    return tiny, eager, plan, tiny.make_inputs(batch=2)


@pytest.mark.slow
def test_regional_graph_takes_each_blocks_lora_and_the_forwards_timesteps(tmp_path):
    """qs.optimize compiles one graph for both blocks, for block 0, which has no LoRA on to_q (calibration keeps a
    block's LoRA only where it helped) while block 1 has: the graph has the site, block 0 gets zeros, and both blocks
    follow the plan."""
    tiny, eager, plan, inputs = _two_blocks_block0_without_to_q_lora(tmp_path)
    counters.clear()
    clear_reports()
    model = qs.optimize(tiny.model, plan=str(tmp_path), options=NO_SPARSITY, cache=False, regional=True)
    # Batch 2 at four steps - the last a float timestep expanded to the batch (stride 0), as samplers pass it - then
    # batch 3: Dynamo recompiles the block once with a symbolic batch, and the timestep input of the new graph has
    # that symbolic batch too.
    for timestep in (*map(torch.tensor, STEPS), torch.tensor(300.0).expand(2), torch.tensor([600, 100, 900])):
        if len(timestep) != len(inputs["timestep"]):
            inputs = {**inputs, **tiny.make_inputs(batch=len(timestep))}
        inputs["timestep"] = timestep
        with torch.no_grad():
            actual = model(**inputs)[0]
        assert_lora_applied(actual, eager, plan, inputs)
    assert counters["stats"]["unique_graphs"] == 2 and len(reports()) == 2  # one block graph per batch kind, shared
    for report in reports():
        assert report.counters["lora_linear"] == 10
        assert any("the forward's per-sample timesteps (regional graph)" in note for note in report.notes)
        (row,) = [site for site in report.sites if site.fqn == "blocks.0.attn1.to_q"]
        assert "zeros" in row.details["lora"]


@pytest.mark.slow
def test_compile_repeated_blocks_takes_each_blocks_plan_and_the_forwards_timesteps(tmp_path):
    """``transformer.compile_repeated_blocks(backend="quantsparse", options={"plan": ...})``: one graph for both
    blocks, each call with its block's calibrated weights and LoRA (zeros for block 0's to_q) and the forward's
    per-sample timesteps - from the transformer's frame in the forward that compiled the blocks (qsparse's hook was
    not on the model yet), from the hook afterwards."""
    tiny, eager, plan, inputs = _two_blocks_block0_without_to_q_lora(tmp_path)
    clear_reports()
    tiny.model.compile_repeated_blocks(backend="quantsparse", options={"plan": str(tmp_path), **NO_SPARSITY})
    for steps in (STEPS[2], STEPS[1]):
        inputs["timestep"] = torch.tensor(steps)
        with torch.no_grad():
            actual = tiny.model(**inputs)[0]
        assert_lora_applied(actual, eager, plan, inputs)
    (report,) = reports()
    assert report.counters["lora_linear"] == 10
    assert any("the forward's per-sample timesteps (regional graph)" in note for note in report.notes)


def test_a_positional_timestep_is_found_by_where_it_goes():
    """Called positionally through nn.Module.__call__, the timestep is only Dynamo's args.1: it is the input that feeds
    diffusers' sinusoidal Timesteps projection (the reference DiT's sampler calls the model this way)."""
    tiny = tiny_wan(num_layers=1)
    inputs = tiny.make_inputs()
    captured = []

    def backend(gm, example_inputs):
        captured.append((private_copy(gm), list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(tiny.model, backend=backend, fullgraph=True)(
            inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"], return_dict=False)
    ((gm, example_inputs),) = captured
    counters.clear()
    ctx = PassContext(QuantSparseConfig.from_options({}), example_inputs, RewriteReport(0), plan=lora_plan(tiny.model))
    with torch.no_grad():
        gm = run_passes(gm, ctx, default_passes())
    assert counters["qsparse"]["lora_linear"] == 10 and not counters["qsparse"]["lora_fallback"]
    assert any("timestep from graph input 'args.1'" in note for note in ctx.report.notes)
    assert "bucket_index(l_args_1_, (250.0, 500.0, 750.0))" in gm.code


def test_a_graph_without_a_timestep_keeps_its_linears_quantized_and_says_why():
    """A plan with LoRA on a model whose forward takes no timestep: the linears are quantized without their LoRA, and
    the report row, a note, a counter and a warning say so."""

    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(32, 32)])

        def forward(self, x):
            return self.blocks[0](x)

    model = Blocks()
    plan = Plan(ModelFingerprint.of(model), {"blocks.0": LinearPlan(group_size=32)}, {},
                {"blocks.0.lora_a": torch.zeros(2, 1, 32), "blocks.0.lora_b": torch.zeros(2, 32, 1)},
                {"lora": {"rank": 1, "bucket_edges": [500.0]}})
    with torch.no_grad():
        gm, example_inputs = capture_dynamo_graph(model, {"x": torch.randn(1, 4, 32)})
    counters.clear()
    ctx = PassContext(QuantSparseConfig.from_options({}), example_inputs, RewriteReport(0), plan=plan)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        run_passes(gm, ctx, default_passes())
    (row,) = [site for site in ctx.report.sites if site.fqn == "blocks.0"]
    assert row.action == "w4a8_linear" and row.reason.startswith("timestep-aware LoRA not applied: no `timestep`")
    assert counters["qsparse"]["lora_fallback"] == 1 and counters["qsparse"]["lora_linear"] == 0
    assert any("0 of 1 quantized linears" in note and "1 kept without LoRA" in note for note in ctx.report.notes)
    assert any("without the plan's timestep-aware LoRA" in str(w.message) for w in caught)
    assert not ctx.lora_slots
