"""benchmarks/bench_e2e.py on its small CPU workloads: every row builds, compiles, runs and is recorded (the CPU smoke
test of issue #9's benchmark; no timing asserts - CPU times are not performance figures).

The Flex rows: ``flex-fp8`` cannot run on the CPU (torchao's fp8 needs a CUDA GPU of compute capability >= 8.9);
``flex`` (bf16 linears) does, but its compile of HunyuanVideo's block classes costs ~17 s on 2 cores, so its parts are
tested here without compiling: the joint block mask (tables, mask_mod and output vs SDPA) and the processors that
route HunyuanVideo's joint attention through it (eager flex_attention evaluates the mask's mask_mod).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_e2e.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves its annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _run(workload: str, rows: str, out: Path) -> dict:
    command = [sys.executable, str(BENCH), "--workload", workload, "--device", "cpu", "--rows", rows,
               "--cpu-repeats", "1", "--out", str(out)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_reference_workload_rows_and_chart(tmp_path):
    out = tmp_path / "e2e.json"
    data = _run("reference", "eager,qsparse", out)
    rows = {row["system"]: row for row in data["rows"]}
    assert set(rows) == {"eager", "qsparse (refresh step)", "qsparse (reuse step)", "qsparse (50-step average)"}
    assert all(row["ms"] > 0 for row in rows.values()), "a row failed: " + str([r["note"] for r in rows.values()])
    reuse = rows["qsparse (reuse step)"]
    # int4 weights + 15% attention + the residual cache: a small, nonzero error vs eager, also on the reuse step.
    assert 0 < reuse["rel_error_vs_eager"] < 0.05
    assert reuse["block_weight_bytes"] < rows["eager"]["block_weight_bytes"] / 3
    assert "residual cache" in reuse["note"] and "11 refresh + 39 reuse" in rows["qsparse (50-step average)"]["note"]
    subprocess.run([sys.executable, str(BENCH), "--plot", str(out)], check=True, cwd=ROOT, capture_output=True,
                   timeout=120)
    assert out.with_suffix(".png").stat().st_size > 1000


# `extended`: the costliest test of the default run (~85 CPU-s: three compiles of HunyuanVideo in a subprocess). The
# default run keeps the bench's end-to-end run (test_reference_workload_rows_and_chart) and HunyuanVideo's regional
# qsparse compile (tests/backend/test_compile_conditioning_linears.py, test_compile_models.py).
@pytest.mark.slow
@pytest.mark.extended
def test_hunyuan_reference_workload_rows(tmp_path):
    """HunyuanVideo's dual- and single-stream blocks, token refiner and text key-padding mask through eager, Inductor
    (compile_repeated_blocks) and qsparse (regional: one graph per block class)."""
    data = _run("hunyuan-reference", "eager,inductor,qsparse", tmp_path / "e2e.json")
    rows = {row["system"]: row for row in data["rows"]}
    assert set(rows) == {"eager", "inductor", "qsparse (refresh step)", "qsparse (reuse step)",
                         "qsparse (50-step average)"}
    assert all(row["ms"] > 0 for row in rows.values()), "a row failed: " + str([r["note"] for r in rows.values()])
    assert rows["inductor"]["rel_error_vs_eager"] < 1e-4
    reuse = rows["qsparse (reuse step)"]
    assert 0 < reuse["rel_error_vs_eager"] < 0.05
    # Both block classes' linears are packed (the adaptive norms' modulation linears stay bf16).
    assert reuse["block_weight_bytes"] < rows["eager"]["block_weight_bytes"] / 2.5
    assert data["meta"]["video_tokens"] == 3 * 15 * 16
    flops = data["meta"]["forward_tflop"]
    assert 0 < flops["attention"] < flops["total"] and 0 < flops["linear"] < flops["total"]


def _tiles(num_blocks: torch.Tensor, indices: torch.Tensor, blocks: int) -> torch.Tensor:
    """(B, 1, Q blocks, KV blocks) bool map of a block table."""
    dense = torch.zeros(*num_blocks.shape, blocks, dtype=torch.bool)
    for b, h, q in torch.cartesian_prod(*(torch.arange(n) for n in num_blocks.shape)).tolist():
        dense[b, h, q, indices[b, h, q, : num_blocks[b, h, q]].long()] = True
    return dense


def test_hunyuan_flex_block_mask_matches_its_token_mask_and_sdpa(bench):
    block = bench.FLEX_BLOCK
    # 720 video tokens + 300 text positions = 1020 tokens = 8 blocks (the last one partial); sample 0 has 11 valid
    # text tokens (blocks 6 and 7 are all padding), sample 1 has 200 (block 7 holds the padding edge).
    workload = dict(bench.WORKLOADS["hunyuan-reference"], latents=(2, 16, 3, 30, 32), text=(2, 300, 64), pooled=(2, 32))
    inputs = bench.make_inputs(workload, "cpu", torch.float32, torch.Generator().manual_seed(0))
    inputs["encoder_attention_mask"][1, :200] = 1
    mask = bench.flex_block_masks(workload, inputs, density=0.15)
    video, tokens, blocks = 720, 1020, 8
    assert mask.seq_lengths == (tokens, tokens) and mask.kv_num_blocks.shape == (2, 1, blocks)

    # The token-level mask the block mask stands for, from its own mask_mod.
    b, q, kv = torch.meshgrid(torch.arange(2), torch.arange(tokens), torch.arange(tokens), indexing="ij")
    allowed = mask.mask_mod(b, torch.zeros_like(b), q, kv)
    valid_keys = torch.tensor([video + 11, video + 200])
    assert not (allowed & (kv >= valid_keys[:, None, None])).any()  # padded text keys never take part
    touches_text = (torch.arange(tokens) // block) >= video // block
    # Every query/key block that touches text is kept for every valid key; video x video tiles are the random ones.
    assert (allowed | (kv >= valid_keys[:, None, None]))[:, touches_text].all()
    assert (allowed | (kv >= valid_keys[:, None, None]))[:, :, touches_text].all()
    video_tiles = allowed[:, : video // block * block, : video // block * block]
    assert 0.15 < video_tiles.float().mean() < 0.6  # ~15% random + the diagonal over 5 blocks

    # The kernel's block tables agree with mask_mod: partial = tiles with some allowed and some masked in-range keys,
    # full = tiles with every in-range key allowed, dropped = none allowed.
    def per_tile(x: torch.Tensor) -> torch.Tensor:  # (2, tokens, tokens) -> (2, Q blocks, KV blocks, tile)
        x = F.pad(x, (0, blocks * block - tokens, 0, blocks * block - tokens))
        return x.reshape(2, blocks, block, blocks, block).transpose(2, 3).flatten(3)

    out_of_range = ~per_tile(torch.ones(2, tokens, tokens, dtype=torch.bool))  # the pad of the last block
    any_allowed = per_tile(allowed).any(-1)[:, None]
    all_allowed = (per_tile(allowed) | out_of_range).all(-1)[:, None]
    full = _tiles(mask.full_kv_num_blocks, mask.full_kv_indices, blocks)
    partial = _tiles(mask.kv_num_blocks, mask.kv_indices, blocks)
    assert torch.equal(full, all_allowed) and torch.equal(partial, any_allowed & ~all_allowed)
    assert not (full | partial)[0, 0, :, 6:].any()  # sample 0: key blocks 6, 7 are all padding

    # What flex_attention computes with it (eager: from mask_mod) is SDPA with that token mask.
    from torch.nn.attention.flex_attention import flex_attention

    qkv = [torch.randn(2, 2, tokens, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    expected = F.scaled_dot_product_attention(*qkv, attn_mask=allowed[:, None])
    assert torch.allclose(flex_attention(*qkv, block_mask=mask), expected, atol=1e-5)


def test_wan_flex_local3d_mask_keeps_qsparse_tiles(bench):
    """pattern="local3d": Flex keeps exactly the tiles of qsparse's static pattern at the same density (so a Flex row
    can be compared with qsparse on quality), not random ones; an unknown pattern is refused by name."""
    from qsparse_compiler.formats.patterns import TokenGrid, local_3d
    from qsparse_compiler.ops.context import patchified_grid

    workload = bench.WORKLOADS["reference"]  # 5 x 16 x 16 video tokens = 1280 = 10 tiles of 128
    inputs = bench.make_inputs(workload, "cpu", torch.float32, torch.Generator().manual_seed(0))
    grid = patchified_grid(workload["config"], workload["latents"])
    expected = local_3d(TokenGrid(*grid, seq_len=1280), 128, 128, 0.3)
    mask = bench.flex_block_masks(workload, inputs, density=0.3, pattern="local3d")
    kept = _tiles(mask.kv_num_blocks, mask.kv_indices, 10)[0, 0]
    assert torch.equal(kept, expected) and 0.3 <= kept.float().mean() < 0.5  # ceil(0.3 x 10) = 3 + diagonal
    random = bench.flex_block_masks(workload, inputs, density=0.3)
    assert not torch.equal(_tiles(random.kv_num_blocks, random.kv_indices, 10)[0, 0], kept)
    with pytest.raises(ValueError, match="pattern 'radial'"):
        bench.flex_block_masks(workload, inputs, 0.3, pattern="radial")


def test_hunyuan_flex_processors_at_full_density_equal_the_model(bench):
    """Both block classes' joint attention through the flex processors, at density 1 (dense tiles, padded text keys
    masked by the block mask instead of the model's key-padding mask): the model's own output."""
    workload = bench.WORKLOADS["hunyuan-reference"]
    model, inputs = bench.build(workload, "cpu", torch.float32)
    with torch.no_grad():
        expected = model(**inputs)[0]
        bench.install_flex_attention(model, workload, bench.flex_block_masks(workload, inputs, density=1.0))
        actual = model(**inputs)[0]
    flex = [block.attn.processor for block in [*model.transformer_blocks, *model.single_transformer_blocks]]
    assert len(flex) == 3 and all(isinstance(p, bench._FlexJointAttention) for p in flex)
    assert float((actual - expected).norm() / expected.norm()) < 1e-5
