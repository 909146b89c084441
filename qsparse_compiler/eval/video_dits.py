"""Tiny random models of diffusers' other video transformers, at realistic attention widths: the coverage bench.

Each factory builds one diffusers 0.42 video DiT class with random weights, 1-2 blocks, heads of 64 channels (2
heads: width 128) and a token grid of 2 x 8 x 8 = 128 video tokens (two query blocks of 64), plus inputs the
class's forward accepts. ``COVERAGE_OPTIONS`` rewrites them with group 64 and 64-token tiles, so every block linear
is quantizable and the sparse layout has tiles to skip. Everything runs on the CPU in a few seconds per model.

The classes beyond Wan, HunyuanVideo and CogVideoX (``eval/models.py``) - each is built as its pipeline
calls it (latent layout, forward arguments); where a class needs a precomputed input (rotary tables, position
lists), the factory computes it as the pipeline does.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .models import TinyModel

__all__ = ["COVERAGE_OPTIONS", "VIDEO_DITS", "tiny_video_dit"]

HEADS, HEAD_DIM = 2, 64
WIDTH = HEADS * HEAD_DIM
ALLEGRO_HEAD_DIM = 96
MOCHI_HEADS = 3
TEXT, TEXT_DIM = 8, 64

# group 64 divides every K of these models (128, 256, ...); 64-token tiles: the 128 video tokens are 2 x 2 tiles.
COVERAGE_OPTIONS: dict[str, Any] = {
    "quant": {"group_size": 64},
    "sparsity": {"density": 0.5, "block_q": 64, "block_kv": 64},
}


def _text(batch: int, tokens: int = TEXT, dim: int = TEXT_DIM) -> torch.Tensor:
    return torch.randn(batch, tokens, dim)


def _timestep(batch: int) -> torch.Tensor:
    return torch.tensor([500] * batch)


def tiny_ltx_video(num_layers: int = 1) -> TinyModel:
    """LTX-Video: patchify is a linear on already-flattened tokens (patch size 1, as the pipeline packs them); the
    grid comes only as the num_frames/height/width forward arguments."""
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM, cross_attention_dim=WIDTH, num_layers=num_layers, caption_channels=TEXT_DIM,
    ).eval()

    def make_inputs(frames: int = 2, batch: int = 1, height: int = 8, width: int = 8) -> dict[str, Any]:
        return {
            "hidden_states": torch.randn(batch, frames * height * width, 8),
            "encoder_hidden_states": _text(batch),
            "timestep": _timestep(batch),
            "encoder_attention_mask": torch.ones(batch, TEXT),
            "num_frames": frames, "height": height, "width": width,
            "return_dict": False,
        }

    # attn1 q,k,v,o + attn2 q,k,v,o + ff up/down
    return TinyModel("ltx_video", model, make_inputs, block_linears=10 * num_layers, video_attentions=num_layers)


def tiny_mochi(num_layers: int = 1) -> TinyModel:
    """Mochi: patchify by a Conv2d per frame, joint video + text attention (per sample in diffusers' processor; the
    coverage bench swaps it for the masked one, runtime/attention_processors.py). 3 heads: its feed-forward is
    8/3 of the width (Mochi's 3072 -> 8192), a multiple of the group 64 only for a width that is a multiple of 24."""
    from diffusers import MochiTransformer3DModel

    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=MOCHI_HEADS, attention_head_dim=HEAD_DIM, num_layers=num_layers,
        pooled_projection_dim=TEXT_DIM, in_channels=4, text_embed_dim=TEXT_DIM, time_embed_dim=32,
        max_sequence_length=TEXT,
    ).eval()

    def make_inputs(frames: int = 2, batch: int = 1, height: int = 16, width: int = 16) -> dict[str, Any]:
        mask = torch.ones(batch, TEXT, dtype=torch.bool)
        mask[:, 6:] = False
        return {
            "hidden_states": torch.randn(batch, 4, frames, height, width),
            "encoder_hidden_states": _text(batch),
            "timestep": _timestep(batch),
            "encoder_attention_mask": mask,
            "return_dict": False,
        }

    # to_q,k,v, add_q,k,v, to_out, to_add_out, ff (swiglu) up/down, ff_context up/down; the last block has no
    # context output path (context_pre_only): its add_q/k/v only, no to_add_out / ff_context.
    return TinyModel("mochi", model, make_inputs, block_linears=12 * num_layers - 3, video_attentions=num_layers)


def tiny_allegro(num_layers: int = 1) -> TinyModel:
    """Allegro: its 3-D rotary embedding splits the head in three even parts, so heads of 96 (its own size)."""
    from diffusers import AllegroTransformer3DModel

    model = AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=HEADS, attention_head_dim=ALLEGRO_HEAD_DIM, in_channels=4,
        out_channels=4, num_layers=num_layers, cross_attention_dim=HEADS * ALLEGRO_HEAD_DIM, sample_height=16, sample_width=16,
        sample_frames=2, caption_channels=TEXT_DIM,
    ).eval()

    def make_inputs(frames: int = 2, batch: int = 1, height: int = 16, width: int = 16) -> dict[str, Any]:
        return {
            "hidden_states": torch.randn(batch, 4, frames, height, width),
            "encoder_hidden_states": _text(batch),
            "timestep": _timestep(batch),
            "encoder_attention_mask": torch.ones(batch, TEXT),
            "image_rotary_emb": _allegro_rope(frames, height // 2, width // 2),
            "return_dict": False,
        }

    return TinyModel("allegro", model, make_inputs, block_linears=10 * num_layers, video_attentions=num_layers)


def _allegro_rope(frames: int, height: int, width: int):
    """The rotary tables and token positions AllegroPipeline._prepare_rotary_positional_embeddings builds."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=ALLEGRO_HEAD_DIM, crops_coords=((0, 0), (height, width)), grid_size=(height, width),
        temporal_size=frames, interpolation_scale=(2.2, 2.0, 2.0),
    )
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return (freqs_t, freqs_h, freqs_w), tuple(pos)


def tiny_easyanimate(num_layers: int = 1) -> TinyModel:
    from diffusers import EasyAnimateTransformer3DModel

    model = EasyAnimateTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, patch_size=2,
        sample_width=16, sample_height=16, num_layers=num_layers, mmdit_layers=num_layers, time_embed_dim=32,
        text_embed_dim=TEXT_DIM,
    ).eval()

    def make_inputs(frames: int = 2, batch: int = 1, height: int = 16, width: int = 16) -> dict[str, Any]:
        return {
            "hidden_states": torch.randn(batch, 4, frames, height, width),
            "timestep": _timestep(batch),
            "encoder_hidden_states": _text(batch),
            "return_dict": False,
        }

    return TinyModel("easyanimate", model, make_inputs, block_linears=12 * num_layers, video_attentions=num_layers)


def tiny_skyreels_v2(num_layers: int = 1) -> TinyModel:
    from diffusers import SkyReelsV2Transformer3DModel

    model = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=256, num_layers=num_layers, rope_max_seq_len=64,
    ).eval()

    def make_inputs(frames: int = 2, batch: int = 1, height: int = 16, width: int = 16) -> dict[str, Any]:
        return {
            "hidden_states": torch.randn(batch, 4, frames, height, width),
            "timestep": _timestep(batch),
            "encoder_hidden_states": _text(batch),
            "return_dict": False,
        }

    return TinyModel("skyreels_v2", model, make_inputs, block_linears=10 * num_layers, video_attentions=num_layers)


def tiny_wan_vace(num_layers: int = 1) -> TinyModel:
    from diffusers import WanVACETransformer3DModel

    model = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=256, num_layers=num_layers, rope_max_seq_len=64,
        vace_layers=[0], vace_in_channels=8,
    ).eval()

    def make_inputs(frames: int = 2, batch: int = 1, height: int = 16, width: int = 16) -> dict[str, Any]:
        return {
            "hidden_states": torch.randn(batch, 4, frames, height, width),
            "timestep": _timestep(batch),
            "encoder_hidden_states": _text(batch),
            "control_hidden_states": torch.randn(batch, 8, frames, height, width),
            "control_hidden_states_scale": torch.ones(1),
            "return_dict": False,
        }

    # the Wan blocks, and the VACE block: the same 10 plus its proj_in / proj_out
    return TinyModel("wan_vace", model, make_inputs, block_linears=10 * num_layers + 12,
                     video_attentions=num_layers + 1)


def tiny_consisid(num_layers: int = 1) -> TinyModel:
    """ConsisID: CogVideoX's layout (frames first, Conv2d patchify, text first in the joint sequence)."""
    from diffusers import ConsisIDTransformer3DModel

    model = ConsisIDTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=TEXT_DIM, num_layers=num_layers, sample_width=16, sample_height=16, sample_frames=5,
        patch_size=2, max_text_seq_length=TEXT,
    ).eval()

    def make_inputs(frames: int = 2, batch: int = 1, height: int = 16, width: int = 16) -> dict[str, Any]:
        return {
            "hidden_states": torch.randn(batch, frames, 4, height, width),
            "encoder_hidden_states": _text(batch),
            "timestep": _timestep(batch),
            "return_dict": False,
        }

    return TinyModel("consisid", model, make_inputs, block_linears=6 * num_layers, video_attentions=num_layers,
                     conditioning_linears=2 * num_layers)


def tiny_cosmos(num_layers: int = 1) -> TinyModel:
    from diffusers import CosmosTransformer3DModel

    model = CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=num_layers,
        mlp_ratio=2.0, text_embed_dim=TEXT_DIM, adaln_lora_dim=32, max_size=(8, 32, 32), patch_size=(1, 2, 2), concat_padding_mask=False,
    ).eval()

    def make_inputs(frames: int = 2, batch: int = 1, height: int = 16, width: int = 16) -> dict[str, Any]:
        return {
            "hidden_states": torch.randn(batch, 4, frames, height, width),
            "timestep": _timestep(batch),
            "encoder_hidden_states": _text(batch),
            "return_dict": False,
        }

    return TinyModel("cosmos", model, make_inputs, block_linears=10 * num_layers, video_attentions=num_layers)


def tiny_latte(num_layers: int = 1) -> TinyModel:
    """Latte: alternating spatial (per frame) and temporal (per position) attention blocks. Frames of 16 x 8 tokens
    (a 2 x 16 x 8 grid): its spatial attention spans two 64-token query blocks, as the others' full attention does."""
    from diffusers import LatteTransformer3DModel

    model = LatteTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=num_layers,
        cross_attention_dim=WIDTH, sample_size=16, patch_size=2, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, caption_channels=TEXT_DIM, video_length=2,
    ).eval()

    def make_inputs(frames: int = 2, batch: int = 1, height: int = 32, width: int = 16) -> dict[str, Any]:
        return {
            "hidden_states": torch.randn(batch, 4, frames, height, width),
            "timestep": _timestep(batch),
            "encoder_hidden_states": _text(batch),
            "return_dict": False,
        }

    return TinyModel("latte", model, make_inputs, block_linears=14 * num_layers, video_attentions=0)


def tiny_sana_video(num_layers: int = 1) -> TinyModel:
    from diffusers import SanaVideoTransformer3DModel

    model = SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=num_layers,
        num_cross_attention_heads=HEADS, cross_attention_head_dim=HEAD_DIM, cross_attention_dim=WIDTH,
        caption_channels=TEXT_DIM, sample_size=16, rope_max_seq_len=64,
    ).eval()

    def make_inputs(frames: int = 2, batch: int = 1, height: int = 16, width: int = 16) -> dict[str, Any]:
        return {
            "hidden_states": torch.randn(batch, 4, frames, height, width),
            "encoder_hidden_states": _text(batch),
            "timestep": _timestep(batch),
            "return_dict": False,
        }

    return TinyModel("sana_video", model, make_inputs, block_linears=8 * num_layers, video_attentions=0)


def tiny_hunyuan_video15(num_layers: int = 1) -> TinyModel:
    from diffusers import HunyuanVideo15Transformer3DModel

    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=num_layers,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=TEXT_DIM,
        text_embed_2_dim=TEXT_DIM, image_embed_dim=TEXT_DIM, rope_axes_dim=(16, 24, 24), task_type="t2v",
    ).eval()

    def make_inputs(frames: int = 2, batch: int = 1, height: int = 16, width: int = 16) -> dict[str, Any]:
        return {
            "hidden_states": torch.randn(batch, 4, frames, height, width),
            "timestep": _timestep(batch).float(),
            "encoder_hidden_states": _text(batch),
            "encoder_attention_mask": torch.ones(batch, TEXT),
            "encoder_hidden_states_2": _text(batch),
            "encoder_attention_mask_2": torch.ones(batch, TEXT),
            "image_embeds": torch.zeros(batch, TEXT, TEXT_DIM),
            "return_dict": False,
        }

    return TinyModel("hunyuan_video15", model, make_inputs, block_linears=12 * num_layers,
                     video_attentions=num_layers)


def tiny_kandinsky5(num_layers: int = 1) -> TinyModel:
    from diffusers import Kandinsky5Transformer3DModel

    model = Kandinsky5Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=TEXT_DIM, in_text_dim2=TEXT_DIM, time_dim=32,
        patch_size=(1, 2, 2), model_dim=WIDTH, ff_dim=256, num_text_blocks=1, num_visual_blocks=num_layers,
        axes_dims=(16, 24, 24),
    ).eval()

    def make_inputs(frames: int = 2, batch: int = 1, height: int = 16, width: int = 16) -> dict[str, Any]:
        return {
            "hidden_states": torch.randn(batch, frames, height, width, 4),
            "encoder_hidden_states": _text(batch),
            "timestep": torch.tensor([500.0] * batch),
            "pooled_projections": torch.randn(batch, TEXT_DIM),
            "visual_rope_pos": [torch.arange(frames), torch.arange(height // 2), torch.arange(width // 2)],
            "text_rope_pos": torch.arange(TEXT),
            "return_dict": False,
        }

    return TinyModel("kandinsky5", model, make_inputs, block_linears=9 * num_layers, video_attentions=num_layers)


VIDEO_DITS: dict[str, Callable[[], TinyModel]] = {
    "ltx_video": tiny_ltx_video,
    "mochi": tiny_mochi,
    "allegro": tiny_allegro,
    "easyanimate": tiny_easyanimate,
    "skyreels_v2": tiny_skyreels_v2,
    "wan_vace": tiny_wan_vace,
    "consisid": tiny_consisid,
    "cosmos": tiny_cosmos,
    "latte": tiny_latte,
    "sana_video": tiny_sana_video,
    "hunyuan_video15": tiny_hunyuan_video15,
    "kandinsky5": tiny_kandinsky5,
}


def tiny_video_dit(name: str) -> TinyModel:
    """The tiny model ``name`` with seeded random weights. Parameters a class initializes to zero (adaLN-zero
    modulation, learnable position tables) are drawn too: a zero gate makes a block the identity, and a rewrite of
    it could not change the output."""
    if name not in VIDEO_DITS:
        raise ValueError(f"qsparse_compiler.eval.video_dits: no tiny model {name!r}; one of {sorted(VIDEO_DITS)}")
    torch.manual_seed(0)
    tiny = VIDEO_DITS[name]()
    with torch.no_grad():
        for param in tiny.model.parameters():
            if param.is_floating_point() and not param.any():
                param.normal_(0.0, 0.02)
    return tiny
