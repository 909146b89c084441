"""W4A8 linear vs bf16 / torchao fp8 rowwise / torchao int4 weight-only at video-DiT shapes (needs CUDA).

    python benchmarks/bench_linear.py --out benchmarks/results/w4a8_linear.json [--sweep] [--shapes all|headline]

For each linear shape of Wan-1.3B and a 14B-class model at M = 32,760 tokens it times (median ms of
triton.testing.do_bench, inputs bf16):
  bf16            F.linear (cuBLAS)
  torchao_fp8     Float8DynamicActivationFloat8WeightConfig(PerRow) under torch.compile (activation quant included)
  torchao_int4wo  Int4WeightOnlyConfig(group_size=128) with every packing format that works here
  ours_*          qsparse: Triton activation quant + Triton W4A8 GEMM (fp8 or int8 MMA, group 128 or per-channel)
and reports TFLOP/s (2MNK / time) and SQNR of each output vs the bf16 output. ``--sweep`` also times every
GEMM config on the headline shape and records what the compiler made of it (registers, spills, shared memory,
wgmma instructions and their types in the PTX), and saves the PTX/TTGIR of the fastest fp8 config.
Writes JSON (--out) and a markdown table next to it (.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [  # (name, K, N); the headline shape first, so a cut-short run still has it
    ("wan1.3b ffn_up 1536->8960", 1536, 8960),
    ("wan1.3b qkvo 1536->1536", 1536, 1536),
    ("wan1.3b ffn_down 8960->1536", 8960, 1536),
    ("14b qkvo 5120->5120", 5120, 5120),
    ("14b ffn_up 5120->13824", 5120, 13824),
    ("14b ffn_down 13824->5120", 13824, 5120),
]
HEADLINE = ("wan1.3b ffn_up 1536->8960", 1536, 8960)
M_TOKENS = 32760


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    return float(10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum().clamp_min(1e-30)))


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def inspect_compiled(k) -> dict:
    """What the compiler made of one GEMM config: resources and the MMA instructions in the PTX."""
    ptx = k.asm.get("ptx", "")
    ttgir = k.asm.get("ttgir", "")
    info = {
        "n_regs": getattr(k, "n_regs", None),
        "n_spills": getattr(k, "n_spills", None),
        "shared_bytes": getattr(k.metadata, "shared", None),
        "wgmma_ptx": len(re.findall(r"wgmma\.mma_async", ptx)),
        "wgmma_types": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.(\w+)\.(\w+)\.(\w+)", ptx))),
        "mma_sync_ptx": len(re.findall(r"\bmma\.sync", ptx)),
        "prmt_ptx": len(re.findall(r"\bprmt\.b32", ptx)),
        "cvt_e4m3_ptx": len(re.findall(r"cvt\.rn\.satfinite\.e4m3x2", ptx)),
        "ttgir_warp_group_dot": ttgir.count("warp_group_dot"),
        "ttgir_dot_wait": ttgir.count("warp_group_dot_wait"),
        "ttgir_wait_pendings": re.findall(r"pendings = (\d+)", ttgir),  # 1 in the loop = MMA overlaps the next step
        "ttgir_local_alloc": ttgir.count("local_alloc"),
        "ttgir_async_copy": ttgir.count("async_copy_global_to_local"),
        "ldl_stl_sass": None,
    }
    cubin = k.asm.get("cubin")
    if cubin:
        try:
            path = Path("/tmp/w4a8_k.cubin")
            path.write_bytes(cubin)
            sass = subprocess.run(["cuobjdump", "-sass", str(path)], capture_output=True, text=True, timeout=60).stdout
            info["ldl_stl_sass"] = len(re.findall(r"\b(LDL|STL)\b", sass))
            info["qgmma_sass"] = len(re.findall(r"\bQGMMA\b", sass))
            info["igmma_sass"] = len(re.findall(r"\bIGMMA\b", sass))
            info["hgmma_sass"] = len(re.findall(r"\bHGMMA\b", sass))
            info["prmt_sass"] = len(re.findall(r"\bPRMT\b", sass))
            info["i2f_f2f_sass"] = len(re.findall(r"\b(I2F|F2F|F2FP)\S*", sass))
            info["_sass"] = sass
        except Exception as e:  # cuobjdump missing: the PTX counts still say which MMA was used
            info["sass_error"] = repr(e)
    return info


def ours_fn(x, pw, bias, group_size, act_format, chunk=0, pre_unpack=False, rescale=None):
    from qsparse_compiler.kernels.act_quant import act_quant
    from qsparse_compiler.kernels.int4_unpack import unpack_int4_to_mma
    from qsparse_compiler.kernels.w4a8_gemm import w4a8_gemm

    def run():
        if pre_unpack:  # the per-call weight unpack is part of the measured time
            codes, scale = act_quant(x, act_format)
            w8 = unpack_int4_to_mma(pw.qweight, act_format)
            return w4a8_gemm(codes, scale, pw.qweight, pw.scale, bias, group_size, x.dtype, w_unpacked=w8,
                             rescale=rescale)
        codes, scale = act_quant(x, act_format, chunk=chunk)
        return w4a8_gemm(codes, scale, pw.qweight, pw.scale, bias, group_size, x.dtype, a_chunk=chunk,
                         rescale=rescale)

    return run


def torchao_linear(w, bias, config):
    import torch.nn as nn
    from torchao.quantization import quantize_

    lin = nn.Linear(w.shape[1], w.shape[0], bias=True, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
    quantize_(lin, config)
    return lin


def run_sweep(x, w, bias, results, out_dir):
    """Every config x unpack variant on the headline shape, GEMM only, plus compiler facts per config."""
    from qsparse_compiler.kernels.act_quant import act_quant
    from qsparse_compiler.kernels.w4a8_gemm import GEMM_CONFIGS, SPLIT_CHUNK, w4a8_gemm
    from qsparse_compiler.formats.quantization import quantize_weight_int4

    m, k = x.shape
    n = w.shape[0]
    flops = 2.0 * m * n * k
    rows = []
    best = {}
    # (act format, PTX unpack, group, A_SPLIT layout, which configs)
    plan = [
        ("fp8_e4m3", True, 128, True, "all"), ("int8", False, 128, True, "all"),
        ("fp8_e4m3", True, 128, False, "noswap"), ("int8", False, 128, False, "noswap"),
        ("fp8_e4m3", False, 128, False, "two"),
        ("fp8_e4m3", True, 0, True, "all"), ("int8", False, 0, True, "all"),
    ]
    pws = {g: quantize_weight_int4(w, g) for g in (128, 0)}
    codes_cache = {}
    for fmt, asm, group_size, split, which in plan:
        pw = pws[group_size]
        chunk = SPLIT_CHUNK if split else 0
        if (fmt, chunk) not in codes_cache:
            codes_cache[(fmt, chunk)] = act_quant(x, fmt, chunk=chunk)
        codes, scale = codes_cache[(fmt, chunk)]
        for cfg in GEMM_CONFIGS:
            kw = cfg.kwargs
            if kw["BM"] < 64 or (group_size and group_size % kw["BK"]) or (split and kw["BK"] != SPLIT_CHUNK):
                continue
            if which == "two" and not (kw["BM"] == 128 and kw["BK"] == 128 and not kw["SWAP_AB"]
                                       and (kw["BN"], cfg.num_warps) in ((256, 8), (128, 8))):
                continue
            if which == "noswap" and kw["SWAP_AB"]:
                continue
            if group_size and kw["SWAP_AB"] and kw["BM"] * kw["BN"] > 128 * 128:
                continue  # spills with the second accumulator (see prune_configs)
            if group_size == 0 and kw["BK"] != 128:
                continue
            name = (f"{fmt}{'-asm' if asm else ''}{'-split' if split else ''} g{group_size} BM{kw['BM']} BN{kw['BN']} "
                    f"BK{kw['BK']} w{cfg.num_warps} s{cfg.num_stages}{' swap' if kw['SWAP_AB'] else ''}")
            row = {"variant": name, "act_format": fmt, "unpack_asm": asm, "group_size": group_size, "a_split": split,
                   **kw, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}

            def call(comp=None):
                return w4a8_gemm(codes, scale, pw.qweight, pw.scale, bias, group_size, x.dtype, unpack_asm=asm,
                                 config=cfg, compiled_out=comp, a_chunk=chunk)

            try:
                comp = []
                call(comp)
                ms = bench_ms(call)
                info = inspect_compiled(comp[0])
                sass = info.pop("_sass", None)
                row.update(ms=ms, tflops=flops / ms / 1e9, **info)
                key = (fmt, asm, group_size)
                if key not in best or ms < best[key][0]:
                    best[key] = (ms, comp[0], sass, name)
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {str(e)[:400]}")
            rows.append(row)
            print(f"  sweep {name:66s} {row.get('ms', float('nan')):8.3f} ms  regs={row.get('n_regs')} "
                  f"spills={row.get('n_spills')} smem={row.get('shared_bytes')} wgmma={row.get('wgmma_ptx')} "
                  f"{row.get('wgmma_types', '')} ldl/stl={row.get('ldl_stl_sass')} {row.get('error', '')}", flush=True)
    results["sweep"] = rows
    results["sweep_best"] = {f"{k[0]}{'-asm' if k[1] else ''} g{k[2]}": v[3] + f" {v[0]:.3f} ms" for k, v in best.items()}
    if out_dir is not None:
        for (fmt, asm, g), (ms, comp, sass, name) in best.items():
            if g != 128 or fmt != "fp8_e4m3" or not asm:
                continue
            (out_dir / "w4a8_best_fp8.ttgir").write_text(comp.asm.get("ttgir", ""))
            (out_dir / "w4a8_best_fp8.ptx").write_text(comp.asm.get("ptx", ""))
            if sass:
                (out_dir / "w4a8_best_fp8.sass").write_text(sass)
        for (fmt, asm, g), (ms, comp, sass, name) in best.items():
            if g == 128 and fmt == "int8" and sass:
                (out_dir / "w4a8_best_int8.sass").write_text(sass)


def run_shape(name, k, n, m, results, with_torchao=True, with_int4=True, sweep=False, out_dir=None, msfp=True):
    from qsparse_compiler.kernels.act_quant import act_quant
    from qsparse_compiler.formats.quantization import quantize_weight_int4

    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device=dev) * k**-0.5).to(torch.bfloat16)
    bias = (torch.randn(n, device=dev) * 0.1).to(torch.bfloat16)
    flops = 2.0 * m * n * k
    ref = F.linear(x, w, bias)
    rows = []

    def add(method, fn, note="", compare=True, against=None):
        row = {"shape": name, "M": m, "K": k, "N": n, "method": method, "note": note}
        try:
            with torch.no_grad():
                out = fn()
                ms = bench_ms(fn)
            row.update(ms=ms, tflops=flops / ms / 1e9)
            if compare:
                row["sqnr_vs_bf16_db"] = sqnr_db(out, ref if against is None else against)
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
        print(f"{name:30s} {method:34s} {row.get('ms', float('nan')):9.3f} ms {row.get('tflops', float('nan')):7.1f} TFLOP/s "
              f"SQNR {row.get('sqnr_vs_bf16_db', float('nan')):6.2f} dB {row.get('error', '')}", flush=True)

    add("bf16 F.linear", lambda: F.linear(x, w, bias))
    if sweep:  # first, so the autotuned runs below reuse the kernels compiled here
        run_sweep(x, w, bias, results, out_dir)
    if with_torchao:
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

            lin8 = torchao_linear(w, bias, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
            f8 = torch.compile(lin8, dynamic=False)
            add("torchao fp8 rowwise (compiled)", lambda: f8(x))
        except Exception as e:
            rows.append({"shape": name, "method": "torchao fp8 rowwise (compiled)", "error": repr(e)[:300]})
    if with_int4:
        from torchao.quantization import Int4WeightOnlyConfig

        for fmt in ("tile_packed_to_4d", "plain", "preshuffled"):
            try:
                lin4 = torchao_linear(w, bias, Int4WeightOnlyConfig(group_size=128, int4_packing_format=fmt))
                add(f"torchao int4 weight-only ({fmt})", lambda: lin4(x))
            except Exception as e:
                rows.append({"shape": name, "method": f"torchao int4 weight-only ({fmt})", "error": repr(e)[:300]})
                print(f"{name:30s} torchao int4wo {fmt}: {type(e).__name__}: {str(e)[:160]}", flush=True)

    for group_size in (128, 0):
        pw = quantize_weight_int4(w, group_size)
        for fmt in ("fp8_e4m3", "int8"):
            for chunk in ((0, 128) if sweep else (128,)):
                add(f"ours {fmt} g{group_size}{' split' if chunk else ''} (quant+gemm)",
                    ours_fn(x, pw, bias, group_size, fmt, chunk),
                    note=f"weights {pw.nbytes / 2**20:.1f} MiB vs bf16 {w.numel() * 2 / 2**20:.1f} MiB")
            add(f"ours {fmt} g{group_size} pre-unpacked (quant+unpack+gemm)",
                ours_fn(x, pw, bias, group_size, fmt, pre_unpack=True))
            if fmt == "fp8_e4m3" and group_size and msfp:  # the grouped-fp8 accumulator choice, on two shapes
                add(f"ours {fmt} g{group_size} split, two accumulators (rescale=False)",
                    ours_fn(x, pw, bias, group_size, fmt, 128, rescale=False))
                add(f"ours {fmt} g{group_size} pre-unpacked, two accumulators (rescale=False)",
                    ours_fn(x, pw, bias, group_size, fmt, pre_unpack=True, rescale=False))
    from qsparse_compiler.kernels.int4_unpack import unpack_int4_to_mma

    for fmt in ("fp8_e4m3", "int8"):
        add(f"int4 -> {fmt} weight unpack only", lambda fmt=fmt: unpack_int4_to_mma(pw.qweight, fmt), compare=False,
            note="TFLOP/s column meaningless")
    if not msfp:
        for fmt in ("fp8_e4m3", "int8"):
            add(f"act_quant {fmt} only", lambda fmt=fmt: act_quant(x, fmt)[0], note="TFLOP/s column meaningless", compare=False)
        results["rows"].extend(rows)
        return x, w, bias
    # MSFP (item 5): is an asymmetric per-token uint8 format free? Inputs after GELU (near non-negative).
    from qsparse_compiler.kernels.act_quant import act_quant_asym
    from qsparse_compiler.kernels.w4a8_gemm import w4a8_gemm
    from qsparse_compiler.ops.w4a8_cuda import w4a8_linear_cuda, weight_row_sums

    xg = F.gelu(x.float() * 2).to(torch.bfloat16)
    refg = F.linear(xg, w, bias)
    pw = quantize_weight_int4(w, 128)
    for fmt in ("int8", "fp8_e4m3", "uint8_msfp"):
        add(f"GELU input: ours {fmt} g128 (op glue)", lambda fmt=fmt: w4a8_linear_cuda(xg, pw.qweight, pw.scale, bias, 128, fmt),
            note="SQNR vs bf16 linear of the same GELU input", against=refg)
    c8, s8 = act_quant(xg, "int8")
    cu, su, zu = act_quant_asym(xg)
    wsum = weight_row_sums(pw.qweight, pw.scale, 128)
    add("GEMM only int8 g128", lambda: w4a8_gemm(c8, s8, pw.qweight, pw.scale, bias, 128, x.dtype), compare=False)
    add("GEMM only uint8+zero (MSFP) g128", lambda: w4a8_gemm(cu, su, pw.qweight, pw.scale, bias, 128, x.dtype, a_zero=zu, wsum=wsum), compare=False)
    add("weight_row_sums (per call, torch)", lambda: weight_row_sums(pw.qweight, pw.scale, 128), compare=False, note="TFLOP/s column meaningless")
    add("act_quant uint8_msfp only", lambda: act_quant_asym(xg)[0], compare=False, note="TFLOP/s column meaningless")
    for fmt in ("fp8_e4m3", "int8"):
        add(f"act_quant {fmt} only", lambda fmt=fmt: act_quant(x, fmt)[0], note="TFLOP/s column meaningless", compare=False)
    results["rows"].extend(rows)
    return x, w, bias


def run_inspect(m, k, n, results):
    """What Triton made of the main variants (headline shape, pinned tiles): MMA instructions, waits, resources."""
    from qsparse_compiler.kernels.act_quant import act_quant
    from qsparse_compiler.kernels.int4_unpack import unpack_int4_to_mma
    from qsparse_compiler.kernels.w4a8_gemm import _cfg, w4a8_gemm
    from qsparse_compiler.formats.quantization import quantize_weight_int4

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
    rows = []
    for name, fmt, g, mode, cfg in [
        ("fp8 g0 pre-unpacked 128x256x128 s3", "fp8_e4m3", 0, "pre", _cfg(128, 256, 128, 8, 3)),
        ("fp8 g128 rescale pre-unpacked 128x256x128 s3", "fp8_e4m3", 128, "pre", _cfg(128, 256, 128, 8, 3)),
        ("fp8 g128 rescale split swap 128x128x128 s4", "fp8_e4m3", 128, "split", _cfg(128, 128, 128, 8, 4, swap=True)),
        ("int8 g0 pre-unpacked 128x256x128 s3", "int8", 0, "pre", _cfg(128, 256, 128, 8, 3)),
        ("int8 g128 split swap 128x128x128 s4", "int8", 128, "split", _cfg(128, 128, 128, 8, 4, swap=True)),
    ]:
        pw = quantize_weight_int4(w, g)
        comp = []
        try:
            if mode == "pre":
                codes, scale = act_quant(x, fmt)
                w4a8_gemm(codes, scale, pw.qweight, pw.scale, None, g, x.dtype, config=cfg, compiled_out=comp,
                          w_unpacked=unpack_int4_to_mma(pw.qweight, fmt))
            else:
                codes, scale = act_quant(x, fmt, chunk=128)
                w4a8_gemm(codes, scale, pw.qweight, pw.scale, None, g, x.dtype, config=cfg, compiled_out=comp, a_chunk=128)
            info = inspect_compiled(comp[0])
            info.pop("_sass", None)
            rows.append({"variant": name, **info})
        except Exception as e:
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print("inspect", rows[-1], flush=True)
    results["inspect"] = rows


def write_markdown(results, path: Path) -> None:
    lines = [f"# W4A8 linear benchmark", "", f"{results['env']}", "", f"command: `{results['command']}`", "",
             "| shape | method | ms | TFLOP/s | SQNR vs bf16 (dB) | note |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['method']} | error | | | {r['error'][:120]} |")
        else:
            s = r.get("sqnr_vs_bf16_db")
            lines.append(f"| {r['shape']} | {r['method']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                         f"{'' if s is None else f'{s:.1f}'} | {r.get('note', '')} |")
    if results.get("sweep"):
        lines += ["", "## GEMM config sweep (headline shape, GEMM only, no activation quant)", "",
                  "| variant | ms | TFLOP/s | regs | spills | smem | wgmma (PTX) | types | LDL/STL |", "|---|---|---|---|---|---|---|---|---|"]
        for r in results["sweep"]:
            if "error" in r:
                lines.append(f"| {r['variant']} | error | | | | | | | {r['error'][:100]} |")
            else:
                lines.append(f"| {r['variant']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['n_regs']} | {r['n_spills']} | "
                             f"{r['shared_bytes']} | {r['wgmma_ptx']} | {r['wgmma_types']} | {r.get('ldl_stl_sass')} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/w4a8_linear.json")
    p.add_argument("--shapes", choices=("all", "headline"), default="all")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--no-torchao", action="store_true")
    p.add_argument("--no-int4", action="store_true")
    p.add_argument("--inspect", action="store_true")
    p.add_argument("--int4-shapes", choices=("all", "headline"), default="all")
    p.add_argument("--m", type=int, default=M_TOKENS)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_linear.py needs a CUDA GPU (run it on the device machine)")
    import triton

    try:
        import torchao

        tao = torchao.__version__
    except Exception:
        tao = "not installed"
    env = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {torch.cuda.get_device_name()}, "
           f"torch {torch.__version__}, triton {triton.__version__}, torchao {tao}, python {platform.python_version()}")
    print(env, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"env": env, "command": " ".join(["python"] + sys.argv), "rows": []}
    shapes = SHAPES if args.shapes == "all" else [HEADLINE]
    for name, k, n in shapes:
        sweep = args.sweep and (name, k, n) == HEADLINE
        int4 = not args.no_int4 and (args.int4_shapes == "all" or (name, k, n) == HEADLINE)
        msfp = (name, k, n) == HEADLINE
        x, w, bias = run_shape(name, k, n, args.m, results, not args.no_torchao, int4, sweep, out.parent, msfp)
        del x, w, bias
        torch.cuda.empty_cache()
        if args.inspect and (name, k, n) == HEADLINE:
            run_inspect(args.m, k, n, results)
        out.write_text(json.dumps(results, indent=1, default=str))  # partial results survive a timeout
        write_markdown(results, out.with_suffix(".md"))
    out.write_text(json.dumps(results, indent=1, default=str))
    write_markdown(results, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
