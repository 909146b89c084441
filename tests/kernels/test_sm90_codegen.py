"""The 8-bit attention kernel as the GPU build sees it, checked on the CPU.

Triton compiles a kernel for a CUDA target without a GPU (the front end and the sm_90 passes run on the host), so
the TTGIR shows what a launch would get. The property checked: with the inputs ``quantize_attention_inputs``
produces at workload W's length (32,760 tokens, not a multiple of 16: the last key tile is a tail), every K and V
tile load of the key loop is an asynchronous, vectorized copy into shared memory (pipelined), not a per-byte load.
Compiled Triton proves alignment only from arguments divisible by 16 (its launch-time specialization, emulated here
from the real tensors); V's rows once had a 32,760-byte stride, and a tail tile masked along them, and were read
byte by byte (BENCHMARKS.md, 2026-12-07).

Second property, on the SASS of the dense kernel's steady-state key loop (tools/sm90_attention_report.py reads it):
at 64x128 tiles with 4 warps (no spills there), per score the loop holds no int->float conversion instruction (the
exact add-and-subtract form), one exp2, no bounds select (the tail tile is peeled off the loop), at most 6 fp32
FMUL/FFMA/FADD (one of them the conversion's subtract; 6.1 plus a conversion before the Q scale moved into the
exponent's FMA and 448 into exp2) and no local-memory traffic.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton


def _report():
    """tools/sm90_attention_report.py as a module: it compiles the kernels for sm_90 with a real launch's
    specialization (run without TRITON_INTERPRET: the kernel modules then hold compilable jit functions)."""
    spec = importlib.util.spec_from_file_location(
        "sm90_attention_report", Path(__file__).resolve().parents[2] / "tools" / "sm90_attention_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def _compiled_dense(config: str):
    """The dense 8-bit kernel at workload W's length (1 head x 32,760 tokens x 128) for one CONFIGS entry."""
    for name, thunk in _report().int8_variants(heads=1, seq=32760, sparse=False):
        if name.startswith(f"int8_fp8 {config}"):
            return thunk()
    raise AssertionError(f"{config} is not in attention_int8_fp8.CONFIGS")


def _async_copies() -> list[str]:
    """The TTGIR lines of the key loop's asynchronous copies at 128x128, 4 warps, 3 stages."""
    ttgir = _compiled_dense("128x128 w4 s3").asm["ttgir"]
    return [line for line in ttgir.splitlines() if "async_copy_global_to_local" in line]


@pytest.mark.skipif("nvidia" not in getattr(triton.backends, "backends", {}), reason="Triton without its CUDA backend")
def test_key_loop_loads_are_pipelined_at_wan_length():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    copies = json.loads(result.stdout.strip().splitlines()[-1])
    assert any("i8" in line for line in copies), "K tiles are not copied asynchronously"
    assert any("f8E4M3FN" in line for line in copies), "V tiles are not copied asynchronously (unaligned rows?)"


def _dense_loop_mix() -> dict:
    """The tool's analysis of the dense kernel at 64x128, 4 warps, 3 stages."""
    r = _report().analyse(_compiled_dense("64x128 w4 s3"))
    return {"regs": r["regs"], "stl": r["stl"], "ldl": r["ldl"], "mix": dict(r["mix"])}


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
