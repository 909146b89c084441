"""SSAR residual cache: formulas, schedule, branches, resets; and in a compiled model without per-step recompiles."""

import pytest
import torch
import torch.nn.functional as F

import qsparse_compiler.ops  # noqa: F401
from qsparse_compiler.compiler.backend import clear_reports, reports
from qsparse_compiler.config import CacheConfig
from qsparse_compiler.ops.residual_attention import MODE_AUTO
from qsparse_compiler.formats.pattern_spec import build_video_layout
from qsparse_compiler.runtime.residual_cache import CacheError, ResidualCacheRuntime
from qsparse_compiler.formats.patterns import TokenGrid
from qsparse_compiler.eval.metrics import relative_error
from qsparse_compiler.eval.models import tiny_wan

SHAPE = (1, 2, 48, 16)
LAYOUT = build_video_layout(TokenGrid(3, 4, 4, 48), "local3d", 0.34, 16, 16)


def attention_step(runtime, schedule, q, k, v, fqn="blocks.0.attn1"):
    """What a compiled graph does at one site: sparse attention, then the residual-cache node."""
    o_sparse, _ = torch.ops.qsparse.sparse_attention(q, k, v, LAYOUT.kv_num_blocks, LAYOUT.kv_indices, 16, 16, 0.25, None)
    state, refresh = runtime.acquire(fqn, schedule, tuple(o_sparse.shape), o_sparse.dtype, o_sparse.device)
    out = torch.ops.qsparse.residual_attention(o_sparse, q, k, v, None, 0.25, state, torch.tensor(refresh),
                                               MODE_AUTO, schedule.order)
    return out, o_sparse, refresh


def sequence(steps, seed=0):
    """Slowly drifting q, k, v over denoising steps (what makes the residual stable)."""
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3)]
    drift = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3)]
    return [[(b + 0.05 * t * d).float() for b, d in zip(base, drift)] for t in range(steps)]


def dense(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=0.25)


def test_refresh_every_step_equals_dense_attention():
    runtime, schedule = ResidualCacheRuntime(), CacheConfig(enabled=True, refresh_first=1, refresh_every=1, order=2)
    for step, (q, k, v) in enumerate(sequence(4)):
        runtime.step(step)
        out, _, refresh = attention_step(runtime, schedule, q, k, v)
        assert refresh
        assert torch.allclose(out, dense(q, k, v), atol=1e-6)


@pytest.mark.parametrize("order", [1, 2])
def test_order_one_and_two_follow_their_formulas(order):
    runtime = ResidualCacheRuntime()
    schedule = CacheConfig(enabled=True, refresh_first=2, refresh_every=4, order=order)
    residuals = {}
    for step, (q, k, v) in enumerate(sequence(9)):
        runtime.step(step)
        out, o_sparse, refresh = attention_step(runtime, schedule, q, k, v)
        assert refresh == (step in (0, 1, 4, 8))
        if refresh:
            residuals[step] = dense(q, k, v) - o_sparse
            expected = dense(q, k, v)
        else:
            last = max(s for s in residuals if s < step)
            previous = max((s for s in residuals if s < last), default=None)
            estimate = residuals[last]
            if order == 2 and previous is not None:
                estimate = estimate + (step - last) * (residuals[last] - residuals[previous]) / (last - previous)
            expected = o_sparse + estimate
        assert torch.allclose(out, expected, atol=1e-5), step


def test_low_rank_with_full_rank_equals_full_storage():
    outputs = {}
    for rank in (0, SHAPE[-1]):
        runtime = ResidualCacheRuntime()
        schedule = CacheConfig(enabled=True, refresh_first=2, refresh_every=0, order=2, rank=rank)
        outputs[rank] = []
        for step, (q, k, v) in enumerate(sequence(5)):
            runtime.step(step)
            outputs[rank].append(attention_step(runtime, schedule, q, k, v)[0])
    for full, factored in zip(outputs[0], outputs[SHAPE[-1]]):
        assert torch.allclose(full, factored, atol=1e-4)


def test_low_rank_cuts_memory_and_reports_it():
    runtime = ResidualCacheRuntime()
    q, k, v = sequence(1)[0]
    attention_step(runtime, CacheConfig(enabled=True, rank=2), q, k, v, fqn="a")
    attention_step(runtime, CacheConfig(enabled=True, rank=0), q, k, v, fqn="b")
    report = runtime.memory_report()
    assert report["a"]["bytes"] < report["b"]["bytes"] / 3
    assert report["total"]["bytes"] == report["a"]["bytes"] + report["b"]["bytes"]
    assert report["total"]["refreshes"] == 2


def test_fp8_storage_halves_bf16_memory_and_stays_within_its_rounding():
    """Order 2 with e4m3 R and dR: the estimate moves by at most the e4m3 rounding of R (and steps x that of dR)."""
    outputs, memory = {}, {}
    for storage in ("model", "fp8_e4m3"):
        runtime = ResidualCacheRuntime()
        schedule = CacheConfig(enabled=True, refresh_first=2, refresh_every=4, order=2, storage=storage)
        outputs[storage] = []
        for step, (q, k, v) in enumerate(sequence(7)):
            runtime.step(step)
            out, o_sparse, refresh = attention_step(runtime, schedule, q.bfloat16(), k.bfloat16(), v.bfloat16())
            outputs[storage].append((out.float(), (dense(q, k, v) - o_sparse.float()), refresh))
        memory[storage] = runtime.memory_report()["total"]["bytes"]
    b, h, s, d = SHAPE
    assert memory["model"] == 2 * b * h * s * d * 2 + 4
    assert memory["fp8_e4m3"] == 2 * (b * h * s * d + b * h * s * 4) + 4  # codes + one fp32 scale per row
    for step, ((exact, residual, refresh), (fp8, _, _)) in enumerate(zip(outputs["model"], outputs["fp8_e4m3"])):
        if refresh:
            assert torch.equal(exact, fp8), step  # a refresh returns dense attention either way
        else:
            # e4m3 keeps 3 mantissa bits: <= 2**-4 of a row's amax per stored value, R + up to 2 dR here.
            bound = 3 * 2**-4 * residual.abs().amax(dim=-1, keepdim=True) + 2**-7 * exact.abs()
            assert bool(((fp8 - exact).abs() <= bound).all()), step
            assert relative_error(fp8, exact) > 0  # the fp8 path really ran


@pytest.mark.parametrize("storage", ["model", "fp8_e4m3"])
def test_order_one_holds_no_delta(storage):
    """Order 1 never reads dR, so its cache holds R only: half of order 2's bytes (plus the step counter)."""
    q, k, v = sequence(1)[0]
    runtime = ResidualCacheRuntime()
    for order in (1, 2):
        attention_step(runtime, CacheConfig(enabled=True, order=order, storage=storage), q, k, v, fqn=f"order{order}")
    report = runtime.memory_report()
    assert report["order1"]["bytes"] - 4 == (report["order2"]["bytes"] - 4) // 2


def test_cfg_branches_are_kept_apart():
    schedule = CacheConfig(enabled=True, refresh_first=1, refresh_every=0, order=1)
    cond, uncond = sequence(4, seed=1), sequence(4, seed=2)
    shared = ResidualCacheRuntime()
    alone = {name: ResidualCacheRuntime() for name in ("cond", "uncond")}
    for step in range(4):
        shared.step(step)
        for runtime in alone.values():
            runtime.step(step)
        both = [attention_step(shared, schedule, *cond[step])[0], attention_step(shared, schedule, *uncond[step])[0]]
        assert torch.equal(both[0], attention_step(alone["cond"], schedule, *cond[step])[0])
        assert torch.equal(both[1], attention_step(alone["uncond"], schedule, *uncond[step])[0])


def test_a_third_call_in_one_step_is_an_error_not_a_wrong_residual():
    runtime, schedule = ResidualCacheRuntime(), CacheConfig(enabled=True, max_branches=2)
    q, k, v = sequence(1)[0]
    attention_step(runtime, schedule, q, k, v)
    attention_step(runtime, schedule, q, k, v)
    with pytest.raises(CacheError, match="ran 3 times in step 0"):
        attention_step(runtime, schedule, q, k, v)


def test_reset_starts_a_new_generation_and_shape_change_restarts_the_site():
    runtime, schedule = ResidualCacheRuntime(), CacheConfig(enabled=True, refresh_first=1, refresh_every=0, order=1)
    steps = sequence(3)
    first = []
    with runtime.generation():
        for i, (q, k, v) in enumerate(steps):
            runtime.step(i)
            first.append(attention_step(runtime, schedule, q, k, v)[0])
    with runtime.generation():
        for i, (q, k, v) in enumerate(steps):
            runtime.step(i)
            out, _, refresh = attention_step(runtime, schedule, q, k, v)
            assert refresh == (i == 0) and torch.equal(out, first[i])
    runtime.step(5)
    q, k, v = (torch.cat([t, t]) for t in steps[0])  # batch 2 now: the cache restarts instead of crashing
    out, _, refresh = attention_step(runtime, schedule, q, k, v)
    assert refresh and runtime.memory_report()["blocks.0.attn1"]["resets"] == 1


def test_a_site_belongs_to_one_model_until_reset_or_until_that_model_is_gone():
    """Two models of one architecture have the same FQNs: the runtime must not hand one model's residual to the other."""
    import gc

    runtime, schedule = ResidualCacheRuntime(), CacheConfig(enabled=True, refresh_first=1, refresh_every=0, order=1)
    first, second = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))  # each model's owner

    def refreshes(owner):
        return runtime.acquire("blocks.0.attn1", schedule, SHAPE, torch.float32, torch.device("cpu"), owner)[1]

    assert refreshes(first)
    runtime.step()
    assert not refreshes(first)  # a reuse of its own residual
    runtime.step()
    with pytest.raises(CacheError, match="two compiled models use the residual cache of blocks.0.attn1"):
        refreshes(second)
    assert not refreshes(first)  # the refused call took no branch: the first model still reuses its residual
    runtime.reset()
    assert refreshes(second)  # a new generation: the site passes to whoever calls first, with a refresh
    runtime.step()
    with pytest.raises(CacheError):
        refreshes(first)
    del second
    gc.collect()
    assert refreshes(first)  # the other model is gone: its residual is dropped, not reused


@pytest.mark.parametrize("storage", ["model", "fp8_e4m3"])
def test_compiled_model_runs_a_generation_without_per_step_recompiles(storage):
    tiny = tiny_wan(num_layers=1)
    runtime = ResidualCacheRuntime()
    options = {
        "quant": {"enabled": False},
        "sparsity": {"density": 0.34, "block_q": 16, "block_kv": 16},
        "cache": {"enabled": True, "refresh_first": 2, "refresh_every": 3, "order": 2, "storage": storage},
        "runtime": runtime,
    }
    # fp8 storage rounds R to e4m3 (3 mantissa bits): a reuse step is that close to the dense output, not exact.
    reuse_tolerance = 1e-5 if storage == "model" else 2e-2
    torch._dynamo.reset()
    clear_reports()
    compiled = torch.compile(tiny.model, backend="quantsparse", options=options, fullgraph=True)
    inputs = tiny.make_inputs()
    with torch.no_grad(), runtime.generation():
        for step in range(7):
            runtime.step(step)
            out = compiled(**inputs)[0]
            if CacheConfig(**options["cache"]).is_refresh_step(step):
                # A refresh step computes dense attention: the model's eager output.
                assert relative_error(out, tiny.model(**inputs)[0]) < 1e-5
            else:
                # Same inputs every step: the stored residual is exact (order 2 adds a zero change).
                assert relative_error(out, tiny.model(**inputs)[0]) < reuse_tolerance
    assert len(reports()) == 1
    assert reports()[0].counters["residual_attention"] == 1
    totals = runtime.memory_report()["total"]
    assert totals["refreshes"] == 4 and totals["reuses"] == 3


def test_opcheck_residual_attention():
    q, k, v = sequence(1)[0]
    o_sparse = torch.randn(SHAPE)
    rows = SHAPE[:3] + (1,)
    fp8 = [torch.zeros(SHAPE, dtype=torch.float8_e4m3fn), torch.ones(rows), torch.zeros(SHAPE, dtype=torch.float8_e4m3fn),
           torch.ones(rows), torch.zeros(1)]
    # opcheck's schema test compares tensors with ops that have no float8 CPU kernel: the mutation declaration is
    # checked with the full-precision state (same schema); fake tensors and autograd registration with both.
    tests = {"full": ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
             "fp8": ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")}
    for refresh in (True, False):
        for kind, state in (("full", [torch.zeros(SHAPE), torch.zeros(SHAPE), torch.zeros(1)]), ("fp8", fp8)):
            torch.library.opcheck(torch.ops.qsparse.residual_attention.default,
                                  (o_sparse, q, k, v, None, 0.25, state, torch.tensor(refresh), MODE_AUTO, 2),
                                  test_utils=tests[kind])


def test_no_cache_nodes_unless_enabled_and_a_note_when_a_plan_wants_them(tmp_path):
    from torch._dynamo.utils import counters

    from qsparse_compiler.config import QuantSparseConfig
    from qsparse_compiler.compiler.passes import PassContext, default_passes, run_passes
    from qsparse_compiler.compiler.passes.report import RewriteReport
    from qsparse_compiler.plan import AttentionPlan, ModelFingerprint, Plan
    from qsparse_compiler.eval.capture import capture_dynamo_graph

    tiny = tiny_wan(num_layers=1)
    plan = Plan(ModelFingerprint.of(tiny.model), attentions={
        "blocks.0.attn1": AttentionPlan(["local3d:0.3"], block_q=16, block_kv=16, cache={"order": 1})})
    for with_plan in (False, True):
        counters.clear()
        with torch.no_grad():
            gm, example_inputs = capture_dynamo_graph(tiny.model, tiny.make_inputs())
            options = {"sparsity": {"block_q": 16, "block_kv": 16}, "quant": {"enabled": False}}
            ctx = PassContext(QuantSparseConfig.from_options(options), example_inputs, RewriteReport(0),
                              plan=plan if with_plan else None)
            run_passes(gm, ctx, default_passes())
        assert counters["qsparse"]["sparse_attention"] == 1 and counters["qsparse"]["residual_attention"] == 0
        assert any("nothing drives" in note for note in ctx.report.notes) == with_plan


def test_optimize_without_cache_overrides_a_plans_cache_settings(tmp_path):
    """qs.optimize(cache=False): no cache nodes even where the plan asks for them (the runtime qs.optimize passes
    would otherwise make the plan's per-site settings apply); cache=True keeps them."""
    import qsparse_compiler as qs
    from qsparse_compiler.plan import AttentionPlan, ModelFingerprint, Plan, save_plan

    tiny = tiny_wan(num_layers=1)
    save_plan(Plan(ModelFingerprint.of(tiny.model), attentions={
        "blocks.0.attn1": AttentionPlan(["local3d:0.3"], block_q=16, block_kv=16, cache={"order": 1})}), tmp_path)
    for cache, cached_sites in ((False, 0), (True, 1)):
        torch._dynamo.reset()
        clear_reports()
        model = qs.optimize(tiny.model, str(tmp_path), options={"quant": {"enabled": False}}, cache=cache,
                            regional=False)
        with torch.no_grad():
            model(**tiny.make_inputs())
        (report,) = reports()
        assert report.counters["sparse_attention"] == 1
        assert report.counters.get("residual_attention", 0) == cached_sites


def test_skipped_steps_owe_their_refresh_and_order_two_extrapolates_over_the_true_distance():
    """A step cache skips whole steps: the site is called at steps 0, 1, 2, 5, 7, 10 of refresh_first=2, every=4
    (refresh steps 0, 1, 4, 8). The refresh of step 4 is owed (step 5 refreshes), dR divides by the 4 steps between
    the refreshes at 1 and 5, the reuse at step 7 adds 2 * dR, and step 10 makes up for step 8."""
    runtime = ResidualCacheRuntime()
    schedule = CacheConfig(enabled=True, refresh_first=2, refresh_every=4, order=2)
    steps = sequence(12)
    residual = {}
    for step in (0, 1, 2, 5, 7, 10):
        q, k, v = steps[step]
        runtime.step(step)
        out, o_sparse, refresh = attention_step(runtime, schedule, q, k, v)
        assert refresh == (step in (0, 1, 5, 10)), step
        if refresh:
            residual[step] = dense(q, k, v) - o_sparse
            continue
        last, previous = (1, 0) if step == 2 else (5, 1)
        delta = (residual[last] - residual[previous]) / (last - previous)
        assert torch.allclose(out, o_sparse + residual[last] + (step - last) * delta, atol=1e-5), step
    state = runtime._sites["blocks.0.attn1"].branches[0].state
    assert float(state[-1]) == 0.0  # step 10 refreshed


def test_reuse_after_a_gap_counts_steps_not_calls():
    runtime = ResidualCacheRuntime()
    schedule = CacheConfig(enabled=True, refresh_first=2, refresh_every=0, order=2)
    steps = sequence(8)
    residual = {}
    for step in (0, 1, 4, 7):
        q, k, v = steps[step]
        runtime.step(step)
        out, o_sparse, refresh = attention_step(runtime, schedule, q, k, v)
        if refresh:
            residual[step] = dense(q, k, v) - o_sparse
        else:
            expected = o_sparse + residual[1] + (step - 1) * (residual[1] - residual[0])
            assert torch.allclose(out, expected, atol=1e-5), step


def test_named_branches_keep_their_residuals_whatever_the_call_order():
    """Branches named by the pipeline's cache context (runtime/context.py forward_branch) key the residuals: a step
    that calls "uncond" before "cond" reads the same residuals as one in the usual order."""
    from qsparse_compiler.ops.context import forward_branch

    schedule = CacheConfig(enabled=True, refresh_first=1, refresh_every=0, order=1)
    cond, uncond = sequence(3, seed=1), sequence(3, seed=2)
    outputs = {}
    for swapped in (False, True):
        runtime = ResidualCacheRuntime()
        outputs[swapped] = {}
        for step in range(3):
            runtime.step(step)
            order = [("uncond", uncond), ("cond", cond)] if swapped and step else [("cond", cond), ("uncond", uncond)]
            for name, qkv in order:
                with forward_branch(name):
                    outputs[swapped][step, name] = attention_step(runtime, schedule, *qkv[step])[0]
        assert runtime.memory_report()["total"]["branches"] == 2
    for key, value in outputs[False].items():
        assert torch.equal(value, outputs[True][key]), key


def test_denoised_order_two_stores_the_rank_r_change_and_extrapolates_it():
    """delta_rank=1: a refresh stores dR's best rank-1 approximation per head (hand-computed SVD here); a reuse step
    returns o_sparse + R + steps * that."""
    runtime = ResidualCacheRuntime()
    schedule = CacheConfig(enabled=True, refresh_first=2, refresh_every=0, order=2, delta_rank=1)
    residuals = {}
    for step, (q, k, v) in enumerate(sequence(4)):
        runtime.step(step)
        o_sparse, _ = torch.ops.qsparse.sparse_attention(q, k, v, LAYOUT.kv_num_blocks, LAYOUT.kv_indices, 16, 16,
                                                         0.25, None)
        state, refresh = runtime.acquire("a", schedule, tuple(o_sparse.shape), o_sparse.dtype, o_sparse.device)
        out = torch.ops.qsparse.residual_attention(o_sparse, q, k, v, None, 0.25, state, torch.tensor(refresh),
                                                   MODE_AUTO, 2, "bf16", 1)
        if refresh:
            residuals[step] = (dense(q, k, v) - o_sparse).double()
            continue
        change = residuals[1] - residuals[0]
        u, sigma, vh = torch.linalg.svd(change, full_matrices=False)
        denoised = sigma[..., 0, None, None] * u[..., :, :1] @ vh[..., :1, :]
        assert torch.allclose(state[1].double(), denoised, atol=1e-5)
        expected = o_sparse.double() + residuals[1] + (step - 1) * denoised
        assert torch.allclose(out.double(), expected, atol=1e-5), step
        plain = o_sparse.double() + residuals[1] + (step - 1) * change
        assert not torch.allclose(out.double(), plain, atol=1e-3)  # the rank-1 change is not the raw change


def test_delta_rank_is_validated_with_the_field_named():
    for bad, match in (({"delta_rank": -1}, "delta_rank=-1"), ({"delta_rank": 2, "order": 1}, "order=1"),
                       ({"delta_rank": 2, "rank": 4}, "rank=4"), ({"delta_rank": True}, "delta_rank")):
        with pytest.raises(ValueError, match=match):
            CacheConfig(enabled=True, **bad)
    assert CacheConfig(enabled=True, order=2, delta_rank=4).delta_rank == 4


def test_cuda_registration_runs_the_reference_for_a_denoising_refresh():
    """The fused step has no SVD: a refresh with delta_rank > 0 must take the reference; reuse steps (the same
    formula) and delta_rank = 0 stay fused."""
    pytest.importorskip("triton")
    from qsparse_compiler.ops.residual_attention import residual_attention_reference
    from qsparse_compiler.ops.residual_attention_cuda import cuda_step, residual_attention_fused

    o_sparse = torch.zeros(SHAPE)
    state = [torch.zeros(SHAPE), torch.zeros(SHAPE), torch.zeros(1)]
    assert cuda_step(o_sparse, state, torch.tensor(True), MODE_AUTO, 2, 4) is residual_attention_reference
    assert cuda_step(o_sparse, state, None, 1, 2, 4) is residual_attention_reference  # MODE_REFRESH
    assert cuda_step(o_sparse, state, torch.tensor(False), MODE_AUTO, 2, 4) is residual_attention_fused
    assert cuda_step(o_sparse, state, torch.tensor(True), MODE_AUTO, 2, 0) is residual_attention_fused
    low_rank = [torch.zeros(1, 2, 48, 2), torch.zeros(1, 2, 2, 16)] * 2 + [torch.zeros(1)]
    assert cuda_step(o_sparse, low_rank, torch.tensor(False), MODE_AUTO, 2, 0) is residual_attention_reference
