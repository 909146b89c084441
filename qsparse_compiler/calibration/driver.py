"""``calibrate``: dense model + samples -> Plan (plan.json + plan.safetensors), resumable, with progress.

Stages (``Stage``: a name, a key over everything its result depends on, compute, and the encode/decode of its
checkpoint in ``<out>/calibration/``, see checkpoint.py; one runner resumes a finished stage whose key matches when
``resume=True`` and computes and saves the others):

    selection    salient data selection over the candidate samples (salient.py)
    statistics   pooled attention maps and activation ranges of the dense model on the kept samples (statistics.py)
    attention_precision  SQNR of int8_fp8 vs bf16 attention per video attention and timestep range, on the kept
                 samples (attention_precision.py); only with ``attention_int8_min_sqnr_db`` set. The floor itself is
                 not in its key: a new floor re-decides from the resumed measurement.
    search       per layer/head sparse pattern under the density budget (search.py)
    ssar         residual-cache schedule, order and rank per attention layer (ssar.py)
    msad/<blk>   W4 weights of each transformer block, distilled block by block (msad.py)

then the plan: every block linear with a token dimension (``LinearPlan``: group size, activation format — MSFP's
``uint8_msfp`` for (almost) non-negative inputs — and its distilled int4 weights as tensors
``<fqn>.qweight``/``<fqn>.scale``), with ``conditioning_linears="int4_weight_only"`` the blocks' conditioning linears
too (act_format ``WEIGHT_ONLY``, distilled with their block), every video attention (``AttentionPlan``: per-head
patterns, tile, cache, and with the attention_precision stage its precision),
and ``metadata`` with the cost model, the search, the selection and the distillation losses.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..config import WEIGHT_ONLY
from ..formats.quantization import PackedInt4Weight
from ..ops.attention_quantization import QUANT_BLOCK
from ..formats.pattern_spec import PATTERNS
from ..plan.io import save_plan
from ..plan.schema import AttentionPlan, LinearPlan, ModelFingerprint, Plan
from .checkpoint import StageStore, stage_key
from .config import CalibrationConfig, CalibrationError
from .attention_precision import RANGE_EDGES, measure_attention_sqnr, precision_decisions
from .hooks import transformer_blocks
from .progress import stage_done, track
from .msad import distill_block
from .pipeline import collect_pipeline_samples
from .salient import score_samples, select_samples, selection_report, SampleScore
from .samples import check_samples, samples_digest, timestep_of
from .search import SearchResult, search_patterns
from .ssar import measure_residuals, ssar_settings
from .statistics import CalibrationStats, LinearStats, collect_statistics

__all__ = ["calibrate", "calibrate_cli_main", "linear_plans", "load_samples", "save_samples"]

CHECKPOINT_DIR = "calibration"

# The config fields each stage reads: a change in one of them recomputes that stage and every later one.
_SELECTION_FIELDS = ("selection", "num_samples", "salient_dt", "group_size", "act_format", "scale_dtype",
                     "conditioning_linears", "site_pattern", "seed")
_STATISTICS_FIELDS = ("block_q", "block_kv", "attention_chunk_elements", "site_pattern")
_SEARCH_FIELDS = ("density_budget", "recall_bound", "candidate_patterns", "candidate_densities", "cost_table")
_SSAR_FIELDS = ("ssar_samples", "ssar_steps", "ssar_step_size", "ssar_tolerance", "ssar_max_every",
                "ssar_refresh_first", "ssar_max_tokens", "ssar_rank_energy", "ssar_delta_ranks", "refresh_budget")
_MSAD_FIELDS = ("group_size", "act_format", "scale_dtype", "msfp", "msfp_max_negative_share", "conditioning_linears",
                "msad_steps", "msad_lr", "lambda_global", "lambda_local", "global_pool_blocks", "salient_token_fraction",
                "dfa", "dfa_flow_shift", "seed", "lora_rank", "lora_bucket_edges", "lora_steps", "lora_lr")


def _transformer(model_or_pipeline: Any) -> torch.nn.Module:
    if isinstance(model_or_pipeline, torch.nn.Module):
        # A torch.compile'd module wraps the original: calibrate the original, whose FQNs the passes see.
        return getattr(model_or_pipeline, "_orig_mod", model_or_pipeline)
    transformer = getattr(model_or_pipeline, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer
    raise CalibrationError(
        "qsparse_compiler.calibration: expected a video transformer (nn.Module) or a diffusers pipeline with a "
        f"`.transformer`; got {type(model_or_pipeline).__name__}"
    )


def _to_device(samples: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in samples]


def _check_parameters(model: torch.nn.Module) -> None:
    """NaN/inf weights fail here, named, instead of as a NaN model output stages later."""
    for name, param in model.named_parameters():
        bad = int((~torch.isfinite(param.detach())).sum())
        if bad:
            raise CalibrationError(
                f"qsparse_compiler.calibration: parameter {name} {tuple(param.shape)} holds {bad} NaN/inf value(s); "
                "the weights are damaged (or overflowed when cast to a smaller dtype) - reload the checkpoint"
            )


def linear_plans(stats: Mapping[str, LinearStats], config: CalibrationConfig) -> tuple[dict[str, LinearPlan], dict[str, Any]]:
    """Which block linears are quantized and how, from their activation statistics; and why, per site."""
    plans: dict[str, LinearPlan] = {}
    notes: dict[str, Any] = {}
    for fqn, s in stats.items():
        if s.tokens == 0:
            notes[fqn] = {"kept": "never called on the calibration samples: stays in its dtype"}
            continue
        conditioning = not s.has_tokens
        if conditioning and config.conditioning_linears == "keep":
            notes[fqn] = {"kept": "conditioning linear (no token dimension): stays in its dtype "
                                  "(conditioning_linears='int4_weight_only' calibrates it as int4 weight-only)"}
            continue
        k = s.in_features
        if k % 2:
            notes[fqn] = {"kept": f"in_features={k} is odd: int4 packs two codes per byte"}
            continue
        group = config.group_size if config.group_size and k % config.group_size == 0 else 0
        if conditioning:
            plans[fqn] = LinearPlan(group, WEIGHT_ONLY, config.scale_dtype)
            notes[fqn] = {"group_size": group, "act_format": WEIGHT_ONLY,
                          "why": "conditioning linear (no token dimension): int4 weights, activations not quantized"}
            continue
        span = s.max - s.min
        negative_share = max(0.0, -s.min) / span if span > 0 else 0.0
        act = "uint8_msfp" if config.msfp and negative_share <= config.msfp_max_negative_share else config.act_format
        plans[fqn] = LinearPlan(group, act, config.scale_dtype)
        notes[fqn] = {
            "group_size": group,
            "act_format": act,
            "negative_share": round(negative_share, 6),
            "nonneg_fraction": round(s.nonneg_fraction, 6),
            "amax_mean": s.amax_mean,
            "amax_max": s.amax_max,
        }
        if group != config.group_size:
            notes[fqn]["why_group"] = f"group_size {config.group_size} does not divide K={k}: per-channel scales"
    return plans, notes


def calibrate(
    model_or_pipeline: Any,
    samples: Sequence[Mapping[str, Any]],
    config: CalibrationConfig | Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    resume: bool = True,
    pipeline_kwargs: Mapping[str, Any] | None = None,
    on_stage: Callable[[str, str, float], None] | None = None,
) -> Plan:
    """Calibrate a plan for a diffusers video transformer (or a pipeline's ``.transformer``).

    ``samples``: a list of dicts of the transformer's forward kwargs (hidden_states, encoder_hidden_states,
    timestep, ...), the candidate (prompt, timestep) pairs; or, with a pipeline, a list of prompts: the pipeline
    runs on each (``pipeline_kwargs``: its call arguments, e.g. num_inference_steps, height, width, num_frames, plus
    ``every``: record every n-th step, default 5) and its transformer's inputs are recorded (pipeline.py).
    ``out``: the plan directory (also holds the stage checkpoints); None keeps everything in memory.
    ``resume``: reuse finished stages from ``out``.
    ``on_stage(name, status, seconds)``: called after every stage (each MSAD block is one), computed or resumed, once
    its checkpoint is saved - for monitoring (benchmarks/bench_calibration.py records memory per stage with it).
    Returns the Plan, saved to ``out`` when given. Raises CalibrationError naming the module and sample on NaN/inf,
    and naming the stage, the peak memory and the settings that lower it when a stage runs out of GPU memory.
    """
    config = config if isinstance(config, CalibrationConfig) else CalibrationConfig.from_dict(config)
    model = _transformer(model_or_pipeline)
    if isinstance(samples, (list, tuple)) and samples and all(isinstance(s, str) for s in samples):
        # Prompts: run the pipeline and record the transformer's inputs at every `every`-th step.
        if model is model_or_pipeline:
            raise CalibrationError(
                "qsparse_compiler.calibration: prompts need a diffusers pipeline (with `.transformer`) to sample from; "
                "with a bare transformer pass samples (dicts of its forward kwargs)"
            )
        options = dict(pipeline_kwargs or {})
        samples = collect_pipeline_samples(model_or_pipeline, list(samples), every=options.pop("every", 5), **options)
    candidates = check_samples(samples)
    _check_sample_count(candidates, config)
    _check_parameters(model)
    device = next(model.parameters()).device
    candidates = _to_device(candidates, device)
    folder = Path(out) if out is not None else None
    run = _StageRunner(StageStore(folder / CHECKPOINT_DIR if folder is not None else None, resume), config, device,
                       on_stage)
    fingerprint = ModelFingerprint.of(model)
    base_key = stage_key(asdict(fingerprint), samples_digest(candidates))
    was_training = model.training
    model.eval()
    try:
        selection_key = stage_key("selection", base_key, config.stage_hash(*_SELECTION_FIELDS))
        report = run(Stage("selection", selection_key, lambda: _select(model, candidates, config)))
        ids = report["selected"]

        statistics_key = stage_key("statistics", selection_key, config.stage_hash(*_STATISTICS_FIELDS))
        stats = run(Stage("statistics", statistics_key, lambda: collect_statistics(model, candidates, config, ids),
                          encode=CalibrationStats.to_record, decode=CalibrationStats.from_record))
        if not stats.attentions:
            warnings.warn(
                "qsparse_compiler.calibration: no video self-attention was seen (every attention stays dense in the "
                "plan). Calibration sees attention through torch's scaled_dot_product_attention: use diffusers' native "
                "attention backend while calibrating (model.set_attention_backend('native')).",
                stacklevel=2,
            )

        measured = None  # off: metadata["calibration"]["attention_precision"] is None, the plan sets no precision
        if config.attention_int8_min_sqnr_db is not None:
            precision_key = stage_key("attention_precision", selection_key,
                                      config.stage_hash("attention_chunk_elements"), RANGE_EDGES, QUANT_BLOCK)
            measured = run(Stage("attention_precision", precision_key, lambda: measure_attention_sqnr(
                model, candidates, ids, config.attention_chunk_elements, config.progress)))

        # the registry's names are part of the key: a new pattern is searched
        search_key = stage_key("search", statistics_key, config.stage_hash(*_SEARCH_FIELDS), sorted(PATTERNS))
        search = run(Stage("search", search_key, lambda: search_patterns(stats.attentions, config),
                           encode=lambda result: (result.to_json(),), decode=lambda data, _: SearchResult.from_json(data)))
        if not search.budget_met:
            raise CalibrationError(
                f"qsparse_compiler.calibration: no pattern meets density_budget={config.density_budget:g}: with every "
                f"head at its cheapest candidate the searched attentions still compute {search.total_density:.4g} of "
                "their video tiles; raise density_budget to at least that, or add cheaper candidate_densities / "
                "candidate_patterns"
            )
        specs = {fqn: _spec(search.head_patterns(fqn)) for fqn in search.heads}

        ssar_key = stage_key("ssar", search_key, config.stage_hash(*_SSAR_FIELDS))
        ssar = run(Stage("ssar", ssar_key, lambda: _ssar(model, candidates, ids, specs, config)))

        # MSAD, block by block: one stage per block with a quantized linear
        linears, linear_notes = linear_plans(stats.linears, config)
        msad_key = stage_key("msad", search_key, config.stage_hash(*_MSAD_FIELDS),
                             {fqn: asdict(p) for fqn, p in sorted(linears.items())})
        packed: dict[str, PackedInt4Weight] = {}
        lora_tensors: dict[str, torch.Tensor] = {}
        results = []
        blocks = transformer_blocks(model, config.site_pattern)
        for block_fqn, block in track(blocks, "MSAD blocks", config.progress):
            name = f"msad/{block_fqn}"
            if not any(fqn.startswith(block_fqn + ".") for fqn in linears):
                run.status[name] = "skipped: no quantized linear in this block"
                continue
            distill = functools.partial(distill_block, model, block_fqn, block, candidates, ids, linears, specs, config,
                                        config.block_q, config.block_kv)
            result, block_packed, block_lora = run(Stage(
                name, stage_key(msad_key, block_fqn), lambda: _msad_result(*distill()), encode=_encode_msad,
                decode=lambda data, tensors: _decode_msad(data, tensors, linears),
            ), timed_as="msad")
            results.append(result)
            lora_tensors.update(block_lora)
            packed.update(block_packed)
        run.seconds.setdefault("msad", 0.0)
    finally:
        model.train(was_training)

    stages, seconds = run.status, run.seconds
    plan = _build_plan(model, fingerprint, config, linears, linear_notes, packed, lora_tensors, search, ssar, report,
                       results, stages, seconds, measured)
    if folder is not None:
        save_plan(plan, folder)
    return plan


def _groups(tensors: Mapping[str, torch.Tensor], linears: Mapping[str, LinearPlan]):
    for name in tensors:
        if name.endswith(".qweight"):
            fqn = name[: -len(".qweight")]
            k = tensors[name].shape[1] * 2
            yield fqn, (k if linears[fqn].group_size == 0 else linears[fqn].group_size)


def _spec(head_patterns: Sequence[str]) -> str:
    return head_patterns[0] if len(set(head_patterns)) == 1 else ";".join(head_patterns)


@dataclass(frozen=True)
class Stage:
    """One resumable step of ``calibrate``. ``key`` hashes everything its result depends on (the config fields it
    reads, and the key of the stage it builds on); ``compute()`` makes the result; ``encode(result)`` gives the
    (json data, tensors) its checkpoint holds and ``decode(data, tensors)`` rebuilds the result from them."""

    name: str
    key: str
    compute: Callable[[], Any]
    encode: Callable[[Any], tuple] = lambda result: (result,)
    decode: Callable[[Any, dict[str, torch.Tensor]], Any] = lambda data, tensors: data


class _StageRunner:
    """The one checkpoint path: a stage resumes from ``store`` when its key matches, else it computes and saves;
    ``status`` and ``seconds`` record what each stage did and how long it took, for the plan's metadata.
    A stage that runs out of GPU memory saves nothing (its checkpoint is written only after it finished), so the
    checkpoints of the stages before it stay valid; the error names the stage, the peak and what lowers it."""

    def __init__(self, store: StageStore, config: CalibrationConfig, device: torch.device | None = None,
                 on_stage: Callable[[str, str, float], None] | None = None) -> None:
        self.store = store
        self.config = config
        self.device = device
        self.on_stage = on_stage
        self.status: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: Stage, timed_as: str | None = None) -> Any:
        start = time.perf_counter()
        record = self.store.load(stage.name, stage.key)
        if record is None:
            try:
                result = stage.compute()
            except torch.OutOfMemoryError as err:  # torch.cuda.OutOfMemoryError is the same class
                raise CalibrationError(out_of_memory_message(stage.name, self.config, self.device,
                                                             self.store.folder)) from err
            self.store.save(stage.name, stage.key, *stage.encode(result))
            self.status[stage.name] = "computed"
        else:
            result = stage.decode(*record)
            self.status[stage.name] = "resumed"
        label = timed_as or stage.name
        elapsed = time.perf_counter() - start
        self.seconds[label] = self.seconds.get(label, 0.0) + elapsed
        stage_done(stage.name, self.status[stage.name], elapsed, self.config.progress)
        if self.on_stage is not None:
            self.on_stage(stage.name, self.status[stage.name], elapsed)
        return result


# What each stage holds on the GPU beyond the model, and the settings that shrink it (CalibrationConfig's fields).
_MEMORY_SETTINGS = {
    "selection": "selection='uniform' (no model runs) or fewer / shorter candidate samples (each is scored alone: "
                 "three forwards, one with round-to-nearest W4A8 weights swapped in)",
    "statistics": "attention_chunk_elements={attention_chunk_elements} (the attention scores held at once while "
                  "pooling; halve it) or shorter videos",
    "search": "fewer candidate_patterns / candidate_densities (tile bitmaps scored per head)",
    "ssar": "attention_chunk_elements={attention_chunk_elements} (the fp32 score chunks of the measured sparse "
            "output; halve it) or shorter videos (ssar_max_tokens bounds host memory only)",
    "msad": "num_samples={num_samples} (the block inputs of every kept sample are held), "
            "attention_chunk_elements={attention_chunk_elements} (the student's sparse attention chunks), "
            "lora_rank={lora_rank}, or shorter videos",
}


def out_of_memory_message(stage: str, config: CalibrationConfig, device: torch.device | None,
                          folder: Path | None) -> str:
    """The CalibrationError text for a stage that ran out of GPU memory: the stage, the peak, what to change."""
    settings = _MEMORY_SETTINGS[stage.split("/")[0]].format(**config.to_json())
    if device is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        peak = f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated of {total:.1f} GiB"
    else:
        peak = "peak not measured off CUDA"
    kept = (f"the checkpoints of the stages before it in {folder} stay valid and resume" if folder is not None
            else "pass out=DIR to keep finished stages across runs")
    return (f"qsparse_compiler.calibration: stage {stage} ran out of GPU memory ({peak}); nothing of this stage was "
            f"saved and {kept}. To lower its memory change {settings}")


def _ssar(model, candidates, ids, specs, config: CalibrationConfig) -> dict[str, Any]:
    """SSAR settings from the residuals measured along trajectories started at the noisiest kept samples."""
    starts = sorted(ids, key=lambda i: -timestep_of(candidates[i]))[: config.ssar_samples]
    residuals = measure_residuals(model, candidates, starts, specs, config.block_q, config.block_kv, config)
    return ssar_settings(residuals, config)


def _msad_result(block_packed, block_lora, result) -> tuple[dict[str, Any], dict[str, PackedInt4Weight], dict]:
    return asdict(result), block_packed, dict(block_lora)


def _encode_msad(block: tuple) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    result, block_packed, block_lora = block
    tensors = dict(block_lora)
    for fqn, weight in block_packed.items():
        tensors[f"{fqn}.qweight"], tensors[f"{fqn}.scale"] = weight.qweight, weight.scale
    return result, tensors


def _decode_msad(data: dict[str, Any], tensors: Mapping[str, torch.Tensor], linears: Mapping[str, LinearPlan]):
    block_packed = {
        fqn: PackedInt4Weight(tensors[f"{fqn}.qweight"], tensors[f"{fqn}.scale"], group)
        for fqn, group in _groups(tensors, linears)
    }
    block_lora = {k: v for k, v in tensors.items() if k.endswith((".lora_a", ".lora_b"))}
    return data, block_packed, block_lora


def _check_sample_count(candidates: Sequence[Mapping[str, Any]], config: CalibrationConfig) -> None:
    """A selection of more samples than exist would quietly calibrate on all of them: refuse it instead."""
    if config.selection != "all" and config.num_samples > len(candidates):
        raise CalibrationError(
            f"qsparse_compiler.calibration: selection={config.selection!r} asks for num_samples={config.num_samples} "
            f"but only {len(candidates)} candidate sample(s) were given; pass more samples, lower num_samples to at "
            f"most {len(candidates)}, or use selection='all' (or num_samples=0)"
        )


def _select(model: torch.nn.Module, candidates: list[dict[str, Any]], config: CalibrationConfig) -> dict[str, Any]:
    if config.selection == "salient" and 0 < config.num_samples < len(candidates):
        scores = score_samples(model, candidates, config)
        report = selection_report(scores, config.num_samples)
    else:
        # No model runs needed: uniform (or all) selection only looks at the timesteps.
        scores = [SampleScore(i, timestep_of(s), float("nan"), float("nan"), float("nan")) for i, s in enumerate(candidates)]
        report = {"count": config.num_samples, "scores": [{"index": s.index, "timestep": s.timestep} for s in scores]}
    report["method"] = config.selection
    report["selected"] = select_samples(scores, config.num_samples, config.selection)
    return report


def _build_plan(model, fingerprint, config, linears, linear_notes, packed, lora_tensors, search, ssar, report, results,
                stages, seconds, measured=None) -> Plan:
    decisions = {} if measured is None else precision_decisions(measured, config.attention_int8_min_sqnr_db)
    attentions = {}
    for fqn, choices in search.heads.items():
        cache = dict(ssar.get(fqn, {}).get("cache", {}))
        precision = decisions[fqn]["precision"] if fqn in decisions else None
        attentions[fqn] = AttentionPlan([c.spec for c in choices], config.block_q, config.block_kv, cache, precision)
    tensors: dict[str, torch.Tensor] = {}
    for fqn in linears:
        weight = packed.get(fqn)
        if weight is not None:
            tensors[f"{fqn}.qweight"], tensors[f"{fqn}.scale"] = weight.qweight, weight.scale
    tensors.update(lora_tensors)
    metadata = {
        "producer": "qsparse_compiler.calibration",
        "cost_model": search.cost_model,
        "calibration": {
            "config": config.to_json(),
            "stages": stages,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "selection": report,
            "search": search.to_json(),
            "ssar": ssar,
            "msad": results,
            "linears": linear_notes,
            "attention_precision": None if measured is None else {
                **measured, "floor_db": config.attention_int8_min_sqnr_db, "decisions": decisions,
                "per_site_not_per_range": "the precision is a compile-time argument of each site; a site is decided "
                                          "by its worst timestep range",
            },
        },
    }
    if lora_tensors:
        metadata["lora"] = {
            "kind": "timestep_aware",
            "rank": config.lora_rank,
            "bucket_edges": list(config.lora_bucket_edges),
            "tensors": "<fqn>.lora_a [buckets, rank, K], <fqn>.lora_b [buckets, N, rank], bf16",
            "math": "y = w4a8(x) + (x @ lora_a[bucket(t)].T) @ lora_b[bucket(t)].T; bucket(t) = #edges <= t",
            "applied_by": "the backend (qsparse_compiler.compiler.passes.apply_lora) and calibration.simulate.plan_applied",
        }
    return Plan(fingerprint=fingerprint, linears=linears, attentions=attentions, tensors=tensors,
                metadata=json.loads(json.dumps(metadata, default=str)))


# -- samples on disk (for the CLI) -------------------------------------------------------------------------------------
def save_samples(samples: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write calibration samples as one safetensors file: tensors "<i>.<kwarg>", other values in its metadata."""
    from safetensors.torch import save_file

    tensors, extras = {}, {}
    for index, sample in enumerate(samples):
        for key, value in sample.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                extras[f"{index}.{key}"] = value
    path = Path(path)
    save_file(tensors, str(path), metadata={"count": str(len(samples)), "extras": json.dumps(extras)})
    return path


def load_samples(path: str | Path) -> list[dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        if "count" not in meta:
            raise CalibrationError(f"qsparse_compiler.calibration: {path} is not a samples file written by save_samples")
        samples: list[dict[str, Any]] = [{} for _ in range(int(meta["count"]))]
        for name in handle.keys():
            index, _, key = name.partition(".")
            samples[int(index)][key] = handle.get_tensor(name)
    for name, value in json.loads(meta.get("extras", "{}")).items():
        index, _, key = name.partition(".")
        samples[int(index)][key] = value
    return samples


def calibrate_cli_main(
    model: torch.nn.Module,
    samples_path: str | Path,
    out: str | Path,
    config_path: str | Path | None = None,
    resume: bool = True,
) -> Plan:
    """What ``qsparse calibrate`` runs once it has the model: samples file + config JSON -> plan dir, and a summary."""
    from rich.console import Console
    from rich.table import Table

    values = json.loads(Path(config_path).read_text()) if config_path else {}
    config = CalibrationConfig.from_dict(values)
    plan = calibrate(model, load_samples(samples_path), config, out=out, resume=resume)
    info = plan.metadata["calibration"]
    table = Table(title=f"qsparse calibrate -> {out}")
    for column in ("site", "decision"):
        table.add_column(column)
    for fqn, entry in sorted(plan.attentions.items()):
        precision = f"  precision={entry.precision}" if entry.precision else ""
        table.add_row(fqn, f"{entry.pattern_spec}  cache={entry.cache}{precision}")
    for block in info["msad"]:
        table.add_row(block["block"], f"MSAD loss {block['loss_rtn']:.4g} (RTN) -> {block['loss_msad']:.4g}, kept {block['kept']}")
    Console().print(table)
    search = info["search"]
    weight_only = sum(entry.act_format == WEIGHT_ONLY for entry in plan.linears.values())
    Console().print(
        f"{len(plan.linears) - weight_only} W4A8 linears"
        + (f", {weight_only} int4 weight-only (conditioning)" if weight_only else "")
        + f", density {search['total_density']:.3f} (budget {search['budget']:g}), "
        f"stages: {info['stages']}"
    )
    return plan
