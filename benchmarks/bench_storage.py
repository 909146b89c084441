"""Bytes of the transformer blocks' weights, bf16 vs as qsparse stores them (int4 codes + scales), for Wan2.1-1.3B.

Runs on the CPU (random bf16 weights, a tiny input just to trace the graph): the rewrite report of the backend's
passes counts every parameter inside the blocks, packed where a linear was quantized.

    python benchmarks/bench_storage.py --out benchmarks/results/storage_wan1.3b.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import WAN_1_3B  # noqa: E402  the one definition of the workload's config

from qsparse_compiler.config import QuantSparseConfig  # noqa: E402
from qsparse_compiler.compiler.passes import PassContext, default_passes, run_passes
from qsparse_compiler.compiler.passes.report import RewriteReport
from qsparse_compiler.eval.capture import capture_dynamo_graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/storage_wan1.3b.json"))
    args = parser.parse_args()
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**WAN_1_3B)
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    inputs = dict(hidden_states=torch.randn(1, 16, 1, 16, 16, dtype=torch.bfloat16),
                  encoder_hidden_states=torch.randn(1, 8, 4096, dtype=torch.bfloat16),
                  timestep=torch.tensor([500]), return_dict=False)
    rows = []
    for group_size in (128, 0):
        with torch.no_grad():
            gm, example_inputs = capture_dynamo_graph(model, inputs)
            ctx = PassContext(QuantSparseConfig.from_options({"quant": {"group_size": group_size}}), example_inputs,
                              RewriteReport(0))
            run_passes(gm, ctx, default_passes())
        report = ctx.report
        rows.append({"group_size": group_size, "bf16_bytes": report.weight_bytes["bf16"],
                     "qsparse_bytes": report.weight_bytes["qsparse"], "compression": report.compression,
                     "w4a8_linears": report.counters.get("w4a8_linear", 0)})
        print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": "Wan2.1-1.3B config, random bf16 weights", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
