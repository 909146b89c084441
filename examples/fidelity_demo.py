"""First fidelity numbers on the reference DiT, with plain-torch stand-ins for the compressed variants.

Until the quantsparse backend lands, the variants here simulate its numerics in eager torch (the same number
formats as ``qsparse_compiler.ops``), so the harness and the yardstick can be checked end to end:

    w4_rtn            block linears' weights -> int4 round-to-nearest, group 128 (quantize, then dequantize)
    w4a8_rtn          + per-token fp8 e4m3 activations at every block linear's input (quantize, dequantize)
    sparse_local3d    self-attention restricted to a 3D-local block layout (128 x 128 tiles) at --density
    w4a8+sparse       both

It also measures the attention recall of that layout (share of the dense softmax mass inside the kept tiles) per
layer and head of the dense model at sigma = 0.5.

    python examples/fidelity_demo.py --out OUT            # GPU: bf16, 4 videos x 30 steps, ~1 minute on an H100
    python examples/fidelity_demo.py --out OUT --small    # CPU: 2 frames of 16x16, 2 steps (smoke test)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qsparse_compiler.formats.quantization import dequantize_activation, dequantize_weight_int4, quantize_activation, quantize_weight_int4
from qsparse_compiler.formats.layout import BlockSparseLayout
from qsparse_compiler.formats.patterns import TokenGrid, local_3d
from qsparse_compiler.eval.fidelity import attention_recall, capture_attention_qk, evaluate
from qsparse_compiler.eval.reference_model import data_config, initial_noise, load_reference_metadata, load_reference_model
from qsparse_compiler.eval.synthetic_video import SyntheticVideoConfig, SyntheticVideos


def block_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for name, m in model.named_modules() if name.startswith("blocks.") and isinstance(m, nn.Linear)]


@torch.no_grad()
def w4_rtn(model: nn.Module, group: int = 128) -> nn.Module:
    for lin in block_linears(model):
        packed = quantize_weight_int4(lin.weight.float(), group_size=group)
        lin.weight.copy_(dequantize_weight_int4(packed.qweight, packed.scale, packed.group_size).to(lin.weight.dtype))
    return model


def a8_fp8(model: nn.Module) -> nn.Module:
    def hook(_mod: nn.Module, args: tuple) -> tuple:
        x = args[0]
        codes, scale, zero = quantize_activation(x, "fp8_e4m3")
        return (dequantize_activation(codes, scale, zero).to(x.dtype),) + tuple(args[1:])

    for lin in block_linears(model):
        lin.register_forward_pre_hook(hook)
    return model


class MaskedSelfAttention:
    """Wraps a Wan attention processor so that its attention call sees a boolean token mask (True = attend)."""

    def __init__(self, processor, mask: torch.Tensor) -> None:
        self.processor, self.mask = processor, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        import diffusers.models.transformers.transformer_wan as wan

        original = wan.dispatch_attention_fn

        def masked(query, key, value, **kwargs):  # diffusers layout [B, S, H, D]
            mask = self.mask.to(query.device)
            out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask)
            return out.transpose(1, 2)

        wan.dispatch_attention_fn = masked
        try:
            return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kw)
        finally:
            wan.dispatch_attention_fn = original


def layout_for(data: SyntheticVideoConfig, patch: list[int], block: int, density: float) -> BlockSparseLayout:
    f, h, w = data.frames // patch[0], data.height // patch[1], data.width // patch[2]
    grid = TokenGrid(f, h, w, seq_len=f * h * w)  # Wan self-attention: video tokens only
    bitmap = local_3d(grid, block, block, density)
    return BlockSparseLayout.from_bitmap(bitmap[None, None], block, block, grid.seq_len, grid.seq_len)


def sparse(layout: BlockSparseLayout):
    def apply(model: nn.Module) -> nn.Module:
        mask = layout.to_token_mask()[0, 0]  # [S, S] bool, broadcast over batch and heads
        for block in model.blocks:
            block.attn1.processor = MaskedSelfAttention(block.attn1.processor, mask)
        return model

    return apply


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--density", type=float, default=0.15)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--small", action="store_true", help="2 frames of 16x16, 2 steps, fp32 (CPU smoke test)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meta = load_reference_metadata()
    data = data_config(meta)
    steps, block = args.steps, args.block
    if args.small:
        data = SyntheticVideoConfig.from_dict({**data.to_dict(), "frames": 2, "height": 16, "width": 16})
        steps, block = 2, 16
    layout = layout_for(data, meta["model"]["patch_size"], block, args.density)
    print(f"[demo] {layout}", flush=True)

    def w4a8(m: nn.Module) -> nn.Module:
        return a8_fp8(w4_rtn(m))

    variants = {
        "w4_rtn": w4_rtn,
        "w4a8_rtn": w4a8,
        f"sparse_local3d_{round(100 * args.density)}": sparse(layout),
        f"w4a8+sparse_{round(100 * args.density)}": lambda m: sparse(layout)(w4a8(m)),
    }
    out = Path(args.out)
    result = evaluate(variants, out_dir=out, device=device, dtype=dtype, seeds=list(range(args.seeds)), num_steps=steps, data=data)
    print(result.markdown(), flush=True)

    # Attention recall of the layout on the dense model (sigma = 0.5, first seed's prompt and data).
    model = load_reference_model(device, dtype)
    gen = SyntheticVideos(data)
    video, prompt = gen.batch(1, seed=0)
    sigma = 0.5
    x_t = (1 - sigma) * video + sigma * initial_noise([0], video.shape[1:])
    captured = capture_attention_qk(model, {"hidden_states": x_t.to(device, dtype), "timestep": torch.tensor([500.0], device=device),
                                            "encoder_hidden_states": prompt.to(device, dtype)})
    recall = {name: attention_recall(q, k, layout)[0].tolist() for name, (q, k) in captured.items()}
    record = {"density": layout.density(), "block": block, "sigma": sigma, "recall_per_head": recall}
    (out / "recall.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"[demo] attention recall of local_3d at density {layout.density():.3f} (per head):", flush=True)
    for name, heads in recall.items():
        print(f"  {name}: " + " ".join(f"{r:.3f}" for r in heads), flush=True)


if __name__ == "__main__":
    main()
