"""End to end on CPU: torch.compile(backend="quantsparse", fullgraph=True) on the three diffusers architectures."""

import pytest
import torch
from torch._dynamo.utils import counters

from qsparse_compiler.compiler.backend import clear_reports, reports
from qsparse_compiler.eval.metrics import relative_error
from qsparse_compiler.eval.models import EXACT_OPTIONS, TEST_OPTIONS, tiny_cogvideox, tiny_hunyuan, tiny_wan

pytestmark = pytest.mark.slow

FACTORIES = {
    "wan": lambda: tiny_wan(num_layers=1),
    "hunyuan": tiny_hunyuan,
    "cogvideox": lambda: tiny_cogvideox(num_layers=1),
}


def _compile_and_run(tiny, options, inputs):
    torch._dynamo.reset()
    counters.clear()
    clear_reports()
    compiled = torch.compile(tiny.model, backend="quantsparse", options=options, fullgraph=True)
    with torch.no_grad():
        return compiled(**inputs)[0]


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_defaults_rewrite_every_site_with_bounded_error(arch):
    tiny = FACTORIES[arch]()
    inputs = tiny.make_inputs()
    with torch.no_grad():
        expected = tiny.model(**inputs)[0]
    actual = _compile_and_run(tiny, TEST_OPTIONS, inputs)

    assert counters["qsparse"]["w4a8_linear"] == tiny.block_linears
    assert counters["qsparse"]["sparse_attention"] == tiny.video_attentions
    (report,) = reports()
    assert len(report.rewritten("w4a8_linear")) == tiny.block_linears
    assert report.compression is not None and report.compression > 1.5  # tiny dims: biases and norms weigh in
    # Every kept site says why.
    assert all(site.reason for site in report.kept())
    # W4A8 (group 32) + 50% tiles: a visible but bounded error, and the output stays finite.
    error = relative_error(actual, expected)
    assert torch.isfinite(actual).all()
    assert 1e-4 < error < 0.15, error


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_no_quantization_full_density_matches_eager(arch):
    tiny = FACTORIES[arch]()
    inputs = tiny.make_inputs()
    with torch.no_grad():
        expected = tiny.model(**inputs)[0]
    actual = _compile_and_run(tiny, EXACT_OPTIONS, inputs)
    # The attention still goes through qsparse::sparse_attention, with every tile listed.
    assert counters["qsparse"]["sparse_attention"] == tiny.video_attentions
    assert counters["qsparse"]["w4a8_linear"] == 0
    assert relative_error(actual, expected) < 1e-4


def test_frame_count_change_recompiles_and_stays_correct():
    tiny = tiny_wan(num_layers=1)
    torch._dynamo.reset()
    clear_reports()
    compiled = torch.compile(tiny.model, backend="quantsparse", options=EXACT_OPTIONS, fullgraph=True)
    with torch.no_grad():
        for frames in (3, 5, 2):
            inputs = tiny.make_inputs(frames=frames)
            assert relative_error(compiled(**inputs)[0], tiny.model(**inputs)[0]) < 1e-4
    # One static graph, then one graph with a dynamic frame count that serves every later shape.
    assert len(reports()) == 2
    assert all(report.counters.get("sparse_attention") == 1 for report in reports())


def test_dump_dir_and_report(tmp_path):
    tiny = tiny_wan(num_layers=1)
    inputs = tiny.make_inputs()
    _compile_and_run(tiny, {**TEST_OPTIONS, "dump_dir": str(tmp_path), "report": True}, inputs)
    (folder,) = list(tmp_path.iterdir())
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "00_dynamo_input.py", "01_after_find_sites.py", "02_after_quantize_linears.py", "03_after_apply_lora.py",
        "04_after_sparsify_attention.py", "05_after_insert_residual_cache.py",
        "06_after_fuse_qk_norm_rope.py", "07_after_fuse_norm_quant.py", "report.json",
    ]
    quantized = (folder / "02_after_quantize_linears.py").read_text()
    # Activation quantization in the graph (for Inductor to fuse) feeding the GEMM op.
    assert "quantize_activation_symmetric" in quantized and "qsparse.w4a8_gemm" in quantized
    assert "qsparse.sparse_attention" in (folder / "04_after_sparsify_attention.py").read_text()
    assert "qsparse.qk_norm_rope" in (folder / "06_after_fuse_qk_norm_rope.py").read_text()
    assert "qsparse.layer_norm_modulate_quant" in (folder / "07_after_fuse_norm_quant.py").read_text()


@pytest.mark.parametrize("act_format", ["fp8_e4m3", "int8"])
def test_activation_quant_in_graph_matches_the_one_op_form(act_format):
    """The default emits the activation quantization as graph ops (Inductor fuses them into the producer) before
    qsparse::w4a8_gemm; act_quant_in_graph=False keeps qsparse::w4a8_linear. Both compute the same quantized math."""
    tiny = tiny_wan(num_layers=1)
    inputs = tiny.make_inputs()
    quant = {**TEST_OPTIONS["quant"], "act_format": act_format}
    fused = _compile_and_run(tiny, {**TEST_OPTIONS, "quant": quant}, inputs)
    # The FFN down-projection takes its GELU into its own quantization kernel instead (one per block).
    assert counters["qsparse"]["gelu_into_act_quant"] == 1
    assert counters["qsparse"]["act_quant_in_graph"] == tiny.block_linears - 1
    one_op = _compile_and_run(tiny, {**TEST_OPTIONS, "quant": {**quant, "act_quant_in_graph": False}}, inputs)
    assert counters["qsparse"]["act_quant_in_graph"] == 0 and counters["qsparse"]["gelu_into_act_quant"] == 1
    assert counters["qsparse"]["w4a8_linear"] == tiny.block_linears
    # Inductor may round a code differently from eager (division vs. fused multiply) - a code step at most.
    assert relative_error(fused, one_op) < 5e-3, relative_error(fused, one_op)
