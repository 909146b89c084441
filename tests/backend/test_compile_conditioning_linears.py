"""Int4 weight-only conditioning linears through Inductor: the compiled graph computes the model with those weights
dequantized (the rewrite itself adds no error), regional compilation shares one graph per block class, and
release_dense_weights frees their dense weights too."""

import copy
import re

import pytest
import torch

import qsparse_compiler as qs
from qsparse_compiler.compiler.backend import clear_reports, reports
from qsparse_compiler.formats.quantization import dequantize_weight_int4, quantize_weight_int4
from qsparse_compiler.runtime.weights import default_store
from qsparse_compiler.eval.capture import rewritten_reference_output
from qsparse_compiler.eval.metrics import relative_error, sqnr_db
from qsparse_compiler.eval.models import EXACT_OPTIONS, TEST_OPTIONS, tiny_cogvideox, tiny_hunyuan

pytestmark = pytest.mark.slow

FACTORIES = {"hunyuan": tiny_hunyuan, "cogvideox": lambda: tiny_cogvideox(num_layers=1)}
# Only the blocks' adaptive-norm linears are quantized; attention runs every tile: the output differs from eager by
# the int4 rounding of those weights alone.
WEIGHT_ONLY = {**TEST_OPTIONS, "quant": {**TEST_OPTIONS["quant"], "conditioning_linears": "int4_weight_only"}}
MODULATION_ONLY = {**EXACT_OPTIONS, "quant": {"group_size": 32, "conditioning_linears": "int4_weight_only", "site_pattern": r"^[A-Za-z_]\w*\.\d+\.norm\w*\.linear$"}}


def _modulation_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    pattern = re.compile(MODULATION_ONLY["quant"]["site_pattern"])
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and pattern.search(name)}


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_compiled_equals_eager_with_dequantized_modulation_weights(arch):
    tiny = FACTORIES[arch]()
    inputs = tiny.make_inputs()
    reference = copy.deepcopy(tiny.model)
    linears = _modulation_linears(reference)
    assert len(linears) == tiny.conditioning_linears
    with torch.no_grad():
        for linear in linears.values():
            packed = quantize_weight_int4(linear.weight, 32)
            linear.weight.copy_(dequantize_weight_int4(packed.qweight, packed.scale, packed.group_size))
        expected, dense = reference(**inputs)[0], tiny.model(**inputs)[0]
        torch._dynamo.reset()
        clear_reports()
        actual = torch.compile(tiny.model, backend="quantsparse", options=MODULATION_ONLY, fullgraph=True)(**inputs)[0]
    (report,) = reports()
    assert report.counters["int4_weight_only"] == tiny.conditioning_linears
    assert "w4a8_linear" not in report.counters
    assert relative_error(actual, dense) > 1e-4  # the int4 weights are in use ...
    assert relative_error(actual, expected) < 1e-5  # ... and are all that differs from eager


def test_compiles_again_from_the_fx_graph_cache(tmp_path, monkeypatch):
    """Regression: traced inline, the dequantization's shape arithmetic on the packed-weight inputs (graph inputs
    with no Dynamo source) left guards that Inductor's FX-graph cache could not rebuild - IndexError in Dynamo's
    produce_guards. As an op (qsparse::int4_weight_only_linear) a compile and a cached recompile both work."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    tiny = tiny_hunyuan()
    inputs = tiny.make_inputs()
    outputs = []
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=True):
        for _ in range(2):
            torch._dynamo.reset()
            compiled = torch.compile(tiny.model, backend="quantsparse", options=MODULATION_ONLY, fullgraph=True)
            outputs.append(compiled(**inputs)[0])
    assert torch.equal(outputs[0], outputs[1])


def test_regional_hunyuan_shares_graphs_and_releases_modulation_weights():
    tiny = tiny_hunyuan(num_layers=2, num_single_layers=2)
    inputs = tiny.make_inputs()
    whole_graph = rewritten_reference_output(tiny.model, inputs, WEIGHT_ONLY)  # the same rewrite on the op references
    torch._dynamo.reset()
    clear_reports()
    with torch.no_grad():
        model = qs.optimize(tiny.model, options=WEIGHT_ONLY, cache=False, regional=True)
        before = model(**inputs)[0]
    # Graphs for x_embedder and context_embedder (no block linears), one for both dual-stream blocks (2 modulation
    # linears each) and the single-stream ones (1 each): Dynamo recompiles the second single-stream block on a stride
    # guard, with or without this rewrite (conditioning_linears="keep" gives the same five graphs).
    per_graph = sorted(report.counters.get("int4_weight_only", 0) for report in reports())
    assert per_graph == [0, 0, 1, 1, 2], [report.summary() for report in reports()]
    assert sqnr_db(before, whole_graph) >= 60, sqnr_db(before, whole_graph)
    linears = _modulation_linears(tiny.model)
    assert len(linears) == tiny.conditioning_linears == 6
    assert all(default_store.packed_nbytes(linear.weight) is not None for linear in linears.values())
    with torch.no_grad():
        freed = qs.release_dense_weights(model)
        after = model(**inputs)[0]
    assert all(linear.weight.untyped_storage().nbytes() == 0 for linear in linears.values())
    assert freed >= sum(4 * linear.weight.numel() for linear in linears.values())
    assert torch.equal(before, after)
