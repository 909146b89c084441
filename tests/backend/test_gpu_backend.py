"""The backend on the GPU: kernels inside compiled graphs, CUDA graphs, the residual cache's refresh/reuse graphs."""

import pytest
import torch
from torch._dynamo.utils import counters

import qsparse_compiler as qs
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
