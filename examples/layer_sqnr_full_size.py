"""Per-layer output SQNR of compressed variants of a random-weight, full-size Wan2.1-1.3B (no meaningful video:
layer-level fidelity only). Runs on the CPU at a small token count, or on the GPU at any size.

    python examples/layer_sqnr_full_size.py --out docs/fidelity/wan1.3b_layer_sqnr.json [--layers 30] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_e2e import WAN_1_3B  # noqa: E402  the workload's config, defined once

from qsparse_compiler.eval.fidelity import layer_sqnr, random_wan_inputs  # noqa: E402

VARIANTS = {
    "w4a8 (group 128)": {"sparsity": {"enabled": False}},
    "w4a8 (per channel)": {"quant": {"group_size": 0}, "sparsity": {"enabled": False}},
    "sparse local3d": {"quant": {"enabled": False}},
    "naive w4a8 + sparse": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/fidelity/wan1.3b_layer_sqnr.json"))
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--density", type=float, default=0.34)
    args = parser.parse_args()
    from diffusers import WanTransformer3DModel

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        model = WanTransformer3DModel(**{**WAN_1_3B, "num_layers": args.layers}).eval().to(dtype)
    inputs = random_wan_inputs(model, frames=args.frames, height=args.size, width=args.size, text_len=64,
                               device=args.device, dtype=dtype)
    rows = {}
    for name, options in VARIANTS.items():
        options = {**options, "sparsity": {**options.get("sparsity", {}), "density": args.density}}
        torch._dynamo.reset()
        start = time.perf_counter()
        variant = torch.compile(model, backend="quantsparse", options=options, fullgraph=True)
        result = layer_sqnr(model, variant, inputs)
        blocks = [v for k, v in result.items() if k != "output"]
        rows[name] = {"options": options, "output_sqnr_db": result["output"], "min_block_sqnr_db": min(blocks),
                      "mean_block_sqnr_db": sum(blocks) / len(blocks), "per_block": result,
                      "seconds": time.perf_counter() - start}
        print(f"{name}: output {result['output']:.2f} dB, blocks min {min(blocks):.2f} / mean "
              f"{sum(blocks) / len(blocks):.2f} dB", flush=True)
    meta = {"model": f"Wan2.1-1.3B config, {args.layers} layers, random weights", "device": args.device,
            "dtype": str(dtype), "tokens": args.frames * (args.size // 2) ** 2, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "variants": rows}, indent=2))


if __name__ == "__main__":
    main()
