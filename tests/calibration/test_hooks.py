"""The SDPA interceptor sees each video self-attention under its module FQN, with the video grid of the input."""

import torch
import torch.nn.functional as F

from qsparse_compiler.calibration.hooks import (
    AttentionInterceptor,
    block_linear_names,
    transformer_blocks,
)
from qsparse_compiler.config import QuantConfig
from qsparse_compiler.eval.models import tiny_cogvideox, tiny_wan

SITES = QuantConfig().site_pattern


def test_wan_self_attentions_are_seen_by_fqn_and_cross_attention_is_not():
    tiny = tiny_wan(num_layers=2)
    inputs = tiny.make_inputs(frames=3)
    seen = []

    def observe(call):
        seen.append((call.fqn, call.grid, tuple(call.q.shape)))
        return None

    original = F.scaled_dot_product_attention
    with torch.no_grad(), AttentionInterceptor(tiny.model, observe):
        tiny.model(**inputs)
    assert F.scaled_dot_product_attention is original  # restored
    assert [fqn for fqn, _, _ in seen] == ["blocks.0.attn1", "blocks.1.attn1"]
    grid = seen[0][1]
    assert (grid.frames, grid.height, grid.width, grid.seq_len, grid.video_start) == (3, 8, 8, 192, 0)
    assert seen[0][2] == (1, 2, 192, 32)


def test_a_handler_can_replace_the_output_and_the_patch_is_undone_on_error():
    tiny = tiny_wan(num_layers=1)
    inputs = tiny.make_inputs()
    with torch.no_grad():
        dense = tiny.model(**inputs)[0]
        with AttentionInterceptor(tiny.model, lambda call: call.dense()):
            same = tiny.model(**inputs)[0]
        with AttentionInterceptor(tiny.model, lambda call: torch.zeros_like(call.q)):
            changed = tiny.model(**inputs)[0]
    torch.testing.assert_close(same, dense)
    assert not torch.allclose(changed, dense)
    original = F.scaled_dot_product_attention
    try:
        with AttentionInterceptor(tiny.model, lambda call: 1 / 0):
            tiny.model(**inputs)
    except ZeroDivisionError:
        pass
    assert F.scaled_dot_product_attention is original


def test_cogvideox_joint_attention_has_text_first():
    tiny = tiny_cogvideox(num_layers=1)
    inputs = tiny.make_inputs(frames=3)
    grids = []
    with torch.no_grad(), AttentionInterceptor(tiny.model, lambda call: grids.append((call.fqn, call.grid))):
        tiny.model(**inputs)
    (fqn, grid), = grids
    assert fqn == "transformer_blocks.0.attn1"
    assert grid.video_start == 8 and grid.seq_len == 8 + grid.video_len  # 8 text tokens, then the video


def test_block_discovery_follows_the_passes_names():
    tiny = tiny_wan(num_layers=2)
    assert [fqn for fqn, _ in transformer_blocks(tiny.model, SITES)] == ["blocks.0", "blocks.1"]
    names = block_linear_names(tiny.model, SITES)
    assert len(names) == 20 and "blocks.0.attn1.to_out.0" in names and "proj_out" not in names
