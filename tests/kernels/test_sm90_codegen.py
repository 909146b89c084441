"""The 8-bit attention kernel as the GPU build sees it, checked on the CPU.

Triton compiles a kernel for a CUDA target without a GPU (the front end and the sm_90 passes run on the host), so
the TTGIR shows what a launch would get. The property checked: with the inputs ``quantize_attention_inputs``
produces at workload W's length (32,760 tokens, not a multiple of 16: the last key tile is a tail), every K and V
tile load of the key loop is an asynchronous, vectorized copy into shared memory (pipelined), not a per-byte load.
Compiled Triton proves alignment only from arguments divisible by 16 (its launch-time specialization, emulated here
from the real tensors); V's rows once had a 32,760-byte stride, and a tail tile masked along them, and were read
byte by byte (BENCHMARKS.md, 2026-12-07).

Second property, on the SASS of the dense kernel's steady-state key loop (tools/sm90_attention_report.py reads it):
at 64x128 tiles with 4 warps (no spills there), per score the loop holds one int->float convert, one exp2, no bounds
select (the tail tile is peeled off the loop) and at most 5 fp32 FMUL/FFMA/FADD (6.1 before the Q scale moved into
the exponent's FMA and 448 into exp2), and no local-memory traffic.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from qsparse_compiler.ops.attention_quantization import quantize_attention_inputs


def _signature_and_attrs(kernel, args: dict, constexprs: dict):
    types = {torch.int8: "*i8", torch.float32: "*fp32", torch.float8_e4m3fn: "*fp8e4nv", torch.bfloat16: "*bf16",
             torch.int32: "*i32", torch.bool: "*i1"}
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if torch.is_tensor(value):
            signature[name] = types[value.dtype]
            divisible = value.data_ptr() % 16 == 0
        elif isinstance(value, float):
            signature[name] = "fp32"
            divisible = False
        else:
            signature[name] = "i32"
            divisible = value % 16 == 0
        if divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _async_copies() -> list[str]:
    """The TTGIR lines of the key loop's asynchronous copies (run where TRITON_INTERPRET is unset: the kernel module
    then holds compilable jit functions)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qsparse_compiler.kernels.attention_int8_fp8 import _attention_int8_fp8_fwd as kernel

    b, h, s, d = 1, 1, 32760, 128
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.bfloat16) for _ in range(3))
    x = quantize_attention_inputs(q, k, v, 64)
    out, lse = torch.empty_like(q), torch.empty(b, h, s)
    names = ("Q", "QScale", "K", "KScale", "V", "VScale", "LseShift", "Out", "Lse", "KvNum", "KvIdx", "Mask")
    tensors = (x.q_codes, x.q_scale, x.k_codes, x.k_scale, x.v_codes, x.v_scale, x.lse_shift, out, lse,
               torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int8))
    args = dict(zip(names, tensors), qk_scale=d**-0.5, H=h, SEQ_Q=s, SEQ_KV=s, Q_TILES=-(-s // 64), K_TILES=-(-s // 64))
    for prefix, t in (("q", x.q_codes), ("k", x.k_codes), ("v", x.v_codes), ("o", out)):
        args.update({f"stride_{prefix}b": t.stride(0), f"stride_{prefix}h": t.stride(1)})
    args.update(stride_qm=x.q_codes.stride(2), stride_kn=x.k_codes.stride(2), stride_vd=x.v_codes.stride(2),
                stride_om=out.stride(2), stride_nb=0, stride_nh=0, stride_nm=0, stride_ib=0, stride_ih=0,
                stride_im=0, stride_mb=0, stride_mn=0)
    from qsparse_compiler.kernels.attention_int8_fp8 import v_padded

    constexprs = dict(V_PADDED=v_padded(x.v_codes), MAGIC_I2F=True, HEAD_DIM=d, QUANT_BLOCK=64, SPARSE=False,
                      LAYOUT_BLOCK_Q=128, LAYOUT_BLOCK_KV=128, HAS_MASK=False, EVEN_KV=s % 128 == 0, BLOCK_M=128,
                      BLOCK_N=128, INTERPRETED=False)
    signature, attrs = _signature_and_attrs(kernel, args, constexprs)
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    return [line for line in compiled.asm["ttgir"].splitlines() if "async_copy_global_to_local" in line]


@pytest.mark.skipif("nvidia" not in getattr(triton.backends, "backends", {}), reason="Triton without its CUDA backend")
def test_key_loop_loads_are_pipelined_at_wan_length():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    copies = json.loads(result.stdout.strip().splitlines()[-1])
    assert any("i8" in line for line in copies), "K tiles are not copied asynchronously"
    assert any("f8E4M3FN" in line for line in copies), "V tiles are not copied asynchronously (unaligned rows?)"


def _dense_loop_mix() -> dict:
    """The tool's analysis of the dense kernel at 64x128, 4 warps, 3 stages (run without TRITON_INTERPRET)."""
    spec = importlib.util.spec_from_file_location(
        "sm90_attention_report", Path(__file__).resolve().parents[2] / "tools" / "sm90_attention_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    for name, thunk in report.int8_variants(heads=2, seq=32760, sparse=False):
        if name.startswith("int8_fp8 64x128 w4 s3"):
            r = report.analyse(thunk())
            return {"regs": r["regs"], "stl": r["stl"], "ldl": r["ldl"], "mix": dict(r["mix"])}
    raise AssertionError("64x128 w4 s3 is not in attention_int8_fp8.CONFIGS")


@pytest.mark.skipif("nvidia" not in getattr(triton.backends, "backends", {}), reason="Triton without its CUDA backend")
def test_dense_key_loop_instruction_mix():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__, "mix"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    mix = r["mix"]
    scores = 64 * 128 // 128  # per thread per key tile
    assert r["stl"] == 0 and r["ldl"] == 0, f"spills: {r}"
    # The scores' int32 -> fp32 is an fp32 subtract (MAGIC_I2F: the integer add folds into the MMA's accumulator),
    # not a conversion instruction (those issue at exp2's rate).
    assert not any(op.startswith("I2F") for op in mix), mix
    assert scores <= mix.get("MUFU.EX2", 0) <= scores + 2, mix
    assert mix.get("FSEL", 0) <= 4, f"a per-score select in the dense loop (tail mask?): {mix}"
    assert mix.get("FMUL", 0) + mix.get("FFMA", 0) + mix.get("FADD", 0) <= 6 * scores, mix


if __name__ == "__main__":
    print(json.dumps(_dense_loop_mix() if sys.argv[1:] == ["mix"] else _async_copies()))
