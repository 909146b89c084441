"""The coverage matrix: diffusers video transformers beyond Wan/HunyuanVideo/CogVideoX, each a tiny random model at
realistic head widths (testing/video_dits.py), compiled with backend="quantsparse" as a user would (no fullgraph).

Fast tests run the rewrite on the ops' plain-torch references (no Inductor: a few seconds a class) and pin each
class's coverage - the share of block linears quantized and of video attentions sparsified - and the reason of
everything kept. The slow test compiles through Inductor and checks the compiled output against that reference run.
"""

import pytest

from qsparse_compiler.testing.coverage import measure_coverage
from qsparse_compiler.testing.video_dits import COVERAGE_OPTIONS, VIDEO_DITS, tiny_video_dit

# class -> (quantized, block linears, sparsified, video attentions, graphs): what the backend does today.
EXPECTED = {
    "ltx_video": (10, 10, 0, 1, 1),
    "mochi": (0, 9, 0, 0, 9),
    "allegro": (10, 10, 1, 1, 1),
    "easyanimate": (12, 12, 1, 1, 1),
    "skyreels_v2": (10, 10, 1, 1, 1),
    "wan_vace": (22, 22, 2, 2, 1),
    "consisid": (6, 6, 1, 1, 1),
    "cosmos": (10, 10, 0, 1, 1),
    "latte": (16, 16, 0, 0, 1),
    "sana_video": (8, 8, 0, 0, 1),
    "hunyuan_video15": (0, 12, 0, 1, 3),
    "kandinsky5": (16, 16, 0, 2, 1),
}


# The fast path (CI without -m slow) keeps one class of each kind of problem: a grid only in forward arguments, a
# per-sample loop that breaks the graph, a patchify by reshape + linear.
FAST = ("ltx_video", "mochi", "cosmos")
CLASSES = [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in sorted(VIDEO_DITS)]


def test_the_matrix_lists_every_bench_model():
    assert sorted(EXPECTED) == sorted(VIDEO_DITS) and len(EXPECTED) >= 8


@pytest.mark.parametrize("name", CLASSES)
def test_coverage_on_the_op_references(name):
    row = measure_coverage(tiny_video_dit(name), COVERAGE_OPTIONS, compile_with_inductor=False)
    assert row.error is None, row.error
    counts = (row.quantized, row.block_linears, row.sparsified, row.video_attentions, row.graphs)
    assert counts == EXPECTED[name], (counts, [(k.fqn, k.reason) for k in row.kept])
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
