"""Tiny diffusers video DiTs with random weights, and matching inputs: the CPU test bench of the passes.

Sizes are chosen so every block linear is quantizable with group_size=32 (K multiple of 32) and the video sequence
spans several 16-token blocks, so sparsity has something to skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyModel", "tiny_wan", "tiny_hunyuan", "tiny_cogvideox", "TINY_MODELS", "TEST_OPTIONS", "EXACT_OPTIONS",
           "ToyAttention", "ToyVideoDiT", "TOY_ATTENTION_VARIANTS"]

# Options that make tiny models exercise every rewrite: small groups and blocks.
TEST_OPTIONS: dict[str, Any] = {
    "quant": {"group_size": 32},
    "sparsity": {"density": 0.5, "block_q": 16, "block_kv": 16},
}
# Options whose rewrite computes what the model does: no quantization, every tile of qsparse::sparse_attention.
EXACT_OPTIONS: dict[str, Any] = {"quant": {"enabled": False}, "sparsity": {"density": 1.0, "block_q": 16, "block_kv": 16}}


@dataclass
class TinyModel:
    name: str
    model: torch.nn.Module
    make_inputs: Callable[..., dict[str, torch.Tensor]]  # make_inputs(frames=..., batch=...) -> forward kwargs
    block_linears: int  # linears with a token dimension inside the blocks (expected w4a8 rewrites)
    video_attentions: int  # self/joint attentions over video tokens (expected sparse rewrites)
    conditioning_linears: int = 0  # block linears without a token dimension (adaptive-norm modulation: int4 weight-only)


def tiny_wan(num_layers: int = 2, dtype: torch.dtype = torch.float32, heads: int = 2) -> TinyModel:
    """``heads`` splits the same 64 channels into more, smaller heads (4 heads of 16 for per-head tests)."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=64 // heads, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    ).eval().to(dtype)

    def make_inputs(frames: int = 3, batch: int = 1, height: int = 16, width: int = 16) -> dict[str, torch.Tensor]:
        return {
            "hidden_states": torch.randn(batch, 4, frames, height, width, dtype=dtype),
            "encoder_hidden_states": torch.randn(batch, 8, 32, dtype=dtype),
            "timestep": torch.tensor([500] * batch),
            "return_dict": False,
        }

    # per block: attn1 q,k,v,o + attn2 q,k,v,o + ffn up/down
    return TinyModel("wan", model, make_inputs, block_linears=10 * num_layers, video_attentions=num_layers)


def tiny_hunyuan(dtype: torch.dtype = torch.float32, num_layers: int = 1, num_single_layers: int = 1) -> TinyModel:
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=num_layers,
        num_single_layers=num_single_layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(8, 12, 12),
    ).eval().to(dtype)

    def make_inputs(frames: int = 3, batch: int = 1, height: int = 16, width: int = 16) -> dict[str, torch.Tensor]:
        mask = torch.ones(batch, 8, dtype=dtype)
        mask[:, 6:] = 0  # padded text: HunyuanVideo turns this into a key-padding mask
        return {
            "hidden_states": torch.randn(batch, 4, frames, height, width, dtype=dtype),
            "timestep": torch.tensor([500] * batch),
            "encoder_hidden_states": torch.randn(batch, 8, 32, dtype=dtype),
            "encoder_attention_mask": mask,
            "pooled_projections": torch.randn(batch, 16, dtype=dtype),
            "guidance": torch.tensor([3.0] * batch, dtype=dtype),
            "return_dict": False,
        }

    # dual-stream block: to_q,k,v, add_q,k,v, to_out, to_add_out, ff x2, ff_context x2 = 12
    # single-stream block: to_q,k,v, proj_mlp, proj_out = 5
    return TinyModel("hunyuan", model, make_inputs, block_linears=12 * num_layers + 5 * num_single_layers,
                     video_attentions=num_layers + num_single_layers,
                     # norm1.linear + norm1_context.linear per dual-stream block, norm.linear per single-stream block
                     conditioning_linears=2 * num_layers + num_single_layers)


def tiny_cogvideox(num_layers: int = 2, dtype: torch.dtype = torch.float32) -> TinyModel:
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=num_layers, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=False,
    ).eval().to(dtype)

    def make_inputs(frames: int = 3, batch: int = 1, height: int = 16, width: int = 16) -> dict[str, torch.Tensor]:
        return {
            "hidden_states": torch.randn(batch, frames, 4, height, width, dtype=dtype),
            "encoder_hidden_states": torch.randn(batch, 8, 32, dtype=dtype),
            "timestep": torch.tensor([500] * batch),
            "return_dict": False,
        }

    # per block: q, k, v, o + ff up/down
    # norm1.linear, norm2.linear per block
    return TinyModel("cogvideox", model, make_inputs, block_linears=6 * num_layers, video_attentions=num_layers,
                     conditioning_linears=2 * num_layers)


TINY_MODELS: dict[str, Callable[[], TinyModel]] = {
    "wan": tiny_wan,
    "hunyuan": tiny_hunyuan,
    "cogvideox": tiny_cogvideox,
}


# Attention variants of ToyAttention the sparse rewrite must leave alone ("plain" is the one it rewrites).
TOY_ATTENTION_VARIANTS = ("plain", "dense_mask", "dropout", "causal", "gqa", "broadcast_kv")


class ToyAttention(nn.Module):
    """A DiT attention block written out with F.scaled_dot_product_attention, in one of ``TOY_ATTENTION_VARIANTS``:
    a dense boolean mask, dropout_p=0.1, causal, grouped-query (``enable_gqa`` with half the k/v width) or one k/v
    head broadcast over the query heads (no ``enable_gqa``). Its last linear has a weight computed in the graph."""

    def __init__(self, dim: int = 64, heads: int = 2, variant: str = "plain") -> None:
        super().__init__()
        if variant not in TOY_ATTENTION_VARIANTS:
            raise ValueError(f"qsparse_compiler.eval.ToyAttention: variant {variant!r} not in {TOY_ATTENTION_VARIANTS}")
        self.heads, self.variant = heads, variant
        kv_dim = {"gqa": dim // 2, "broadcast_kv": dim // heads}.get(variant, dim)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, kv_dim), nn.Linear(dim, kv_dim)
        self.to_out = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.ones(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k = self.to_k(x).unflatten(-1, (-1, q.shape[-1])).transpose(1, 2)
        v = self.to_v(x).unflatten(-1, (-1, q.shape[-1])).transpose(1, 2)
        if self.variant == "dense_mask":
            mask = torch.ones(b, self.heads, s, s, dtype=torch.bool, device=x.device).tril()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.variant == "dropout":
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        elif self.variant == "causal":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.variant == "gqa":
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:  # plain, and broadcast_kv: k/v (B, 1, S, D) broadcast over the query heads
            out = F.scaled_dot_product_attention(q, k, v)
        out = self.to_out(out.transpose(1, 2).flatten(2))
        # A linear whose weight is computed in the graph: must stay as it is.
        return F.linear(out, self.gate * 0.5)


class ToyVideoDiT(nn.Module):
    """Conv3d patchify (grid = conv output), a ModuleList of blocks, a head: the shape of Wan, minus the rest.
    Inputs: ``{"x": (B, 4, frames, height, width)}``; 4 block linears per block, one video attention."""

    def __init__(self, variant: str = "plain", dim: int = 64) -> None:
        super().__init__()
        self.patch = nn.Conv3d(4, dim, (1, 2, 2), stride=(1, 2, 2))
        self.blocks = nn.ModuleList([ToyAttention(dim, variant=variant)])
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)
