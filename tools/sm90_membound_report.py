"""What an H100 would execute for the activation-quantization kernels, read on a CPU: instructions per element.

    python tools/sm90_membound_report.py [--kernel act_quant|ln_modulate_quant|qk_norm_rope|residual_cache_step|all]
                                         [--tokens 32760] [--json F]

The kernels between the GEMMs of a reuse step (per-token 8-bit quantization, with a GELU in front for the FFN
down-projection, or LayerNorm + adaLN modulation in front for q/k/v and the FFN up-projection; q/k RMS norm + rope;
the residual cache's step) move 3-8 bytes per element. They run at the memory's speed only if the SMs issue the
kernel's instructions faster than the memory delivers the bytes. On an H100 SXM (132 SMs, 4 schedulers each issuing
one warp instruction per cycle, 1.98 GHz boost, 3.35 TB/s HBM3) that is 132 x 128 x 1.98e9 = 33.5e12
thread-instructions per second against 3.35e12 bytes: **about 10 thread-instructions per byte** before a kernel is
issue-bound (fewer in practice: loads, stores and reductions stall). The special-function unit (MUFU: ex2, rcp,
tanh) issues 16 per SM per cycle: 1.25 per byte.

Per variant (workload W: 32,760 tokens; Wan2.1-1.3B's 1,536 features, FFN 8,960), compiled for sm_90 with the
specialization a real launch gets (tools/sm90_attention_report.compile_kernel), from the cubin's SASS:
    regs / spill    registers per thread, local-memory stores / loads in the kernel (spills)
    global accesses the kernel's global load / store instructions by bytes per thread (16: vectorized)
    instr/elem      thread-instructions per element: every instruction of the program once, over the program's
                    elements per thread. Static: branches taken or not are both counted, a loop body (``loops``
                    counts backward branches; none of these kernels has one) or a called subroutine (the residual
                    step's 64-bit division) only once
    mufu/elem       the same for MUFU instructions
    instr/byte      instr/elem over the bytes the kernel must move per element (bf16 in, 8-bit codes out, plus
                    modulation inputs where read)
    issue / memory  at workload W on the H100: the time to issue the instructions (at the figure above) and to
                    move the bytes; the larger bounds the kernel

Static counts, not timings: only a GPU run says what is faster (benchmarks/bench_membound.py). What the counts
show is structure: a GELU computed twice, software rounding where the hardware conversion is exact, reductions
per tile instead of per row, spills.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("tools/sm90_membound_report.py compiles for sm_90: run it without TRITON_INTERPRET")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from sm90_attention_report import compile_kernel, loop_bodies, registers, sass_lines  # noqa: E402

H100_ISSUE_PER_S = 132 * 128 * 1.98e9  # thread-instructions per second (see the module docstring)
H100_BYTES_PER_S = 3.35e12


def act_quant_variant(tokens: int, k: int, fmt: str, activation: str):
    """(name, compile thunk, elements per program, threads per program, bytes per element) of
    kernels/act_quant.py as ``act_quant`` launches it for a (tokens, k) bf16 input."""
    from qsparse_compiler.kernels import act_quant as mod

    x = torch.empty(tokens, k, dtype=torch.bfloat16)
    codes = torch.empty(tokens, k, dtype=torch.float8_e4m3fn if fmt == "fp8_e4m3" else torch.int8)
    scale = torch.empty(tokens)
    launch = mod.launch_shape(k, tokens)
    args = dict(x_ptr=x, q_ptr=codes, s_ptr=scale, z_ptr=scale, M=tokens, K=k, stride_xm=x.stride(0),
                stride_qm=codes.stride(0))
    constexprs = dict(QMAX=mod._QMAX[fmt], IS_FP8=fmt == "fp8_e4m3", ASYM=False, CHUNK=0, EPS=mod._AMAX_EPS,
                      PRE_GELU=activation == "gelu_tanh", INTERPRETED=False, **launch.constexprs())
    name = f"act_quant {fmt} K={k} {activation} ({launch.describe()})"
    return (name, lambda: compile_kernel(mod._act_quant_kernel, args, constexprs, launch.num_warps, 3),
            launch.rows * k, launch.num_warps * 32, 2 + 1 + 4 / k)


def ln_modulate_quant_variant(tokens: int, k: int, fmt: str):
    """The same for kernels/ln_modulate_quant.py (LayerNorm without affine, adaLN scale and shift per video, Wan2.1's
    norm1 / norm3 in front of q/k/v and the FFN up-projection)."""
    from qsparse_compiler.kernels import ln_modulate_quant as mod

    x = torch.empty(1, tokens, k, dtype=torch.bfloat16)
    mod_scale, mod_shift = (torch.empty(1, 1, k, dtype=torch.bfloat16) for _ in range(2))
    codes = torch.empty(tokens, k, dtype=torch.float8_e4m3fn if fmt == "fp8_e4m3" else torch.int8)
    act_scale = torch.empty(tokens)
    launch = mod.launch_config(k)[0]
    args = dict(x_ptr=x, w_ptr=x, b_ptr=x, scale_ptr=mod_scale, shift_ptr=mod_shift, q_ptr=codes, s_ptr=act_scale,
                M=tokens, S=tokens, K=k, stride_xb=x.stride(0), stride_xs=x.stride(1), stride_mb=0,
                stride_ms=0, stride_hb=0, stride_hs=0, eps=1e-6)
    constexprs = dict(HAS_WEIGHT=False, HAS_BIAS=False, MODULATE=True, ROUND_TO=1, QMAX=mod._QMAX[fmt],
                      IS_FP8=fmt == "fp8_e4m3", EPS_AMAX=mod._AMAX_EPS, INTERPRETED=False,
                      **mod.block_constexprs(tokens, k, launch))
    name = f"ln_modulate_quant {fmt} K={k} ({launch.rows} rows, {launch.num_warps} warps)"
    return (name, lambda: compile_kernel(mod._ln_modulate_quant_kernel, args, constexprs, launch.num_warps, 3),
            launch.rows * k, launch.num_warps * 32, 2 + 1 + 4 / k)


def qk_norm_rope_variant(tokens: int, heads: int, head_dim: int):
    """The same for kernels/qk_norm_rope.py (Wan's q/k RMS norm across heads with weights, then its rotary embedding;
    one program normalizes q or k rows: grid axis 1). Bytes per element: bf16 in and out, plus the fp32 cos and sin
    of each pair (read once per token and per tensor, shared by the heads)."""
    from qsparse_compiler.kernels import qk_norm_rope as mod

    features = heads * head_dim
    q, k = (torch.empty(1, tokens, features, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty(1, tokens, heads, head_dim, dtype=torch.bfloat16)
    weight = torch.empty(features, dtype=torch.bfloat16)
    table = torch.empty(1, tokens, 1, head_dim // 2)
    block_h, block_half, _ = mod._row_tile(heads, head_dim)
    launch = mod.launch_config(heads, head_dim)[0]
    args = dict(q_ptr=q, k_ptr=k, q_out_ptr=out, k_out_ptr=out, q_w_ptr=weight, k_w_ptr=weight, cos_ptr=table,
                sin_ptr=table, M=tokens, S=tokens, stride_qb=q.stride(0), stride_qs=q.stride(1),
                stride_kb=k.stride(0), stride_ks=k.stride(1), stride_cb=0, stride_cs=table.stride(1), stride_ci=1,
                stride_sb=0, stride_ss=table.stride(1), stride_si=1, eps=1e-6)
    constexprs = dict(HEADS=heads, HEAD_DIM=head_dim, ACROSS_HEADS=True, HAS_WEIGHT=True, W_HEAD_STRIDE=head_dim,
                      ROWS=launch.rows, BLOCK_H=block_h, BLOCK_HALF=block_half, ROUND_BF16=False)
    name = f"qk_norm_rope K={features} ({launch.rows} rows, {launch.num_warps} warps)"
    return (name, lambda: compile_kernel(mod._qk_norm_rope_kernel, args, constexprs, launch.num_warps, 3),
            launch.rows * features, launch.num_warps * 32, 2 + 2 + 2 * 4 * (head_dim // 2) / features)


def residual_cache_step_variant(tokens: int, heads: int, head_dim: int, order: int):
    """The same for kernels/residual_cache_step.py on a reuse step (O = O_sparse + R [+ steps dR], bf16 cache): the
    attention's (B, H, S, D) output in, the step's output out. Bytes per element: 2 per tensor read or written."""
    from qsparse_compiler.kernels import residual_cache_step as mod

    o_sparse = torch.empty(1, heads, tokens, head_dim, dtype=torch.bfloat16)
    residual, delta, out = (torch.empty(1, heads, tokens, head_dim, dtype=torch.bfloat16) for _ in range(3))
    steps, scale = torch.empty(()), torch.empty(1)
    rows = heads * tokens
    block_d, block_r = mod.block_shape(head_dim)
    args = dict(o_ptr=o_sparse, dense_ptr=o_sparse, r_ptr=residual, dr_ptr=delta, r_scale_ptr=scale,
                dr_scale_ptr=scale, out_ptr=out, steps_ptr=steps, ROWS=rows, H=heads, S=tokens, D=head_dim,
                stride_ob=o_sparse.stride(0), stride_oh=o_sparse.stride(1), stride_os=o_sparse.stride(2),
                stride_db=o_sparse.stride(0), stride_dh=o_sparse.stride(1), stride_ds=o_sparse.stride(2))
    constexprs = dict(REFRESH=False, ORDER2=order == 2, FP8=False, BLOCK_R=block_r, BLOCK_D=block_d)
    name = f"residual_cache_step reuse order {order} K={heads * head_dim} ({heads} heads; {block_r} rows, 4 warps)"
    return (name, lambda: compile_kernel(mod._residual_cache_step_kernel, args, constexprs, 4, 3),
            block_r * head_dim, 4 * 32, 2 * (3 + (order == 2)))


def _access_bytes(op: str) -> int:
    """Bytes per thread of a global load / store (LDG.E.128 -> 16; no size suffix: 4)."""
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return size
    return 4


def analyse(compiled, elements: int, threads: int) -> dict:
    """Registers, spills and the instruction counts per element (see the module docstring)."""
    cubin = compiled.asm["cubin"]
    instrs = [(a, op, b) for a, op, b in sass_lines(cubin) if op != "NOP"]
    per_thread = elements / threads
    by_base = Counter(op if op.startswith("MUFU") else op.split(".")[0] for _, op, _ in instrs)
    mufu = sum(n for op, n in by_base.items() if op.startswith("MUFU"))
    widths = Counter(_access_bytes(op) for _, op, _ in instrs if op.split(".")[0] in ("LDG", "STG"))
    return dict(regs=registers(cubin), stl=by_base["STL"], ldl=by_base["LDL"], loops=len(loop_bodies(instrs)),
                global_access_bytes=dict(sorted(widths.items())),
                instr_per_elem=len(instrs) / per_thread, mufu_per_elem=mufu / per_thread,
                mix={op: round(n / per_thread, 2) for op, n in by_base.most_common(12)})


def variants(kernel: str, tokens: int):
    out = []
    if kernel in ("act_quant", "all"):
        out += [act_quant_variant(tokens, 1536, "fp8_e4m3", "none"),
                act_quant_variant(tokens, 8960, "fp8_e4m3", "gelu_tanh"),
                act_quant_variant(tokens, 8960, "int8", "gelu_tanh")]
    if kernel in ("ln_modulate_quant", "all"):
        out += [ln_modulate_quant_variant(tokens, 1536, "fp8_e4m3")]
    if kernel in ("qk_norm_rope", "all"):
        out += [qk_norm_rope_variant(tokens, 12, 128)]
    if kernel in ("residual_cache_step", "all"):
        out += [residual_cache_step_variant(tokens, 12, 128, order) for order in (1, 2)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=("act_quant", "ln_modulate_quant", "qk_norm_rope", "residual_cache_step",
                                             "all"), default="all")
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--json", type=Path, help="write the rows here")
    a = parser.parse_args()
    rows = []
    for name, thunk, elements, threads, bytes_per_elem in variants(a.kernel, a.tokens):
        r = analyse(thunk(), elements, threads)
        k = int(re.search(r"K=(\d+)", name).group(1))
        n = a.tokens * k
        r.update(name=name, bytes_per_elem=round(bytes_per_elem, 3),
                 instr_per_byte=round(r["instr_per_elem"] / bytes_per_elem, 2),
                 issue_us=round(r["instr_per_elem"] * n / H100_ISSUE_PER_S * 1e6, 1),
                 memory_us=round(bytes_per_elem * n / H100_BYTES_PER_S * 1e6, 1))
        r["instr_per_elem"], r["mufu_per_elem"] = round(r["instr_per_elem"], 2), round(r["mufu_per_elem"], 2)
        rows.append(r)
        print(f"{name}\n    regs {r['regs']} spill STL {r['stl']} LDL {r['ldl']}  instr/elem {r['instr_per_elem']}  "
              f"mufu/elem {r['mufu_per_elem']}  bytes/elem {r['bytes_per_elem']}  instr/byte {r['instr_per_byte']}  "
              f"H100 issue {r['issue_us']} us / memory {r['memory_us']} us\n    global accesses by bytes per thread "
              f"{r['global_access_bytes']}\n    {r['mix']}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
