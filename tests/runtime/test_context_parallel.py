"""qs.optimize under diffusers' context parallelism (Ulysses): two CPU processes over gloo give one process's output.

The model has 4 heads and a plan with a different pattern per head, so each Ulysses rank (2 heads) must slice the
plan to its own heads - a wrong slice changes the reuse steps of the residual cache by several percent. The residual
cache runs its refresh and reuse steps (order 2) on each rank's heads only.

diffusers 0.42 builds the context-parallel device as ``rank % torch.accelerator.device_count()``, which is 0 on a
machine without an accelerator; the worker processes (and only they) report one device so that diffusers' setup runs
on CPU. gloo implements the all-to-all that Ulysses attention uses; nothing else is patched.
"""

import datetime
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qsparse_compiler as qs
from qsparse_compiler.compiler.backend import clear_reports, reports
from qsparse_compiler.plan import AttentionPlan, LinearPlan, ModelFingerprint, Plan, save_plan
from qsparse_compiler.eval.models import tiny_wan

WORLD = 2
HEADS = 4
HEAD_PATTERNS = ["local3d:0.3", "dense", "skip", "multidiag:0.4"]  # rank 0: heads 0-1, rank 1: heads 2-3
CACHE = {"refresh_first": 2, "refresh_every": 0, "order": 2}  # steps 0, 1 refresh; 2, 3 reuse R + steps * dR


def _denoise(model: torch.nn.Module, plan_dir: str, steps: list[dict], regional: bool, parallel=None):
    """qs.optimize, then one forward per step through the runtime: outputs and the cache memory report."""
    model = qs.optimize(model, plan=plan_dir, regional=regional, parallel=parallel)
    runtime = qs.runtime_of(model)
    outputs = []
    with torch.no_grad(), runtime.generation():
        for step, inputs in enumerate(steps):
            runtime.step(step)
            outputs.append(model(**inputs)[0])
        memory = runtime.memory_report()
    return outputs, memory


def _worker(rank: int, tmp: str, regional: bool, layers: int) -> None:
    from diffusers import ContextParallelConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        saved = torch.load(f"{tmp}/inputs.pt")
        tiny = tiny_wan(num_layers=layers, heads=HEADS)
        tiny.model.load_state_dict(saved["state"])
        parallel = ContextParallelConfig(ulysses_degree=WORLD)
        with mock.patch.object(torch.accelerator, "device_count", return_value=1):
            if not regional:  # the other way in: qs.optimize finds the parallelism the user enabled
                tiny.model.enable_parallelism(config=parallel)
                parallel = None
            outputs, memory = _denoise(tiny.model, f"{tmp}/plan", saved["steps"], regional, parallel)
        sites = [site for report in reports() for site in report.sites]
        attention = {site.fqn: site.reason for site in sites if site.action == "sparse_attention"}
        linears = {site.fqn for site in sites if site.action == "w4a8_linear"}
        fusions = {site.fqn: site.action for site in sites if site.kind == "fusion"}
        torch.save({"outputs": outputs, "memory": memory, "attention": attention, "linears": linears,
                    "fusions": fusions}, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# Regional: the first block's graph carries diffusers' input split, the second block's graph is the shared one.
# Whole model (one block, to keep the compile short): one graph from the split to the output gather; the workers call
# enable_parallelism themselves and qs.optimize(parallel=None) finds it.
@pytest.mark.slow
# Regional (qs.optimize's default) keeps the two-process scenario in the default run; the whole-model graph is extended.
@pytest.mark.parametrize("regional, layers", [(True, 2), pytest.param(False, 1, marks=pytest.mark.extended)],
                         ids=["regional", "whole_model"])
def test_ulysses_two_processes_equal_one_process(tmp_path, regional, layers):
    tiny = tiny_wan(num_layers=layers, heads=HEADS)
    linears = {name for name, module in tiny.model.blocks.named_modules(prefix="blocks")
               if isinstance(module, torch.nn.Linear)}
    plan = Plan(ModelFingerprint.of(tiny.model),
                linears={name: LinearPlan(group_size=32, act_format="int8") for name in linears},
                attentions={f"blocks.{i}.attn1": AttentionPlan(HEAD_PATTERNS, block_q=16, block_kv=16, cache=CACHE)
                            for i in range(layers)})
    save_plan(plan, tmp_path / "plan")
    steps = [tiny.make_inputs() for _ in range(4)]  # new latents every step, as in denoising
    torch.save({"state": tiny.model.state_dict(), "steps": steps}, tmp_path / "inputs.pt")

    torch._dynamo.reset()
    clear_reports()
    expected, expected_memory = _denoise(tiny.model, str(tmp_path / "plan"), steps, regional)
    mp.spawn(_worker, args=(str(tmp_path), regional, layers), nprocs=WORLD, join=True)

    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["linears"] == linears  # W4A8 on the rank's sequence shard (per-token scales: same numbers)
        # The same fusions as one process (q/k norm + rope through Ulysses' all-to-all): else q/k differ by rounding,
        # which the int8 activation quantization and the cache's reuse steps amplify past the tolerance below.
        assert result["fusions"] == {f"blocks.{i}.{site}": action for i in range(layers) for site, action in (
            ("attn1.qk_norm_rope", "qk_norm_rope"), ("norm1", "layer_norm_modulate_quant"),
            ("norm2", "layer_norm_modulate_quant"), ("norm3", "layer_norm_modulate_quant"))}
        for step, (actual, reference) in enumerate(zip(result["outputs"], expected)):
            assert torch.allclose(actual, reference, rtol=1e-5, atol=1e-6), f"rank {rank}, step {step}"
        first = rank * HEADS // WORLD
        local = ";".join(HEAD_PATTERNS[first:first + HEADS // WORLD])
        assert result["attention"] == {
            f"blocks.{i}.attn1": f"{local} @ density 0.15 of the video x video tiles; heads {first}..{first + 1} of 4 "
                                 f"(Ulysses rank {rank} of 2)" for i in range(layers)}
        for site in result["attention"]:
            ours, reference = result["memory"][site], expected_memory[site]
            assert (ours["refreshes"], ours["reuses"]) == (reference["refreshes"], reference["reuses"]) == (2, 2)
            # R and dR of 2 of the 4 heads, and the 4-byte step counter.
            assert ours["bytes"] == (reference["bytes"] - 4) // 2 + 4


def test_optimize_refuses_what_it_cannot_follow():
    from diffusers import ContextParallelConfig, TensorParallelConfig

    model = tiny_wan(num_layers=1).model
    with pytest.raises(ValueError, match=r"ring attention .*ulysses_degree=2\)"):
        qs.optimize(model, parallel=ContextParallelConfig(ring_degree=2))
    with pytest.raises(ValueError, match="ulysses_anything=False"):
        qs.optimize(model, parallel=ContextParallelConfig(ulysses_degree=2, ulysses_anything=True))
    with pytest.raises(ValueError, match="tensor parallelism is not supported"):
        qs.optimize(model, parallel=TensorParallelConfig(tp_degree=2))
    assert model._parallel_config is None  # refused before anything was changed
