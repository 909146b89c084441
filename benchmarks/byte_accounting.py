"""Byte accounting of the memory-bound kernels of a qsparse reuse step (issue #19, item 1).

Two tables, one per question:

1. **What the math needs** (`minimum_bytes`, no GPU): per Wan block, every memory-bound stage of the reuse step
   between the GEMMs and the attentions - the adaptive norms with their modulation and activation quantization, q/k
   RMS norm + rotary embedding, the quantization of the attention outputs, the gated residual adds, FFN GELU +
   quantization, the residual cache's step - with the bytes it must read and write (a) as one pass of its own, each
   input read once and each output written once, with the data formats the rewrite uses today (activations bf16,
   8-bit codes + an fp32 scale per token), and (b) folded into the neighbouring GEMM or attention where that is
   possible (a gated residual add in the GEMM's epilogue reads the residual and writes the sum, and the GEMM's own
   output never reaches memory; GELU + quantization in the FFN-up GEMM's epilogue writes only the 8-bit codes).
   Row-wise norms stay one pass in (b): a norm over all heads does not fit a GEMM tile. (Applying it where q and k
   are read - statistics as a GEMM side output, norm and rope in the attention's prologue - would remove that pass
   too; not counted.)
   Totals per forward and the time they take at a card's bandwidth.

2. **What the compiled graph moves** (`--device cuda`): the qsparse reuse step of the workload compiled as
   bench_e2e.py's qsparse row is, once under torch.profiler (GPU ms per kernel name and calls per forward), then
   recompiled with Inductor's ``profile_bandwidth`` (each generated Triton kernel carries Inductor's count of the
   bytes it reads and writes, ``kernel_num_gb``, and is timed once on its own). Each kernel is mapped to a stage of
   table 1 by the ops its name says it fuses (``KERNEL_STAGES``); the join says, stage by stage, how far each
   kernel is from the bytes the math needs and from the card's bandwidth - which fusions pay.

    python benchmarks/byte_accounting.py --workload wan-1.3b-480p --out bytes.json        # on the GPU: both tables
    python benchmarks/byte_accounting.py --workload wan-1.3b-480p --device cpu --out b.json  # table 1 only

Only Wan's block structure is modelled in table 1 (``WanTransformerBlock``: self-attention with q/k RMS norm across
heads and rope, cross-attention over the text, FFN with GELU(tanh), adaLN modulation with gates); another model is
refused with that reason.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

_BENCH_E2E = Path(__file__).with_name("bench_e2e.py")

# HBM bandwidth by card (datasheet), bytes/s: the floor's denominator.
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}

ACT_BYTES = 2  # bf16 activations
CODE_BYTES = 1  # fp8 e4m3 / int8 codes
SCALE_BYTES = 4  # one fp32 scale per token


@dataclass
class Stage:
    name: str
    what: str
    one_pass_bytes: int  # per block, as a pass of its own
    fused_bytes: int  # per block, folded into a neighbouring GEMM / attention where possible
    fused_how: str


def _load_bench_e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e", _BENCH_E2E)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def minimum_bytes(workload: dict[str, Any], cache_order: int) -> list[Stage]:
    """Table 1: the memory-bound stages of one Wan block's reuse step and the bytes each must move."""
    if workload["model"] != "wan":
        raise ValueError(f"byte accounting models Wan's block only; workload model {workload['model']!r} is not "
                         "modelled (add its stages to minimum_bytes)")
    from qsparse_compiler.ops.context import patchified_grid

    config = workload["config"]
    batch = workload["latents"][0]
    tokens = batch * int(torch.tensor(patchified_grid(config, workload["latents"])).prod())
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    ffn = config["ffn_dim"]
    head_dim = config["attention_head_dim"]
    act = tokens * dim * ACT_BYTES  # one bf16 (tokens, dim) tensor
    quantized = tokens * dim * CODE_BYTES + tokens * SCALE_BYTES  # its 8-bit codes + per-token scales
    rope_tables = 2 * tokens // batch * head_dim * 4  # cos and sin, fp32, shared by the batch
    residual_state = cache_order * act  # R (and dR for order 2)
    return [
        Stage("norm1 + modulation + quant", "x -> LayerNorm, x*(1+scale)+shift, 8-bit codes for q/k/v GEMMs",
              act + quantized, act + quantized, "one pass (the LayerNorm needs the whole row)"),
        Stage("q/k RMS norm + rope", "q, k -> RMS norm across heads, rotary embedding",
              4 * act + rope_tables, 4 * act + rope_tables,
              "one pass over q and k (the norm spans all heads: not in a 128-wide GEMM tile)"),
        Stage("residual cache step", f"O = O_sparse + R{' + steps*dR' if cache_order == 2 else ''}",
              2 * act + residual_state, residual_state, "in the sparse attention's epilogue"),
        Stage("attention output quant", "O -> 8-bit codes for the o-projection", act + quantized, act + quantized,
              "one pass (a per-token scale spans all heads)"),
        Stage("self-attn gated residual", "x + gate * o_proj(O)", 3 * act, 2 * act, "o-projection GEMM epilogue"),
        Stage("norm2 + quant", "x -> LayerNorm (affine), 8-bit codes for the cross-attention q GEMM",
              act + quantized, act + quantized, "one pass"),
        Stage("cross q RMS norm", "q -> RMS norm across heads (the text k is 512 rows: not counted)", 2 * act, 2 * act,
              "one pass (as q/k above)"),
        Stage("cross-attn output quant", "O -> 8-bit codes", act + quantized, act + quantized, "one pass"),
        Stage("cross-attn residual", "x + o_proj(O)", 3 * act, 2 * act, "o-projection GEMM epilogue"),
        Stage("norm3 + modulation + quant", "x -> LayerNorm, modulation, 8-bit codes for FFN up",
              act + quantized, act + quantized, "one pass"),
        Stage("FFN GELU + quant", "h -> GELU(tanh), 8-bit codes for FFN down",
              tokens * ffn * ACT_BYTES + tokens * ffn * CODE_BYTES + tokens * SCALE_BYTES,
              tokens * ffn * CODE_BYTES + tokens * SCALE_BYTES,
              "FFN-up GEMM epilogue (per-token scale from a row-amax side output)"),
        Stage("FFN gated residual", "x + gate * ffn_down(h)", 3 * act, 2 * act, "FFN-down GEMM epilogue"),
    ]


# Inductor and library kernel names -> the stage of table 1 they implement (first match wins). Inductor names a
# kernel after the ops it fuses; the patterns are those of the H200 profile of workload W's reuse step
# (benchmarks/results/h200/profile/wan480p_qsparse_reuse_step.txt).
KERNEL_STAGES: list[tuple[str, str]] = [
    ("q/k RMS norm + rope", r"rms_norm.*(slice|unbind|sub)|rope"),
    ("cross q RMS norm", r"rms_norm"),
    ("norm + modulation + quant (norm1/norm3)", r"native_layer_norm.*(amax|mul)|amax.*native_layer_norm"),
    ("FFN GELU + quant", r"_act_quant_kernel|gelu"),
    ("attention output quant", r"amax"),
    ("residual cache step", r"_residual_cache_step_kernel"),
    ("gated residual adds", r"^triton_poi_fused.*add"),
    ("sparse attention", r"_block_sparse_attention_fwd"),
    ("GEMM", r"gemm|nvjet|sm90_xmma|cutlass|scaled_mm"),
    ("cross attention (SDPA)", r"flash|fmha|cudnn|attention"),
]


def stage_of(kernel: str) -> str:
    return next((stage for stage, pattern in KERNEL_STAGES if re.search(pattern, kernel)), "other")


def profile_kernels(call, repeats: int = 3) -> dict[str, dict[str, float]]:
    """GPU ms per forward and calls per forward of every kernel name (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                call()
            torch.cuda.synchronize()
    kernels: dict[str, dict[str, float]] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = kernels.setdefault(event.name, {"ms_per_forward": 0.0, "calls_per_forward": 0.0})
        entry["ms_per_forward"] += event.time_range.elapsed_us() / 1e3 / repeats
        entry["calls_per_forward"] += 1 / repeats
    return kernels


def inductor_kernel_bytes(call) -> dict[str, dict[str, float]]:
    """GB per call and isolated ms per call of each Inductor-generated Triton kernel (``profile_bandwidth``)."""
    from torch._inductor.runtime import triton_heuristics

    start = len(triton_heuristics.collected_calls)
    with torch.no_grad():
        call()
        torch.cuda.synchronize()
    out: dict[str, dict[str, float]] = {}
    for ms, num_gb, _gb_per_s, name in triton_heuristics.collected_calls[start:]:
        out[name] = {"gb_per_call": float(num_gb), "isolated_ms_per_call": float(ms)}
    return out


def compiled_reuse_step(bench, workload: dict[str, Any], options: dict[str, Any], cache: dict[str, Any]):
    """bench_e2e's qsparse row: the model compiled regionally by qs.optimize, a refresh step run, and a callable that
    runs one reuse step."""
    import qsparse_compiler as qs

    model, inputs = bench.build(workload, "cuda", torch.bfloat16)
    fn_model = qs.optimize(model, options=options, cache=cache, regional=True)
    runtime = qs.runtime_of(fn_model)
    with torch.no_grad():
        runtime.step(0)
        fn_model(**inputs)
    qs.release_dense_weights(fn_model)

    def reuse_step():
        runtime.step(bench.REUSE_STEP)
        return fn_model(**inputs)

    return reuse_step


def measure(bench, workload: dict[str, Any], options: dict[str, Any], cache: dict[str, Any]) -> list[dict[str, Any]]:
    """Table 2: every kernel of one reuse forward with its stage, time, calls and (Inductor's) bytes."""
    step = compiled_reuse_step(bench, workload, options, cache)
    kernels = profile_kernels(step)
    del step
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    import torch._inductor.config as inductor_config

    inductor_config.profile_bandwidth = True  # kernels compiled from here on carry kernel_num_gb and are timed alone
    try:
        step = compiled_reuse_step(bench, workload, options, cache)
        step()  # the first call of each kernel benchmarks it; collected from the second forward on
        sizes = inductor_kernel_bytes(step)
    finally:
        inductor_config.profile_bandwidth = False
    rows = []
    for name, timing in sorted(kernels.items(), key=lambda kv: -kv[1]["ms_per_forward"]):
        size = sizes.get(name, {})
        gb = size.get("gb_per_call")
        ms_call = timing["ms_per_forward"] / max(timing["calls_per_forward"], 1e-9)
        rows.append({
            "kernel": name, "stage": stage_of(name), "ms_per_forward": round(timing["ms_per_forward"], 3),
            "calls_per_forward": round(timing["calls_per_forward"], 2), "ms_per_call": round(ms_call, 4),
            "gb_per_call": None if gb is None else round(gb, 4),
            "tb_per_s": None if gb is None else round(gb / ms_call, 3),  # GB/ms = TB/s
        })
    return rows


def write_tables(out: Path, meta: dict[str, Any], stages: list[Stage], kernels: list[dict[str, Any]] | None,
                 blocks: int) -> str:
    lines = [f"Byte accounting, {meta['workload']}, reuse step ({meta['device']}, {meta['date']})", "",
             "Table 1: what the math needs per block (MB) and per forward (GB)", "",
             "| stage | what | one pass MB/block | fused MB/block | fused where |", "|---|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {s.name} | {s.what} | {s.one_pass_bytes / 1e6:,.0f} | {s.fused_bytes / 1e6:,.0f} | "
                     f"{s.fused_how} |")
    one_pass = sum(s.one_pass_bytes for s in stages) * blocks
    fused = sum(s.fused_bytes for s in stages) * blocks
    floors = ", ".join(f"{card} {one_pass / bw * 1e3:.1f} / {fused / bw * 1e3:.1f} ms" for card, bw in BANDWIDTH.items())
    lines += ["", f"Per forward ({blocks} blocks): one pass {one_pass / 1e9:.1f} GB, fused {fused / 1e9:.1f} GB; "
              f"at the bandwidth floor (one pass / fused): {floors}"]
    if kernels:
        lines += ["", "Table 2: the kernels of one compiled reuse forward, by stage", "",
                  "| stage | ms / forward | GB / forward (Inductor's count) | TB/s | kernels |", "|---|---|---|---|---|"]
        by_stage: dict[str, dict[str, float]] = {}
        for k in kernels:
            entry = by_stage.setdefault(k["stage"], {"ms": 0.0, "gb": 0.0, "n": 0, "counted_ms": 0.0})
            entry["ms"] += k["ms_per_forward"]
            entry["n"] += 1
            if k["gb_per_call"] is not None:
                entry["gb"] += k["gb_per_call"] * k["calls_per_forward"]
                entry["counted_ms"] += k["ms_per_forward"]
        for stage, e in sorted(by_stage.items(), key=lambda kv: -kv[1]["ms"]):
            rate = f"{e['gb'] / e['counted_ms']:.2f}" if e["counted_ms"] else "-"
            gb = f"{e['gb']:.1f}" if e["counted_ms"] else "- (library / own kernel)"
            lines.append(f"| {stage} | {e['ms']:.1f} | {gb} | {rate} | {e['n']} |")
        lines += ["", "| kernel | stage | ms / forward | calls | ms / call | GB / call | TB/s |",
                  "|---|---|---|---|---|---|---|"]
        for k in kernels[:40]:
            lines.append(f"| {k['kernel'][:90]} | {k['stage']} | {k['ms_per_forward']} | {k['calls_per_forward']} | "
                         f"{k['ms_per_call']} | {k['gb_per_call'] if k['gb_per_call'] is not None else '-'} | "
                         f"{k['tb_per_s'] if k['tb_per_s'] is not None else '-'} |")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "stages": [asdict(s) for s in stages], "kernels": kernels}, indent=2))
    out.with_suffix(".md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="wan-1.3b-480p")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/byte_accounting.json"))
    args = parser.parse_args()
    bench = _load_bench_e2e()
    if args.workload not in bench.WORKLOADS:
        parser.error(f"--workload {args.workload!r}: one of {', '.join(sorted(bench.WORKLOADS))}")
    workload = bench.WORKLOADS[args.workload]
    cache = dict(bench.CACHE)
    options = {**bench.QSPARSE_OPTIONS, "sparsity": {"density": 0.15}}
    stages = minimum_bytes(workload, cache["order"])
    meta = {"workload": args.workload, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (table 1 only)",
            "options": options, "cache": cache}
    kernels = measure(bench, workload, options, cache) if args.device == "cuda" else None
    print(write_tables(args.out, meta, stages, kernels, workload["config"]["num_layers"]))


if __name__ == "__main__":
    main()
