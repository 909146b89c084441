"""The backend on the GPU: kernels inside compiled graphs, CUDA graphs, the residual cache's refresh/reuse graphs."""

import pytest
import torch
from torch._dynamo.utils import counters

import qsparse_compiler as qs
from qsparse_compiler.backend import clear_reports, reports
from qsparse_compiler.testing.metrics import relative_error
from qsparse_compiler.testing.models import tiny_wan

pytestmark = pytest.mark.gpu

OPTIONS = {"quant": {"group_size": 64}, "sparsity": {"density": 0.34, "block_q": 64, "block_kv": 64}}
# torch.compile takes mode or options, not both: CUDA graphs come as the Inductor patches of "reduce-overhead".
CUDA_GRAPHS = {"inductor": torch._inductor.list_mode_options("reduce-overhead")}


def cuda_wan(layers=2):
    tiny = tiny_wan(num_layers=layers)
    tiny.model.to("cuda", torch.bfloat16)
    inputs = {k: (v.to("cuda", torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else
                  v.cuda() if torch.is_tensor(v) else v) for k, v in tiny.make_inputs(frames=4, height=32, width=32).items()}
    return tiny, inputs


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
    assert torch.isfinite(out).all() and relative_error(out, expected) < 0.15


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
    model = qs.optimize(tiny.model, options=OPTIONS, cache=cache, cuda_graphs=True)
    runtime = qs.runtime_of(model)
    with torch.no_grad():
        expected = tiny.model(**inputs)[0]
        outputs = []
        with runtime.generation():
            for step in range(6):
                runtime.step(step)
                outputs.append(model(**inputs)[0].clone())
    for out in outputs:
        assert torch.isfinite(out).all() and relative_error(out, expected) < 0.15
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
    assert out.dtype == torch.float32 and relative_error(out, expected) < 0.15
