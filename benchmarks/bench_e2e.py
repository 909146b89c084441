"""End-to-end forward time of a video DiT: eager, Inductor, torchao fp8, FlexAttention 15% + fp8, and qsparse.

Workload W (BASELINES.md): diffusers WanTransformer3DModel with the Wan2.1-1.3B config, random bf16 weights, eval,
no_grad; hidden_states (1, 16, 21, 60, 104) = 480p x 81 frames = 32,760 video tokens; encoder_hidden_states
(1, 512, 4096); timestep [500]. One transformer forward, median of triton.testing.do_bench.

    python benchmarks/bench_e2e.py --workload wan-1.3b-480p --rows eager,inductor,fp8,flex-fp8,qsparse --out r.json
    python benchmarks/bench_e2e.py --workload reference --device cpu --rows eager,qsparse   # CPU smoke test

Every row builds its own model copy from the same seed (a compile mutates its module), compiles it, checks its
output against eager (relative error), and reports ms, speedup vs Inductor, compile seconds, peak memory and the
block weights' bytes. ``qsparse`` is timed for a refresh step and a reuse step of the residual cache and averaged
over a 50-step schedule.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
WORKLOADS: dict[str, dict[str, Any]] = {
    "wan-1.3b-480p": dict(config=WAN_1_3B, latents=(1, 16, 21, 60, 104), text=(1, 512, 4096)),
    "wan-1.3b-720p": dict(config=WAN_1_3B, latents=(1, 16, 21, 90, 160), text=(1, 512, 4096)),
    # A small config that runs anywhere (the CPU smoke test of this benchmark).
    "reference": dict(
        config=dict(WAN_1_3B, num_attention_heads=4, attention_head_dim=32, text_dim=64, freq_dim=64, ffn_dim=512,
                    num_layers=2, rope_max_seq_len=128),
        latents=(1, 16, 5, 32, 32), text=(1, 16, 64),
    ),
}
SCHEDULE_STEPS = 50
# Per-channel int4 weights: the fastest W4A8 kernel path on the H100 (benchmarks/results/w4a8_linear.md).
QSPARSE_OPTIONS: dict[str, Any] = {"quant": {"group_size": 0}}
CACHE: dict[str, Any] = {"refresh_first": 2, "refresh_every": 5, "order": 2}
REUSE_STEP = 7  # not a refresh step of CACHE's schedule


@dataclass
class Row:
    system: str
    ms: float
    compile_s: float
    peak_gib: float
    rel_error_vs_eager: float
    block_weight_bytes: int | None = None
    note: str = ""
    speedup_vs_inductor: float | None = None
    profile: dict[str, float] | None = None  # GPU ms per forward by kernel category (--profile)


def build(workload: dict[str, Any], device: str, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**workload["config"]).eval().to(dtype)
    generator = torch.Generator(device).manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(workload["latents"], device=device, dtype=dtype, generator=generator),
        encoder_hidden_states=torch.randn(workload["text"], device=device, dtype=dtype, generator=generator),
        timestep=torch.tensor([500], device=device),
        return_dict=False,
    )
    return model, inputs


def block_linear_filter(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and fqn.startswith("blocks.")


def time_ms(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=300, rep=1500, return_mode="median"))
    times = []
    for _ in range(3):  # CPU: a smoke run, not a performance figure
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the blocks' weights as the model stores them: packed int4 where qsparse packed them."""
    from qsparse_compiler.runtime.weights import default_store

    total = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("blocks."):
            packed = default_store.packed_nbytes(tensor)
            total += packed if packed is not None else tensor.numel() * tensor.element_size()
    return total


def flex_block_masks(model, inputs, density: float):
    """FlexAttention BlockMask from a random 128x128 block bitmap with the diagonal kept (as in BASELINES.md)."""
    from torch.nn.attention.flex_attention import BlockMask

    latents = inputs["hidden_states"].shape
    tokens = latents[2] * (latents[3] // 2) * (latents[4] // 2)
    blocks = math.ceil(tokens / 128)
    generator = torch.Generator().manual_seed(2)
    bitmap = torch.rand(1, 1, blocks, blocks, generator=generator) < density
    bitmap |= torch.eye(blocks, dtype=torch.bool)
    counts = bitmap.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~bitmap).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    device = inputs["hidden_states"].device
    return BlockMask.from_kv_blocks(counts.to(device), indices.to(device), BLOCK_SIZE=128, seq_lengths=(tokens, tokens))


class _FlexSelfAttention:
    """Wan attn1 processor that runs diffusers' flex backend with a fixed block mask."""

    def __init__(self, processor: Any, block_mask: Any) -> None:
        self.processor, self.block_mask = processor, block_mask
        self.processor._attention_backend = "flex"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        return self.processor(attn, hidden_states, encoder_hidden_states, self.block_mask, rotary_emb, **kw)


def run_row(name: str, workload: dict[str, Any], device: str, dtype: torch.dtype, eager_out: torch.Tensor | None,
            density: float, profile_dir: Path | None = None) -> list[Row]:
    model, inputs = build(workload, device, dtype)
    note = ""
    if name in ("fp8", "flex-fp8"):
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=block_linear_filter)
    if name == "flex-fp8":
        mask = flex_block_masks(model, inputs, density)
        for block in model.blocks:
            block.attn1.set_processor(_FlexSelfAttention(block.attn1.processor, mask))
        note = f"random {density:.0%} 128x128 blocks + diagonal"
    runtime = None
    if name in ("qsparse", "qsparse-cudagraphs"):
        import qsparse_compiler as qs

        options = {**QSPARSE_OPTIONS, "sparsity": {**QSPARSE_OPTIONS.get("sparsity", {}), "density": density}}
        cuda_graphs = name == "qsparse-cudagraphs"
        fn_model = qs.optimize(model, options=options, cache=CACHE, regional=not cuda_graphs, cuda_graphs=cuda_graphs)
        runtime = qs.runtime_of(fn_model)
        how = "whole model, a refresh and a reuse CUDA graph" if cuda_graphs else "regional compile"
        note = f"{how}, options {json.dumps(options)}, cache {json.dumps(CACHE)}"
    elif name == "eager":
        fn_model = model
    else:
        model.compile_repeated_blocks(fullgraph=True)
        fn_model = model
    start = time.perf_counter()
    with torch.no_grad():
        if runtime is not None:
            runtime.step(0)
        # Clones: under CUDA graphs an output lives in the graph's memory pool, which the next replay overwrites.
        out = fn_model(**inputs)[0].clone()
        if runtime is not None:  # the first reuse step: a second graph where refresh and reuse are compiled apart
            runtime.step(REUSE_STEP)
            out_reuse = fn_model(**inputs)[0].clone()
    compile_s = time.perf_counter() - start
    note_parts = [note] if note else []
    if runtime is not None:
        freed = qs.release_dense_weights(fn_model)
        cache_bytes = runtime.memory_report()["total"]["bytes"]
        note_parts.append(f"released {freed / 2**30:.2f} GiB of bf16 block weights; residual cache "
                          f"{cache_bytes / 2**30:.2f} GiB")
    note = "; ".join(note_parts)
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    def error_of(result: torch.Tensor) -> float:
        return 0.0 if eager_out is None else float((result.float() - eager_out.float()).norm() / eager_out.float().norm())

    error = error_of(out)
    rows = []

    def measure(system: str, before: Callable[[], Any] | None, error: float = error) -> Row:
        def call():
            if before is not None:
                before()
            return fn_model(**inputs)

        with torch.no_grad():
            ms = time_ms(call, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        row = Row(system, ms, compile_s if name != "eager" else 0.0, peak, error, note=note)
        if profile_dir is not None:
            slug = re.sub(r"[^A-Za-z0-9]+", "_", system).strip("_")
            try:
                row.profile = profile_forward(call, device, profile_dir / f"profile_{slug}.txt")
            except Exception as exc:  # a profiler failure must not lose the timing
                row.note += f"; profile failed: {type(exc).__name__}: {exc}"[:200]
        return row

    if runtime is None:
        rows.append(measure(name, None))
    else:
        refresh = measure(f"{name} (refresh step)", lambda: runtime.step(0))
        # Same inputs every step: the reuse output is the sparse output plus the residual of the refresh, so its error
        # vs eager shows the cache at work (without it, sparse attention alone is far off).
        reuse = measure(f"{name} (reuse step)", lambda: runtime.step(REUSE_STEP), error_of(out_reuse))
        schedule = runtime_schedule_counts(SCHEDULE_STEPS)
        average = (schedule[0] * refresh.ms + schedule[1] * reuse.ms) / SCHEDULE_STEPS
        rows += [refresh, reuse, Row(f"{name} ({SCHEDULE_STEPS}-step average)", average, compile_s,
                                     max(refresh.peak_gib, reuse.peak_gib), max(refresh.rel_error_vs_eager,
                                                                                reuse.rel_error_vs_eager),
                                     note=f"{schedule[0]} refresh + {schedule[1]} reuse steps; {note}")]
    for row in rows:
        row.block_weight_bytes = weight_bytes(model)
    del model, fn_model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


# Kernel name -> where the time goes (issue #9's profile). First match wins; names are Triton kernel function names,
# Inductor's generated kernels (triton_*) and the library kernels of cuBLAS / SDPA.
KERNEL_CATEGORIES: list[tuple[str, str]] = [
    ("w4a8 GEMM", r"_w4a8_gemm_kernel"),
    ("int4 unpack", r"_int4_unpack_kernel"),
    ("activation quant kernel (FFN down: + GELU)", r"_act_quant_kernel"),
    ("sparse attention (ours)", r"_block_sparse_attention_fwd"),
    ("residual cache step", r"_residual_cache_step_kernel"),
    ("layout build", r"_block_scores_kernel"),
    ("flex attention", r"flex_attention|triton_tem_fused"),
    # Inductor names its kernels after the ops they fuse ("..._w4a8_gemm_7" is a quantization feeding our GEMM).
    ("Inductor fused (norms, rope, modulation, act quant, GELU)", r"^triton_"),
    ("dense SDPA (cross attn; self attn on refresh)", r"flash|fmha|cudnn|attention"),
    ("fp8 / bf16 GEMM (cuBLAS)", r"gemm|nvjet|sm90_xmma|cutlass|scaled_mm"),
]


def profile_forward(call: Callable[[], Any], device: str, table: Path, repeats: int = 3) -> dict[str, float]:
    """GPU ms per forward by kernel category, plus the wall time and the idle gap between kernels.

    The profiler's own table (top kernels by GPU time) goes to ``table``."""
    from torch.profiler import ProfilerActivity, profile

    if device != "cuda":
        return {}
    with torch.no_grad():
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - start) * 1e3 / repeats
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        category = next((c for c, pattern in KERNEL_CATEGORIES if re.search(pattern, event.name)), "other kernels")
        totals[category] = totals.get(category, 0.0) + event.time_range.elapsed_us() / 1e3 / repeats
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
    busy = sum(totals.values())
    totals = {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    totals["kernels total"] = round(busy, 3)
    totals["wall (profiled)"] = round(wall_ms, 3)
    totals["idle / launch gaps"] = round(max(wall_ms - busy, 0.0), 3)
    return totals


def runtime_schedule_counts(steps: int) -> tuple[int, int]:
    from qsparse_compiler.config import CacheConfig

    schedule = CacheConfig(enabled=True, **CACHE)
    refresh = sum(schedule.is_refresh_step(i) for i in range(steps))
    return refresh, steps - refresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="wan-1.3b-480p", choices=sorted(WORKLOADS))
    parser.add_argument("--rows", default="eager,inductor,fp8,flex-fp8,qsparse")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/e2e.json"))
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="also profile each row: GPU ms per kernel category in the JSON, kernel tables in DIR")
    parser.add_argument("--qsparse-options", default=json.dumps(QSPARSE_OPTIONS), help="backend options (JSON)")
    parser.add_argument("--cache", default=json.dumps(CACHE),
                        help='residual-cache schedule of the qsparse rows (JSON), e.g. \'{"order": 1, "storage": "fp8_e4m3"}\' '
                             "(fields of qsparse_compiler.config.CacheConfig; the given ones replace the default's)")
    parser.add_argument("--plot", type=Path, metavar="JSON", help="only draw the bar chart of a results JSON")
    args = parser.parse_args()
    if args.plot is not None:
        print(f"wrote {plot_results(args.plot)}")
        return
    QSPARSE_OPTIONS.clear()
    QSPARSE_OPTIONS.update(json.loads(args.qsparse_options))
    CACHE.update(json.loads(args.cache))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    workload = WORKLOADS[args.workload]
    eager_model, inputs = build(workload, args.device, dtype)
    with torch.no_grad():
        eager_out = eager_model(**inputs)[0]
    del eager_model
    gc.collect()
    meta = {
        "workload": args.workload, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "density": args.density, "date": time.strftime("%Y-%m-%d"),
    }
    rows: list[Row] = []
    for name in args.rows.split(","):
        try:
            rows += run_row(name, workload, args.device, dtype, eager_out, args.density, args.profile)
        except Exception as exc:  # a failing baseline is recorded, not hidden
            rows.append(Row(name, float("nan"), 0.0, 0.0, float("nan"), note=f"failed: {type(exc).__name__}: {exc}"[:300]))
        torch._dynamo.reset()
        write_results(args.out, meta, rows)  # after every row: a time limit keeps what finished


def plot_results(json_path: Path) -> Path:
    """Bar chart (ms per forward, lower is better) of the rows of a results JSON, next to it as .png."""
    from qsparse_compiler.testing.plots import bar_plot

    data = json.loads(json_path.read_text())
    values = {r["system"]: r["ms"] for r in data["rows"] if r["ms"] == r["ms"]}
    meta = data["meta"]
    return bar_plot(values, json_path.with_suffix(".png"), size=(900, 440),
                    title=f"ms per forward (lower is better): {meta['workload']} on {meta['device']}, "
                          f"torch {meta['torch']}, {meta['date']}")


def write_results(out: Path, meta: dict[str, Any], rows: list[Row]) -> None:
    inductor = next((r.ms for r in rows if r.system == "inductor"), None)
    for row in rows:
        row.speedup_vs_inductor = inductor / row.ms if inductor and row.ms == row.ms else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"\n{meta}")
    print("| system | ms/forward | vs Inductor | compile s | peak GiB | block weights MiB | rel. error vs eager | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mib = f"{r.block_weight_bytes / 2**20:.0f}" if r.block_weight_bytes else "-"
        speed = f"{r.speedup_vs_inductor:.2f}x" if r.speedup_vs_inductor else "-"
        print(f"| {r.system} | {r.ms:.1f} | {speed} | {r.compile_s:.0f} | {r.peak_gib:.1f} | {mib} | "
              f"{r.rel_error_vs_eager:.3g} | {r.note} |", flush=True)
    for r in rows:
        if r.profile:
            print(f"\nprofile of {r.system} (GPU ms per forward): " + ", ".join(f"{k} {v}" for k, v in r.profile.items()))


if __name__ == "__main__":
    main()
