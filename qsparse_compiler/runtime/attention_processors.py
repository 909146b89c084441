"""Compile-friendly attention processors for diffusers models whose own processor breaks Dynamo's graph.

Contract: ``use_compile_friendly_attention(model)`` swaps each such processor for one computing the same function
without the break, and returns the names of the attention modules it changed; ``restore_attention(model)`` puts the
model's own processors back. ``qs.optimize`` calls the first (``qs.restore`` the second); a user compiling with plain
``torch.compile(model, backend="quantsparse")`` calls it before compiling.

Mochi (``MochiAttention`` + ``MochiAttnProcessor2_0``, the only processor diffusers 0.42 ships for it, with no
attention-backend dispatch): the processor loops over the batch and gathers each sample's valid text tokens with
``torch.nonzero`` - a data-dependent shape. Dynamo breaks the graph in the loop, skips the processor's frame, and the
block's projections and attention run eagerly (no rewrite reaches them). ``MochiMaskedAttnProcessor`` runs one
SDPA over the whole ``cat([video, text])`` sequence with a boolean key-padding mask (B, 1, 1, S) that hides the
padded text keys - the joint-attention form the sparse rewrite takes (video first) - and zeroes the padded text
rows, which the original fills with zeros by ``F.pad``. Numerics: per sample, each valid query sees the same keys in
both (softmax over the valid keys only), so video and valid text rows equal the original's to fp32 rounding and the
padded rows are exactly zero in both; tests/runtime/test_attention_processors.py checks it on a batch with
different masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MochiMaskedAttnProcessor", "use_compile_friendly_attention", "restore_attention"]

_ORIGINAL_ATTR = "_qsparse_original_processor"


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # MochiAttnProcessor2_0's rotation of interleaved (even, odd) channel pairs, in fp32.
    x_even, x_odd = x[..., 0::2].float(), x[..., 1::2].float()
    rotated_cos = (x_even * cos - x_odd * sin).to(x.dtype)
    rotated_sin = (x_even * sin + x_odd * cos).to(x.dtype)
    return torch.stack([rotated_cos, rotated_sin], dim=-1).flatten(-2)


class MochiMaskedAttnProcessor:
    """``MochiAttnProcessor2_0`` without the per-sample loop: one masked SDPA over video + text (module doc)."""

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor, image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(2, (attn.heads, -1))

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), \
            heads(attn.to_v(hidden_states))
        query, key = attn.norm_q(query), attn.norm_k(key)
        text_query = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
        text_key = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
        text_value = heads(attn.add_v_proj(encoder_hidden_states))
        if image_rotary_emb is not None:
            query, key = _apply_rotary(query, *image_rotary_emb), _apply_rotary(key, *image_rotary_emb)

        video_len, text_len = query.shape[1], text_query.shape[1]
        # (B, S, H, D) -> (B, H, S, D), video first.
        query = torch.cat([query, text_query], dim=1).transpose(1, 2)
        key = torch.cat([key, text_key], dim=1).transpose(1, 2)
        value = torch.cat([value, text_value], dim=1).transpose(1, 2)
        valid_text = attention_mask.reshape(attention_mask.shape[0], text_len) != 0
        valid = torch.cat([valid_text.new_ones(valid_text.shape[0], video_len), valid_text], dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=valid[:, None, None, :], dropout_p=0.0,
                                             is_causal=False)
        # Padded text rows: zero, as the original's F.pad leaves them.
        out = out.masked_fill(~valid[:, None, :, None], 0.0)
        out = out.transpose(1, 2).flatten(2, 3)
        hidden_states, encoder_hidden_states = out.split_with_sizes((video_len, text_len), dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def _replacement(module: torch.nn.Module):
    """The compile-friendly processor for ``module``'s current one, or None when it needs none."""
    try:
        from diffusers.models.attention_processor import MochiAttention, MochiAttnProcessor2_0
    except ImportError:  # a diffusers without Mochi has nothing to replace
        return None
    if isinstance(module, MochiAttention) and type(getattr(module, "processor", None)) is MochiAttnProcessor2_0:
        return MochiMaskedAttnProcessor()
    return None


def use_compile_friendly_attention(model: torch.nn.Module) -> list[str]:
    """Swap every attention processor that breaks Dynamo's graph for its compile-friendly equivalent (module doc);
    the names of the modules changed. Idempotent: a swapped module keeps its first original."""
    changed = []
    for name, module in model.named_modules():
        processor = _replacement(module)
        if processor is not None:
            setattr(module, _ORIGINAL_ATTR, module.processor)
            module.processor = processor
            changed.append(name)
    return changed


def restore_attention(model: torch.nn.Module) -> None:
    """Put back the processors ``use_compile_friendly_attention`` replaced."""
    for module in model.modules():
        original = module.__dict__.pop(_ORIGINAL_ATTR, None)
        if original is not None:
            module.processor = original
