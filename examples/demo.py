"""`make demo`: compile a small Wan model with backend="quantsparse", run it, print what the backend did.

On a CPU machine the qsparse:: ops run their plain-torch references (float32); with CUDA the same script runs
in bfloat16 on the GPU kernels. Prints the rewrite report, the size of the block weights vs bf16, and the output
error against eager.
"""

from __future__ import annotations

import time

import torch
from diffusers import WanTransformer3DModel

from qsparse_compiler.compiler.backend import reports
from qsparse_compiler.eval.metrics import relative_error


def small_wan(device: torch.device, dtype: torch.dtype) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=64, ffn_dim=512, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=128,
    ).eval().to(device=device, dtype=dtype)


def main() -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = small_wan(device, dtype)
    # 5 latent frames of 32x32 -> 5 x 16 x 16 = 1,280 video tokens = 10 query blocks of 128.
    inputs = {
        "hidden_states": torch.randn(1, 16, 5, 32, 32, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, 16, 64, device=device, dtype=dtype),
        "timestep": torch.tensor([500], device=device),
        "return_dict": False,
    }
    options = {"quant": {"group_size": 128}, "sparsity": {"density": 0.3}, "report": True, "dump_dir": "qs-dump"}
    print(f"device: {device}, dtype: {dtype}, torch {torch.__version__}")
    with torch.no_grad():
        expected = model(**inputs)[0]
        start = time.perf_counter()
        compiled = torch.compile(model, backend="quantsparse", options=options, fullgraph=True)
        actual = compiled(**inputs)[0]
        seconds = time.perf_counter() - start
    report = reports()[-1]
    print(f"\ncompile + first run: {seconds:.1f} s (graph dumps and report.json in qs-dump/)")
    if report.compression:
        print(f"block weights: {report.weight_bytes['bf16']:,} bytes as bf16 -> {report.weight_bytes['qsparse']:,} "
              f"bytes ({report.compression:.2f}x smaller)")
    print(f"output vs eager: relative error {relative_error(actual, expected):.4f} "
          f"(W4A8 round-to-nearest + 30% of attention tiles)")


if __name__ == "__main__":
    main()
