"""benchmarks/byte_accounting.py without a GPU: table 1's arithmetic for workload W, the kernel -> stage mapping on
the kernel names of the H200 profile it was written against, and the refusal of a block it does not model."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def accounting():
    spec = importlib.util.spec_from_file_location("byte_accounting", ROOT / "benchmarks" / "byte_accounting.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_workload_w_stage_bytes(accounting):
    bench = accounting._load_bench_e2e()
    stages = {s.name: s for s in accounting.minimum_bytes(bench.WORKLOADS["wan-1.3b-480p"], cache_order=2)}
    tokens, dim, ffn = 21 * 30 * 52, 1536, 8960
    # LayerNorm + modulation + quant: read x in bf16, write fp8 codes and an fp32 scale per token.
    assert stages["norm1 + modulation + quant"].one_pass_bytes == 2 * tokens * dim + tokens * dim + 4 * tokens
    # GELU + quant folded into FFN up: only the codes and scales of the (tokens, ffn) hidden state reach memory.
    assert stages["FFN GELU + quant"].fused_bytes == tokens * ffn + 4 * tokens
    assert stages["FFN GELU + quant"].one_pass_bytes == 3 * tokens * ffn + 4 * tokens
    # Order 2 keeps R and dR; in the attention epilogue only they are read (O_sparse stays on chip).
    assert stages["residual cache step"].fused_bytes == 2 * 2 * tokens * dim
    assert all(s.fused_bytes <= s.one_pass_bytes for s in stages.values())


def test_h200_profile_kernels_map_to_stages(accounting):
    profile = ROOT / "benchmarks/results/h200/profile/wan480p_qsparse_reuse_step.txt"
    names = {line.split()[0] for line in profile.read_text().splitlines()
             if line.strip().startswith(("triton_", "_"))}
    stages = {name: accounting.stage_of(name) for name in names}
    assert stages["triton_red_fused__fused_rms_norm_add_copy_mul_slice_sub_unbind_view_1"] == "q/k RMS norm + rope"
    assert stages["_act_quant_kernel"] == "FFN GELU + quant"
    assert stages["_block_sparse_attention_fwd"] == "sparse attention"
    layer_norm = [n for n in names if re.search("native_layer_norm", n)]
    assert layer_norm and all(stages[n] == "norm + modulation + quant (norm1/norm3)" for n in layer_norm)
    assert "other" not in {stages[n] for n in names if n.startswith("triton_")}


def test_unmodelled_block_is_refused(accounting):
    bench = accounting._load_bench_e2e()
    with pytest.raises(ValueError, match="models Wan's block only"):
        accounting.minimum_bytes(bench.WORKLOADS["hunyuan-scaled"], cache_order=2)
