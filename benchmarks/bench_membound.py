"""The memory-bound fusions of issue #19 vs Inductor's compile of the subgraphs they replace (workload W shapes).

    python benchmarks/bench_membound.py --out benchmarks/results/membound.json          (CUDA; < 2 minutes)
    python benchmarks/bench_membound.py --device cpu --tokens 64 --out /tmp/mb.json     (CPU smoke run: the kernels
                                                                                        under TRITON_INTERPRET=1)

Rows, each at Wan-1.3B 480p's workload W (B=1, S=32,760 tokens, D=1,536 = 12 heads x 128), bf16 inputs:
  qk_norm_rope      q/k RMS-norm across heads (with weights) + Wan's interleaved rope, both q and k
  ln_mod_quant      norm1/norm3 form: LayerNorm without affine, x (1 + scale) + shift, type_as, per-token fp8
                    (and int8) quantization;  norm2 form: affine LayerNorm, no modulation, fp8
  gelu_act_quant    the FFN down-projection's input: GELU(tanh) of the up-projection's bf16 output (8,960
                    features) and its per-token fp8 quantization (kernels/act_quant.py with the GELU prologue; the
                    ``ours_op`` row is the kernel's launcher, which ``qsparse::w4a8_linear`` calls)
For each: ``inductor`` = torch.compile(fullgraph=True, dynamic=False) of the unfused subgraph written as diffusers
writes it (the ops of the Dynamo graph); ``ours_op`` = the ``qsparse::`` op through the dispatcher (what a compiled
graph calls); ``ours_kernel[cfg]`` = the Triton launcher directly with each launch config of the kernel's table (the
dispatcher's host time is the difference to ``ours_op``; the best config belongs in the table).
Reported: median ms (triton.testing.do_bench; a perf_counter loop on CPU), GB moved = the bytes the math must read and
write (computed from the shapes: each input element read once, each output written once; weights and tables counted
as read once) and GB/s = GB / time; plus agreement with Inductor's result (relative error, or the fraction of equal
quantization codes and the largest scale difference, against the eager unfused graph and against Inductor's: the
eager graph rounds the modulated activation to bf16 before quantizing it, as the op does, while Inductor's fused kernel
keeps it in fp32 (``emulate_precision_casts`` is off), so a few percent of its codes differ by one step).
Writes JSON (--out), a markdown table and a bar plot of GB/s next to it. These are isolated subgraphs: Inductor
compiles the same ops inside the whole model graph, where the neighbouring ops it fuses may differ.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

if "--device" in sys.argv and "cpu" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qsparse_compiler.ops  # noqa: E402,F401  (registers the qsparse:: ops)
from qsparse_compiler.kernels import ln_modulate_quant as ln_kernel  # noqa: E402
from qsparse_compiler.kernels import qk_norm_rope as qk_kernel  # noqa: E402
from qsparse_compiler.formats.quantization import quantize_activation_symmetric  # noqa: E402
from qsparse_compiler.eval.metrics import relative_error  # noqa: E402

TOKENS, HEADS, HEAD_DIM, EPS = 32760, 12, 128, 1e-6
LN_FORMS = (("norm1: modulated", "fp8_e4m3"), ("norm2: affine", "fp8_e4m3"), ("norm1: modulated", "int8"))
FFN_FEATURES = 8960
SHORT = {"qk_norm_rope (across heads, wan)": "qk", "ln_mod_quant (norm1: modulated, fp8_e4m3)": "ln1 fp8",
         "ln_mod_quant (norm2: affine, fp8_e4m3)": "ln2 fp8", "ln_mod_quant (norm1: modulated, int8)": "ln1 int8",
         "gelu_act_quant (ffn down, fp8_e4m3)": "gelu fp8"}


def bench_ms(fn, device: str, cpu_repeats: int) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    fn()
    start = time.perf_counter()
    for _ in range(cpu_repeats):
        fn()
    return (time.perf_counter() - start) / cpu_repeats * 1e3


def _wan_rope(x, freqs_cos, freqs_sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def unfused_qk_norm_rope(q, k, q_weight, k_weight, freqs_cos, freqs_sin):
    """WanAttnProcessor's ops from the projections' outputs to the rotated (B, S, H, D) q and k."""
    q = F.rms_norm(q, (q.shape[-1],), q_weight, EPS).unflatten(2, (HEADS, -1))
    k = F.rms_norm(k, (k.shape[-1],), k_weight, EPS).unflatten(2, (HEADS, -1))
    return _wan_rope(q, freqs_cos, freqs_sin), _wan_rope(k, freqs_cos, freqs_sin)


def unfused_ln_mod_quant(h, weight, bias, scale, shift, act_format):
    """A Wan block's pre-norm and the activation quantization quantize_linears puts in front of the W4A8 GEMM."""
    y = F.layer_norm(h.float(), (h.shape[-1],), weight, bias, EPS)
    if scale is not None:
        y = y * (1 + scale) + shift
    return quantize_activation_symmetric(y.type_as(h), act_format)


def unfused_gelu_act_quant(h, act_format):
    """The FFN down-projection's input as the unrewritten graph computes it, quantized per token."""
    return quantize_activation_symmetric(F.gelu(h, approximate="tanh"), act_format)


def _env(device: str) -> str:
    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {name}, torch {torch.__version__}, "
            f"triton {triton.__version__}, python {platform.python_version()}")


def _row(results, fusion, method, ms, gbytes, **extra):
    row = {"fusion": fusion, "short": SHORT[fusion], "method": method, "ms": ms, "gb": gbytes,
           "gb_per_s": gbytes / (ms * 1e-3), **extra}
    results["rows"].append(row)
    print(f"{fusion:32s} {method:24s} {ms:8.3f} ms  {row['gb_per_s']:8.1f} GB/s  "
          + " ".join(f"{k}={v}" for k, v in extra.items()), flush=True)


def _error_row(results, fusion, method, error):
    results["rows"].append({"fusion": fusion, "short": SHORT.get(fusion, fusion), "method": method, "error": error})
    print(f"{fusion:32s} {method:24s} error: {error.splitlines()[-1][:160]}", flush=True)


def run_qk_norm_rope(results, tokens, device, cpu_repeats):
    fusion = "qk_norm_rope (across heads, wan)"
    features = HEADS * HEAD_DIM
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(1, tokens, features, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    q_w, k_w = ((1 + 0.1 * torch.randn(features, generator=gen)).to(device, torch.bfloat16) for _ in range(2))
    angles = torch.rand(tokens, HEAD_DIM // 2, generator=gen, dtype=torch.float64) * 6.3
    freqs_cos = torch.cos(angles).repeat_interleave(2, -1).reshape(1, tokens, 1, HEAD_DIM).float().to(device)
    freqs_sin = torch.sin(angles).repeat_interleave(2, -1).reshape(1, tokens, 1, HEAD_DIM).float().to(device)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    # q, k read and written once (bf16); the D/2 cos and sin values per token (fp32) and the weights read once.
    gbytes = (4 * tokens * features * 2 + 2 * tokens * HEAD_DIM // 2 * 4 + 2 * features * 2) / 1e9

    exact = unfused_qk_norm_rope(q.double(), k.double(), q_w.double(), k_w.double(), freqs_cos.double(),
                                 freqs_sin.double())
    compiled = torch.compile(unfused_qk_norm_rope, fullgraph=True, dynamic=False)
    start = time.perf_counter()
    inductor_out = compiled(q, k, q_w, k_w, freqs_cos, freqs_sin)
    compile_s = time.perf_counter() - start
    _row(results, fusion, "inductor", bench_ms(lambda: compiled(q, k, q_w, k_w, freqs_cos, freqs_sin), device,
                                               cpu_repeats), gbytes,
         rel_err_vs_fp64=round(relative_error(inductor_out[0], exact[0]), 6), compile_s=round(compile_s, 1))

    op = torch.ops.qsparse.qk_norm_rope
    out = op(q, k, q_w, k_w, cos, sin, HEADS, EPS, "across_heads")
    _row(results, fusion, "ours_op", bench_ms(lambda: op(q, k, q_w, k_w, cos, sin, HEADS, EPS, "across_heads"),
                                             device, cpu_repeats), gbytes,
         rel_err_vs_fp64=round(relative_error(out[0], exact[0]), 6),
         rel_diff_vs_inductor=round(relative_error(out[0], inductor_out[0]), 6))
    for launch in qk_kernel.launch_config(HEADS, HEAD_DIM):
        name = f"ours_kernel[rows={launch.rows},warps={launch.num_warps}]"
        try:
            run = functools.partial(qk_kernel.qk_norm_rope, q, k, q_w, k_w, cos, sin, HEADS, EPS, "across_heads",
                                    launch)
            run()
            _row(results, fusion, name, bench_ms(run, device, cpu_repeats), gbytes)
        except Exception:
            _error_row(results, fusion, name, traceback.format_exc())


def _code_agreement(codes, ref_codes, scale, ref_scale) -> dict:
    # Compared as values: a negative input that rounds to zero is -0 in torch's cast and +0 under the interpreter.
    same = float((codes.reshape(-1).float() == ref_codes.reshape(-1).float()).float().mean())
    scale_diff = float(((scale.reshape(-1) - ref_scale.reshape(-1)).abs() / ref_scale.reshape(-1)).max())
    return {"codes_equal": round(same, 6), "max_scale_rel_diff": float(f"{scale_diff:.3g}")}


def run_ln_mod_quant(results, tokens, device, cpu_repeats, form, act_format, sweep):
    fusion = f"ln_mod_quant ({form}, {act_format})"
    features = HEADS * HEAD_DIM
    gen = torch.Generator(device="cpu").manual_seed(1)
    h = (torch.randn(1, tokens, features, generator=gen) * 4).to(device, torch.bfloat16)
    weight = bias = scale = shift = None
    if form == "norm2: affine":
        weight = (1 + 0.1 * torch.randn(features, generator=gen)).to(device)
        bias = (0.1 * torch.randn(features, generator=gen)).to(device)
    else:
        scale = (0.3 * torch.randn(1, 1, features, generator=gen)).to(device)
        shift = (0.3 * torch.randn(1, 1, features, generator=gen)).to(device)
    # h read once (bf16); 1-byte codes and one fp32 scale per token written once; affine / modulation rows read once.
    gbytes = (tokens * features * (2 + 1) + tokens * 4 + 2 * features * 4) / 1e9

    compiled = torch.compile(unfused_ln_mod_quant, fullgraph=True, dynamic=False)
    start = time.perf_counter()
    ref_codes, ref_scale = compiled(h, weight, bias, scale, shift, act_format)
    compile_s = time.perf_counter() - start
    _row(results, fusion, "inductor", bench_ms(lambda: compiled(h, weight, bias, scale, shift, act_format), device,
                                               cpu_repeats), gbytes, compile_s=round(compile_s, 1))
    eager_codes, eager_scale = unfused_ln_mod_quant(h, weight, bias, scale, shift, act_format)
    op = torch.ops.qsparse.layer_norm_modulate_quant
    codes, act_scale = op(h, weight, bias, scale, shift, EPS, act_format)
    _row(results, fusion, "ours_op", bench_ms(lambda: op(h, weight, bias, scale, shift, EPS, act_format), device,
                                             cpu_repeats), gbytes,
         vs_eager=_code_agreement(codes, eager_codes, act_scale, eager_scale),
         vs_inductor=_code_agreement(codes, ref_codes, act_scale, ref_scale))
    for launch in ln_kernel.launch_config(features) if sweep else ():
        name = f"ours_kernel[rows={launch.rows},warps={launch.num_warps}]"
        try:
            run = functools.partial(ln_kernel.ln_modulate_quant, h, weight, bias, scale, shift, EPS, act_format,
                                    launch)
            run()
            _row(results, fusion, name, bench_ms(run, device, cpu_repeats), gbytes)
        except Exception:
            _error_row(results, fusion, name, traceback.format_exc())


def run_gelu_act_quant(results, tokens, device, cpu_repeats, act_format="fp8_e4m3"):
    from qsparse_compiler.kernels.act_quant import act_quant

    fusion = f"gelu_act_quant (ffn down, {act_format})"
    gen = torch.Generator(device="cpu").manual_seed(2)
    h = (torch.randn(tokens, FFN_FEATURES, generator=gen) * 2).to(device, torch.bfloat16)
    # h read once (bf16); 1-byte codes and one fp32 scale per token written once.
    gbytes = (tokens * FFN_FEATURES * (2 + 1) + tokens * 4) / 1e9
    compiled = torch.compile(unfused_gelu_act_quant, fullgraph=True, dynamic=False)
    start = time.perf_counter()
    ref_codes, ref_scale = compiled(h, act_format)
    compile_s = time.perf_counter() - start
    _row(results, fusion, "inductor", bench_ms(lambda: compiled(h, act_format), device, cpu_repeats), gbytes,
         compile_s=round(compile_s, 1))
    eager_codes, eager_scale = unfused_gelu_act_quant(h.float(), act_format)
    codes, scale = act_quant(h, act_format, activation="gelu_tanh")
    _row(results, fusion, "ours_op", bench_ms(lambda: act_quant(h, act_format, activation="gelu_tanh"), device,
                                             cpu_repeats), gbytes,
         vs_eager_fp32=_code_agreement(codes, eager_codes, scale, eager_scale),
         vs_inductor=_code_agreement(codes, ref_codes, scale, ref_scale))


def write_markdown(results, path: Path) -> None:
    lines = ["# Memory-bound fusions vs Inductor (issue #19)", "", results["env"], "",
             f"command: `{results['command']}`", "", f"tokens: {results['tokens']}", "",
             "| fusion | method | ms | GB moved | GB/s | agreement / notes |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['fusion']} | {r['method']} | error | | | {r['error'].splitlines()[-1][:120]} |")
            continue
        notes = ", ".join(f"{k}={v}" for k, v in r.items()
                          if k not in ("fusion", "short", "method", "ms", "gb", "gb_per_s"))
        lines.append(f"| {r['fusion']} | {r['method']} | {r['ms']:.4f} | {r['gb']:.3f} | {r['gb_per_s']:.0f} | "
                     f"{notes} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(results, path: Path) -> None:
    from qsparse_compiler.eval.plots import bar_plot

    values = {f"{r['short']} {r['method']}": r["gb_per_s"] for r in results["rows"]
              if "error" not in r and not r["method"].startswith("ours_kernel")}
    if values:
        bar_plot(values, path, title=results["env"].split(", ")[1], ylabel="GB/s", size=(1100, 480))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/membound.json")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--cpu-repeats", type=int, default=1)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_membound.py: no CUDA device; run it on the device machine or pass --device cpu --tokens 64")
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"env": _env(args.device), "command": " ".join(["python"] + sys.argv), "tokens": args.tokens, "rows": []}
    print(results["env"], flush=True)
    parts = [lambda: run_qk_norm_rope(results, args.tokens, args.device, args.cpu_repeats)]
    for index, (form, act_format) in enumerate(LN_FORMS):  # the launch sweep on the first form only (time)
        parts.append(lambda form=form, act_format=act_format, sweep=index == 0: run_ln_mod_quant(
            results, args.tokens, args.device, args.cpu_repeats, form, act_format, sweep))
    parts.append(lambda: run_gelu_act_quant(results, args.tokens, args.device, args.cpu_repeats))
    for part in parts:
        try:
            part()
        except Exception:
            _error_row(results, "?", "part", traceback.format_exc())
        out.write_text(json.dumps(results, indent=1))  # partial results survive a time limit
        write_markdown(results, out.with_suffix(".md"))
    write_plot(results, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
