"""The fused norm/rope/quantization ops inside a model compiled on CUDA (issue #19): the fusions are applied, and the
bf16 output meets the 2x-reference rule against the same rewrite on CPU (fp32 and bf16, the ops' references), with
and without CUDA graphs."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from qsparse_compiler.compiler.backend import clear_reports, reports
from qsparse_compiler.eval.capture import rewritten_reference_output
from qsparse_compiler.eval.metrics import within_reference_error
from qsparse_compiler.eval.models import tiny_wan

pytestmark = pytest.mark.gpu

OPTIONS = {"quant": {"group_size": 64}, "sparsity": {"density": 0.34, "block_q": 64, "block_kv": 64}}
CUDA_GRAPHS = {"inductor": torch._inductor.list_mode_options("reduce-overhead")}


def _moved(inputs, device, dtype=None):
    return {k: (v.to(device, dtype or v.dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in inputs.items()}


@pytest.mark.parametrize("act_format", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_wan_fusions_on_cuda_within_2x_of_cpu_rewrite(act_format, cuda_graphs):
    tiny = tiny_wan(num_layers=2, heads=4)  # 4 heads of 16: per-head tiles narrower than a warp's row
    tiny.model.to("cuda", torch.bfloat16)
    inputs = _moved(tiny.make_inputs(frames=4, height=32, width=32), "cuda", torch.bfloat16)
    options = {**OPTIONS, "quant": {**OPTIONS["quant"], "act_format": act_format}}
    torch._dynamo.reset()
    counters.clear()
    clear_reports()
    compiled = torch.compile(tiny.model, backend="quantsparse", options={**options, **(CUDA_GRAPHS if cuda_graphs
                                                                                         else {})}, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay under CUDA graphs
            out = compiled(**inputs)[0].clone()
    report = reports()[0]
    assert report.counters["qk_norm_rope"] == 2 and report.counters["layer_norm_modulate_quant"] == 6
    cpu_model = copy.deepcopy(tiny.model).cpu()
    same_dtype = rewritten_reference_output(cpu_model, _moved(inputs, "cpu"), options)
    exact = rewritten_reference_output(cpu_model.float(), _moved(inputs, "cpu", torch.float32), options)
    ok, ours, theirs = within_reference_error(out.cpu(), same_dtype, exact)
    assert ok, f"CUDA output {ours:.5f} from the fp32 rewrite; the bf16 rewrite on CPU {theirs:.5f}"
