"""The coverage matrix: diffusers video transformers beyond Wan/HunyuanVideo/CogVideoX, each a tiny random model at
realistic head widths (eval/video_dits.py), compiled with backend="quantsparse" as a user would (no fullgraph).

Fast tests run the rewrite on the ops' plain-torch references (no Inductor: a few seconds a class) and pin each
class's coverage - the share of block linears quantized and of video attentions sparsified - and the reason of
everything kept. The slow test compiles through Inductor and checks the compiled output against that reference run.
"""

import pytest

from qsparse_compiler.eval.coverage import measure_coverage
from qsparse_compiler.eval.video_dits import COVERAGE_OPTIONS, VIDEO_DITS, tiny_video_dit

# class -> (quantized, block linears, sparsified, video attentions, graphs, grid, grid source): what the backend does.
# Kept (the matrix's reasons, docs/coverage.md, README "Supported models"): Latte's temporal attention (S = f = 2
# tokens: one query block; its spatial attention is sparse with a one-frame layout); SanaVideo's self-attention is
# linear attention (no SDPA, O(N)); HunyuanVideo 1.5's blocks, in a graph of their own after its forward's
# data-dependent branch and per-sample text reorder, see no grid under plain torch.compile (with the forward's grid,
# as qs.optimize gives it, the attention is sparse: FORWARD_GRID). Mochi runs with its compile-friendly processor.
EXPECTED = {
    "ltx_video": (10, 10, 1, 1, 1, "2x8x8", "forward arguments"),
    "mochi": (9, 9, 1, 1, 1, "2x8x8", "conv patch embedding"),
    "allegro": (10, 10, 1, 1, 1, "2x8x8", "conv patch embedding"),
    "easyanimate": (12, 12, 1, 1, 1, "2x8x8", "conv patch embedding"),
    "skyreels_v2": (10, 10, 1, 1, 1, "2x8x8", "conv patch embedding"),
    "wan_vace": (22, 22, 2, 2, 1, "2x8x8", "conv patch embedding"),
    "consisid": (6, 6, 1, 1, 1, "2x8x8", "conv patch embedding"),
    "cosmos": (10, 10, 1, 1, 1, "2x8x8", "latent shape"),
    "latte": (16, 16, 1, 2, 1, "2x16x8", "conv patch embedding"),
    "sana_video": (8, 8, 0, 1, 1, "2x8x8", "conv patch embedding"),
    "hunyuan_video15": (12, 12, 0, 1, 3, "2x8x8", "conv patch embedding"),
    "kandinsky5": (16, 16, 1, 1, 1, "2x8x8", "rotary position ids"),
}
# Sparsified when each forward's grid is in the runtime context (qs.optimize's hook), for the classes that need it.
FORWARD_GRID = {"hunyuan_video15": 1}
KEPT = {
    "latte": "S=2 fits in one query block (block_q=64): nothing to skip",
    "sana_video": "SanaLinearAttnProcessor3_0: linear attention",
    "hunyuan_video15": "no video token grid in this graph",
}


# One class of each kind of problem: a grid only in forward arguments, a per-sample loop that breaks the graph
# (swapped for the compile-friendly processor), a patchify by reshape + linear, a grid from rotary positions.
# Factorized attention and the pair mask have toy-model tests (tests/passes). Every class's coverage is pinned on the
# op references in the default run; the Inductor compile of the other classes (the same passes, more compile time)
# is `extended`.
FAST = ("ltx_video", "mochi", "cosmos", "kandinsky5")
CLASSES = [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in sorted(VIDEO_DITS)]
COMPILED_CLASSES = [name if name in FAST else pytest.param(name, marks=pytest.mark.extended)
                    for name in sorted(VIDEO_DITS)]


def test_the_matrix_lists_every_bench_model():
    assert sorted(EXPECTED) == sorted(VIDEO_DITS) and len(EXPECTED) >= 8


@pytest.mark.parametrize("name", CLASSES)
def test_coverage_on_the_op_references(name):
    row = measure_coverage(tiny_video_dit(name), COVERAGE_OPTIONS, compile_with_inductor=False)
    assert row.error is None, row.error
    counts = (row.quantized, row.block_linears, row.sparsified, row.video_attentions, row.graphs)
    assert counts == EXPECTED[name][:5], (counts, [(k.fqn, k.reason) for k in row.kept])
    # The grid and the source that gave it (structural discovery's resolution order, compiler/passes/discovery.py).
    grid, source = EXPECTED[name][5:]
    grids = [note.split(" from ", 1)[1] for note in row.notes if note.startswith(f"video token grid {grid} from ")]
    assert grids and grids[0].startswith(source), row.notes
    # Everything kept says why, and the video attentions kept say the class's reason.
    assert all(site.reason for site in row.kept), row.kept
    video_kept = [site.reason for site in row.kept if site.kind != "linear"]
    assert all(reason.startswith(KEPT.get(name, "(none expected)")) for reason in video_kept), video_kept
    assert row.sparsified_with_forward_grid == FORWARD_GRID.get(name), row.sparsified_with_forward_grid
    # W4A8 (group 64) + half the tiles: a visible but bounded error (measured 26-51 dB on these models).
    assert 20 <= row.sqnr_vs_eager_db < 80, row.sqnr_vs_eager_db
    if name in FORWARD_GRID:
        assert 20 <= row.sqnr_with_forward_grid_db < 80, row.sqnr_with_forward_grid_db


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILED_CLASSES)
def test_compiled_output_matches_the_same_rewrite_on_the_references(name):
    row = measure_coverage(tiny_video_dit(name), COVERAGE_OPTIONS)
    assert row.error is None, row.error
    # Inductor vs the plain-torch run of the same rewrite: fp32 accumulation order only (measured 63-135 dB).
    assert row.sqnr_vs_reference_db >= 60, row.sqnr_vs_reference_db
