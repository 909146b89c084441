"""End-to-end forward time of a video DiT: eager, Inductor, torchao fp8, FlexAttention 15% + fp8, and qsparse.

Workload W (BASELINES.md): diffusers WanTransformer3DModel with the Wan2.1-1.3B config, random bf16 weights, eval,
no_grad; hidden_states (1, 16, 21, 60, 104) = 480p x 81 frames = 32,760 video tokens; encoder_hidden_states
(1, 512, 4096); timestep [500]. One transformer forward, median of triton.testing.do_bench. ``wan-1.3b-720p`` is the
same model at 720p (75,600 tokens); ``hunyuan-scaled`` is diffusers' HunyuanVideoTransformer3DModel at its real
width and a fifth of its depth (see HUNYUAN_SCALED). ``reference`` and ``hunyuan-reference`` are tiny CPU configs.

    python benchmarks/bench_e2e.py --workload wan-1.3b-480p --rows eager,inductor,fp8,flex-fp8,qsparse --out r.json
    python benchmarks/bench_e2e.py --workload reference --device cpu --rows eager,qsparse   # CPU smoke test

Every row builds its own model copy from the same seed (a compile mutates its module), compiles it, checks its
output against eager (relative error), and reports ms, speedup vs Inductor, compile seconds, peak memory and the
block weights' bytes. ``qsparse`` is timed for a refresh step and a reuse step of the residual cache and averaged
over a 50-step schedule. ``flex`` is the FlexAttention row with bf16 linears (BASELINES.md's 248 ms row; on the CPU
it is the only Flex row that runs: torchao's fp8 needs a CUDA GPU of compute capability >= 8.9).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
# HunyuanVideo (13B; diffusers' defaults = the released config): 20 dual-stream + 40 single-stream blocks of width
# 3072 (24 heads x 128), a 2-block text token refiner over LLaVA-Llama text states (4096), CLIP pooled text (768),
# 3-axis rope (16, 56, 56), guidance embedding.
HUNYUAN_VIDEO = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56),
)
# "Scaled to fit" (issue #9: one H100 80 GB, bf16, every row): depth 60 -> 12 blocks (4 dual + 8 single stream, the
# real 1:2 ratio) and video 720p x 129 frames (33 x 45 x 80 = 118,800 tokens) -> 480p x 81 frames (21 x 30 x 52 =
# 32,760 tokens, the Wan workload's grid). Everything a kernel sees is HunyuanVideo's: width 3072, 24 heads of 128,
# MLP 4x (12,288; the single-stream proj_out reads 15,360), the text refiner at 4096, 256 text positions with a
# key-padding mask, joint attention over 32,760 + 256 tokens (video first). Why (one dense forward, FlopCounterMode
# on the meta device, which bench_e2e prints; Wan-1.3B at 480p is 283 TFLOP):
# - full model at 720p x 129: 12,069 TFLOP (43x Wan), and the qsparse row's order-2 residual cache alone is
#   60 layers x 119,056 tokens x 3072 x bf16 x (R, dR) = 81.8 GiB: does not fit;
# - full model at 480p x 81: fits (25.6 GB of bf16 weights, 22.7 GiB of cache) but costs 1,253 TFLOP (4.4x Wan,
#   12.8B parameters): its rows would not fit the device's 10-minute calls as Wan's do;
# - scaled: 251 TFLOP (0.89x Wan; 161 of it attention), 2.85B parameters, residual cache 4.5 GiB.
HUNYUAN_SCALED = dict(HUNYUAN_VIDEO, num_layers=4, num_single_layers=8)
WORKLOADS: dict[str, dict[str, Any]] = {
    "wan-1.3b-480p": dict(model="wan", config=WAN_1_3B, latents=(1, 16, 21, 60, 104), text=(1, 512, 4096)),
    "wan-1.3b-720p": dict(model="wan", config=WAN_1_3B, latents=(1, 16, 21, 90, 160), text=(1, 512, 4096)),
    # 256 text positions (diffusers' HunyuanVideoPipeline max_sequence_length), the first 120 a prompt, the rest
    # padding that the joint attention masks out.
    "hunyuan-scaled": dict(model="hunyuan", config=HUNYUAN_SCALED, latents=(1, 16, 21, 60, 104), text=(1, 256, 4096),
                           text_tokens=120, pooled=(1, 768), guidance=6.0),
    # Small configs that run anywhere (the CPU smoke tests of this benchmark).
    "reference": dict(
        model="wan",
        config=dict(WAN_1_3B, num_attention_heads=4, attention_head_dim=32, text_dim=64, freq_dim=64, ffn_dim=512,
                    num_layers=2, rope_max_seq_len=128),
        latents=(1, 16, 5, 32, 32), text=(1, 16, 64),
    ),
    "hunyuan-reference": dict(
        model="hunyuan",
        config=dict(HUNYUAN_VIDEO, num_attention_heads=4, attention_head_dim=32, num_layers=1, num_single_layers=2,
                    num_refiner_layers=1, text_embed_dim=64, pooled_projection_dim=32, rope_axes_dim=(8, 12, 12)),
        latents=(1, 16, 3, 30, 32), text=(1, 16, 64), text_tokens=11, pooled=(1, 32), guidance=6.0,
    ),
}
# The blocks each model repeats: their linears are the ones quantized, their weights the ones counted.
BLOCK_PREFIXES = {"wan": ("blocks.",), "hunyuan": ("transformer_blocks.", "single_transformer_blocks.")}
ROWS = ("eager", "inductor", "fp8", "flex", "flex-fp8", "qsparse", "qsparse-cudagraphs")
SCHEDULE_STEPS = 50
# Per-channel int4 weights: the fastest W4A8 kernel path on the H100 (benchmarks/results/w4a8_linear.md).
# Conditioning linears (HunyuanVideo's modulation, 27% of its block parameters; Wan has none) as int4 weight-only.
QSPARSE_OPTIONS: dict[str, Any] = {"quant": {"group_size": 0, "conditioning_linears": "int4_weight_only"}}
CACHE: dict[str, Any] = {"refresh_first": 2, "refresh_every": 5, "order": 2}
REUSE_STEP = 7  # not a refresh step of CACHE's schedule
CPU_REPEATS = 3  # calls timed per row on the CPU (--cpu-repeats; the median is reported)


@dataclass
class Row:
    system: str
    ms: float
    compile_s: float
    peak_gib: float
    rel_error_vs_eager: float
    block_weight_bytes: int | None = None
    note: str = ""
    speedup_vs_inductor: float | None = None
    profile: dict[str, float] | None = None  # GPU ms per forward by kernel category (--profile)


def _model_class(workload: dict[str, Any]) -> type:
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    return {"wan": WanTransformer3DModel, "hunyuan": HunyuanVideoTransformer3DModel}[workload["model"]]


def make_inputs(workload: dict[str, Any], device: str, dtype: torch.dtype,
                generator: torch.Generator | None = None) -> dict[str, Any]:
    """Forward kwargs of the workload's model (random latents and text states; ``generator`` None: unseeded)."""
    def randn(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, device=device, dtype=dtype, generator=generator)

    inputs: dict[str, Any] = dict(
        hidden_states=randn(workload["latents"]),
        encoder_hidden_states=randn(workload["text"]),
        timestep=torch.tensor([500] * workload["latents"][0], device=device),
        return_dict=False,
    )
    if workload["model"] == "hunyuan":
        batch, positions = workload["text"][:2]
        # As the pipeline passes it: the tokenizer's 0/1 mask (int64), prompt first, padding after.
        mask = torch.zeros(batch, positions, dtype=torch.int64, device=device)
        mask[:, : workload["text_tokens"]] = 1
        inputs.update(
            encoder_attention_mask=mask,
            pooled_projections=randn(workload["pooled"]),
            # HunyuanVideoPipeline: guidance = guidance_scale * 1000
            guidance=torch.full((batch,), workload["guidance"] * 1000.0, device=device, dtype=dtype),
        )
    return inputs


def build(workload: dict[str, Any], device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    with torch.device(device):
        model = _model_class(workload)(**workload["config"]).eval().to(dtype)
    return model, make_inputs(workload, device, dtype, torch.Generator(device).manual_seed(1))


def forward_flops(workload: dict[str, Any]) -> dict[str, float]:
    """FLOPs of one dense bf16 forward, counted by torch's FlopCounterMode on the meta device (no memory, no time):
    ``attention`` = the scaled-dot-product attentions (video, joint, cross and text), ``linear`` = the matmuls of the
    linears, ``total`` = all counted ops (+ the patch embedding's convolution); and the model's parameter count."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = _model_class(workload)(**workload["config"]).eval().to(torch.bfloat16)
    inputs = make_inputs(workload, "meta", torch.bfloat16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    by_op = {str(op): float(count) for op, count in counter.get_flop_counts()["Global"].items()}
    # On the meta device SDPA runs its math path: its two matmuls are the batched ones (bmm); the linears are (add)mm.
    attention = sum(v for op, v in by_op.items() if "bmm" in op or "attention" in op)
    linear = sum(v for op, v in by_op.items() if op.endswith((".mm", ".addmm")))
    return {"total": float(counter.get_total_flops()), "attention": attention, "linear": linear,
            "parameters": float(sum(p.numel() for p in model.parameters()))}


def modulation_linears(model: torch.nn.Module) -> set[str]:
    """FQNs of the linears of adaptive norms (HunyuanVideo's ``norm1.linear`` ...): they map the (batch, dim) timestep
    embedding to scales and shifts, one row per sample - no token dimension, so the fp8 rows keep them bf16. (The
    qsparse rows pack them as int4 weight-only, QSPARSE_OPTIONS' ``quant.conditioning_linears``; ``weight_bytes``
    then counts their packed size, as for every weight in the packed-weight store.)"""
    return {f"{name}.{child_name}" for name, module in model.named_modules()
            if type(module).__name__.startswith("AdaLayerNorm")
            for child_name, child in module.named_children() if isinstance(child, torch.nn.Linear)}


def block_linear_filter(workload: dict[str, Any], model: torch.nn.Module) -> Callable[[torch.nn.Module, str], bool]:
    """torchao ``filter_fn``: the linears of the repeated blocks that see tokens."""
    prefixes, modulation = BLOCK_PREFIXES[workload["model"]], modulation_linears(model)
    return lambda module, fqn: (isinstance(module, torch.nn.Linear) and fqn.startswith(prefixes)
                                and fqn not in modulation)


def time_ms(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=300, rep=1500, return_mode="median"))
    times = []
    for _ in range(CPU_REPEATS):  # CPU: a smoke run, not a performance figure
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def weight_bytes(model: torch.nn.Module, prefixes: tuple[str, ...]) -> int:
    """Bytes of the blocks' weights as the model stores them: packed int4 where qsparse packed them."""
    from qsparse_compiler.runtime.weights import default_store

    total = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(prefixes):
            packed = default_store.packed_nbytes(tensor)
            total += packed if packed is not None else tensor.numel() * tensor.element_size()
    return total


FLEX_BLOCK = 128  # FlexAttention's tile (BASELINES.md: 128x128 blocks)


def _kv_blocks(bitmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks, kv_indices) of a (B, H, Q blocks, KV blocks) bool bitmap: the kept blocks first, in order."""
    counts = bitmap.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~bitmap).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts, indices


def _random_block_bitmap(blocks: int, density: float) -> torch.Tensor:
    """(1, 1, blocks, blocks): random blocks at ``density`` with the diagonal kept (as in BASELINES.md)."""
    generator = torch.Generator().manual_seed(2)
    bitmap = torch.rand(1, 1, blocks, blocks, generator=generator) < density
    return bitmap | torch.eye(blocks, dtype=torch.bool)


def video_tokens(workload: dict[str, Any]) -> int:
    """Video tokens after patchify (Wan: patch (1, 2, 2); HunyuanVideo: patch_size_t x patch_size^2)."""
    from qsparse_compiler.ops.context import patchified_grid

    return math.prod(patchified_grid(workload["config"], workload["latents"]))


FLEX_PATTERNS = ("random", "local3d")


def _flex_tile_bitmap(workload: dict[str, Any], tokens: int, density: float, pattern: str) -> torch.Tensor:
    """(1, 1, blocks, blocks) bool: the 128x128 tiles Flex keeps over the attention's ``tokens`` (video first).
    ``random``: random tiles at ``density`` + the diagonal (BASELINES.md's Flex row). ``local3d``: qsparse's own static
    pattern (``formats.patterns.local_3d``, the default ``SparsityConfig.pattern``: per query tile the ``density``
    share of video key tiles nearest in (frame, row, col), + the diagonal; tiles touching text dense), so a Flex row
    can be compared with qsparse on quality with the same tiles kept rather than random ones."""
    blocks = math.ceil(tokens / FLEX_BLOCK)
    if pattern == "random":
        return _random_block_bitmap(blocks, density)
    if pattern != "local3d":
        raise ValueError(f"Flex pattern {pattern!r}: choose one of {FLEX_PATTERNS}")
    from qsparse_compiler.formats.patterns import TokenGrid, local_3d
    from qsparse_compiler.ops.context import patchified_grid

    frames, height, width = patchified_grid(workload["config"], workload["latents"])
    return local_3d(TokenGrid(frames, height, width, seq_len=tokens), FLEX_BLOCK, FLEX_BLOCK, density)[None, None]


def flex_block_masks(workload: dict[str, Any], inputs: dict[str, Any], density: float, pattern: str = "random"):
    """FlexAttention BlockMask of the workload's video attention: 128x128 tiles at ``density`` chosen by ``pattern``
    (``_flex_tile_bitmap``: random + diagonal by default, or qsparse's local3d).

    Wan (self-attention over the video): the bitmap over the video tokens (random: as in BASELINES.md).
    HunyuanVideo (joint attention over [video, text], video first, padded text masked): the video x video tiles are
    the pattern's; every tile that touches a text token, as query or key, is kept (qsparse keeps those dense
    too); the padded text keys are masked - a tile whose keys are all padding is dropped, a tile with some padding
    is a partial block (the kernel evaluates mask_mod in it), every other kept tile is a full block (no mask_mod).
    The mask is per sample (the valid text length differs per sample). Its mask_mod states the whole mask (kept tile
    and valid key), so eager flex_attention, which evaluates only mask_mod and ignores the block tables, computes
    the same attention as the compiled kernel, which evaluates it only in the partial blocks.
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = inputs["hidden_states"].device
    video = video_tokens(workload)
    if workload["model"] == "wan":
        counts, indices = _kv_blocks(_flex_tile_bitmap(workload, video, density, pattern))
        return BlockMask.from_kv_blocks(counts.to(device), indices.to(device), BLOCK_SIZE=FLEX_BLOCK,
                                        seq_lengths=(video, video))
    mask = inputs["encoder_attention_mask"]
    tokens = video + mask.shape[1]
    blocks = math.ceil(tokens / FLEX_BLOCK)
    starts = torch.arange(blocks) * FLEX_BLOCK
    ends = torch.clamp(starts + FLEX_BLOCK, max=tokens)  # the last block stops at the sequence's end
    touches_text = ends > video
    kept = _flex_tile_bitmap(workload, tokens, density, pattern) | touches_text[:, None] | touches_text[None, :]
    valid_keys = video + mask.to(torch.int64).sum(dim=1).cpu()  # (B,): keys [0, valid_keys) take part
    all_valid = (ends[None, :] <= valid_keys[:, None])[:, None, None, :]  # (B, 1, 1, KV blocks)
    none_valid = (starts[None, :] >= valid_keys[:, None])[:, None, None, :]
    full = kept & all_valid
    partial = kept & ~all_valid & ~none_valid
    limit = valid_keys.to(device=device, dtype=torch.int32)
    tiles = kept.to(device)

    def kept_tile_and_valid_key(b, h, q_idx, kv_idx):
        return tiles[0, 0, q_idx // FLEX_BLOCK, kv_idx // FLEX_BLOCK] & (kv_idx < limit[b])

    counts, indices = _kv_blocks(partial)
    full_counts, full_indices = _kv_blocks(full)
    return BlockMask.from_kv_blocks(counts.to(device), indices.to(device), full_counts.to(device),
                                    full_indices.to(device), BLOCK_SIZE=FLEX_BLOCK, mask_mod=kept_tile_and_valid_key,
                                    seq_lengths=(tokens, tokens))


class _FlexSelfAttention:
    """Wan attn1 processor that runs diffusers' flex backend with a fixed block mask."""

    def __init__(self, processor: Any, block_mask: Any) -> None:
        self.processor, self.block_mask = processor, block_mask
        self.processor._attention_backend = "flex"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        return self.processor(attn, hidden_states, encoder_hidden_states, self.block_mask, rotary_emb, **kw)


class _FlexJointAttention:
    """HunyuanVideo joint-attention processor (dual- and single-stream blocks) that runs diffusers' flex backend with
    a fixed block mask over [video, text] in place of the model's (B, 1, 1, S) key-padding mask, which the block mask
    already holds. (Named parameters: diffusers' Attention drops keyword arguments its processor does not name.)"""

    def __init__(self, processor: Any, block_mask: Any) -> None:
        self.processor, self.block_mask = processor, block_mask
        self.processor._attention_backend = "flex"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return self.processor(attn, hidden_states, encoder_hidden_states, self.block_mask, image_rotary_emb)


def install_flex_attention(model: torch.nn.Module, workload: dict[str, Any], block_mask: Any) -> None:
    """Route the model's video attentions through FlexAttention with ``block_mask``."""
    if workload["model"] == "wan":
        for block in model.blocks:
            block.attn1.set_processor(_FlexSelfAttention(block.attn1.processor, block_mask))
        return
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.attn.set_processor(_FlexJointAttention(block.attn.processor, block_mask))


def run_row(name: str, workload: dict[str, Any], device: str, dtype: torch.dtype, eager_out: torch.Tensor | None,
            density: float, profile_dir: Path | None = None) -> list[Row]:
    model, inputs = build(workload, device, dtype)
    note = ""
    if name in ("fp8", "flex-fp8"):
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=block_linear_filter(workload, model))
    if name in ("flex", "flex-fp8"):
        install_flex_attention(model, workload, flex_block_masks(workload, inputs, density))
        note = f"random {density:.0%} 128x128 blocks + diagonal"
        if workload["model"] == "hunyuan":
            note += " in the video x video region; text tiles dense, padded text keys masked"
    runtime = None
    if name in ("qsparse", "qsparse-cudagraphs"):
        import qsparse_compiler as qs

        options = {**QSPARSE_OPTIONS, "sparsity": {**QSPARSE_OPTIONS.get("sparsity", {}), "density": density}}
        cuda_graphs = name == "qsparse-cudagraphs"
        fn_model = qs.optimize(model, options=options, cache=CACHE, regional=not cuda_graphs, cuda_graphs=cuda_graphs)
        runtime = qs.runtime_of(fn_model)
        how = "whole model, a refresh and a reuse CUDA graph" if cuda_graphs else "regional compile"
        note = f"{how}, options {json.dumps(options)}, cache {json.dumps(CACHE)}"
    elif name == "eager":
        fn_model = model
    else:
        model.compile_repeated_blocks(fullgraph=True)
        fn_model = model
    start = time.perf_counter()
    with torch.no_grad():
        if runtime is not None:
            runtime.step(0)
        # Clones: under CUDA graphs an output lives in the graph's memory pool, which the next replay overwrites.
        out = fn_model(**inputs)[0].clone()
        if runtime is not None:  # the first reuse step: a second graph where refresh and reuse are compiled apart
            runtime.step(REUSE_STEP - 2)  # CACHE's refresh before REUSE_STEP: the runtime owes skipped refreshes
            fn_model(**inputs)
            runtime.step(REUSE_STEP)
            out_reuse = fn_model(**inputs)[0].clone()
    compile_s = time.perf_counter() - start
    note_parts = [note] if note else []
    if runtime is not None:
        freed = qs.release_dense_weights(fn_model)
        cache_bytes = runtime.memory_report()["total"]["bytes"]
        note_parts.append(f"released {freed / 2**30:.2f} GiB of bf16 block weights; residual cache "
                          f"{cache_bytes / 2**30:.2f} GiB")
    note = "; ".join(note_parts)
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    def error_of(result: torch.Tensor) -> float:
        return 0.0 if eager_out is None else float((result.float() - eager_out.float()).norm() / eager_out.float().norm())

    error = error_of(out)
    rows = []

    def measure(system: str, before: Callable[[], Any] | None, error: float = error) -> Row:
        def call():
            if before is not None:
                before()
            return fn_model(**inputs)

        with torch.no_grad():
            ms = time_ms(call, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        row = Row(system, ms, compile_s if name != "eager" else 0.0, peak, error, note=note)
        if profile_dir is not None:
            slug = re.sub(r"[^A-Za-z0-9]+", "_", system).strip("_")
            try:
                row.profile = profile_forward(call, device, profile_dir / f"profile_{slug}.txt")
            except Exception as exc:  # a profiler failure must not lose the timing
                row.note += f"; profile failed: {type(exc).__name__}: {exc}"[:200]
        return row

    if runtime is None:
        rows.append(measure(name, None))
    else:
        refresh = measure(f"{name} (refresh step)", lambda: runtime.step(0))
        # Same inputs every step: the reuse output is the sparse output plus the residual of the refresh, so its error
        # vs eager shows the cache at work (without it, sparse attention alone is far off).
        reuse = measure(f"{name} (reuse step)", lambda: runtime.step(REUSE_STEP), error_of(out_reuse))
        schedule = runtime_schedule_counts(SCHEDULE_STEPS)
        average = (schedule[0] * refresh.ms + schedule[1] * reuse.ms) / SCHEDULE_STEPS
        rows += [refresh, reuse, Row(f"{name} ({SCHEDULE_STEPS}-step average)", average, compile_s,
                                     max(refresh.peak_gib, reuse.peak_gib), max(refresh.rel_error_vs_eager,
                                                                                reuse.rel_error_vs_eager),
                                     note=f"{schedule[0]} refresh + {schedule[1]} reuse steps; {note}")]
    for row in rows:
        row.block_weight_bytes = weight_bytes(model, BLOCK_PREFIXES[workload["model"]])
    del model, fn_model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


# Kernel name -> where the time goes (issue #9's profile). First match wins; names are Triton kernel function names,
# Inductor's generated kernels (triton_*) and the library kernels of cuBLAS / SDPA.
KERNEL_CATEGORIES: list[tuple[str, str]] = [
    ("w4a8 GEMM", r"_w4a8_gemm_kernel"),
    ("int4 unpack", r"_int4_unpack_kernel"),
    ("activation quant kernel (FFN down: + GELU)", r"_act_quant_kernel"),
    ("sparse attention (ours)", r"_block_sparse_attention_fwd"),
    ("residual cache step", r"_residual_cache_step_kernel"),
    ("layout build", r"_block_scores_kernel"),
    ("flex attention", r"flex_attention|triton_tem_fused"),
    # Inductor names its kernels after the ops they fuse ("..._w4a8_gemm_7" is a quantization feeding our GEMM).
    ("Inductor fused (norms, rope, modulation, act quant, GELU)", r"^triton_"),
    ("dense SDPA (cross attn; self attn on refresh)", r"flash|fmha|cudnn|attention"),
    ("fp8 / bf16 GEMM (cuBLAS)", r"gemm|nvjet|sm90_xmma|cutlass|scaled_mm"),
]


def profile_forward(call: Callable[[], Any], device: str, table: Path, repeats: int = 3) -> dict[str, float]:
    """GPU ms per forward by kernel category, plus the wall time and the idle gap between kernels.

    The profiler's own table (top kernels by GPU time) goes to ``table``."""
    from torch.profiler import ProfilerActivity, profile

    if device != "cuda":
        return {}
    with torch.no_grad():
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - start) * 1e3 / repeats
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        category = next((c for c, pattern in KERNEL_CATEGORIES if re.search(pattern, event.name)), "other kernels")
        totals[category] = totals.get(category, 0.0) + event.time_range.elapsed_us() / 1e3 / repeats
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
    busy = sum(totals.values())
    totals = {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    totals["kernels total"] = round(busy, 3)
    totals["wall (profiled)"] = round(wall_ms, 3)
    totals["idle / launch gaps"] = round(max(wall_ms - busy, 0.0), 3)
    return totals


def runtime_schedule_counts(steps: int) -> tuple[int, int]:
    from qsparse_compiler.config import CacheConfig

    schedule = CacheConfig(enabled=True, **CACHE)
    refresh = sum(schedule.is_refresh_step(i) for i in range(steps))
    return refresh, steps - refresh


def main() -> None:
    global CPU_REPEATS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="wan-1.3b-480p", choices=sorted(WORKLOADS))
    parser.add_argument("--rows", default="eager,inductor,fp8,flex-fp8,qsparse")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/e2e.json"))
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="also profile each row: GPU ms per kernel category in the JSON, kernel tables in DIR")
    parser.add_argument("--qsparse-options", default=json.dumps(QSPARSE_OPTIONS), help="backend options (JSON)")
    parser.add_argument("--cache", default=json.dumps(CACHE),
                        help='residual-cache schedule of the qsparse rows (JSON), e.g. \'{"order": 1, "storage": "fp8_e4m3"}\' '
                             "(fields of qsparse_compiler.config.CacheConfig; the given ones replace the default's)")
    parser.add_argument("--cpu-repeats", type=int, default=CPU_REPEATS,
                        help="calls timed per row on the CPU (a smoke run: its times are not performance figures)")
    parser.add_argument("--plot", type=Path, metavar="JSON", help="only draw the bar chart of a results JSON")
    args = parser.parse_args()
    if args.plot is not None:
        print(f"wrote {plot_results(args.plot)}")
        return
    QSPARSE_OPTIONS.clear()
    QSPARSE_OPTIONS.update(json.loads(args.qsparse_options))
    CACHE.update(json.loads(args.cache))
    if args.cpu_repeats < 1:
        parser.error(f"--cpu-repeats {args.cpu_repeats}: must be >= 1")
    CPU_REPEATS = args.cpu_repeats
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown row(s) {unknown}; the rows are {', '.join(ROWS)}")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    workload = WORKLOADS[args.workload]
    try:
        flops = forward_flops(workload)
        size: dict[str, Any] = {"forward_tflop": {k: round(v / 1e12, 6) for k, v in flops.items() if k != "parameters"},
                                "parameters": int(flops["parameters"])}
        print(f"{args.workload}: {video_tokens(workload):,} video tokens, {flops['parameters'] / 1e6:,.1f}M parameters, "
              f"one dense forward {flops['total'] / 1e12:,.4g} TFLOP (attention {flops['attention'] / 1e12:,.4g}, "
              f"linears {flops['linear'] / 1e12:,.4g})", flush=True)
    except Exception as exc:  # an estimate must not cost the run its rows: recorded, as a failing row is
        size = {"forward_tflop": f"failed: {type(exc).__name__}: {exc}"[:300]}
        print(f"{args.workload}: FLOP count {size['forward_tflop']}", flush=True)
    eager_model, inputs = build(workload, args.device, dtype)
    with torch.no_grad():
        eager_out = eager_model(**inputs)[0]
    del eager_model
    gc.collect()
    meta = {
        "workload": args.workload, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "density": args.density, "date": time.strftime("%Y-%m-%d"),
        "video_tokens": video_tokens(workload), **size,
    }
    rows: list[Row] = []
    for name in args.rows.split(","):
        try:
            rows += run_row(name, workload, args.device, dtype, eager_out, args.density, args.profile)
        except Exception as exc:  # a failing baseline is recorded, not hidden
            rows.append(Row(name, float("nan"), 0.0, 0.0, float("nan"), note=f"failed: {type(exc).__name__}: {exc}"[:300]))
        torch._dynamo.reset()
        write_results(args.out, meta, rows)  # after every row: a time limit keeps what finished


def plot_results(json_path: Path) -> Path:
    """Bar chart (ms per forward, lower is better) of the rows of a results JSON, next to it as .png."""
    from qsparse_compiler.eval.plots import bar_plot

    data = json.loads(json_path.read_text())
    values = {r["system"]: r["ms"] for r in data["rows"] if r["ms"] == r["ms"]}
    meta = data["meta"]
    return bar_plot(values, json_path.with_suffix(".png"), size=(900, 440),
                    title=f"ms per forward (lower is better): {meta['workload']} on {meta['device']}, "
                          f"torch {meta['torch']}, {meta['date']}")


def write_results(out: Path, meta: dict[str, Any], rows: list[Row]) -> None:
    inductor = next((r.ms for r in rows if r.system == "inductor"), None)
    for row in rows:
        row.speedup_vs_inductor = inductor / row.ms if inductor and row.ms == row.ms else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"\n{meta}")
    print("| system | ms/forward | vs Inductor | compile s | peak GiB | block weights MiB | rel. error vs eager | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mib = f"{r.block_weight_bytes / 2**20:.0f}" if r.block_weight_bytes else "-"
        speed = f"{r.speedup_vs_inductor:.2f}x" if r.speedup_vs_inductor else "-"
        print(f"| {r.system} | {r.ms:.1f} | {speed} | {r.compile_s:.0f} | {r.peak_gib:.1f} | {mib} | "
              f"{r.rel_error_vs_eager:.3g} | {r.note} |", flush=True)
    for r in rows:
        if r.profile:
            print(f"\nprofile of {r.system} (GPU ms per forward): " + ", ".join(f"{k} {v}" for k, v in r.profile.items()))


if __name__ == "__main__":
    main()
