"""The backend on the GPU: kernels inside compiled graphs, CUDA graphs, the residual cache's refresh/reuse graphs.

Outputs are checked against the same rewrite run on CPU on the ops' plain-torch references: a bf16 run on CUDA may
be at most twice as far from the fp32 rewrite as the bf16 rewrite on CPU is (the 2x-reference rule); the error
against eager is the quantization's, not the compiler's."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import qsparse_compiler as qs
from qsparse_compiler.compiler.backend import clear_reports, reports
from qsparse_compiler.eval.capture import rewritten_reference_output
from qsparse_compiler.eval.metrics import relative_error, sqnr_db, within_reference_error
from qsparse_compiler.eval.models import tiny_hunyuan, tiny_wan

pytestmark = pytest.mark.gpu

OPTIONS = {"quant": {"group_size": 64}, "sparsity": {"density": 0.34, "block_q": 64, "block_kv": 64}}
# torch.compile takes mode or options, not both: CUDA graphs come as the Inductor patches of "reduce-overhead".
CUDA_GRAPHS = {"inductor": torch._inductor.list_mode_options("reduce-overhead")}


def moved(inputs, device, dtype=None):
    """``inputs`` on ``device``, floating-point tensors in ``dtype`` (None: unchanged)."""
    return {k: (v.to(device, dtype or v.dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in inputs.items()}


def cuda_tiny(tiny):
    tiny.model.to("cuda", torch.bfloat16)
    return tiny, moved(tiny.make_inputs(frames=4, height=32, width=32), "cuda", torch.bfloat16)


def cuda_wan(layers=2):
    return cuda_tiny(tiny_wan(num_layers=layers))


def assert_within_cpu_reference_error(out, model, inputs, options):
    """The 2x-reference rule for a bf16 output of ``model`` compiled with ``options`` on CUDA."""
    cpu_model = copy.deepcopy(model).cpu()
    same_dtype = rewritten_reference_output(cpu_model, moved(inputs, "cpu"), options)
    exact = rewritten_reference_output(cpu_model.float(), moved(inputs, "cpu", torch.float32), options)
    ok, ours, theirs = within_reference_error(out.cpu(), same_dtype, exact)
    assert ok, f"CUDA output {ours:.5f} from the fp32 rewrite; the bf16 rewrite on CPU {theirs:.5f}"


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_model_on_cuda(mode):
    tiny, inputs = cuda_wan()
    torch._dynamo.reset()
    counters.clear()
    options = {**OPTIONS, **(CUDA_GRAPHS if mode == "reduce-overhead" else {})}
    compiled = torch.compile(tiny.model, backend="quantsparse", options=options, fullgraph=True)
    with torch.no_grad():
        expected = tiny.model(**inputs)[0]
        for _ in range(3):  # warm-up, record, replay under CUDA graphs
            out = compiled(**inputs)[0]
    assert counters["qsparse"]["w4a8_linear"] == tiny.block_linears
    assert counters["qsparse"]["sparse_attention"] == tiny.video_attentions
    assert torch.isfinite(out).all()
    assert_within_cpu_reference_error(out, tiny.model, inputs, OPTIONS)
    assert sqnr_db(out.float(), expected.float()) >= 10  # and the rewrite approximates eager


def test_residual_cache_refresh_and_reuse_graphs_under_cuda_graphs():
    tiny, inputs = cuda_wan(layers=1)
    torch._dynamo.reset()
    runtime = qs.ResidualCacheRuntime()
    cache = {"enabled": True, "refresh_first": 2, "refresh_every": 0, "order": 2}
    graphs = {
        mode: torch.compile(tiny.model, backend="quantsparse", fullgraph=True,
                            options={**OPTIONS, **CUDA_GRAPHS, "quant": {"enabled": False}, "runtime": runtime,
                                     "cache": {**cache, "mode": mode}})
        for mode in ("refresh", "reuse")
    }
    outputs = []
    with torch.no_grad(), runtime.generation():
        for step in range(5):
            runtime.step(step)
            mode = "refresh" if runtime.will_refresh("blocks.0.attn1", qs.CacheConfig(**cache)) else "reuse"
            outputs.append(graphs[mode](**inputs)[0].clone())
        expected = tiny.model(**inputs)[0]
    # Same inputs each step: refresh steps are dense attention, reuse steps add back the exact residual.
    for out in outputs:
        assert relative_error(out, expected) < 2e-2
    report = runtime.memory_report()["total"]
    assert report["refreshes"] == 2 and report["reuses"] == 3


def test_optimize_cuda_graphs_with_quantized_linears():
    """qs.optimize(cuda_graphs=True): the refresh and the reuse graph of a quantized, sparsified model replay under
    CUDA graphs; nothing the ops cache (layouts) is allocated inside a graph's memory pool."""
    tiny, inputs = cuda_wan(layers=2)
    torch._dynamo.reset()
    cache = {"refresh_first": 1, "refresh_every": 3, "order": 2}
    dense_model = copy.deepcopy(tiny.model)  # before qs.optimize hooks it (its runtime holds a lock: no deepcopy)
    model = qs.optimize(tiny.model, options=OPTIONS, cache=cache, cuda_graphs=True)
    runtime = qs.runtime_of(model)
    with torch.no_grad():
        outputs = []
        with runtime.generation():
            for step in range(6):
                runtime.step(step)
                outputs.append(model(**inputs)[0].clone())
    # A refresh step is W4A8 linears + dense attention; a reuse step with the same inputs adds back the residual
    # the refresh stored, so it lands on the refresh output up to bf16 rounding.
    assert_within_cpu_reference_error(outputs[0], dense_model, inputs, {**OPTIONS, "sparsity": {"enabled": False}})
    for out in outputs[1:]:
        assert torch.isfinite(out).all() and relative_error(out, outputs[0]) < 2e-2
    report = runtime.memory_report()["total"]
    assert report["refreshes"] == 2 * 2 and report["reuses"] == 2 * 4  # two cached sites


def test_fp32_model_keeps_its_attention_on_sdpa_and_says_why():
    """The Triton attention kernel takes bf16/fp16: an fp32 model's video attention stays on SDPA (not the S x S
    reference op), the report says why, and its linears still run W4A8."""
    tiny = tiny_wan(num_layers=1)
    tiny.model.to("cuda")
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in tiny.make_inputs(frames=4, height=32, width=32).items()}
    torch._dynamo.reset()
    clear_reports()
    counters.clear()
    compiled = torch.compile(tiny.model, backend="quantsparse", options=OPTIONS, fullgraph=True)
    with torch.no_grad():
        out, expected = compiled(**inputs)[0], tiny.model(**inputs)[0]
    (report,) = reports()
    attention = {site.fqn: site for site in report.sites}["blocks.0.attn1"]
    assert attention.action == "kept" and "no CUDA kernel for this site (dtype" in attention.reason
    assert counters["qsparse"]["w4a8_linear"] == tiny.block_linears and counters["qsparse"]["sparse_attention"] == 0
    # fp32 throughout: the compiled graph equals the same rewrite run eagerly on CUDA (same kernels, same SDPA).
    assert out.dtype == torch.float32
    assert sqnr_db(out, rewritten_reference_output(tiny.model, inputs, OPTIONS)) >= 60
    assert sqnr_db(out, expected) >= 10


def test_weight_only_conditioning_linears_and_joint_attention_on_cuda():
    """HunyuanVideo on CUDA: int4 weight-only modulation linears, W4A8 block linears, the joint attention sparse in
    its video x video tiles with the text key-padding mask passed to the Triton kernel."""
    tiny, inputs = cuda_tiny(tiny_hunyuan())
    options = {"quant": {"group_size": 32, "conditioning_linears": "int4_weight_only"},
               "sparsity": {"density": 0.5, "block_q": 32, "block_kv": 32}}
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(tiny.model, backend="quantsparse", options=options, fullgraph=True)
    with torch.no_grad():
        out, expected = compiled(**inputs)[0], tiny.model(**inputs)[0]
    assert counters["qsparse"]["int4_weight_only"] == tiny.conditioning_linears
    assert counters["qsparse"]["w4a8_linear"] == tiny.block_linears
    assert counters["qsparse"]["sparse_attention"] == tiny.video_attentions
    assert torch.isfinite(out).all()
    assert_within_cpu_reference_error(out, tiny.model, inputs, options)
    assert sqnr_db(out.float(), expected.float()) >= 10


def test_plan_calibrated_on_cuda_compiles_with_lora_and_an_fp8_cache(tmp_path):
    """Calibration on the GPU (fp32 teacher, MSAD + TALoRA, pattern search at the kernel's tiles), then the plan
    compiled regionally on the bf16 model with the residual cache stored in fp8: the refresh step is the plan's
    simulation with dense attention, reuse steps land on it far closer than the plan's sparse attention alone."""
    from qsparse_compiler.calibration import calibrate
    from qsparse_compiler.calibration.simulate import plan_applied

    torch.manual_seed(0)
    tiny = tiny_wan(num_layers=2)
    tiny.model.cuda()
    samples = []
    for timestep in (100, 400, 700, 900):
        sample = moved(tiny.make_inputs(frames=4, height=32, width=32), "cuda")
        sample["timestep"] = torch.tensor([timestep], device="cuda")
        samples.append(sample)
    config = dict(block_q=64, block_kv=64, group_size=32, density_budget=0.15, num_samples=2, msad_steps=10,
                  lora_rank=2, lora_steps=5, ssar_steps=4, ssar_samples=1, progress=False)
    plan = calibrate(tiny.model, samples, config, out=tmp_path)
    assert all(block["loss_msad"] <= block["loss_rtn"] for block in plan.metadata["calibration"]["msad"])

    tiny.model.to(torch.bfloat16)
    inputs = moved(samples[1], "cuda", torch.bfloat16)
    with torch.no_grad():
        with plan_applied(tiny.model, plan, sparsify=False):
            dense_attention = tiny.model(**inputs)[0]
        with plan_applied(tiny.model, plan):
            sparse_attention = tiny.model(**inputs)[0]
    torch._dynamo.reset()
    cache = {"refresh_first": 2, "refresh_every": 0, "order": 2, "storage": "fp8_e4m3"}
    model = qs.optimize(tiny.model, plan=str(tmp_path), cache=cache)
    runtime = qs.runtime_of(model)
    with torch.no_grad(), runtime.generation():
        outputs = []
        for step in range(4):
            runtime.step(step)
            outputs.append(model(**inputs)[0].clone())
    assert all(relative_error(out, dense_attention) < 2e-2 for out in outputs[:2])
    sparse_error = relative_error(sparse_attention, dense_attention)
    for out in outputs[2:]:
        assert relative_error(out, dense_attention) < sparse_error / 4, (relative_error(out, dense_attention),
                                                                         sparse_error)
    report = runtime.memory_report()["total"]
    assert report["refreshes"] == 2 * 2 and report["reuses"] == 2 * 2  # two cached sites
