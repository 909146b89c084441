"""What an H100 would run for the attention kernels, read on a CPU: registers, spills and the key loop's SASS mix.

    python tools/sm90_attention_report.py [--kernel int8|bf16|all] [--mode dense|sparse|all] [--seq 32760]
                                          [--heads 12] [--dump DIR]

Triton compiles for sm_90 without a GPU (its front end, the TTGIR passes and ptxas run on the host). This script
compiles ``kernels/attention_int8_fp8.py`` and ``kernels/block_sparse_attention.py`` for every config of their
``CONFIGS`` lists that ``keep_config`` accepts at head dim 128 with 128x128 layout blocks, at workload W's shape
(1 x 12 heads x 32,760 tokens x 128 by default), with the argument specialization a real launch would get: the
signature and ``tt.divisibility`` attributes come from Triton's own specializer applied to tensors laid out as the
launchers lay them out (``quantize_attention_inputs``' padded V rows included). Must run without TRITON_INTERPRET.

Per config it prints, from the cubin Triton produced (``cuobjdump``, no re-assembly with other options):
    regs / spill        registers per thread; local-memory stores and loads (STL/LDL) in the whole kernel
    smem                dynamic shared memory (bytes) of the launch
    loop                the steady-state key loop: the backward branch's body that holds the most warpgroup MMAs
                        (after software pipelining the loop body is one key tile). Counts of the instructions that
                        matter for attention: MMA by type (IGMMA int8, QGMMA fp8, HGMMA bf16/fp16), warpgroup
                        waits (WARPGROUP.DEPBAR / WARPSYNC), int->float converts (I2F*), packs (F2FP*), FMUL, FFMA,
                        FADD, FMNMX, MUFU.EX2, shared-memory loads/stores (LDS*, STS*), async copies (LDGSTS),
                        TMA loads (UTMALDG), barrier ops (SYNCS*, BAR), shuffles (SHFL) and the loop's length.
    order               the loop's sequence of MMA issues (G), MMA waits (W) and the first/last exp2 (E) as a
                        compact string: an MMA whose wait comes right after its issue, with no softmax math between,
                        is not overlapped with anything.

The numbers are static counts per loop iteration, not timings: they show structure (spills, converts, serialized
MMAs) that explains a measured gap, and before/after changes to a kernel; only a GPU run says what is faster.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("tools/sm90_attention_report.py compiles for sm_90: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
TARGET = GPUTarget("cuda", 90, 32)


# ---- compile with a launch's specialization ------------------------------------------------------------------------


def compile_kernel(kernel, args: dict, constexprs: dict, num_warps: int, num_stages: int):
    """``triton.compile`` for sm_90 with the signature / attributes / constant specialization that launching
    ``kernel`` with ``args`` (name -> value) would give (Triton's specializer: 16-divisible pointers and ints get
    ``tt.divisibility``, ints equal to 1 become constants)."""
    signature, attrs, consts = {}, {}, {}
    defaults = {name: p.default for name, p in inspect.signature(kernel.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs or (name not in args and name in defaults):  # a launch leaves defaults as they are
            signature[name] = "constexpr"
            consts[(index,)] = constexprs.get(name, defaults.get(name))
            continue
        param = kernel.params[index]
        kind, key = native_specialize_impl(BaseBackend, args[name], param.is_const, not param.do_not_specialize,
                                           not param.do_not_specialize_on_alignment)
        signature[name] = kind
        if kind == "constexpr":
            consts[(index,)] = key
        elif key == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs, constexprs=consts)
    return triton.compile(source, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def _int8_inputs(heads: int, seq: int, dim: int, quant_block: int = 64):
    """Codes and scales laid out exactly as ``quantize_attention_inputs`` lays them out (values are irrelevant)."""
    from qsparse_compiler.ops.attention_quantization import quantize_attention_inputs

    q, k, v = (torch.zeros(1, heads, seq, dim, dtype=torch.bfloat16) for _ in range(3))
    return quantize_attention_inputs(q, k, v, quant_block)


def int8_variants(heads: int, seq: int, sparse: bool):
    """(name, compile thunk) per config of attention_int8_fp8.CONFIGS with a query tile of >= 64 at D=128 and 128x128
    layout blocks (those measured on the H100); configs ``keep_config`` leaves out of the autotuner's candidates
    there are marked "pinned"."""
    from qsparse_compiler.kernels import attention_int8_fp8 as mod

    dim, qb = 128, 64
    x = _int8_inputs(heads, seq, dim, qb)
    out, lse = torch.empty(1, heads, seq, dim, dtype=torch.bfloat16), torch.empty(1, heads, seq)
    nkb = -(-seq // 128)
    kv_num = torch.zeros(1, heads, nkb, dtype=torch.int32)
    kv_idx = torch.zeros(1, heads, nkb, nkb, dtype=torch.int32)
    args = dict(Q=x.q_codes, QScale=x.q_scale, K=x.k_codes, KScale=x.k_scale, V=x.v_codes, VScale=x.v_scale,
                LseShift=x.lse_shift, Out=out, Lse=lse, KvNum=kv_num if sparse else lse,
                KvIdx=kv_idx if sparse else lse, Mask=lse, qk_scale=dim**-0.5, H=heads, SEQ_Q=seq, SEQ_KV=seq,
                Q_TILES=-(-seq // qb), K_TILES=-(-seq // qb), stride_mb=0, stride_mn=0)
    for prefix, t in (("q", x.q_codes), ("k", x.k_codes), ("v", x.v_codes), ("o", out)):
        args.update({f"stride_{prefix}b": t.stride(0), f"stride_{prefix}h": t.stride(1),
                     f"stride_{prefix}{'m' if prefix in 'qo' else ('n' if prefix == 'k' else 'd')}": t.stride(2)})
    if sparse:
        args.update(stride_nb=0, stride_nh=kv_num.stride(1), stride_nm=kv_num.stride(2), stride_ib=0,
                    stride_ih=kv_idx.stride(1), stride_im=kv_idx.stride(2))
    else:
        args.update({f"stride_{n}": 0 for n in ("nb", "nh", "nm", "ib", "ih", "im")})
    kernel = mod._attention_int8_fp8_fwd
    for config in mod.CONFIGS:
        if config.kwargs["BLOCK_M"] < 64:
            continue
        bn = config.kwargs["BLOCK_N"]
        constexprs = dict(HEAD_DIM=dim, QUANT_BLOCK=qb, SPARSE=sparse, LAYOUT_BLOCK_Q=128, LAYOUT_BLOCK_KV=128,
                          HAS_MASK=False, EVEN_KV=seq % max(bn, 128) == 0, V_PADDED=mod.v_padded(x.v_codes),
                          INTERPRETED=False, **config.kwargs)
        name = f"int8_fp8 {config.kwargs['BLOCK_M']}x{bn} w{config.num_warps} s{config.num_stages}"
        name += "" if mod.keep_config(config, dim, 128, 128) else " pinned"
        yield name, (lambda c=constexprs, w=config.num_warps, s=config.num_stages:
                     compile_kernel(kernel, args, c, w, s))


def bf16_variants(heads: int, seq: int, sparse: bool):
    """(name, compile thunk) per config of block_sparse_attention.CONFIGS kept at D=128, 128x128 layout blocks (the
    bf16 kernel is always block-sparse; dense = every block listed, which the loop does not see)."""
    from qsparse_compiler.kernels import block_sparse_attention as mod

    dim = 128
    q, k, v = (torch.zeros(1, heads, seq, dim, dtype=torch.bfloat16) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(1, heads, seq)
    nkb = -(-seq // 128)
    kv_num = torch.zeros(1, heads, nkb, dtype=torch.int32)
    kv_idx = torch.zeros(1, heads, nkb, nkb, dtype=torch.int32)
    tma_ok = mod._tma_ok(k) and mod._tma_ok(v)
    kernel = mod._block_sparse_attention_fwd
    for config in mod.CONFIGS:
        if not mod.keep_config(config, dim, 128, 128):
            continue
        kw = config.kwargs
        if kw["USE_TMA"] != tma_ok:  # the launcher's pruning: TMA configs where TMA is possible
            continue
        bn = kw["BLOCK_N"]
        descs = (TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, bn, dim]),
                 TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, bn, dim])) if tma_ok else (k, v)
        args = dict(Q=q, K=k, V=v, Out=out, Lse=lse, KvNum=kv_num, KvIdx=kv_idx, Mask=kv_num, K_desc=descs[0],
                    V_desc=descs[1], qk_scale_log2=dim**-0.5 * 1.4426950408889634, H=heads, SEQ_Q=seq, SEQ_KV=seq,
                    stride_lb=lse.stride(0), stride_lh=lse.stride(1), stride_nb=0, stride_nh=kv_num.stride(1),
                    stride_nm=kv_num.stride(2), stride_ib=0, stride_ih=kv_idx.stride(1), stride_im=kv_idx.stride(2),
                    stride_mb=0, stride_mn=0)
        for prefix, t in (("q", q), ("k", k), ("v", v), ("o", out)):
            args.update({f"stride_{prefix}b": t.stride(0), f"stride_{prefix}h": t.stride(1),
                         f"stride_{prefix}{'m' if prefix in 'qo' else 'n'}": t.stride(2)})
        constexprs = dict(HEAD_DIM=dim, LAYOUT_BLOCK_Q=128, LAYOUT_BLOCK_KV=128, HAS_MASK=False,
                          EVEN_KV=mod._even_kv(seq, bn, 128), UPCAST_DOT=False, WARP_SPECIALIZE=False,
                          TMA_OK=tma_ok, **kw)
        name = f"bf16 {kw['BLOCK_M']}x{bn} w{config.num_warps} s{config.num_stages}{' tma' if kw['USE_TMA'] else ''}"
        yield name, (lambda c=constexprs, a=args, w=config.num_warps, s=config.num_stages:
                     compile_kernel(kernel, a, c, w, s))


# ---- read the cubin ------------------------------------------------------------------------------------------------


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def sass_lines(cubin: bytes) -> list[tuple[int, str, str]]:
    """[(address, opcode with modifiers, instruction without its predicate)] of the kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(_BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    instrs = []
    for line in text.splitlines():
        m = _INSTR.search(line)
        if m:
            body = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())
            instrs.append((int(m.group(1), 16), body.split()[0] if body else "", body))
    return instrs


def loop_bodies(instrs) -> list[tuple[int, int]]:
    """[start, end) indices of every backward branch's body (a loop)."""
    index = {addr: i for i, (addr, _, _) in enumerate(instrs)}
    bodies = []
    for i, (addr, op, body) in enumerate(instrs):
        target = re.search(r"0x([0-9a-f]+)", body) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
            bodies.append((index[int(target.group(1), 16)], i + 1))
    return bodies


def key_loop(instrs) -> tuple[int, int]:
    """[start, end) indices of the backward-branch body holding the most warpgroup MMAs (the pipelined key loop)."""
    best, best_count = (0, 0), -1
    for start, end in loop_bodies(instrs):
        count = sum(op.split(".")[0].endswith("GMMA") for _, op, _ in instrs[start:end])
        if count > best_count:
            best, best_count = (start, end), count
    return best


def _bucket(op: str) -> str | None:
    base = op.split(".")[0]
    if base.endswith("GMMA"):
        return op  # keep the shape and types (e.g. IGMMA.64x128x32.S8.S8)
    if base in ("I2F", "F2FP", "F2F", "F2I", "I2FP"):
        return op
    if op.startswith("MUFU"):
        return op
    if op.startswith("WARPGROUP"):
        return op
    if base in ("FMUL", "FFMA", "FADD", "FMNMX", "FSEL", "FSETP", "LDGSTS", "UTMALDG", "BAR", "SHFL", "STL", "LDL",
                "LDG", "STG", "DEPBAR", "HMUL2", "HFMA2", "HADD2", "IMAD", "IADD3", "LEA", "SEL", "ISETP", "LOP3",
                "MOV", "PRMT", "SHF", "LDSM", "STSM", "FMUL2", "FFMA2", "FADD2"):
        return base
    if base in ("LDS", "STS", "SYNCS", "WARPSYNC", "ARRIVES", "UTMACCTL", "FENCE"):
        return base
    return None


def analyse(compiled) -> dict:
    """Registers, spills, shared memory and the key loop's instruction mix of one compiled kernel."""
    instrs = sass_lines(compiled.asm["cubin"])
    start, end = key_loop(instrs)
    loop = [(op, body) for _, op, body in instrs[start:end]]
    mix = Counter(b for b in (_bucket(op) for op, _ in loop) if b)
    events = []
    ex2 = [i for i, (op, _) in enumerate(loop) if op.startswith("MUFU.EX2")]
    for i, (op, body) in enumerate(loop):
        base = op.split(".")[0]
        if base.endswith("GMMA"):
            events.append(("G" + base[0], i))
        elif op.startswith("WARPGROUP.DEPBAR"):
            events.append(("W" + body.split()[-1].replace("0x", ""), i))
        elif ex2 and i in (ex2[0], ex2[-1]):
            events.append(("E", i))
    order = []
    for tag, _ in events:  # run-length: "GIx8" = 8 consecutive int8 MMAs
        if order and order[-1][0] == tag:
            order[-1][1] += 1
        else:
            order.append([tag, 1])
    whole = Counter(op.split(".")[0] for _, op, _ in instrs)
    return dict(regs=registers(compiled.asm["cubin"]), stl=whole["STL"],
                ldl=whole["LDL"], smem=compiled.metadata.shared, loop_len=len(loop), mix=mix,
                order=" ".join(f"{t}x{n}" if n > 1 else t for t, n in order))


def registers(cubin: bytes) -> int:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(_BIN / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", text).group(1))


def _summary(mix: Counter) -> str:
    mma = " ".join(f"{k}:{v}" for k, v in sorted(mix.items()) if k.split(".")[0].endswith("GMMA"))
    cvt = " ".join(f"{k}:{v}" for k, v in sorted(mix.items()) if k.split(".")[0] in ("I2F", "F2FP", "F2F", "I2FP"))
    wg = " ".join(f"{k}:{v}" for k, v in sorted(mix.items()) if k.startswith("WARPGROUP"))
    plain = ["FMUL", "FFMA", "FADD", "FMNMX", "FSEL", "MUFU.EX2", "LDS", "LDSM", "STS", "STSM", "LDGSTS", "UTMALDG",
             "SYNCS", "BAR", "SHFL", "LDG", "IMAD", "IADD3", "ISETP", "FSETP", "PRMT", "MOV", "STL", "LDL"]
    rest = " ".join(f"{k}:{mix[k]}" for k in plain if mix.get(k))
    return f"MMA[{mma}] WG[{wg}] CVT[{cvt}] {rest}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=("int8", "bf16", "all"), default="all")
    parser.add_argument("--mode", choices=("dense", "sparse", "all"), default="all")
    parser.add_argument("--seq", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dump", type=Path, help="write each variant's ttgir / ptx / sass here")
    a = parser.parse_args()
    variants = []
    if a.kernel in ("bf16", "all"):
        variants += list(bf16_variants(a.heads, a.seq, sparse=True))
    for sparse in {"dense": (False,), "sparse": (True,), "all": (False, True)}[a.mode]:
        if a.kernel in ("int8", "all"):
            tag = "sparse" if sparse else "dense"
            variants += [(f"{n} {tag}", c) for n, c in int8_variants(a.heads, a.seq, sparse)]
    for name, thunk in variants:
        compiled = thunk()
        r = analyse(compiled)
        print(f"{name:34s} regs {r['regs']:3d} spill STL {r['stl']} LDL {r['ldl']} smem {r['smem']} "
              f"loop {r['loop_len']} instr")
        print(f"    {_summary(r['mix'])}")
        print(f"    order: {r['order']}")
        if a.dump:
            a.dump.mkdir(parents=True, exist_ok=True)
            stem = re.sub(r"\W+", "_", name)
            for key in ("ttgir", "ptx"):
                (a.dump / f"{stem}.{key}").write_text(compiled.asm[key])
            (a.dump / f"{stem}.sass").write_text(
                "\n".join(f"{addr:05x} {body}" for addr, _, body in sass_lines(compiled.asm["cubin"])))


if __name__ == "__main__":
    main()
