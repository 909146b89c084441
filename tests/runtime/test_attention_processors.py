"""Compile-friendly attention processors (runtime/attention_processors.py): the same function as the model's own
processor, and put back by restore_attention."""

import torch
from diffusers.models.attention_processor import MochiAttnProcessor2_0

from qsparse_compiler.eval.video_dits import tiny_mochi
from qsparse_compiler.runtime.attention_processors import (
    MochiMaskedAttnProcessor,
    restore_attention,
    use_compile_friendly_attention,
)


def _attention_outputs(model, inputs):
    """(video, text) outputs of every block's attention, and the model's output."""
    captured = []
    handles = [block.attn1.register_forward_hook(lambda _m, _a, out: captured.append(out))
               for block in model.transformer_blocks]
    try:
        with torch.no_grad():
            out = model(**inputs)[0]
    finally:
        for handle in handles:
            handle.remove()
    return captured, out


def test_mochi_masked_processor_equals_the_per_sample_loop():
    torch.manual_seed(0)
    # Two blocks: the first has the text output path (to_add_out), the last is context_pre_only.
    tiny = tiny_mochi(num_layers=2)
    inputs = tiny.make_inputs(batch=2)
    inputs["encoder_attention_mask"][1, 3:] = False  # the samples keep 6 and 3 of their 8 text tokens
    own, own_out = _attention_outputs(tiny.model, inputs)

    assert use_compile_friendly_attention(tiny.model) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert all(isinstance(b.attn1.processor, MochiMaskedAttnProcessor) for b in tiny.model.transformer_blocks)
    masked, masked_out = _attention_outputs(tiny.model, inputs)
    # Same softmax over the same keys per sample: fp32 rounding at most.
    for (video, text), (video_ref, text_ref) in zip(masked, own):
        torch.testing.assert_close(video, video_ref)
        torch.testing.assert_close(text, text_ref)
    torch.testing.assert_close(masked_out, own_out)
    # The padded text rows are zero before the output projection: what to_add_out makes of them is its bias.
    padded = masked[0][1][1, 3:]
    torch.testing.assert_close(padded, tiny.model.transformer_blocks[0].attn1.to_add_out.bias.expand_as(padded))

    restore_attention(tiny.model)
    assert all(type(b.attn1.processor) is MochiAttnProcessor2_0 for b in tiny.model.transformer_blocks)
    assert use_compile_friendly_attention(torch.nn.Linear(4, 4)) == []


def test_optimize_swaps_the_processor_and_restore_puts_it_back():
    import qsparse_compiler as qs

    tiny = tiny_mochi(num_layers=1)
    qs.optimize(tiny.model)
    assert isinstance(tiny.model.transformer_blocks[0].attn1.processor, MochiMaskedAttnProcessor)
    qs.restore(tiny.model)
    assert type(tiny.model.transformer_blocks[0].attn1.processor) is MochiAttnProcessor2_0
