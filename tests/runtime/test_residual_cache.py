"""SSAR residual cache: formulas, schedule, branches, resets; and in a compiled model without per-step recompiles."""

import pytest
import torch
import torch.nn.functional as F

import qsparse_compiler.ops  # noqa: F401
from qsparse_compiler.compiler.backend import clear_reports, reports
from qsparse_compiler.config import CacheConfig
from qsparse_compiler.ops.residual_attention import MODE_AUTO
from qsparse_compiler.formats.complement import complement_blocks
from qsparse_compiler.formats.pattern_spec import build_video_layout
from qsparse_compiler.runtime.residual_cache import CacheError, ResidualCacheRuntime
from qsparse_compiler.formats.patterns import TokenGrid
from qsparse_compiler.eval.metrics import relative_error
from qsparse_compiler.eval.models import tiny_wan

SHAPE = (1, 2, 48, 16)
LAYOUT = build_video_layout(TokenGrid(3, 4, 4, 48), "local3d", 0.34, 16, 16)


COMPLEMENT = complement_blocks(LAYOUT.kv_num_blocks, LAYOUT.kv_indices)


def attention_step(runtime, schedule, q, k, v, fqn="blocks.0.attn1"):
    """What a compiled graph does at one site: sparse attention, then the residual-cache node (which a refresh
    completes to dense attention from the sparse lse and the layout's complement)."""
    o_sparse, lse = torch.ops.qsparse.sparse_attention(q, k, v, LAYOUT.kv_num_blocks, LAYOUT.kv_indices, 16, 16, 0.25,
                                                       None)
    state, refresh = runtime.acquire(fqn, schedule, tuple(o_sparse.shape), o_sparse.dtype, o_sparse.device)
    out = torch.ops.qsparse.residual_attention(o_sparse, q, k, v, None, 0.25, state, torch.tensor(refresh),
                                               MODE_AUTO, schedule.order, "bf16", 0, lse, LAYOUT.kv_num_blocks,
                                               LAYOUT.kv_indices, 16, 16, *COMPLEMENT)
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
    lse = torch.randn(SHAPE[:3])
    layouts = ((), (lse, LAYOUT.kv_num_blocks, LAYOUT.kv_indices, 16, 16),
               (lse, LAYOUT.kv_num_blocks, LAYOUT.kv_indices, 16, 16, *COMPLEMENT))
    for refresh in (True, False):
        for kind, state in (("full", [torch.zeros(SHAPE), torch.zeros(SHAPE), torch.zeros(1)]), ("fp8", fp8)):
            for layout in layouts:
                args = (o_sparse, q, k, v, None, 0.25, state, torch.tensor(refresh), MODE_AUTO, 2, "bf16", 0, *layout)
                torch.library.opcheck(torch.ops.qsparse.residual_attention.default, args, test_utils=tests[kind])


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


# ---- A refresh completes the sparse attention over the complement tiles (issue #16): the old dense path's numbers ----

REFRESH_BLOCK = 32


def _refresh_layout(heads: int, s: int):
    """Per-head layout over S = 77 tokens (a 13-token tail): random tiles with the diagonal, an empty row (head 0,
    query block 1), a full row (head 1, query block 0: an empty complement row) and a head that computes nothing
    (head 2: its refresh is all complement)."""
    from qsparse_compiler.formats.layout import BlockSparseLayout, num_blocks

    blocks = num_blocks(s, REFRESH_BLOCK)
    bitmap = torch.rand(1, heads, blocks, blocks, generator=torch.Generator().manual_seed(3)) < 0.4
    bitmap |= torch.eye(blocks, dtype=torch.bool)
    bitmap[0, 0, 1] = False
    bitmap[0, 1, 0] = True
    bitmap[0, 2] = False
    return BlockSparseLayout.from_bitmap(bitmap, REFRESH_BLOCK, REFRESH_BLOCK, s, s)


def _two_refreshes(impl: str, precision: str, steps, mask, layout, given: str):
    """Two refreshes of one order-2 site, 2 reuse steps apart; ``given``: "none" (the old path: a dense attention),
    "layout" (the op builds the complement) or "complement" (the pass's arguments). Returns per refresh
    (o_sparse, out, R, dR)."""
    from qsparse_compiler.ops.residual_attention import MODE_REFRESH, residual_attention_reference

    n, idx = layout.kv_num_blocks, layout.kv_indices
    q0 = steps[0][0]
    state = [torch.zeros(q0.shape), torch.zeros(q0.shape), torch.full((1,), -1.0)]
    results = []
    for q, k, v in steps:
        scale = q.shape[-1] ** -0.5
        o_sparse, lse = torch.ops.qsparse.sparse_attention(q, k, v, n, idx, REFRESH_BLOCK, REFRESH_BLOCK, scale, mask,
                                                           precision)
        extra = {"none": (), "layout": (lse, n, idx, REFRESH_BLOCK, REFRESH_BLOCK),
                 "complement": (lse, n, idx, REFRESH_BLOCK, REFRESH_BLOCK, *complement_blocks(n, idx))}[given]
        args = (o_sparse, q, k, v, mask, scale, state, None, MODE_REFRESH, 2, precision)
        if impl == "fused":
            from qsparse_compiler.ops.residual_attention_cuda import residual_attention_fused

            out = residual_attention_fused(*args, *extra)
        else:
            out = residual_attention_reference(*args, 0, *extra)
        results.append((o_sparse, out, state[0].clone(), state[1].clone()))
        state[-1].fill_(2.0)  # two reuse steps until the next refresh: dR = (R - R_prev) / 3
    return results


def _exact_dense(q, k, v, mask):
    scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v.double()


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("precision", ["bf16", "int8_fp8"])
@pytest.mark.parametrize("masked", [False, True])
def test_refresh_from_the_complement_matches_the_dense_path_by_the_2x_rule(impl, precision, masked):
    """O_dense, the stored R and dR of a refresh that merges the complement tiles with O_sparse: as close to exact
    (fp64 dense attention) as the old path's (a dense attention in the same precision), by the 2x rule; tails, an
    empty and a full layout row, a head with no tiles, per-head layouts, key padding, both precisions, the op's
    reference and the fused CUDA step (Triton interpreter here)."""
    if impl == "fused":
        pytest.importorskip("triton")
    from qsparse_compiler.eval.metrics import within_reference_error

    b, h, s, d = 2, 3, 77, 32
    layout = _refresh_layout(h, s)
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(b, h, s, d, generator=gen) for _ in range(3)]
    base[1] = base[1] + 1.5  # a key offset, as DiT keys carry (what the 8-bit recipe smooths)
    drift = [torch.randn(b, h, s, d, generator=gen) for _ in range(3)]
    steps = [[(x + 0.1 * t * dx).bfloat16() for x, dx in zip(base, drift)] for t in range(2)]
    mask = None
    if masked:
        mask = torch.rand(b, 1, 1, s, generator=gen) < 0.7
        mask[..., 0] = True  # every batch attends somewhere: the old path's SDPA gives NaN for a row with no key
    old = _two_refreshes(impl, precision, steps, mask, layout, "none")
    exact_r = []
    for (q, k, v), (o_sparse, *_) in zip(steps, old):
        exact_r.append(_exact_dense(q, k, v, mask) - o_sparse.double())
    for given in ("layout", "complement"):
        new = _two_refreshes(impl, precision, steps, mask, layout, given)
        for i, ((q, k, v), (o_new, out, r, dr), (o_old, out_old, r_old, dr_old)) in enumerate(zip(steps, new, old)):
            assert torch.equal(o_new, o_old)
            exact = _exact_dense(q, k, v, mask)
            exact_dr = (exact_r[1] - exact_r[0]) / 3 if i else torch.zeros_like(exact)
            pairs = {"out": (out, out_old, exact), "R": (r, r_old, exact_r[i])}
            if i:
                pairs["dR"] = (dr, dr_old, exact_dr)
            else:
                assert torch.count_nonzero(dr) == 0 and torch.count_nonzero(dr_old) == 0  # no previous R yet
            for name, (got, theirs, truth) in pairs.items():
                ok, ours, reference = within_reference_error(got, theirs, truth)
                assert ok, (given, i, name, ours, reference)


def test_refresh_of_rows_with_no_key_is_zero_and_a_partial_layout_is_named():
    """A batch whose keys are all padding: the complement path keeps the sparse convention (out 0, lse -inf), so O_dense
    and R are 0 (the old path's SDPA gave NaN there). Refresh-layout arguments given in part raise, naming them."""
    from qsparse_compiler.ops.residual_attention import MODE_REFRESH

    b, h, s, d = 2, 3, 77, 32
    layout = _refresh_layout(h, s)
    q, k, v = torch.randn(3, b, h, s, d).unbind(0)
    mask = torch.ones(b, 1, 1, s, dtype=torch.bool)
    mask[1] = False
    n, idx = layout.kv_num_blocks, layout.kv_indices
    o_sparse, lse = torch.ops.qsparse.sparse_attention(q, k, v, n, idx, REFRESH_BLOCK, REFRESH_BLOCK, 0.2, mask)
    state = [torch.zeros(q.shape), torch.zeros(q.shape), torch.full((1,), -1.0)]
    out = torch.ops.qsparse.residual_attention(o_sparse, q, k, v, mask, 0.2, state, None, MODE_REFRESH, 2, "bf16", 0,
                                               lse, n, idx, REFRESH_BLOCK, REFRESH_BLOCK)
    assert (out[1] == 0).all() and (state[0][1] == 0).all()
    assert torch.isfinite(out).all() and out[0].abs().sum() > 0
    for extra, match in (((lse, n, None, 32, 32), r"\['kv_indices'\] is None"),
                         ((lse, n, idx, 0, 32), "block_q=0"),
                         ((lse, n, idx, 32, 32, n), "complement_num_blocks and complement_indices")):
        with pytest.raises(ValueError, match=match):
            torch.ops.qsparse.residual_attention(o_sparse, q, k, v, mask, 0.2, state, None, MODE_REFRESH, 2, "bf16",
                                                 0, *extra)


@pytest.mark.parametrize("mode", ["reuse", "refresh"])
def test_the_pass_hands_the_refresh_the_sparse_lse_layout_and_cached_complement(mode):
    """The residual node reads the sparse attention's lse and layout and a complement from the layout op
    (complement=True: cached with the layout); a reuse-mode graph (the reuse graph of CUDA graphs) gets none of it."""
    import operator

    from qsparse_compiler.eval.capture import rewrite_with_default_passes
    from qsparse_compiler.eval.models import TEST_OPTIONS, ToyVideoDiT

    options = {**TEST_OPTIONS, "cache": {"enabled": True, "mode": mode}}
    gm, _, _ = rewrite_with_default_passes(ToyVideoDiT(), {"x": torch.randn(1, 4, 3, 16, 16)}, options)
    (sparse,) = [n for n in gm.graph.nodes if n.target is torch.ops.qsparse.sparse_attention.default]
    (cached,) = [n for n in gm.graph.nodes if n.target is torch.ops.qsparse.residual_attention.default]
    layouts = [n for n in gm.graph.nodes if n.target is torch.ops.qsparse.video_block_layout.default]
    if mode == "reuse":
        assert len(cached.args) == 12 and len(layouts) == 1
        return
    lse, kv_num, kv_idx, block_q, block_kv, comp_num, comp_idx = cached.args[12:]
    assert lse.target is operator.getitem and lse.args == (sparse, 1)
    assert (kv_num, kv_idx, block_q, block_kv) == tuple(sparse.args[3:7])
    (layout, complement) = layouts
    assert complement.args == (*layout.args, True)
    assert comp_num.args == (complement, 0) and comp_idx.args == (complement, 1)


def test_compiled_refresh_runs_no_dense_attention_and_matches_the_op_reference_rewrite(monkeypatch):
    """A generation of a compiled model: every refresh step completes the sparse attention over the complement
    (probe: the op's dense attention is never called), returns the op-reference rewrite's output (the passes' graph
    run eagerly, ops on their references) and the model's dense output; no recompiles between refresh and reuse."""
    import importlib

    from qsparse_compiler.eval.capture import rewrite_with_default_passes

    # The module, not the op object that qsparse_compiler.ops exports under the same name.
    residual_module = importlib.import_module("qsparse_compiler.ops.residual_attention")

    calls = {"dense_attention": 0, "dense_from_sparse": 0}

    def counted(name):
        real = getattr(residual_module, name)

        def probe(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return probe

    for name in calls:
        monkeypatch.setattr(residual_module, name, counted(name))
    tiny = tiny_wan(num_layers=1)
    runtime = ResidualCacheRuntime()
    cache = {"enabled": True, "refresh_first": 2, "refresh_every": 3, "order": 2}
    options = {"quant": {"enabled": False}, "sparsity": {"density": 0.34, "block_q": 16, "block_kv": 16},
               "cache": cache, "runtime": runtime}
    inputs = tiny.make_inputs()
    gm, _, ctx = rewrite_with_default_passes(tiny.model, inputs, {**options, "runtime": None,
                                                                  "cache": {**cache, "mode": "refresh"}})
    # The cache inputs' examples carry the graph's fake mode: real zeros of their shapes (a refresh overwrites them).
    extra = [torch.zeros(t.shape, dtype=t.dtype) if isinstance(t, torch._subclasses.FakeTensor) else t
             for t in ctx.extra_example_inputs]
    with torch.no_grad():
        reference = gm(*ctx.example_inputs, *extra)[0]
        eager = tiny.model(**inputs)[0]
    assert calls == {"dense_attention": 0, "dense_from_sparse": 1}
    torch._dynamo.reset()
    clear_reports()
    compiled = torch.compile(tiny.model, backend="quantsparse", options=options, fullgraph=True)
    refreshes = 0
    with torch.no_grad(), runtime.generation():
        for step in range(6):
            runtime.step(step)
            out = compiled(**inputs)[0]
            if CacheConfig(**cache).is_refresh_step(step):
                refreshes += 1
                assert relative_error(out, reference) < 1e-5 and relative_error(out, eager) < 1e-5
    assert calls == {"dense_attention": 0, "dense_from_sparse": 1 + refreshes} and refreshes == 3
    assert len(reports()) == 1  # one graph for refresh and reuse steps
