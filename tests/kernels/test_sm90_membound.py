"""The quantization kernels as an H100 would execute them, checked on the CPU (tools/sm90_membound_report.py).

Per element, at workload W's shapes, compiled for sm_90 with a real launch's specialization: no spills, and few
enough thread-instructions that the H100 can issue them about as fast as HBM3 moves the 3 bytes the element costs
(about 10 per byte, the report's docstring). Measured 2026-12-08 (SASS), now (before): act_quant with the GELU
prologue at K = 8,960 20.6 instructions and 2.1 MUFU per element (56.1 and 4.1); without it at K = 1,536 9.7 (30.8);
LayerNorm + modulation + fp8 quant at K = 1,536 28.9 (54.1); q/k norm + rope 26.1 (28.8) with 16-byte accesses (4).
The bounds leave room for compiler drift, not for a second GELU, software fp8 rounding, padded lanes, per-tile
reductions or narrow accesses.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

REPORT = Path(__file__).resolve().parents[2] / "tools" / "sm90_membound_report.py"


@pytest.mark.skipif("nvidia" not in getattr(triton.backends, "backends", {}), reason="Triton without its CUDA backend")
def test_quantization_kernels_instruction_budget_on_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, str(REPORT), "--json", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["name"].split(" (")[0]: r for r in json.loads(out.read_text())}
    for name, row in rows.items():
        assert row["stl"] == 0 and row["ldl"] == 0, f"{name} spills: {row}"
    gelu = rows["act_quant fp8_e4m3 K=8960 gelu_tanh"]
    assert gelu["instr_per_elem"] <= 24 and gelu["mufu_per_elem"] <= 2.2, gelu
    assert rows["act_quant fp8_e4m3 K=1536 none"]["instr_per_elem"] <= 12, rows
    norm = rows["ln_modulate_quant fp8_e4m3 K=1536"]
    # 64 registers: 8 programs of 4 warps per SM; the earlier kernel's 8-row launch (128 registers, 2 programs)
    # measured 1.6x slower than its 2-row one at the same instruction count (BENCHMARKS.md, 2026-12-07).
    assert norm["instr_per_elem"] <= 32 and norm["regs"] <= 80, norm
    rope = rows["qk_norm_rope K=1536"]
    # Every global access 16 bytes wide (the (head, pair, 2) tile loaded directly gave 4-byte ones; JSON keys).
    assert set(rope["global_access_bytes"]) == {"16"} and rope["instr_per_elem"] <= 28, rope
