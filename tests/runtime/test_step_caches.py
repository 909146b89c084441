"""qs.optimize as diffusers hooks: restore is its inverse, CFG branches come from cache_context, and diffusers' step
caches (transformer.enable_cache) either wrap the compiled blocks with the same result as on the eager model or are
refused with the reason."""

import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                             SeaCacheConfig, TaylorSeerCacheConfig)

import qsparse_compiler as qs
from qsparse_compiler.runtime.residual_cache import CacheError
from qsparse_compiler.eval.metrics import relative_error
from qsparse_compiler.eval.models import EXACT_OPTIONS, tiny_wan

pytestmark = pytest.mark.slow

STEPS = 6
SPARSE = {"quant": {"enabled": False}, "sparsity": {"density": 0.34, "block_q": 16, "block_kv": 16}}


class WanLikePipeline:
    """WanPipeline's denoising loop: set_timesteps, a "cond" and an "uncond" call per step each inside
    transformer.cache_context(name, step_index=i, ...), scheduler.step, and the stateful hooks reset at the end
    (what maybe_free_model_hooks does). ``uncond_first`` swaps the two calls (branches must follow the names)."""

    def __init__(self, transformer, uncond_first=False):
        self.transformer = transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        self.uncond_first = uncond_first
        self.calls = 0

    def __call__(self, latents, cond, uncond, steps=STEPS, guidance=3.0):
        self.scheduler.set_timesteps(steps)
        for i, t in enumerate(self.scheduler.timesteps):
            timestep = t.expand(latents.shape[0])
            context = {"step_index": i, "num_inference_steps": steps, "sigma": float(self.scheduler.sigmas[i])}
            v = {}
            for name in (("uncond", "cond") if self.uncond_first else ("cond", "uncond")):
                with self.transformer.cache_context(name, **context):
                    v[name] = self.transformer(hidden_states=latents, encoder_hidden_states=cond if name == "cond"
                                               else uncond, timestep=timestep, return_dict=False)[0]
            latents = self.scheduler.step(v["uncond"] + guidance * (v["cond"] - v["uncond"]), t, latents).prev_sample
        self.transformer._reset_stateful_cache()
        return latents


def inputs_of(tiny):
    inputs = tiny.make_inputs()
    return inputs["hidden_states"], inputs["encoder_hidden_states"], torch.randn_like(inputs["encoder_hidden_states"])


def attention_calls(transformer):
    """Count the self-attentions an eager model computes (a torch pre-hook on attn1, inside each block: it fires only
    when a step cache lets the block run)."""
    calls = []
    for block in transformer.blocks:
        block.attn1.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_restore_brings_back_the_eager_model_exactly():
    tiny = tiny_wan(num_layers=2)
    pipe = WanLikePipeline(tiny.model)
    args = inputs_of(tiny)
    with torch.no_grad():
        eager = pipe(*args)
        qs.optimize(pipe, options=SPARSE, cache={"refresh_first": 2, "refresh_every": 0, "order": 1})
        optimized = pipe(*args)
        qs.restore(pipe)
        restored = pipe(*args)
    assert not torch.equal(optimized, eager)  # the sparse rewrite ran
    assert torch.equal(restored, eager)
    assert not tiny.model._diffusers_hook.hooks and not any(block._diffusers_hook.hooks for block in tiny.model.blocks)
    with pytest.raises(ValueError, match="not prepared by qs.optimize"):
        qs.runtime_of(pipe)
    qs.optimize(pipe, options=SPARSE)  # and it can be optimized again; optimizing twice replaces the first
    qs.optimize(pipe, options=SPARSE)
    assert list(tiny.model._diffusers_hook.hooks) == ["qsparse_runtime"]
    assert all(list(block._diffusers_hook.hooks) == ["qsparse_compiled"] for block in tiny.model.blocks)


def test_cfg_branches_follow_the_cache_context_names():
    """Swapping the order of the cond / uncond calls changes nothing: each residual belongs to its branch's name,
    not to a call position (and the step comes from the cache context: 2 refreshes + 4 reuses per branch)."""
    tiny = tiny_wan(num_layers=1)
    args = inputs_of(tiny)
    results = {}
    for uncond_first in (False, True):
        pipe = WanLikePipeline(copy.deepcopy(tiny.model), uncond_first=uncond_first)
        qs.optimize(pipe, options=SPARSE, cache={"refresh_first": 2, "refresh_every": 0, "order": 1})
        with torch.no_grad():
            results[uncond_first] = pipe(*args)
        total = qs.runtime_of(pipe).memory_report()["total"]
        assert total["branches"] == 2 and total["refreshes"] == 2 * 2 and total["reuses"] == 2 * (STEPS - 2)
    assert torch.equal(results[False], results[True])


def test_compile_repeated_blocks_in_a_pipeline_runs_as_qs_optimize():
    """``transformer.compile_repeated_blocks(backend="quantsparse")`` with the residual cache, in a pipeline: at the
    first compile the backend finds the pipeline calling the transformer (runtime/repeated.py), so the step follows
    its cache_context and scheduler and the CFG branches their names - the same output and the same refreshes and
    reuses as qs.optimize(pipe), in the first generation (whose first forward compiled the blocks before any hook
    was there) and in the next."""
    tiny = tiny_wan(num_layers=2)
    args = inputs_of(tiny)
    cache = {"refresh_first": 2, "refresh_every": 0, "order": 1}
    reference = WanLikePipeline(copy.deepcopy(tiny.model))
    qs.optimize(reference, options=SPARSE, cache=cache, summary=False)
    with torch.no_grad():
        expected = reference(*args)
    expected_counts = qs.runtime_of(reference).memory_report()["total"]
    torch._dynamo.reset()
    pipe, session = WanLikePipeline(tiny.model), qs.Session()
    tiny.model.compile_repeated_blocks(backend="quantsparse",
                                       options={**SPARSE, "session": session, "cache": {"enabled": True, **cache}})
    with torch.no_grad():
        first = pipe(*args)
        counts = qs.runtime_of(pipe).memory_report()["total"]
        second = pipe(*args)
    assert qs.runtime_of(pipe) is session.cache and list(tiny.model._diffusers_hook.hooks) == ["qsparse_runtime"]
    assert relative_error(first, expected) < 1e-5 and relative_error(second, expected) < 1e-5
    assert {key: counts[key] for key in ("branches", "refreshes", "reuses")} == \
        {key: expected_counts[key] for key in ("branches", "refreshes", "reuses")}
    assert expected_counts["reuses"] == 2 * 2 * (STEPS - 2)  # 2 blocks x 2 branches


COMPOSING = {
    "FirstBlockCacheConfig": lambda: FirstBlockCacheConfig(threshold=0.5),
    "MagCacheConfig": lambda: MagCacheConfig(threshold=0.5, max_skip_steps=2, retention_ratio=0.2,
                                             num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS),
    "SeaCacheConfig": lambda: SeaCacheConfig(threshold=0.5, retention_steps=1, cache_end_steps=1),
    "TaylorSeerCacheConfig(use_lite_mode=True)": lambda: TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, use_lite_mode=True, taylor_factors_dtype=torch.float32),
}
# TaylorSeer's default patterns ("^blocks.*attn", matched with re.fullmatch) match no module of a Wan transformer
# ("blocks.0.attn1" ends in a digit): diffusers installs no hook, so it runs the model unchanged, compiled or not.
EQUIVALENT = {"TaylorSeerCacheConfig()": lambda: TaylorSeerCacheConfig()}


@pytest.mark.parametrize("name", sorted(COMPOSING))
def test_block_level_step_caches_wrap_the_compiled_blocks(name):
    """With EXACT_OPTIONS the compiled blocks compute what the eager blocks do (every tile, no quantization; the
    residual cache on, its residual ~0): the step cache must then skip the same blocks and give the same video as on
    the eager model - and the residual cache must see the skipped steps as gaps, not crash or recount them."""
    tiny = tiny_wan(num_layers=3)
    eager_pipe = WanLikePipeline(copy.deepcopy(tiny.model))
    pipe = WanLikePipeline(tiny.model)
    qs.optimize(pipe, options=EXACT_OPTIONS, cache={"refresh_first": 2, "refresh_every": 3, "order": 2})
    eager_pipe.transformer.enable_cache(COMPOSING[name]())
    pipe.transformer.enable_cache(COMPOSING[name]())
    eager_calls = attention_calls(eager_pipe.transformer)
    args = inputs_of(tiny)
    with torch.no_grad():
        expected = eager_pipe(*args)
        actual = pipe(*args)
    assert relative_error(actual, expected) < 1e-4
    # The same blocks ran: the residual cache saw each executed block's attention once, skipped steps not at all.
    report = qs.runtime_of(pipe).memory_report()
    compiled_calls = sum(report[f"blocks.{i}.attn1"]["refreshes"] + report[f"blocks.{i}.attn1"]["reuses"]
                         for i in range(3))
    assert compiled_calls == len(eager_calls) < 3 * 2 * STEPS, (compiled_calls, len(eager_calls))


def test_a_step_cache_that_installs_no_hook_on_wan_runs_the_model_unchanged():
    tiny = tiny_wan(num_layers=2)
    eager_pipe, pipe = WanLikePipeline(copy.deepcopy(tiny.model)), WanLikePipeline(tiny.model)
    qs.optimize(pipe, options=EXACT_OPTIONS, cache={"refresh_first": 2, "refresh_every": 3, "order": 2})
    for each in (eager_pipe, pipe):
        each.transformer.enable_cache(EQUIVALENT["TaylorSeerCacheConfig()"]())
    args = inputs_of(tiny)
    with torch.no_grad():
        assert relative_error(pipe(*args), eager_pipe(*args)) < 1e-4


REFUSED = {
    "PyramidAttentionBroadcastConfig": lambda: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500),
    "FasterCacheConfig": lambda: FasterCacheConfig(current_timestep_callback=lambda: 500),
    "TaylorSeerCacheConfig": lambda: TaylorSeerCacheConfig(cache_identifiers=[r"blocks\.\d+\.attn1"]),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_step_caches_that_hook_inside_the_blocks_are_refused_by_name(name):
    tiny = tiny_wan(num_layers=2)
    pipe = WanLikePipeline(tiny.model)
    qs.optimize(pipe, options=SPARSE)
    pipe.transformer.enable_cache(REFUSED[name]())
    with pytest.raises(CacheError, match=rf"{name} cannot compose with qs.optimize: it hooks modules inside"):
        with torch.no_grad():
            pipe(*inputs_of(tiny), steps=2)


def test_a_step_cache_on_a_whole_model_graph_is_refused():
    tiny = tiny_wan(num_layers=2)
    pipe = WanLikePipeline(tiny.model)
    qs.optimize(pipe, options=SPARSE, regional=False)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    with pytest.raises(CacheError, match="FirstBlockCacheConfig cannot compose with a transformer compiled as one"):
        with torch.no_grad():
            pipe(*inputs_of(tiny), steps=2)


def test_a_step_cache_enabled_before_optimize_is_refused():
    tiny = tiny_wan(num_layers=2)
    tiny.model.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    with pytest.raises(ValueError, match="FirstBlockCacheConfig is enabled on the transformer"):
        qs.optimize(tiny.model, options=SPARSE)


def per_layer_plan(model, tmp_path, schedules, steps=STEPS):
    """A plan whose two blocks differ only in their refresh steps (what calibration's refresh_budget writes)."""
    from qsparse_compiler.plan import AttentionPlan, ModelFingerprint, Plan, save_plan

    attentions = {f"blocks.{i}.attn1": AttentionPlan(["local3d:0.34"], block_q=16, block_kv=16, cache={
        "refresh_steps": refresh_steps, "num_steps": steps, "order": 1}) for i, refresh_steps in enumerate(schedules)}
    save_plan(Plan(ModelFingerprint.of(model), attentions=attentions), tmp_path)
    return str(tmp_path)


def test_per_layer_refresh_steps_run_in_one_regional_graph_and_under_cuda_graph_switching(tmp_path):
    """Each block follows its own refresh steps from the plan: one regional graph for both blocks (the steps are
    host-side), no recompile across steps; cuda_graphs=True gives each block a refresh and a reuse graph picked per
    call from its own schedule (on CPU Inductor runs them without CUDA graphs) with the same result."""
    from qsparse_compiler.compiler.backend import clear_reports, reports

    schedules = ([0, 3], [0, 2, 4])
    tiny = tiny_wan(num_layers=2)
    plan = per_layer_plan(tiny.model, tmp_path, schedules)
    args = inputs_of(tiny)
    results, graphs = {}, {}
    for cuda_graphs in (False, True):
        torch._dynamo.reset()
        clear_reports()
        pipe = WanLikePipeline(copy.deepcopy(tiny.model))
        qs.optimize(pipe, plan, options={"quant": {"enabled": False}}, cuda_graphs=cuda_graphs)
        with torch.no_grad():
            results[cuda_graphs] = pipe(*args)
        graphs[cuda_graphs] = len(reports())
        report = qs.runtime_of(pipe).memory_report()
        for i, refresh_steps in enumerate(schedules):
            site = report[f"blocks.{i}.attn1"]
            assert site["refreshes"] == 2 * len(refresh_steps) and site["reuses"] == 2 * (STEPS - len(refresh_steps))
    assert graphs == {False: 1, True: 2}  # one shared block graph; a refresh and a reuse graph
    assert relative_error(results[True], results[False]) < 1e-5


def test_a_plan_whose_schedules_do_not_fit_the_step_count_is_refused(tmp_path):
    tiny = tiny_wan(num_layers=2)
    pipe = WanLikePipeline(tiny.model)
    qs.optimize(pipe, per_layer_plan(tiny.model, tmp_path, ([0, 3], [0, 2, 4])), options={"quant": {"enabled": False}})
    with pytest.raises(CacheError, match=r"CacheConfig.num_steps=6.*but this generation runs 8 steps; run "
                                         r"num_inference_steps=6"):
        with torch.no_grad():
            pipe(*inputs_of(tiny), steps=8)


@pytest.mark.gpu
def test_per_layer_refresh_steps_under_cuda_graphs_on_the_gpu(tmp_path):
    """The same as the CPU test, captured: mode="reduce-overhead" records each block's refresh and reuse graphs; the
    video equals the auto-mode regional run's up to bf16 rounding (the same ops, fused into other graphs)."""
    schedules = ([0, 3], [0, 2, 4])
    tiny = tiny_wan(num_layers=2, dtype=torch.bfloat16)
    tiny.model.to("cuda")
    plan = per_layer_plan(tiny.model, tmp_path, schedules)
    args = [t.to("cuda") for t in inputs_of(tiny)]
    results = {}
    for cuda_graphs in (False, True):
        torch._dynamo.reset()
        pipe = WanLikePipeline(copy.deepcopy(tiny.model))
        qs.optimize(pipe, plan, options={"quant": {"enabled": False}}, cuda_graphs=cuda_graphs)
        with torch.no_grad():
            results[cuda_graphs] = pipe(*args).clone()
        report = qs.runtime_of(pipe).memory_report()
        assert [report[f"blocks.{i}.attn1"]["refreshes"] for i in range(2)] == [2 * len(s) for s in schedules]
    assert relative_error(results[True].float(), results[False].float()) < 2e-2


# MagCache composes with the compiled blocks in test_block_level_step_caches_wrap_the_compiled_blocks; over sparse
# attention it repeats FirstBlockCache's check with other skipped steps, hence `extended`.
@pytest.mark.parametrize("name", ["FirstBlockCacheConfig", pytest.param("MagCacheConfig", marks=pytest.mark.extended)])
def test_a_step_cache_over_sparse_attention_and_an_order_two_cache_matches_the_uncompiled_rewrite(name, monkeypatch):
    """Density 0.34 with an order-2 residual cache under a step cache that skips steps: the compiled pipeline gives
    the video of the same rewrite run uncompiled (its FX graph interpreted: every qsparse:: op on its plain-torch
    reference, the runtime's gap handling the same), with the same skipped blocks."""
    import torch._inductor.compile_fx as inductor

    tiny = tiny_wan(num_layers=3)
    args = inputs_of(tiny)
    cache = {"refresh_first": 2, "refresh_every": 2, "order": 2}
    results, executed = {}, {}
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(inductor, "compile_fx", lambda gm, example_inputs, config_patches=None: gm.forward)
        torch._dynamo.reset()
        pipe = WanLikePipeline(copy.deepcopy(tiny.model))
        qs.optimize(pipe, options=SPARSE, cache=cache)
        pipe.transformer.enable_cache(COMPOSING[name]())
        with torch.no_grad():
            results[compiled] = pipe(*args)
        report = qs.runtime_of(pipe).memory_report()
        executed[compiled] = [report[f"blocks.{i}.attn1"]["refreshes"] + report[f"blocks.{i}.attn1"]["reuses"]
                              for i in range(3)]
    assert executed[True] == executed[False] and sum(executed[True]) < 3 * 2 * STEPS, executed
    assert relative_error(results[True], results[False]) < 1e-4
