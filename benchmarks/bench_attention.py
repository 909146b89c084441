"""Block-sparse attention benchmark: ours vs FlexAttention (same layout) vs dense SDPA (flash backend).

    python benchmarks/bench_attention.py --out benchmarks/results/sparse_attention.json
    python benchmarks/bench_attention.py --sweep --out sweep.json     # launch-config sweep at 32,760 tokens
    python benchmarks/bench_attention.py --int8 --int8-sweep --densities 0.15 1.0 --patterns random \
        --out benchmarks/results/attention_int8.json                 # + the 8-bit kernels and the refresh rows

Shapes (bf16, B x H x S x D): 1x12x32,760x128 (Wan-1.3B 480p, grid 21x30x52), 1x12x75,600x128 (720p, 21x45x80),
1x40x32,760x128 (14B-class). Layouts use 128x128 tiles: "random" = per head, per query block, a uniformly random
set of key blocks with the diagonal kept (ceil-free: round(density * KVB) blocks per row, so every row does the same
work); "local3d" = the static 3D-local pattern (one layout for all heads). FlexAttention gets the identical layout
through ``BlockMask.from_kv_blocks`` twice: as partial blocks (mask_mod applied, the way the earlier baseline was
measured) and as full blocks (mask_mod skipped: Flex's fastest form). Each timing is the median of
``triton.testing.do_bench``; outputs are cross-checked (ours vs Flex, relative error) at every point.

Throughput "per computed block" counts 4 * D flops per attended (query, key) pair of the layout's tiles (tails
excluded), so 100%-density numbers compare directly with dense SDPA's.

``--int8`` adds, at every point, the 8-bit kernels (kernels/attention_int8_fp8.py; the dense entry point at density
1.0): "int8_fp8" times the kernel on pre-quantized inputs, "int8_fp8+quant_eager" / "int8_fp8+quant_compiled" add
the Q/K/V quantization as eager torch ops / as one torch.compile'd function (what Inductor makes of the recipe when
it sits in the graph), each with its SQNR against SDPA. At densities < 1 it also times a refresh step's dense
attention both ways (ops/refresh_attention.py): "refresh_complement_<precision>" = attention over the complement
tiles + the lse merge (the sparse part is already computed by the step) vs "refresh_dense_<precision>" (SDPA or the
dense 8-bit kernel), on pre-quantized inputs; "refresh_op_complement_<precision>" / "refresh_op_dense_<precision>"
are what qsparse::residual_attention's refresh calls on the new path (dense_from_sparse, complement cached with the
layout) and on the old one (a dense attention: SDPA or the 8-bit path), quantization of q/k/v included. The issue's
decision (#16 item 3) is refresh_op_complement vs refresh_op_dense at 1x12x32,760x128, density 0.15:

    python benchmarks/bench_attention.py --int8 --shapes wan1.3b-480p --densities 0.15 --patterns random \
        --no-flex --out benchmarks/results/refresh_complement.json

A one-pass kernel (O_sparse and O_dense from one sweep over every tile, two accumulators) has no row: its tile work
equals the complement path's (every tile once), it only saves the merge's elementwise pass, and on every reuse step
the sparse kernel would have to stay a separate kernel anyway. ``--int8-sweep`` times every 8-bit launch config at
1x12x32,760x128, dense and 15%.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton.jit decorates the kernels (import time)

from qsparse_compiler.kernels.block_sparse_attention import (  # noqa: E402
    CONFIGS,
    _autotuned,
    block_sparse_attention,
    keep_config,
)
from qsparse_compiler.kernels.attention_int8_fp8 import _autotuned as _int8_autotuned  # noqa: E402
from qsparse_compiler.formats.layout import bitmap_to_blocks, num_blocks  # noqa: E402
from qsparse_compiler.eval.metrics import sqnr_db  # noqa: E402
from qsparse_compiler.formats.patterns import TokenGrid, local_3d  # noqa: E402

SHAPES = {
    "wan1.3b-480p": dict(b=1, h=12, grid=(21, 30, 52), d=128),
    "wan1.3b-720p": dict(b=1, h=12, grid=(21, 45, 80), d=128),
    "14b-480p": dict(b=1, h=40, grid=(21, 30, 52), d=128),
}
SMOKE_SHAPE = dict(b=1, h=2, grid=(3, 7, 13), d=32)  # 273 tokens: tails in 128-token blocks (8-bit kernels: D >= 32)
BLOCK = 128


SMOKE = False  # --smoke: tiny shapes on CPU under TRITON_INTERPRET=1, to check this script before a GPU run
INT8 = False  # --int8: the 8-bit kernels' rows and the refresh rows at every point


def bench(fn, warmup=25, rep=100) -> float:
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def random_layout(b, h, s, density, device, seed=0):
    """Per (batch, head, query block): round(density * KVB) random key blocks, the diagonal always among them."""
    qb = kvb = num_blocks(s, BLOCK)
    keep = max(1, min(kvb, round(density * kvb)))
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(b, h, qb, kvb, generator=gen, device=device)
    scores.diagonal(dim1=-2, dim2=-1).fill_(2.0)
    chosen = scores.topk(keep, dim=-1).indices
    bitmap = torch.zeros(b, h, qb, kvb, dtype=torch.bool, device=device).scatter_(-1, chosen, True)
    return bitmap


def attended_pairs(bitmap: torch.Tensor, s: int) -> int:
    sizes = torch.full((bitmap.shape[-1],), BLOCK, dtype=torch.float64, device=bitmap.device)
    sizes[-1] = s - BLOCK * (bitmap.shape[-1] - 1)
    per_tile = sizes[:, None] * sizes[None, :]
    return int((bitmap.double() * per_tile).sum().item())


def flex_block_masks(kv_num, kv_idx, s):
    from torch.nn.attention.flex_attention import BlockMask

    def make(full: bool):
        kwargs = dict(BLOCK_SIZE=BLOCK)
        try:
            if full:
                return BlockMask.from_kv_blocks(
                    torch.zeros_like(kv_num), kv_idx, kv_num, kv_idx, seq_lengths=(s, s), **kwargs
                )
            return BlockMask.from_kv_blocks(kv_num, kv_idx, seq_lengths=(s, s), **kwargs)
        except TypeError:  # older signature without seq_lengths
            if full:
                return BlockMask.from_kv_blocks(torch.zeros_like(kv_num), kv_idx, kv_num, kv_idx, **kwargs)
            return BlockMask.from_kv_blocks(kv_num, kv_idx, **kwargs)

    return make(False), make(True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item())


class Recorder:
    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = {"meta": meta, "results": [], "sweep": [], "layout_build": [], "refresh": [], "int8_sweep": []}

    def add(self, section: str, row: dict) -> None:
        self.data[section].append(row)
        print(json.dumps(row), flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))


def run_shape(name, cfg, densities, patterns, rec: Recorder, flex_fn, with_flex=True):
    b, h, d = cfg["b"], cfg["h"], cfg["d"]
    frames, height, width = cfg["grid"]
    s = frames * height * width
    dev = "cpu" if SMOKE else "cuda"
    scale = 1 / math.sqrt(d)
    q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    shape = f"{b}x{h}x{s}x{d}"

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa():
        with sdpa_kernel([SDPBackend.MATH if SMOKE else SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    sdpa_out = sdpa()
    t_sdpa = bench(sdpa)
    sdpa_tflops = 4 * d * b * h * s * s / t_sdpa / 1e9
    rec.add("results", dict(shape=shape, name=name, impl="sdpa_flash_dense", density=1.0, pattern="dense", ms=t_sdpa,
                            tflops=sdpa_tflops))
    # torch's own backend choice (cuDNN on Hopper when available) is the stronger dense baseline: record it too.
    best_sdpa_tflops = sdpa_tflops
    for label, backends in (("sdpa_default_dense", None), ("sdpa_cudnn_dense", ["CUDNN_ATTENTION"])):
        if SMOKE:
            break
        try:
            def run_backend(backends=backends):
                if backends is None:
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)
                with sdpa_kernel([getattr(SDPBackend, x) for x in backends]):
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)

            other = run_backend()
            t = bench(run_backend)
            tf = 4 * d * b * h * s * s / t / 1e9
            best_sdpa_tflops = max(best_sdpa_tflops, tf)
            rec.add("results", dict(shape=shape, name=name, impl=label, density=1.0, pattern="dense", ms=t, tflops=tf,
                                    err_vs_flash=rel_err(other, sdpa_out)))
        except Exception as error:
            rec.add("results", dict(shape=shape, name=name, impl=label, density=1.0, pattern="dense",
                                    error=repr(error)[:300]))

    grid = TokenGrid(frames, height, width, s)
    for pattern in patterns:
        for density in densities:
            if pattern == "local3d" and density >= 1.0:
                continue  # identical to the dense random layout
            if pattern == "random":
                bitmap = random_layout(b, h, s, density, dev)
            else:
                bitmap = local_3d(grid, BLOCK, BLOCK, density)[None, None].to(dev)
            kv_num, kv_idx = bitmap_to_blocks(bitmap)
            actual = float(bitmap.float().mean().item())
            pairs = attended_pairs(bitmap, s) * (h if bitmap.shape[1] == 1 else 1) * (b if bitmap.shape[0] == 1 else 1)

            def ours():
                return block_sparse_attention(q, k, v, kv_num, kv_idx, BLOCK, BLOCK, scale)[0]

            out = ours()
            t_ours = bench(ours)
            row = dict(shape=shape, name=name, pattern=pattern, density=density, actual_density=actual)
            tf = 4 * d * pairs / t_ours / 1e9
            chosen = getattr(_autotuned, "best_config", None)
            rec.add("results", dict(row, impl="ours", ms=t_ours, tflops=tf, vs_sdpa_per_block=tf / sdpa_tflops,
                                    vs_best_sdpa_per_block=tf / best_sdpa_tflops,
                                    config=str(chosen) if chosen is not None and not SMOKE else None,
                                    err_vs_sdpa=rel_err(out, sdpa_out) if density >= 1.0 else None))
            if with_flex:
                partial, full = flex_block_masks(kv_num, kv_idx, s)
                for label, bm in (("flex_partial", partial), ("flex_full", full)):
                    try:
                        fout = flex_fn(q, k, v, block_mask=bm, scale=scale)
                        t = bench(lambda: flex_fn(q, k, v, block_mask=bm, scale=scale))
                        rec.add("results", dict(row, impl=label, ms=t, tflops=4 * d * pairs / t / 1e9,
                                                ours_speedup=t / t_ours, err_ours_vs_flex=rel_err(out, fout)))
                    except Exception as error:  # record and go on: one failing baseline must not end the run
                        rec.add("results", dict(row, impl=label, error=repr(error)[:300]))
            if INT8:
                run_int8_point(q, k, v, kv_num, kv_idx, density, row, pairs, sdpa_out, t_ours, rec)
            del kv_num, kv_idx, bitmap
    try:
        from qsparse_compiler.ops.dynamic_layout import dynamic_topk_blocks
    except ImportError:
        return
    for density in (0.15,):
        fn = lambda: dynamic_topk_blocks(q, k, BLOCK, BLOCK, density)  # noqa: E731
        fn()
        t = bench(fn)
        rec.add("layout_build", dict(shape=shape, name=name, what="dynamic_topk_blocks", density=density, ms=t))


@functools.lru_cache(maxsize=1)
def _quantizers():
    """(eager, compiled) Q/K/V quantization; one compiled function for the whole run (it recompiles per shape)."""
    from qsparse_compiler.ops.attention_quantization import quantize_attention_inputs

    def eager(q, k, v):
        x = quantize_attention_inputs(q, k, v)
        return (x.q_codes, x.q_scale, x.k_codes, x.k_scale, x.v_codes, x.v_scale, x.lse_shift)

    return eager, (eager if SMOKE else torch.compile(eager, dynamic=False))


def run_int8_point(q, k, v, kv_num, kv_idx, density, row, pairs, sdpa_out, t_bf16, rec: Recorder):
    """The 8-bit rows of one (shape, layout) point, and the refresh rows at densities < 1 (module docstring)."""
    from qsparse_compiler.kernels.attention_int8_fp8 import block_sparse_attention_int8_fp8, dense_attention_int8_fp8
    from qsparse_compiler.kernels.attention_merge import merge_attention_partials
    from qsparse_compiler.formats.complement import complement_blocks

    d = q.shape[-1]
    scale = 1 / math.sqrt(d)
    eager_quant, compiled_quant = _quantizers()
    args = compiled_quant(q, k, v)
    dense = density >= 1.0

    def kernel(args=args, layout=(kv_num, kv_idx)):
        if dense:
            return dense_attention_int8_fp8(*args, scale, None, 64, q.dtype)
        return block_sparse_attention_int8_fp8(*args, *layout, BLOCK, BLOCK, scale, None, 64, q.dtype)

    rows = (("int8_fp8", kernel), ("int8_fp8+quant_eager", lambda: kernel(eager_quant(q, k, v))),
            ("int8_fp8+quant_compiled", lambda: kernel(compiled_quant(q, k, v))))
    # Dense: against SDPA; sparse: against our bf16 kernel on the same layout.
    ref = sdpa_out if dense else block_sparse_attention(q, k, v, kv_num, kv_idx, BLOCK, BLOCK, scale)[0]
    for label, fn in rows:
        try:
            out, _ = fn()
            t = bench(fn)
            extra = {("sqnr_vs_sdpa_db" if dense else "sqnr_vs_bf16_kernel_db"): sqnr_db(out, ref)}
            chosen = getattr(_int8_autotuned, "best_config", None)
            rec.add("results", dict(row, impl=label, ms=t, tflops=4 * d * pairs / t / 1e9, vs_bf16_kernel=t_bf16 / t,
                                    config=str(chosen) if chosen is not None and not SMOKE else None, **extra))
        except Exception as error:
            rec.add("results", dict(row, impl=label, error=repr(error)[:300]))
    if dense:
        return
    # A refresh step's dense attention: complement tiles + merge (the step's sparse part exists) vs a dense pass.
    kv_num_c, kv_idx_c = complement_blocks(kv_num, kv_idx)
    out_s, lse_s = block_sparse_attention(q, k, v, kv_num, kv_idx, BLOCK, BLOCK, scale)
    out_s8, lse_s8 = kernel()

    def complement_bf16():
        out_c, lse_c = block_sparse_attention(q, k, v, kv_num_c, kv_idx_c, BLOCK, BLOCK, scale)
        return merge_attention_partials(out_s, lse_s, out_c, lse_c)

    def complement_int8():
        out_c, lse_c = block_sparse_attention_int8_fp8(*args, kv_num_c, kv_idx_c, BLOCK, BLOCK, scale, None, 64,
                                                       q.dtype)
        return merge_attention_partials(out_s8, lse_s8, out_c, lse_c)

    def sdpa_dense():
        return F.scaled_dot_product_attention(q, k, v, scale=scale), None

    def int8_dense():
        return dense_attention_int8_fp8(*args, scale, None, 64, q.dtype)

    # What qsparse::residual_attention's refresh runs, per precision, after the step's sparse attention: the new
    # path (ops/refresh_attention.py with the complement cached with the layout) and the old one (ops/
    # residual_attention.py's dense_attention); both include the 8-bit path's quantization of q, k, v.
    from qsparse_compiler.ops.refresh_attention import dense_from_sparse
    from qsparse_compiler.ops.residual_attention import dense_attention

    def op_rows(precision, out_sparse, lse_sparse):
        def complement():
            return dense_from_sparse(q, k, v, out_sparse, lse_sparse, kv_num, kv_idx, BLOCK, BLOCK, scale, None,
                                     precision, (kv_num_c, kv_idx_c))

        def dense():
            return dense_attention(q, k, v, None, scale, precision), None

        return ((f"refresh_op_complement_{precision}", complement), (f"refresh_op_dense_{precision}", dense))

    reference = F.scaled_dot_product_attention(q, k, v, scale=scale)
    for label, fn in (("refresh_complement_bf16", complement_bf16), ("refresh_dense_bf16", sdpa_dense),
                      ("refresh_complement_int8_fp8", complement_int8), ("refresh_dense_int8_fp8", int8_dense),
                      *op_rows("bf16", out_s, lse_s), *op_rows("int8_fp8", out_s8, lse_s8)):
        try:
            out, _ = fn()
            t = bench(fn)
            rec.add("refresh", dict(row, impl=label, ms=t, sqnr_vs_sdpa_db=sqnr_db(out, reference)))
        except Exception as error:
            rec.add("refresh", dict(row, impl=label, error=repr(error)[:300]))


def run_int8_sweep(rec: Recorder):
    """Every 8-bit launch config at the 480p shape, dense and at 15% (random layout), pre-quantized inputs."""
    from qsparse_compiler.kernels.attention_int8_fp8 import (CONFIGS as INT8_CONFIGS, block_sparse_attention_int8_fp8,
                                                             dense_attention_int8_fp8)

    cfg = SMOKE_SHAPE if SMOKE else SHAPES["wan1.3b-480p"]
    b, h, d = cfg["b"], cfg["h"], cfg["d"]
    s = math.prod(cfg["grid"])
    dev = "cpu" if SMOKE else "cuda"
    q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    args = _quantizers()[0](q, k, v)
    kv_num, kv_idx = bitmap_to_blocks(random_layout(b, h, s, 0.15, dev))
    # Each config's accuracy beside its time (a config changes the kernel's accumulation order).
    references = {1.0: F.scaled_dot_product_attention(q, k, v, scale=d**-0.5)}
    if not SMOKE:
        references[0.15] = block_sparse_attention(q, k, v, kv_num, kv_idx, BLOCK, BLOCK, d**-0.5)[0]
    # CONFIGS, then register-capped candidates: tools/sm90_attention_report.py (CPU, sm_90) shows every CONFIGS entry
    # at 255 registers and one block per SM; these caps fit 2-3 blocks with few spills (not yet timed).
    capped = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, maxnreg=cap)
              for bm, bn, w, st, cap in ((64, 64, 4, 2, 168), (64, 128, 4, 2, 200), (64, 128, 4, 2, 168),
                                         (128, 64, 8, 2, 128))]
    # and the two best of CONFIGS with the scores' int32 -> fp32 as a conversion instruction (MAGIC_I2F=False, the
    # kernel before the exact add-and-subtract form): the A/B of that change.
    converted = [dict(BLOCK_M=128, BLOCK_N=128, num_warps=w, num_stages=st, MAGIC_I2F=False)
                 for w, st in ((4, 3), (8, 2))]
    variants = [dict(v.kwargs, num_warps=v.num_warps, num_stages=v.num_stages) for v in INT8_CONFIGS]
    variants += capped + converted
    for c in variants:
        if SMOKE and c["BLOCK_M"] > 32:
            continue  # keep the interpreter quick
        for density in (1.0, 0.15):
            try:
                if density >= 1.0:
                    fn = lambda: dense_attention_int8_fp8(*args, d**-0.5, None, 64, q.dtype, config=c)  # noqa: E731
                else:
                    fn = lambda: block_sparse_attention_int8_fp8(  # noqa: E731
                        *args, kv_num, kv_idx, BLOCK, BLOCK, d**-0.5, None, 64, q.dtype, config=c)
                out = fn()[0]
                accuracy = {"sqnr_db": sqnr_db(out.float(), references[density].float())} if density in references else {}
                rec.add("int8_sweep", dict(density=density, **c, ms=bench(fn), **accuracy))
            except Exception as error:
                rec.add("int8_sweep", dict(density=density, **c, error=repr(error)[:300]))


def run_sweep(rec: Recorder, densities):
    cfg = SMOKE_SHAPE if SMOKE else SHAPES["wan1.3b-480p"]
    b, h, d = cfg["b"], cfg["h"], cfg["d"]
    s = math.prod(cfg["grid"])
    dev = "cpu" if SMOKE else "cuda"
    q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    variants = [c for c in CONFIGS if keep_config(c, d, BLOCK, BLOCK)]
    for density in densities:
        bitmap = random_layout(b, h, s, density, dev)
        kv_num, kv_idx = bitmap_to_blocks(bitmap)
        ref = None
        for variant in variants:
            c = dict(variant.kwargs, num_warps=variant.num_warps, num_stages=variant.num_stages)
            try:
                if SMOKE and (c["BLOCK_M"] > 32 or c["BLOCK_N"] > 32):
                    c = dict(c, BLOCK_M=32, BLOCK_N=32)  # keep the interpreter quick
                fn = lambda: block_sparse_attention(q, k, v, kv_num, kv_idx, BLOCK, BLOCK, d**-0.5, config=c)[0]  # noqa
                out = fn()
                ref = out if ref is None else ref
                t = bench(fn)
                rec.add("sweep", dict(density=density, **c, ms=t, err_vs_first=rel_err(out, ref)))
            except Exception as error:
                rec.add("sweep", dict(density=density, **c, error=repr(error)[:300]))


def write_markdown(data: dict, path: Path) -> None:
    lines = ["# Block-sparse attention (generated by benchmarks/bench_attention.py)", ""]
    m = data["meta"]
    lines += [f"{m['date']}, {m['gpu']}, torch {m['torch']}, triton {m['triton']}; command: `{m['command']}`", ""]
    by_shape: dict = {}
    for r in data["results"]:
        by_shape.setdefault(r["shape"], []).append(r)
    for shape, rows in by_shape.items():
        sdpa = next((r for r in rows if r["impl"] == "sdpa_flash_dense"), None)
        lines += [f"## {shape} ({rows[0]['name']})", ""]
        if sdpa:
            lines += [f"dense SDPA (flash backend): {sdpa['ms']:.2f} ms, {sdpa['tflops']:.0f} TFLOP/s"]
        for r in rows:
            if r["impl"] in ("sdpa_default_dense", "sdpa_cudnn_dense"):
                lines += [f"dense SDPA ({r['impl'][5:-6]}): " + (f"{r['ms']:.2f} ms, {r['tflops']:.0f} TFLOP/s"
                                                              if "ms" in r else f"failed: {r['error'][:120]}")]
        ours_cfg = next((r.get("config") for r in rows if r["impl"] == "ours" and r.get("config")), None)
        lines += [f"our launch config (autotuned): {ours_cfg}", ""]
        lines += ["| pattern | density (actual) | ours ms | TFLOP/s per computed block | vs SDPA flash per block | "
                  "vs best SDPA per block | Flex partial ms | Flex full ms | speedup vs best Flex |",
                  "|---|---|---|---|---|---|---|---|---|"]
        keys = sorted({(r["pattern"], r["density"]) for r in rows if r["impl"] == "ours"}, key=lambda x: (x[0] != "random", x))
        for pattern, density in keys:
            pick = {r["impl"]: r for r in rows if r.get("pattern") == pattern and r.get("density") == density}
            o = pick["ours"]
            fp, ff = pick.get("flex_partial", {}), pick.get("flex_full", {})
            flex_times = [x["ms"] for x in (fp, ff) if "ms" in x]
            best = min(flex_times) if flex_times else float("nan")
            lines.append(
                f"| {pattern} | {density:.2f} ({o['actual_density']:.3f}) | {o['ms']:.3f} | {o['tflops']:.0f} | "
                f"{o['vs_sdpa_per_block']:.2f} | {o.get('vs_best_sdpa_per_block', float('nan')):.2f} | "
                f"{fp.get('ms', float('nan')):.3f} | {ff.get('ms', float('nan')):.3f} | "
                f"{best / o['ms']:.2f}x |"
            )
        lines.append("")
    int8 = [r for r in data["results"] if r["impl"].startswith("int8_fp8")]
    if int8:
        lines += ["## 8-bit attention (int8 Q.K^T, e4m3 P.V)", "",
                  "| shape | pattern | density | variant | ms | vs ours bf16 | "
                  "SQNR dB (vs SDPA dense / ours bf16 sparse) | config |", "|---|---|---|---|---|---|---|---|"]
        for r in int8:
            sq = r.get("sqnr_vs_sdpa_db", r.get("sqnr_vs_bf16_kernel_db", float("nan")))
            lines.append(f"| {r['shape']} | {r['pattern']} | {r['density']} | {r['impl']} | "
                         + (f"{r['ms']:.3f} | {r['vs_bf16_kernel']:.2f}x | {sq:.1f} | {r.get('config')} |"
                            if "ms" in r else f"failed: {r['error'][:120]} | | | |"))
        lines.append("")
    if data["refresh"]:
        lines += ["## Refresh step's dense attention: complement tiles + lse merge vs a dense pass", "",
                  "| shape | density | variant | ms | SQNR vs SDPA dB |", "|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['density']} | {r['impl']} | "
                  + (f"{r['ms']:.3f} | {r['sqnr_vs_sdpa_db']:.1f} |" if "ms" in r
                     else f"failed: {r['error'][:120]} | |")
                  for r in data["refresh"]]
        lines.append("")
    if data["int8_sweep"]:
        lines += ["## 8-bit launch-config sweep (1x12x32,760x128)", "",
                  "| density | BLOCK_M | BLOCK_N | warps | stages | register cap | exact add I2F | ms | SQNR dB vs bf16 "
                  "|",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['density']} | {r['BLOCK_M']} | {r['BLOCK_N']} | "
                  f"{r['num_warps']} | {r['num_stages']} | {r.get('maxnreg') or '-'} | {r.get('MAGIC_I2F', True)} | "
                  f"{r.get('ms', float('nan')):.3f} | "
                  f"{r.get('sqnr_db', float('nan')):.1f} |" for r in data["int8_sweep"]]
        lines.append("")
    if data["layout_build"]:
        lines += ["## Dynamic top-k layout build", "", "| shape | density | ms |", "|---|---|---|"]
        lines += [f"| {r['shape']} | {r['density']} | {r['ms']:.3f} |" for r in data["layout_build"]]
        lines.append("")
    if data["sweep"]:
        lines += ["## Launch-config sweep (1x12x32,760x128, random layout)", "",
                  "| density | BLOCK_M | BLOCK_N | warps | stages | TMA | tail branch | lazy rescale | ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['density']} | {r['BLOCK_M']} | {r['BLOCK_N']} | {r['num_warps']} | {r['num_stages']} | "
                  f"{r.get('USE_TMA', False)} | {r.get('TAIL_BRANCH', False)} | {r.get('LAZY_RESCALE', False)} | "
                  f"{r.get('ms', float('nan')):.3f} |"
                  for r in data["sweep"]]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sparse_attention.json")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    # 0.15 first: the autotuner picks the launch config on the first call, at the headline density.
    parser.add_argument("--densities", nargs="*", type=float, default=[0.15, 0.05, 0.30, 1.0])
    parser.add_argument("--patterns", nargs="*", default=["random", "local3d"])
    parser.add_argument("--sweep", action="store_true", help="launch-config sweep instead of the comparison")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--int8", action="store_true", help="add the 8-bit kernels' rows and the refresh rows")
    parser.add_argument("--int8-sweep", action="store_true", help="also time every 8-bit launch config")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1 (checks the script)")
    args = parser.parse_args()
    global SMOKE, INT8
    SMOKE = args.smoke
    INT8 = args.int8
    if SMOKE:
        SHAPES.clear()
        SHAPES["smoke"] = SMOKE_SHAPE
        args.shapes = ["smoke"]
    elif not torch.cuda.is_available():
        raise SystemExit("bench_attention: needs a CUDA GPU (run it on the device machine), or pass --smoke")
    import triton

    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu="cpu (smoke)" if SMOKE else torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        command=" ".join(["python", *sys.argv]),
    )
    rec = Recorder(args.out, meta)
    start = time.time()
    if args.sweep:
        run_sweep(rec, args.densities)
    else:
        from torch.nn.attention.flex_attention import flex_attention

        for name in args.shapes:
            # A fresh compiled Flex per shape: past Dynamo's recompile limit (8; each shape and each BlockMask form
            # recompiles) Flex silently runs its eager path, which materializes S x S (it tried 160 GiB at
            # 1x40x32,760 in the 2026-11-25 run).
            torch._dynamo.reset()
            flex_fn = flex_attention if SMOKE else torch.compile(flex_attention, dynamic=False)
            run_shape(name, SHAPES[name], args.densities, args.patterns, rec, flex_fn, not args.no_flex)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if args.int8_sweep:
            run_int8_sweep(rec)
    write_markdown(rec.data, args.out.with_suffix(".md"))
    print(f"done in {time.time() - start:.0f} s; wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
