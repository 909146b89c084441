"""Never slow silently: every site the backend should rewrite stays rewritten at every shape a server meets, through
every ordinary way of compiling (issue #17). Each test names the scenario it covers."""

import copy

import pytest
import torch

import qsparse_compiler as qs
from qsparse_compiler.compiler.backend import clear_reports, reports
from qsparse_compiler.eval.capture import rewrite_with_default_passes
from qsparse_compiler.eval.metrics import relative_error
from qsparse_compiler.eval.models import EXACT_OPTIONS, TEST_OPTIONS, tiny_wan

pytestmark = pytest.mark.slow

# Sparse attention alone (half the tiles), so that a call that ran dense stands out: on the tiny random model dense
# and sparse attention differ by ~1% of the output, the compiled graph and the op references by ~1e-6. (The
# quantized linears are checked per graph by the reports: Inductor may round an activation code differently.)
SPARSE_ONLY = {**EXACT_OPTIONS, "sparsity": {**EXACT_OPTIONS["sparsity"], "density": 0.5}}

# 3 resolutions (two of them with the same token count but another grid, hence another layout) x 2 batch sizes.
SHAPES = [(frames, height, width, batch) for frames, height, width in ((3, 16, 16), (2, 16, 24), (3, 24, 16))
          for batch in (1, 2)]
# The default run's server: a first shape, a new resolution (the same token count on another grid: Dynamo recompiles
# with symbolic sizes and the layout must follow the grid, not the length), then a new batch size (another
# recompile). The whole matrix is `extended`: its other shapes repeat these two kinds of change.
REPRESENTATIVE = [(3, 16, 16, 1), (2, 16, 24, 1), (2, 16, 24, 2)]
SHAPE_SETS = [pytest.param(REPRESENTATIVE, id="resolution-and-batch-change"),
              pytest.param(SHAPES, id="3-resolutions-x-2-batches", marks=pytest.mark.extended)]


def _serving_requests(tiny, shapes):
    """Per shape, the conditional and the unconditional call of a CFG step (same latents, other text)."""
    requests = []
    for frames, height, width, batch in shapes:
        inputs = tiny.make_inputs(frames=frames, batch=batch, height=height, width=width)
        uncond = {**inputs, "encoder_hidden_states": torch.zeros_like(inputs["encoder_hidden_states"])}
        requests += [inputs, uncond]
    return requests


def _references(tiny, requests):
    """Per request, the sparse rewrite run on the op references (no Inductor), and the dense eager output. Computed
    before any compile: capturing a graph resets Dynamo."""
    references = []
    for inputs in requests:
        gm, _, ctx = rewrite_with_default_passes(tiny.model, inputs, SPARSE_ONLY)
        assert ctx.report.counters["sparse_attention"] == tiny.video_attentions
        with torch.no_grad():
            references.append((gm(*ctx.example_inputs, *ctx.extra_example_inputs)[0], tiny.model(**inputs)[0]))
    return references


@pytest.fixture(scope="module")
def serving(request):
    """A tiny Wan's weights, the CFG requests of a list of shapes and their references, built once for both ways of
    compiling (each test compiles a fresh model loaded with these weights: qs.optimize changes the one it gets)."""
    torch.manual_seed(0)
    tiny = tiny_wan(num_layers=1)
    requests = _serving_requests(tiny, request.param)
    return tiny.model.state_dict(), requests, _references(tiny, requests)


@pytest.mark.parametrize("serving", SHAPE_SETS, indirect=True)
@pytest.mark.parametrize("how", ["qs.optimize", "torch.compile"])
def test_serving_loop_stays_sparse_at_every_shape(how, serving):
    """Scenario 1: a server over new resolutions and batch sizes x CFG. A second shape makes Dynamo recompile with a
    symbolic sequence length; the regional graph (qs.optimize) then kept its video self-attention dense ("S=s2 is not
    the video grid") and later calls silently ran dense. Every call must equal the sparse, quantized rewrite on the
    op references (which differs from the dense model), and every graph compiled must hold the sparse attention."""
    weights, requests, references = serving
    tiny = tiny_wan(num_layers=1)
    tiny.model.load_state_dict(weights)
    torch._dynamo.reset()
    clear_reports()
    if how == "qs.optimize":
        model = qs.optimize(tiny.model, options=SPARSE_ONLY, cache=False)
    else:
        model = torch.compile(tiny.model, backend="quantsparse", options=SPARSE_ONLY)
    with torch.no_grad():
        for inputs, (rewritten, dense) in zip(requests, references):
            out = model(**inputs)[0]
            shape = tuple(inputs["hidden_states"].shape)
            assert relative_error(rewritten, dense) > 5e-3, shape  # sparse attention changes the output ...
            assert relative_error(out, rewritten) < 1e-5, (shape, relative_error(out, rewritten))  # ... and ran
    assert len(reports()) > 1  # recompiles happened
    for report in reports():
        assert report.counters.get("sparse_attention") == tiny.video_attentions, report.summary()


@pytest.mark.parametrize("shapes", SHAPE_SETS)
def test_regional_quantization_and_residual_cache_survive_new_shapes(shapes):
    """Scenario 1, the other rewrites: through qs.optimize with the default residual cache, every graph Dynamo
    compiles for a new resolution or batch size keeps its quantized linears and its cached sparse attention, and
    the cache refreshes then reuses at every shape."""
    tiny = tiny_wan(num_layers=1)
    torch._dynamo.reset()
    clear_reports()
    model = qs.optimize(tiny.model, options=TEST_OPTIONS, cache={"refresh_first": 1, "refresh_every": 0, "order": 1})
    runtime = qs.runtime_of(model)
    with torch.no_grad():
        for frames, height, width, batch in shapes:
            inputs = tiny.make_inputs(frames=frames, batch=batch, height=height, width=width)
            with runtime.generation():
                for step in range(2):
                    runtime.step(step)
                    assert torch.isfinite(model(**inputs)[0]).all()
    assert len(reports()) > 1
    for report in reports():
        assert report.counters.get("w4a8_linear") == tiny.block_linears, report.summary()
        assert report.counters.get("sparse_attention") == tiny.video_attentions, report.summary()
        assert report.counters.get("residual_attention") == tiny.video_attentions, report.summary()
    sites = runtime.memory_report()
    assert sites["blocks.0.attn1"]["refreshes"] == len(shapes) and sites["blocks.0.attn1"]["reuses"] == len(shapes)


def _rewrites(compile_and_call):
    """(fqn, action) of every site of the graphs one compile makes, and the first output."""
    torch._dynamo.reset()
    clear_reports()
    with torch.no_grad():
        out = compile_and_call()
    return sorted((site.fqn, site.action) for report in reports() for site in report.sites), out


def test_wrapper_function_and_nesting_give_the_same_rewrite():
    """Scenario 2: module FQNs were recovered by regex from Dynamo's source names, so a compiled function calling
    the transformer (``net.blocks.0...``) or a module holding it quantized 0 of its block linears. They now come
    from Dynamo's nn_module_stack, relative to the diffusers model: the same sites, rewritten the same way."""
    tiny = tiny_wan(num_layers=1)
    inputs = tiny.make_inputs()
    net = tiny.model

    def denoise(**kwargs):
        return net(**kwargs)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = net

        def forward(self, **kwargs):
            return self.transformer(**kwargs)

    expected, out = _rewrites(lambda: torch.compile(net, backend="quantsparse", options=TEST_OPTIONS)(**inputs)[0])
    assert ("blocks.0.attn1.to_q", "w4a8_linear") in expected and ("blocks.0.attn1", "sparse_attention") in expected
    for target in (denoise, Holder()):
        rewrites, wrapped_out = _rewrites(
            lambda: torch.compile(target, backend="quantsparse", options=TEST_OPTIONS)(**inputs)[0])
        assert rewrites == expected
        assert relative_error(wrapped_out, out) < 1e-6


def test_optimize_undoes_an_earlier_compile(caplog):
    """Scenario 2: ``torch.compile`` (or ``module.compile()``) before ``qs.optimize`` left the earlier compile in
    charge - the output equalled eager. qs.optimize now unwraps it, says so, and the sparse rewrite runs."""
    tiny = tiny_wan(num_layers=1)
    inputs = tiny.make_inputs()
    (rewritten, dense), = _references(tiny, [inputs])
    torch._dynamo.reset()
    for earlier in ("torch.compile", "module.compile"):
        model = tiny_wan(num_layers=1).model
        model.load_state_dict(tiny.model.state_dict())
        if earlier == "torch.compile":
            model = torch.compile(model, backend="eager")
        else:
            model.compile(backend="eager")
        with caplog.at_level("WARNING", logger="qsparse_compiler"):
            optimized = qs.optimize(model, options=SPARSE_ONLY, cache=False, regional=False)
        assert "already compiled" in caplog.text
        with torch.no_grad():
            out = optimized(**inputs)[0]
        assert relative_error(out, rewritten) < 1e-5 and relative_error(out, dense) > 5e-3, earlier
        caplog.clear()


def _qsparse_warnings(caplog):
    return [record.getMessage() for record in caplog.records
            if record.levelname == "WARNING" and record.name.startswith("qsparse_compiler")]


def test_compile_repeated_blocks_runs_the_sparse_rewrite_at_every_resolution(caplog):
    """Scenario 2: ``transformer.compile_repeated_blocks(backend="quantsparse")`` compiles one graph for every block
    (``block.compile()``), which sees neither the latents nor its block's name, and rewrote nothing. The backend now
    gives it what qs.optimize's hooks give a regional graph (runtime/repeated.py): each call - the compiling forward,
    the other blocks, the other CFG branch, a second resolution that recompiles - equals the sparse rewrite on the op
    references, and warns about nothing."""
    tiny = tiny_wan(num_layers=2)
    # CFG at 3x16x16, 2x16x24 (another grid of the same 192 tokens: another layout) and 3x24x16 (288 tokens)
    requests = [request for i, request in enumerate(_serving_requests(tiny, SHAPES)) if i in (0, 1, 4, 5, 8, 9)]
    references = _references(tiny, requests)
    torch._dynamo.reset()
    clear_reports()
    tiny.model.compile_repeated_blocks(backend="quantsparse", options=SPARSE_ONLY)
    with caplog.at_level("WARNING", logger="qsparse_compiler"), torch.no_grad():
        for inputs, (rewritten, dense) in zip(requests, references):
            out = tiny.model(**inputs)[0]
            shape = tuple(inputs["hidden_states"].shape)
            assert relative_error(rewritten, dense) > 5e-3, shape
            assert relative_error(out, rewritten) < 1e-5, (shape, relative_error(out, rewritten))
    assert len(reports()) == 2  # one graph for both blocks, recompiled once for the second token count
    for report in reports():
        assert report.counters.get("sparse_attention") == 1, report.summary()
        assert "blocks.0.attn1" in {site.fqn for site in report.rewritten("sparse_attention")}
    assert not _qsparse_warnings(caplog)


def test_compile_repeated_blocks_quantizes_every_block_as_qs_optimize_does(caplog):
    """Scenario 2: with quantization and the residual cache, compile_repeated_blocks' graphs rewrite the same sites
    the same way as qs.optimize's regional graphs, at two resolutions; every block's linears run on their own packed
    weights (one graph, the weights are graph inputs looked up per call) and every block's attention keeps its own
    residual cache. Outside a pipeline the step comes from the runtime (one WARNING says so, naming qs.optimize)."""
    cache = {"refresh_first": 1, "refresh_every": 0, "order": 1}
    tiny = tiny_wan(num_layers=2)
    shapes = [tiny.make_inputs(frames=3, height=16, width=16), tiny.make_inputs(frames=3, height=24, width=16)]

    def run(model, runtime):
        """Two steps (a refresh, a reuse) at each resolution, and the (fqn, action) of every site compiled."""
        torch._dynamo.reset()
        outs = []
        with torch.no_grad():
            for inputs in shapes:
                with runtime.generation():
                    for step in range(2):
                        runtime.step(step)
                        outs.append(model(**inputs)[0])
        return outs

    def rewrites(session):
        return sorted((site.fqn, site.action) for report in session.reports for site in report.sites)

    reference_session = qs.Session()
    optimized = qs.optimize(copy.deepcopy(tiny.model), options={**TEST_OPTIONS, "session": reference_session},
                            cache=cache, summary=False)
    expected_outs = run(optimized, qs.runtime_of(optimized))
    model, session = tiny.model, qs.Session()
    model.compile_repeated_blocks(backend="quantsparse", options={
        **TEST_OPTIONS, "session": session, "cache": {"enabled": True, **cache}})
    with caplog.at_level("WARNING", logger="qsparse_compiler"):
        outs = run(model, session.cache)
    assert rewrites(session) == rewrites(reference_session)
    assert ("blocks.0.attn1", "residual_attention") in rewrites(session)
    assert all(relative_error(out, reference) < 1e-5 for out, reference in zip(outs, expected_outs))
    assert len(session.reports) == 2
    for report in session.reports:
        assert report.counters.get("w4a8_linear") == tiny.block_linears // 2, report.summary()
        assert report.counters.get("sparse_attention") == report.counters.get("residual_attention") == 1
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
               and name.startswith("blocks.") and ".norm" not in name]
    assert len(linears) == tiny.block_linears
    assert all(session.weights.packed_nbytes(module.weight) for _, module in linears), linears
    sites = qs.runtime_of(model).memory_report()
    assert qs.runtime_of(model) is session.cache
    for block in ("blocks.0.attn1", "blocks.1.attn1"):
        assert sites[block]["refreshes"] == len(shapes) and sites[block]["reuses"] == len(shapes), sites
    (warning,) = _qsparse_warnings(caplog)
    assert "called outside a pipeline" in warning and "qs.optimize(pipe)" in warning


def test_a_compile_that_rewrites_less_than_it_should_warns(caplog):
    """Scenario 3: a block compiled on its own and called outside its model's forward sees no latents - no token
    grid, names relative to the block - and rewrote nothing, silently. A logging WARNING now names every reason with
    its count and the fix; a compile that does its job warns about nothing."""
    tiny = tiny_wan(num_layers=1)
    block = tiny.model.blocks[0]
    captured = {}
    handle = block.register_forward_pre_hook(lambda _, args, kwargs: captured.update(args=args, kwargs=kwargs),
                                             with_kwargs=True)
    with torch.no_grad():
        tiny.model(**tiny.make_inputs())
    handle.remove()
    torch._dynamo.reset()
    clear_reports()
    block.compile(backend="quantsparse", options=TEST_OPTIONS)
    with caplog.at_level("WARNING", logger="qsparse_compiler"), torch.no_grad():
        block(*captured["args"], **captured["kwargs"])
    (report,) = reports()
    assert report.shortfalls() and not report.rewritten("sparse_attention")
    warning = "\n".join(_qsparse_warnings(caplog))
    assert "rewrote none of its" in warning
    assert "1 x no video token grid in this graph (a block compiled on its own" in warning and "qs.optimize" in warning
    assert "x outside the transformer blocks" in warning


def test_optimize_prints_a_summary_and_a_good_compile_warns_nothing(capsys, caplog):
    """Scenario 3: qs.optimize says what it compiles and how by default; a compile that rewrites every site it
    should logs no warning."""
    tiny = tiny_wan(num_layers=1)
    torch._dynamo.reset()
    clear_reports()
    model = qs.optimize(tiny.model, options=TEST_OPTIONS, cache=False)
    printed = capsys.readouterr().out
    assert "qsparse_compiler.optimize: WanTransformer3DModel" in printed
    assert "regional: 1 blocks (WanTransformerBlock)" in printed and "local3d at density 0.5" in printed
    with caplog.at_level("WARNING", logger="qsparse_compiler"), torch.no_grad():
        model(**tiny.make_inputs())
    assert reports() and not any(report.shortfalls() for report in reports())
    assert not _qsparse_warnings(caplog)
