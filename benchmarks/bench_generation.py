"""Whole-video speed and fidelity: a real sampling loop with classifier-free guidance, per configuration.

Users time videos, not forwards. Each row builds its own model (same seed), then runs the denoising loop as
diffusers' ``WanPipeline`` runs it: ``steps`` scheduler steps, each a conditional and an unconditional transformer call,
each inside ``transformer.cache_context("cond" / "uncond", step_index=..., sigma=..., num_inference_steps=...)``,
then ``scheduler.step`` on float32 latents; after the video the step caches' state is reset
(``_reset_stateful_cache``, as the pipeline's ``maybe_free_model_hooks`` does). The scheduler is
``UniPCMultistepScheduler`` with Wan's flow sigmas and flow shift (3.0 at 480p, 5.0 at 720p; the released
Wan2.1-1.3B scheduler config) or ``FlowMatchEulerDiscreteScheduler`` (``--scheduler euler``).

Speed (default): workload W of bench_e2e.py (Wan2.1-1.3B config, random bf16 weights, 480p x 81 frames, 512 text
tokens; ``--workload reference`` is a tiny CPU config). Per row: the cold video (every compile + the first run),
then one warm video: wall clock around the whole loop, CUDA-synchronized (``seconds_per_video``), the transformer
calls and the blocks actually executed in it (a step cache skips blocks: ``forwards_executed`` = executed blocks /
blocks), the peak GPU memory of the warm video, and whether the final latents are finite.

    python benchmarks/bench_generation.py --rows inductor,flex-fp8,flex-fp8+fbc,qsparse --out gen.json
    python benchmarks/bench_generation.py --workload reference --device cpu --steps 3 --rows inductor,qsparse

Fidelity (``--fidelity``): the same rows and the same loop on the trained reference DiT (testing/reference_model.py)
at the same seeds as ``qsparse eval`` (prompt and starting noise per seed, the all-zero prompt as the negative one),
whole runs; PSNR / SSIM of every row's videos against the eager dense run's. ``qsparse eval --pareto gen.json
--fidelity-json fid.json`` joins the two into (seconds per video, dB) points and draws the Pareto plot.

    python benchmarks/bench_generation.py --fidelity --device cpu --frames 4 --height 32 --width 32 --steps 8 \\
        --seeds 0,1 --rows inductor,flex,qsparse,inductor+fbc --out fid.json

Rows: ``BASE[+STEP_CACHE]`` or ``cache-dit``.
- BASE ``eager`` | ``inductor`` (bf16 Inductor) | ``flex`` (FlexAttention, random 15% of 128x128 tiles + diagonal,
  bf16 linears) | ``flex-fp8`` (that + torchao fp8 rowwise linears; needs a CUDA GPU of compute capability >= 8.9)
  | ``qsparse`` (``qs.optimize``: regional compile, int4 weights, 15% sparse attention, the residual cache; its
  step clock is hooked on this loop's scheduler as on a pipeline's). The model and attention builders are
  bench_e2e.py's.
- The eager / Inductor / Flex rows compile each block's own ``forward`` (one graph for all blocks, as
  ``compile_repeated_blocks``) *below* diffusers' cache hooks: the hooks decide on the host whether a block runs, the
  block's computation is the compiled graph. A host-side counter between the two counts executed blocks.
- ``qsparse[KEY=VALUE,...]``: the qsparse row with its residual-cache schedule or attention precision changed:
  ``first`` / ``every`` (refresh the first k steps, then every n-th: CacheConfig.refresh_first / refresh_every; the
  default row's 2 / 5 refreshes 11 of 50 steps, ``first=1,every=10`` 5 of 50: 0, 10, .., 40), ``steps=0:11:32``
  (exactly these steps refresh: CacheConfig.refresh_steps - e.g. steps a step cache is known to run), ``order``
  (1 or 2), ``attn`` (``sparsity.attention_precision``: bf16 or int8_fp8, the 8-bit kernels for the sparse and the
  refresh attention), ``graphs=1`` (``qs.optimize(cuda_graphs=True)``, still regional: each block replays a captured refresh
  or reuse CUDA graph - no Python op wrappers or kernel launches on the host per call), ``density`` (the row's
  attention density instead of ``--density``: what the residual cache's quality margin can buy in speed).
- STEP_CACHE (diffusers 0.42 ``transformer.enable_cache``): ``fbc`` FirstBlockCacheConfig, ``mag`` MagCacheConfig
  (calibrated first: one full video with ``calibrate=True`` records each CFG branch's residual magnitude ratio per
  step; the warm video runs with their mean as ``mag_ratios``; ``--mag-ratios FIDELITY_JSON`` takes the ratios of
  the same row of a ``--fidelity`` run instead, so a speed row skips exactly the steps whose PSNR was measured),
  ``taylorseer`` TaylorSeerCacheConfig in lite mode (its default mode hooks the attention modules inside each
  block, where regional compilation traces its host-side step counter; lite mode skips whole blocks and predicts
  ``proj_out``). Each may carry settings over diffusers'
  defaults, to trace a step cache's speed / quality curve: ``fbc[threshold=T]``, ``mag[threshold=T,max_skip=N,
  retention=R]``, ``taylorseer[interval=N,warmup=N]``.
- ``flex[pattern=local3d]`` / ``flex-fp8[pattern=local3d]``: the Flex row keeping qsparse's own static tiles
  (``local3d`` at the same density) instead of random ones - the same cost, and a fair quality baseline for qsparse;
  ``density=D`` sets the row's density (Flex at the density where its quality meets qsparse's).
- ``cache-dit``: cache-dit's one-line default (``DBCacheConfig()``: DBCache F8B0, 8 warmup steps) through its Wan
  block adapter (Pattern_2, separate CFG) with its compile settings (``set_compile_configs``) and
  ``compile_repeated_blocks``, bf16 weights. Its global Dynamo / Inductor settings are restored after the row.

A failing row is recorded with its error and the run goes on; the JSON (and a markdown table, and a bar chart of
seconds per video) is rewritten after every row, so a time limit keeps what finished. ``--row-budget`` bounds one
row's wall clock: the loop stops at the first step past it, and the warm video is skipped when the cold one already
used more than half of it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import json
import logging
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402  (the workloads, the model and the Flex / fp8 builders)

STEP_CACHES = ("fbc", "mag", "taylorseer")
BASES = ("eager", "inductor", "flex", "flex-fp8", "qsparse")
DEFAULT_ROWS = "inductor,flex-fp8,flex-fp8+fbc,flex-fp8+mag,flex-fp8+taylorseer,cache-dit,qsparse,qsparse+fbc"
GUIDANCE = 5.0  # WanPipeline's default guidance_scale
FLOW_SHIFT = {"wan-1.3b-480p": 3.0, "wan-1.3b-720p": 5.0}  # Wan2.1's flow shift per resolution (else 3.0)
DENSITY = 0.15
WAN_1_3B_BLOCKS = bench_e2e.WAN_1_3B["num_layers"]
# qsparse's residual-cache schedule in a video (bench_e2e's: refresh at steps 0, 1 and every 5th).
QSPARSE_CACHE = dict(bench_e2e.CACHE)


class RowBudgetExceeded(RuntimeError):
    pass


@dataclass
class GenRow:
    system: str
    seconds_per_video: float = math.nan
    first_video_s: float = math.nan  # cold: every compile + the first video (--warmup-steps long)
    first_call_s: float = math.nan  # the first transformer call alone (its compile)
    steps: int = 0
    transformer_calls: int = 0  # of the warm video
    block_calls: int = 0
    forwards_executed: float = math.nan  # executed blocks / blocks
    peak_gib: float = 0.0
    finite: bool | None = None
    speedup_vs_inductor: float | None = None
    residual_cache: dict[str, int] | None = None  # qsparse: refreshes / reuses over every attention site
    calibration: dict[str, Any] | None = None
    step_profile: dict[str, Any] | None = None  # the warm video's seconds by kind of step (StepProfile)
    note: str = ""
    error: str | None = None
    # --fidelity
    psnr_db: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    psnr_mean: float | None = None
    ssim_mean: float | None = None


@dataclass
class Prepared:
    """A row's model and how to read what it executed."""

    model: torch.nn.Module
    blocks: int
    block_calls: Callable[[], int]  # cumulative executed block calls
    before_video: Callable[[], None] = lambda: None
    residual_cache: Callable[[], dict[str, int]] | None = None
    note: str = ""
    calibrate: Callable[[Callable[[], torch.Tensor]], dict[str, Any]] | None = None
    fixed_steps: bool = False  # its schedule is made for the run's step count and refuses a shorter video


# ---------------------------------------------------------------------------------------------- the sampling loop
def make_scheduler(kind: str, shift: float):
    """The scheduler of Wan2.1's diffusers release (UniPC with flow sigmas) or flow-matching Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if kind == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       num_train_timesteps=1000, flow_shift=shift)
    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    raise ValueError(f"--scheduler {kind!r}: use unipc or euler")


@torch.no_grad()
def generate(transformer: torch.nn.Module, scheduler: Any, latents: torch.Tensor, cond: torch.Tensor,
             uncond: torch.Tensor, steps: int, guidance: float = GUIDANCE, deadline: float | None = None,
             calls: list[int] | None = None, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """WanPipeline's denoising loop (diffusers 0.42): float32 ``latents`` -> denoised float32 latents.
    ``calls`` (one int) counts transformer calls; past ``deadline`` (perf_counter) it raises RowBudgetExceeded;
    ``on_step(i)`` runs after each scheduler step (the per-step profile)."""
    dtype = cond.dtype
    scheduler.set_timesteps(steps, device=latents.device)
    scheduler.set_begin_index(0)
    for i, t in enumerate(scheduler.timesteps):
        if deadline is not None and time.perf_counter() > deadline:
            raise RowBudgetExceeded(f"row budget exceeded after {i} of {steps} steps")
        x = latents.to(dtype)
        timestep = t.expand(latents.shape[0])
        context = dict(step_index=i, sigma=float(scheduler.sigmas[i]), num_inference_steps=steps)
        with transformer.cache_context("cond", **context):
            noise = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
        with transformer.cache_context("uncond", **context):
            noise_uncond = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond,
                                       return_dict=False)[0]
        if calls is not None:
            calls[0] += 2
        noise = noise_uncond + guidance * (noise - noise_uncond)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i)
    if hasattr(transformer, "_reset_stateful_cache") and getattr(transformer, "_cache_config", None) is not None:
        transformer._reset_stateful_cache()  # WanPipeline's maybe_free_model_hooks
    return latents


# ---------------------------------------------------------------------------------------------- rows
# qsparse[KEY=VALUE,...]: the qsparse row with another residual-cache schedule or attention precision.
def _flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(value)
    return value == "1"


_flag.__name__ = "0 or 1"  # named in the row error


def _step_list(value: str) -> tuple[int, ...]:
    return tuple(int(step) for step in value.split(":"))


_step_list.__name__ = "steps joined by ':'"
QSPARSE_KEYS = {"first": ("cache", "refresh_first", int), "every": ("cache", "refresh_every", int),
                "steps": ("cache", "refresh_steps", _step_list),
                "graphs": ("optimize", "cuda_graphs", _flag), "density": ("sparsity", "density", float),
                "order": ("cache", "order", int), "attn": ("sparsity", "attention_precision", str)}
# A step cache's settings in a row (``+mag[threshold=0.12,max_skip=5]``): KEY -> (its diffusers config field, type).
STEP_CACHE_KEYS = {"fbc": {"threshold": ("threshold", float)},
                   "mag": {"threshold": ("threshold", float), "max_skip": ("max_skip_steps", int),
                           "retention": ("retention_ratio", float)},
                   "taylorseer": {"interval": ("cache_interval", int), "warmup": ("disable_cache_before_step", int)}}
FLEX_KEYS = {"pattern": None, "density": None}
ROW_KEYS = {"qsparse": QSPARSE_KEYS, "flex": FLEX_KEYS, "flex-fp8": FLEX_KEYS, **STEP_CACHE_KEYS}


def parse_row(spec: str) -> tuple[str, str | None]:
    """``BASE[+CACHE]`` -> (BASE, CACHE or None); a qsparse or Flex BASE may carry settings:
    ``qsparse[every=10,attn=int8_fp8]`` (qsparse_settings), ``flex-fp8[pattern=local3d]`` (flex_settings)."""
    if spec == "cache-dit":
        return spec, None
    base, plus, cache = spec.partition("+")
    name, cache_name = base.partition("[")[0], cache.partition("[")[0]
    if name not in BASES or (plus and cache_name not in STEP_CACHES) or (name != base and name not in ROW_KEYS):
        raise ValueError(f"row {spec!r}: rows are BASE[+CACHE] with BASE in {BASES} (qsparse may be qsparse[KEY=VALUE,"
                         f"...] with KEY in {sorted(QSPARSE_KEYS)}, flex / flex-fp8 may be flex[pattern=P] with P in "
                         f"{bench_e2e.FLEX_PATTERNS}) and CACHE in {STEP_CACHES} (may be CACHE[KEY=VALUE,...]: "
                         f"{ {k: sorted(v) for k, v in STEP_CACHE_KEYS.items()} }), or cache-dit")
    # the settings' own errors name the bad key or value
    if name == "qsparse":
        qsparse_settings(base)
    elif name in ROW_KEYS:
        flex_settings(base)
    if plus:
        step_cache_settings(cache)
    return base, cache or None


def split_rows(rows: str) -> list[str]:
    """--rows: comma-separated row specs; commas inside a ``BASE[...]`` belong to the row."""
    return [spec for spec in re.split(r",(?![^\[]*\])", rows) if spec]


def _row_items(base: str) -> tuple[str, list[tuple[str, str]]]:
    """``NAME[KEY=VALUE,...]`` -> (NAME, [(KEY, VALUE), ...]) with each KEY checked against ROW_KEYS[NAME]."""
    name = base.partition("[")[0]
    keys = ROW_KEYS.get(name, {})
    inner = base[len(name) + 1:-1] if base.startswith(name + "[") and base.endswith("]") else None
    if inner is None:
        if base != name:
            raise ValueError(f"row base {base!r}: write {name}[KEY=VALUE,...]")
        return name, []
    items = []
    for item in filter(None, inner.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in keys:
            raise ValueError(f"row base {base!r}: {item!r} is not KEY=VALUE with KEY in {sorted(keys)}")
        items.append((key, value))
    return name, items


def qsparse_settings(base: str) -> dict[str, dict[str, Any]]:
    """What a ``qsparse[...]`` row changes from the default row's: {"sparsity": SparsityConfig options, "cache":
    residual-cache settings, "optimize": qs.optimize arguments}."""
    settings: dict[str, dict[str, Any]] = {"sparsity": {}, "cache": {}, "optimize": {}}
    for key, value in _row_items(base)[1]:
        where, field_name, kind = QSPARSE_KEYS[key]
        settings[where][field_name] = _typed(base, key, value, kind)
    return settings


def step_cache_settings(spec: str) -> tuple[str, dict[str, Any]]:
    """``mag[threshold=0.12,max_skip=5]`` -> ("mag", {"threshold": 0.12, "max_skip_steps": 5}): the diffusers config
    fields a row's step cache changes from diffusers' defaults."""
    name, items = _row_items(spec)
    fields = STEP_CACHE_KEYS[name]
    return name, {fields[key][0]: _typed(spec, key, value, fields[key][1]) for key, value in items}


def _typed(base: str, key: str, value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"row base {base!r}: {key}={value!r} must be {kind.__name__}") from None


def flex_settings(base: str) -> tuple[str, float | None]:
    """(tile pattern, density or None for ``--density``) of a ``flex[...]`` / ``flex-fp8[...]`` row (patterns:
    bench_e2e.FLEX_PATTERNS, default random)."""
    items = dict(_row_items(base)[1])
    pattern = items.get("pattern", "random")
    if pattern not in bench_e2e.FLEX_PATTERNS:
        raise ValueError(f"row base {base!r}: pattern={pattern!r} must be one of {bench_e2e.FLEX_PATTERNS}")
    density = _typed(base, "density", items["density"], float) if "density" in items else None
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"row base {base!r}: density={density} must be in (0, 1]")
    return pattern, density


def step_cache_config(spec: str, steps: int, mag_ratios: list[float] | None = None):
    """The diffusers config of a row's step cache: diffusers' defaults (FirstBlockCache threshold 0.05; MagCache
    threshold 0.06, at most 3 skipped steps in a row, first 20% computed; TaylorSeer lite: interval 5, 3 warm-up
    steps, order 1) with the row's settings (``step_cache_settings``) over them."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    name, settings = step_cache_settings(spec)
    if name == "fbc":
        return FirstBlockCacheConfig(**settings)
    if name == "mag":  # calibrated first (prepare_row): then its ratios
        if mag_ratios is None:
            return MagCacheConfig(calibrate=True, num_inference_steps=steps, **settings)
        return MagCacheConfig(mag_ratios=mag_ratios, num_inference_steps=steps, **settings)
    # lite mode: its default mode hooks the attention modules inside each block (module docstring)
    return TaylorSeerCacheConfig(use_lite_mode=True, **settings)


def _count_compiled_blocks(model: torch.nn.Module, compile_blocks: bool) -> Callable[[], int]:
    """Compile each block's ``forward`` (one graph for all: Dynamo guards on the block's structure, not its identity)
    and count the calls that reach it. Installed before any cache hook, so hooks wrap the counted compiled forward."""
    count = [0]
    for block in model.blocks:
        inner = torch.compile(block.forward, fullgraph=True) if compile_blocks else block.forward

        def counted(*args: Any, _inner: Callable = inner, **kwargs: Any) -> Any:
            count[0] += 1
            return _inner(*args, **kwargs)

        block.forward = counted
    return lambda: count[0]


def _capture_mag_ratios(run_video: Callable[[], torch.Tensor]) -> dict[str, Any]:
    """One full video with MagCacheConfig(calibrate=True): diffusers logs each CFG branch's ratios when its last
    step ends (mag_cache.py, ``_advance_step``); they are read from its logger."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "Calibration Results:" in message:
                records.append(message.split("Calibration Results:", 1)[1].strip())

    logger = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its print() of the same list
            run_video()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    runs = [[float(x) for x in ast.literal_eval(r)] for r in records]
    if not runs or len(runs) % 2:  # per video: the cond branch's list, then the uncond one's (its tail ends last)
        raise RuntimeError(f"MagCache calibration: expected a list per CFG branch and video, got {len(runs)}")

    def mean(lists: list[list[float]]) -> list[float]:
        return [sum(values) / len(values) for values in zip(*lists)]

    cond, uncond = mean(runs[0::2]), mean(runs[1::2])
    return {"cond": cond, "uncond": uncond, "videos": len(runs) // 2, "mag_ratios": mean([cond, uncond])}


class _Pipe:
    """What ``qs.optimize`` hooks on a pipeline: ``.transformer`` and ``.scheduler`` (its step clock)."""

    def __init__(self, transformer: torch.nn.Module, scheduler: Any) -> None:
        self.transformer, self.scheduler = transformer, scheduler


def _without_graphs(spec: str) -> str:
    """``qsparse[every=10,graphs=1]+mag`` -> ``qsparse[every=10]+mag`` (any other row unchanged)."""
    base, cache = parse_row(spec)
    name, items = _row_items(base)
    kept = [f"{key}={value}" for key, value in items if key != "graphs"]
    return name + (f"[{','.join(kept)}]" if kept else "") + (f"+{cache}" if cache else "")


def mag_ratios_of(spec: str, fidelity_jsons: list[Path]) -> tuple[list[float], str]:
    """(mag_ratios, "FILE: row" they come from) for a MagCache row, from ``--fidelity`` runs' JSONs: the row of the
    same spec in any of them, else the spec with ``flex-fp8`` read as ``flex`` (torchao's fp8 needs a
    GPU, so the CPU fidelity runs measure its bf16 form), else either with MagCache's settings dropped
    (``+mag[threshold=0.5]`` -> ``+mag``: calibration never skips, so its ratios do not depend on them). MagCache
    decides every skip from its ratios and settings alone (diffusers hooks/mag_cache.py: accumulated
    |1 - prod(ratios)| against the threshold), so a run with these ratios skips the same steps as the fidelity row
    whose PSNR it is plotted with - random weights have no trajectory worth calibrating on. A qsparse row's
    ``graphs=`` setting is left out of the lookup: CUDA graphs replay the same kernels (and a CPU fidelity run
    cannot capture them)."""
    forms = (spec, spec.replace("flex-fp8", "flex", 1), _without_graphs(spec))
    sources = list(dict.fromkeys([*forms, *(re.sub(r"\+mag\[[^\]]*\]", "+mag", form) for form in forms)]))
    tables = [(path, {r["system"]: r for r in json.loads(path.read_text())["rows"]}) for path in fidelity_jsons]
    for source in sources:  # the closest form first, in any of the files
        for path, rows in tables:
            ratios = ((rows.get(source) or {}).get("calibration") or {}).get("mag_ratios")
            if ratios:
                return [float(x) for x in ratios], f"{path.name}: {source}"
    raise ValueError(f"row {spec!r}: --mag-ratios {', '.join(str(p) for p in fidelity_jsons)} hold no MagCache "
                     f"calibration for it (looked for rows {sources}); run that row with --fidelity first")


def prepare_row(spec: str, model: torch.nn.Module, workload: dict[str, Any], mask_inputs: dict[str, Any],
                scheduler: Any, steps: int, density: float, mag_ratios: list[float] | None = None) -> Prepared:
    """Turn a fresh dense model into the row's configuration (in place). ``mag_ratios``: a MagCache row runs with
    these instead of calibrating its own."""
    base, cache = parse_row(spec)
    blocks = len(model.blocks)
    if spec == "cache-dit":
        return _prepare_cache_dit(model, steps)
    if base.startswith("qsparse"):
        import qsparse_compiler as qs

        settings = qsparse_settings(base)
        options = {**bench_e2e.QSPARSE_OPTIONS, "sparsity": {**bench_e2e.QSPARSE_OPTIONS.get("sparsity", {}),
                                                             "density": density, **settings["sparsity"]}}
        schedule = {**QSPARSE_CACHE, **settings["cache"]}
        if "refresh_steps" in schedule:  # an explicit schedule is made for this many steps
            schedule["num_steps"] = steps
        # regional even with CUDA graphs: each block captures its own refresh and reuse graph (qs.optimize)
        pipe_kwargs = settings["optimize"]
        pipe = qs.optimize(_Pipe(model, scheduler), options=options, cache=schedule, regional=True, **pipe_kwargs)
        runtime = qs.runtime_of(pipe)
        graphs = ", CUDA graphs (a refresh and a reuse graph per block)" if pipe_kwargs.get("cuda_graphs") else ""

        def residual_cache() -> dict[str, int]:
            total = runtime.memory_report()["total"]
            return {"refreshes": total["refreshes"], "reuses": total["reuses"], "resets": total["resets"],
                    "bytes": total["bytes"]}

        prepared = Prepared(pipe.transformer, blocks, lambda: sum(residual_cache()[k] for k in ("refreshes", "reuses")),
                            residual_cache=residual_cache, fixed_steps="refresh_steps" in schedule,
                            note=f"qs.optimize regional{graphs}, options {json.dumps(options)}, cache "
                                 f"{json.dumps(schedule)}")
    else:
        name = base.partition("[")[0]
        if name == "flex-fp8":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

            quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                      filter_fn=bench_e2e.block_linear_filter(workload, model))
        tiles = ""
        if name in ("flex", "flex-fp8"):
            pattern, row_density = flex_settings(base)
            density = density if row_density is None else row_density
            bench_e2e.install_flex_attention(model, workload,
                                             bench_e2e.flex_block_masks(workload, mask_inputs, density, pattern))
            tiles = (f"random {density:.0%} 128x128 tiles + diagonal" if pattern == "random"
                     else f"qsparse's local3d {density:.0%} of 128x128 tiles + diagonal")
        counter = _count_compiled_blocks(model, compile_blocks=name != "eager")
        notes = {"eager": "eager", "inductor": "Inductor bf16, blocks compiled",
                 "flex": f"FlexAttention {tiles}, bf16 linears",
                 "flex-fp8": f"FlexAttention {tiles}, torchao fp8 rowwise"}
        prepared = Prepared(model, blocks, counter, note=notes[name])
    if cache is not None:
        transformer = prepared.model
        given = mag_ratios if cache.startswith("mag") else None
        if given is not None and len(given) != steps:
            raise ValueError(f"row {spec!r}: {len(given)} MagCache ratios for a {steps}-step video")
        transformer.enable_cache(step_cache_config(cache, steps, given))
        prepared.note += f"; + {type(transformer._cache_config).__name__}"
        if cache.startswith("mag") and given is None:
            def calibrate(run_video: Callable[[], torch.Tensor]) -> dict[str, Any]:
                ratios = _capture_mag_ratios(run_video)
                transformer.disable_cache()
                transformer.enable_cache(step_cache_config(cache, steps, ratios["mag_ratios"]))
                return ratios

            prepared.calibrate = calibrate
    return prepared


def _prepare_cache_dit(model: torch.nn.Module, steps: int) -> Prepared:
    import cache_dit
    from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern

    # Its Wan adapter for a transformer-only flow (adapters.py "Wan": Pattern_2, has_separate_cfg), its default config.
    adapter = BlockAdapter(transformer=model, blocks=model.blocks, forward_pattern=ForwardPattern.Pattern_2,
                           has_separate_cfg=True)
    blocks = len(model.blocks)
    config = DBCacheConfig(num_inference_steps=steps)
    fitted = ""
    if config.Fn_compute_blocks >= blocks:  # a small model (cache-dit asserts Fn < blocks): the same share of blocks
        fn = max(1, round(config.Fn_compute_blocks * blocks / WAN_1_3B_BLOCKS))
        config = DBCacheConfig(num_inference_steps=steps, Fn_compute_blocks=fn)
        fitted = (f" (Fn {fn} for this {blocks}-block model: F8's share of Wan-1.3B's {WAN_1_3B_BLOCKS} blocks)")
    cache_dit.enable_cache(adapter, cache_config=config)
    cache_dit.set_compile_configs()
    model.compile_repeated_blocks(fullgraph=True)
    finished = [0]  # executed blocks of the generations before the current one (refresh_context starts anew)

    def current() -> int:
        stats = cache_dit.summary(model, logging=False)[0]
        cached = len(stats.cached_steps or []) + len(stats.cfg_cached_steps or [])
        computed_when_cached = config.Fn_compute_blocks + config.Bn_compute_blocks
        return stats.accumulated_transformer_executed_steps * blocks - cached * (blocks - computed_when_cached)

    def before_video() -> None:
        finished[0] += current()
        cache_dit.refresh_context(model, num_inference_steps=steps)

    return Prepared(model, blocks, lambda: finished[0] + current(), before_video=before_video,
                    note=f"cache-dit {getattr(cache_dit, '__version__', '?')} DBCacheConfig() "
                         f"(F{config.Fn_compute_blocks}B{config.Bn_compute_blocks}, threshold "
                         f"{config.residual_diff_threshold}, {config.max_warmup_steps} warmup steps){fitted}, Wan adapter, "
                         "compile_repeated_blocks, bf16")


@contextlib.contextmanager
def _restored_compile_settings():
    """Dynamo / Inductor global settings as they were (cache-dit's set_compile_configs changes them)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    saved = dynamo_config.save_config(), inductor_config.save_config()
    try:
        yield
    finally:
        dynamo_config.load_config(saved[0])
        inductor_config.load_config(saved[1])


# ---------------------------------------------------------------------------------------------- one row
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepProfile:
    """Where a warm video's seconds go, per kind of step: each step ends with a device sync (50 per video: noise
    next to its seconds) and is classed by what ran in it - ``refresh`` (qsparse: some attention refreshed its
    residual, i.e. ran dense), ``reuse`` (qsparse: every attention reused), ``full`` (every block ran, no residual
    cache), ``skipped`` (a step cache skipped blocks of at least one of the two CFG calls)."""

    def __init__(self, device: str, prepared: Prepared) -> None:
        self.device, self.prepared = device, prepared
        self.blocks = prepared.block_calls()
        self.refreshes = self._refreshes()
        self.last = time.perf_counter()  # reset to the video's start by the caller
        self.kinds: dict[str, list[float]] = {}

    def _refreshes(self) -> int:
        return self.prepared.residual_cache()["refreshes"] if self.prepared.residual_cache else 0

    def on_step(self, index: int) -> None:
        _sync(self.device)
        now = time.perf_counter()
        blocks, refreshes = self.prepared.block_calls(), self._refreshes()
        if blocks - self.blocks < 2 * self.prepared.blocks:
            kind = "skipped"
        elif refreshes > self.refreshes:
            kind = "refresh"
        else:
            kind = "reuse" if self.prepared.residual_cache else "full"
        self.kinds.setdefault(kind, []).append(now - self.last)
        self.last, self.blocks, self.refreshes = now, blocks, refreshes

    def summary(self, seconds: float) -> dict[str, Any]:
        out: dict[str, Any] = {kind: {"steps": len(times), "seconds": sum(times), "ms_per_step": 1e3 * sum(times)
                                      / len(times)} for kind, times in sorted(self.kinds.items())}
        out["unaccounted_s"] = seconds - sum(sum(times) for times in self.kinds.values())
        return out


def run_row(spec: str, build: Callable[[], torch.nn.Module], videos: Callable[[], list[tuple]], workload: dict,
            mask_inputs: dict, args: argparse.Namespace, keep_output: bool = False,
            mag_ratios: tuple[list[float], str] | None = None) -> tuple[GenRow, torch.Tensor | None]:
    """Cold video, then (budget permitting) the warm video that is measured. ``videos`` gives the (latents, cond,
    uncond) of each video of a run (one for speed; one per seed for fidelity). ``mag_ratios``: (ratios, where from)
    for a MagCache row that replays a fidelity row's skips (``mag_ratios_of``). Returns the row and, with
    ``keep_output``, the warm run's final latents."""
    row = GenRow(spec, steps=args.steps)
    deadline = time.perf_counter() + args.row_budget
    model = build()
    scheduler = make_scheduler(args.scheduler, args.shift)
    settings = _restored_compile_settings() if spec == "cache-dit" else contextlib.nullcontext()
    output = None
    with settings:
        ratios, source = mag_ratios or (None, None)
        if ratios is not None:
            row.calibration = {"mag_ratios": ratios, "from": source}
        prepared = prepare_row(spec, model, workload, mask_inputs, scheduler, args.steps, args.density, ratios)
        row.note = prepared.note
        if ratios is not None:
            row.note += f"; MagCache ratios of {source} (its skipped steps)"
        calls = [0]
        first_call: list[float] = []
        start = time.perf_counter()

        def first_call_timer(module, inputs, result) -> None:
            if not first_call:
                _sync(args.device)
                first_call.append(time.perf_counter() - start)

        handle = prepared.model.register_forward_hook(first_call_timer)

        def run_video(steps: int = args.steps, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
            outs = []
            for latents, cond, uncond in videos():
                prepared.before_video()
                outs.append(generate(prepared.model, scheduler, latents, cond, uncond, steps, args.guidance,
                                     deadline, calls, on_step))
            return torch.cat(outs)

        # --fidelity measures outputs, not time: one run per row (the cold one) unless MagCache must calibrate first.
        cold_only = args.fidelity and prepared.calibrate is None
        if prepared.calibrate is not None:
            row.calibration = prepared.calibrate(run_video)  # also the cold video
        elif not cold_only:
            warmup_steps = 0 if prepared.fixed_steps else args.warmup_steps
            run_video(warmup_steps or args.steps)
            if warmup_steps:
                row.note += f"; cold run: a {warmup_steps}-step video"
            elif args.warmup_steps:
                row.note += f"; cold run: the whole {args.steps}-step video (its refresh steps are made for it)"
        if not cold_only:
            _sync(args.device)
            row.first_video_s = time.perf_counter() - start
            row.first_call_s = first_call[0] if first_call else math.nan
            handle.remove()
            if row.first_video_s > args.row_budget / 2:
                row.note += (f"; warm video skipped: the cold one took {row.first_video_s:.0f} s of a "
                             f"{args.row_budget:.0f} s budget")
                return row, None
        else:
            row.note += "; one (cold) run: its seconds include compilation"
        if args.device == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        calls[0], blocks_before = 0, prepared.block_calls()
        cache_before = prepared.residual_cache() if prepared.residual_cache else None
        profile = StepProfile(args.device, prepared) if not args.fidelity else None
        _sync(args.device)
        start = time.perf_counter()
        if profile is not None:
            profile.last = start
        output = run_video(on_step=profile.on_step if profile else None)
        _sync(args.device)
        row.seconds_per_video = (time.perf_counter() - start) / len(videos())
        if profile is not None:
            row.step_profile = profile.summary(row.seconds_per_video)
        row.transformer_calls = calls[0]
        row.block_calls = prepared.block_calls() - blocks_before
        row.forwards_executed = row.block_calls / prepared.blocks
        row.peak_gib = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0
        row.finite = bool(torch.isfinite(output).all())
        if cold_only:
            row.first_video_s = row.seconds_per_video * len(videos())
            row.first_call_s = first_call[0] if first_call else math.nan
            handle.remove()
        if cache_before is not None:
            after = prepared.residual_cache()
            row.residual_cache = {k: after[k] - cache_before[k] for k in ("refreshes", "reuses", "resets")}
            row.residual_cache["bytes"] = after["bytes"]
    del model, prepared
    return row, output if keep_output else None


# ---------------------------------------------------------------------------------------------- output
def write_results(out: Path, meta: dict[str, Any], rows: list[GenRow]) -> None:
    inductor = next((r.seconds_per_video for r in rows if r.system == "inductor"), None)
    for row in rows:
        ok = inductor and row.seconds_per_video == row.seconds_per_video
        row.speedup_vs_inductor = inductor / row.seconds_per_video if ok else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    table = markdown(meta, rows)
    out.with_suffix(".md").write_text(table)
    print("\n" + table, flush=True)
    timed = {r.system: r.seconds_per_video for r in rows if r.seconds_per_video == r.seconds_per_video}
    if timed:
        from qsparse_compiler.eval.plots import bar_plot

        bar_plot(timed, out.with_suffix(".png"), size=(960, 460), ylabel="s",
                 title=f"seconds per video (lower is better): {meta['workload']}, {meta['steps']} steps + CFG, "
                       f"{meta['device']}, {meta['date']}")


def markdown(meta: dict[str, Any], rows: list[GenRow]) -> str:
    fidelity = meta.get("mode") == "fidelity"
    lines = [f"{meta['workload']}: {meta['steps']} {meta['scheduler']} steps, CFG {meta['guidance']} (2 transformer "
             f"calls per step), {meta['device']}, torch {meta['torch']}, {meta['date']}", "",
             "| system | s / video | vs Inductor | cold video s | first call s | calls | forwards executed | "
             "peak GiB | finite |" + (" PSNR dB | SSIM |" if fidelity else " note |"),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if fidelity else "---|")]
    for r in rows:
        speed = f"{r.speedup_vs_inductor:.2f}x" if r.speedup_vs_inductor else "-"
        tail = (f" {r.psnr_mean:.2f} | {r.ssim_mean:.4f} |" if fidelity and r.psnr_mean is not None
                else " - | - |" if fidelity else f" {r.note} |")
        lines.append(f"| {r.system} | {r.seconds_per_video:.2f} | {speed} | {r.first_video_s:.1f} | "
                     f"{r.first_call_s:.1f} | {r.transformer_calls} | {r.forwards_executed:.1f} | {r.peak_gib:.1f} | "
                     f"{r.finite} |{tail}")
    errors = [f"- {r.system}: {r.error}" for r in rows if r.error]
    notes = [f"- {r.system}: {r.note}" for r in rows if fidelity and r.note]
    profiles = [f"- {r.system}: " + ", ".join(
        f"{kind} {v['steps']} steps {v['seconds']:.2f} s ({v['ms_per_step']:.0f} ms each)"
        for kind, v in r.step_profile.items() if isinstance(v, dict))
        + f"; unaccounted {r.step_profile['unaccounted_s']:.2f} s" for r in rows if r.step_profile]
    if profiles:
        profiles = ["", "Where the warm video's seconds go (per kind of step, each step ended by a device sync):",
                    *profiles]
    return "\n".join(lines + ([""] + errors if errors else []) + ([""] + notes if notes else []) + profiles) + "\n"


# ---------------------------------------------------------------------------------------------- main
def _speed_setup(args: argparse.Namespace):
    workload = bench_e2e.WORKLOADS[args.workload]
    if workload["model"] != "wan":
        raise SystemExit(f"--workload {args.workload}: the generation loop drives Wan transformers; use a Wan workload")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(workload["latents"], generator=generator).to(args.device)  # WanPipeline: float32 latents
    cond = torch.randn(workload["text"], generator=generator).to(args.device, dtype)
    uncond = torch.randn(workload["text"], generator=generator).to(args.device, dtype)
    mask_inputs = {"hidden_states": latents.to(dtype)}

    def build() -> torch.nn.Module:
        return bench_e2e.build(workload, args.device, dtype)[0]

    return workload, build, lambda: [(latents, cond, uncond)], mask_inputs


def _fidelity_setup(args: argparse.Namespace):
    """The reference DiT, its prompts and starting noise per seed (as testing/fidelity.evaluate chooses them)."""
    import dataclasses

    from qsparse_compiler.eval.reference_model import initial_noise, load_reference_metadata, load_reference_model
    from qsparse_compiler.eval.synthetic_video import SyntheticVideoConfig, SyntheticVideos

    meta = load_reference_metadata()
    data = SyntheticVideoConfig.from_dict(meta["data"])
    data = dataclasses.replace(data, **{k: getattr(args, k) for k in ("frames", "height", "width")
                                        if getattr(args, k) is not None})
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    seeds = [int(s) for s in args.seeds.split(",")]
    videos = SyntheticVideos(data, device="cpu")
    prompts = videos.embed(videos.scenes_for_seeds(seeds)).to(args.device, dtype)
    noise = initial_noise(seeds, (data.channels, data.frames, data.height, data.width)).to(args.device)
    runs = [(noise[i : i + 1], prompts[i : i + 1], torch.zeros_like(prompts[i : i + 1])) for i in range(len(seeds))]
    workload = dict(model="wan", config=meta["model"], latents=(1, data.channels, data.frames, data.height, data.width),
                    text=tuple(prompts[:1].shape))

    def build() -> torch.nn.Module:
        return load_reference_model(args.device, dtype)

    return workload, build, lambda: runs, {"hidden_states": runs[0][0].to(dtype)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="wan-1.3b-480p", choices=sorted(bench_e2e.WORKLOADS))
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated rows (module docstring)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scheduler", default="unipc", choices=("unipc", "euler"))
    parser.add_argument("--shift", type=float, default=None, help="flow shift (default: Wan's for the workload)")
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--density", type=float, default=DENSITY, help="attention density of the Flex / qsparse rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="steps of the cold (compiling) video; 0: a whole video. Enough steps to reach every "
                             "graph and cache path (qsparse's reuse step, a step cache's first skip, cache-dit's 8 "
                             "warmup steps) keep compiles out of the measured video at a fraction of the device time")
    parser.add_argument("--row-budget", type=float, default=540.0, help="seconds one row may take (cold + warm)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/generation.json"))
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of an existing --out of the same settings (rows re-run replace theirs)")
    parser.add_argument("--fidelity", action="store_true", help="run the rows on the reference DiT; PSNR/SSIM vs eager")
    parser.add_argument("--seeds", default="0,1,2,3", help="--fidelity: one video per seed")
    parser.add_argument("--frames", type=int, default=None, help="--fidelity: video frames (default: the reference's)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--mag-ratios", type=Path, action="append", default=None,
                        help="a --fidelity run's JSON (repeatable): MagCache rows take the ratios its same row "
                             "calibrated (so they skip the steps whose PSNR it measured) instead of calibrating on "
                             "this run's model")
    args = parser.parse_args(argv)
    specs = split_rows(args.rows)
    for spec in specs:
        try:
            parse_row(spec)
        except ValueError as exc:
            parser.error(str(exc))
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: must be >= 1")
    if args.shift is None:
        args.shift = FLOW_SHIFT.get(args.workload, 3.0)
    # Resolved once, before any row runs: a MagCache row missing from the files stops the run here.
    replayed: dict[str, tuple[list[float], str]] = {}
    for spec in specs if args.mag_ratios is not None else ():
        if (parse_row(spec)[1] or "").startswith("mag"):
            try:
                replayed[spec] = mag_ratios_of(spec, args.mag_ratios)
            except (OSError, ValueError, KeyError) as exc:
                parser.error(f"--mag-ratios: {exc}")
    if args.fidelity:
        workload, build, videos, mask_inputs = _fidelity_setup(args)
        specs = ["eager"] + [s for s in specs if s != "eager"]  # the dense reference run first
    else:
        workload, build, videos, mask_inputs = _speed_setup(args)
    meta = {"mode": "fidelity" if args.fidelity else "speed",
            "workload": "reference DiT" if args.fidelity else args.workload, "steps": args.steps,
            "scheduler": f"{args.scheduler} (shift {args.shift})", "guidance": args.guidance, "density": args.density,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "latents": list(workload["latents"])}
    if args.fidelity:
        meta["seeds"] = args.seeds
    rows: list[GenRow] = []
    if args.append and args.out.is_file():
        old = json.loads(args.out.read_text())
        same = {k: v for k, v in old["meta"].items() if k != "date"} == {k: v for k, v in meta.items() if k != "date"}
        if not same:
            parser.error(f"--append: {args.out} was measured with other settings ({old['meta']}); use another --out")
        rows = [GenRow(**r) for r in old["rows"] if r["system"] not in specs]
    dense: torch.Tensor | None = None
    for spec in specs:
        try:
            row, output = run_row(spec, build, videos, workload, mask_inputs, args, keep_output=args.fidelity,
                                  mag_ratios=replayed.get(spec))
        except Exception as exc:  # a failing row is recorded, not hidden, and the next one runs
            error = f"{type(exc).__name__}: {exc}"
            row, output = GenRow(spec, steps=args.steps, error=error[:600]), None
        if args.fidelity and output is not None:
            from qsparse_compiler.eval.fidelity import psnr, ssim

            videos_out = output.clamp(-1.0, 1.0).float().cpu()  # the reference sampler's output convention
            if spec == "eager":
                dense = videos_out
                row.note += "; the dense reference of the PSNR / SSIM columns"
            elif dense is not None:
                row.psnr_db = [float(x) for x in psnr(dense, videos_out)]
                row.ssim = [float(x) for x in ssim(dense, videos_out)]
                finite = [x for x in row.psnr_db if math.isfinite(x)]
                row.psnr_mean = sum(finite) / len(finite) if len(finite) == len(row.psnr_db) else math.inf
                row.ssim_mean = sum(row.ssim) / len(row.ssim)
        rows.append(row)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
        write_results(args.out, meta, rows)  # after every row: a time limit keeps what finished


if __name__ == "__main__":
    main()
