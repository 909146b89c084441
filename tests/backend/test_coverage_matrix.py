"""The coverage matrix: diffusers video transformers beyond Wan/HunyuanVideo/CogVideoX, each a tiny random model at
realistic head widths (eval/video_dits.py), compiled with backend="quantsparse" as a user would (no fullgraph).

Fast tests run the rewrite on the ops' plain-torch references (no Inductor: a few seconds a class) and pin each
class's coverage - the share of block linears quantized and of video attentions sparsified - and the reason of
everything kept. The slow test compiles through Inductor and checks the compiled output against that reference run.
"""

import pytest

from qsparse_compiler.eval.coverage import measure_coverage
from qsparse_compiler.eval.video_dits import COVERAGE_OPTIONS, VIDEO_DITS, tiny_video_dit

# class -> (quantized, block linears, sparsified, video attentions, graphs, grid source): what the backend does.
# Kept (the matrix's reasons, README "Supported models"): Mochi's per-sample attention loop (a data-dependent
# nonzero: Dynamo splits it into 9 graphs and runs the attention eagerly); Latte's factorized attention (per frame,
# per position); HunyuanVideo 1.5's blocks, in a graph of their own after its forward's data-dependent branch
# (torch.all(image_embeds == 0)), see no grid (qs.optimize supplies it). SanaVideo's attention is linear (no SDPA).
EXPECTED = {
    "ltx_video": (10, 10, 1, 1, 1, "forward arguments"),
    "mochi": (0, 9, 0, 0, 9, None),
    "allegro": (10, 10, 1, 1, 1, "conv patch embedding"),
    "easyanimate": (12, 12, 1, 1, 1, "conv patch embedding"),
    "skyreels_v2": (10, 10, 1, 1, 1, "conv patch embedding"),
    "wan_vace": (22, 22, 2, 2, 1, "conv patch embedding"),
    "consisid": (6, 6, 1, 1, 1, "conv patch embedding"),
    "cosmos": (10, 10, 1, 1, 1, "latent shape"),
    "latte": (16, 16, 0, 2, 1, "conv patch embedding"),
    "sana_video": (8, 8, 0, 0, 1, "conv patch embedding"),
    "hunyuan_video15": (12, 12, 0, 1, 3, "conv patch embedding"),
    "kandinsky5": (16, 16, 1, 1, 1, "rotary position ids"),
}


# The fast path (CI without -m slow) keeps one class of each kind of problem: a grid only in forward arguments, a
# per-sample loop that breaks the graph, a patchify by reshape + linear, a grid from rotary positions.
FAST = ("ltx_video", "mochi", "cosmos", "kandinsky5")
CLASSES = [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in sorted(VIDEO_DITS)]


def test_the_matrix_lists_every_bench_model():
    assert sorted(EXPECTED) == sorted(VIDEO_DITS) and len(EXPECTED) >= 8


@pytest.mark.parametrize("name", CLASSES)
def test_coverage_on_the_op_references(name):
    row = measure_coverage(tiny_video_dit(name), COVERAGE_OPTIONS, compile_with_inductor=False)
    assert row.error is None, row.error
    grids = [note.split(" from ", 1)[1] for note in row.notes if note.startswith("video token grid 2x8x8 from ")]
    counts = (row.quantized, row.block_linears, row.sparsified, row.video_attentions, row.graphs)
    assert counts == EXPECTED[name][:5], (counts, [(k.fqn, k.reason) for k in row.kept])
    # The grid and the source that gave it (structural discovery's resolution order, compiler/passes/discovery.py).
    source = EXPECTED[name][5]
    assert (grids[0].startswith(source) if source else not grids), grids
    # Everything kept says why.
    assert all(site.reason for site in row.kept), row.kept
    if row.quantized:
        # W4A8 (group 64) + half the tiles: a visible but bounded error (measured 26-47 dB on these models).
        assert 20 <= row.sqnr_vs_eager_db < 80, row.sqnr_vs_eager_db


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VIDEO_DITS))
def test_compiled_output_matches_the_same_rewrite_on_the_references(name):
    row = measure_coverage(tiny_video_dit(name), COVERAGE_OPTIONS)
    assert row.error is None, row.error
    # Inductor vs the plain-torch run of the same rewrite: fp32 accumulation order only (measured 63-134 dB).
    assert row.sqnr_vs_reference_db >= 60, row.sqnr_vs_reference_db
