"""``CalibrationConfig``: every knob of ``qsparse_compiler.calibration.calibrate``, typed, versioned, checked.

Like the backend's configs (``qsparse_compiler.config``), a bad value fails when the config is built, with a message
that names the field, the value and the fix — not an hour into a calibration run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..config import ACT_FORMATS, CONDITIONING_LINEAR_MODES, SCALE_DTYPES, QuantConfig
from ..config import _check_known_fields, _fail as _config_fail
from ..formats.pattern_spec import PATTERNS

__all__ = ["CalibrationConfig", "CalibrationError", "SELECTIONS"]

SELECTIONS = ("salient", "uniform", "all")


class CalibrationError(RuntimeError):
    """Calibration cannot go on: non-finite activations or losses, unusable samples, stale checkpoints."""


def _fail(name: str, value: Any, why: str) -> None:
    _config_fail("CalibrationConfig", name, value, why, where="qsparse_compiler.calibration")


def _is_fraction(value: Any, *, allow_zero: bool = False) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return False
    return (0.0 <= value <= 1.0) if allow_zero else (0.0 < value <= 1.0)


@dataclass(frozen=True)
class CalibrationConfig:
    """What calibration measures, searches and trains.

    Sparsity (pattern search, Sparse-vDiT):
    density_budget        mean fraction of video x video tiles computed over all searched layers and heads.
    recall_bound          a head's pattern must keep at least this fraction of its dense attention mass (measured on
                          the block-pooled attention maps) unless the budget forces a cheaper one.
    candidate_patterns    names in ``formats.pattern_spec.PATTERNS`` to try; None = every registered name (so patterns
                          added to the registry later are searched without a change here).
    candidate_densities   densities each density-parametrised pattern is tried at (patterns that ignore the density
                          are de-duplicated by their tile bitmap).
    block_q, block_kv     the kernel's tile, also the pooling resolution of the statistics.
    cost_table            measured kernel time per density, {density: ms} (``qsparse bench --kernels`` on the GPU); None
                          uses a FLOP proxy (tiles computed). Stored in plan.metadata either way.
    attention_chunk_elements  upper bound on the score elements held at once while pooling attention maps (query
                          chunks are sized from it), so S x S is never materialised at large S.

    Quantization (W4A8):
    group_size, act_format, scale_dtype, site_pattern   as ``qsparse_compiler.config.QuantConfig``.
    msfp                  let a linear whose inputs are (almost) non-negative use ``uint8_msfp`` (MSFP).
    msfp_max_negative_share  a linear counts as (almost) non-negative when -min / (max - min) of its calibration
                          inputs is at most this (GELU outputs: min ~ -0.17 against max of several units); a signed
                          format would leave about half of its codes unused there.
    conditioning_linears  block linears without a token dimension (adaptive-norm modulation), as
                          ``QuantConfig.conditioning_linears``: "keep" leaves them out of the plan; "int4_weight_only"
                          lists them (act_format ``config.WEIGHT_ONLY``) and MSAD distills their int4 scales with the
                          rest of the block, so the plan is scored (and compiled) with them quantized.

    Salient data selection (S²Q-VDiT):
    selection             "salient" (top ``num_samples`` by diffusion term x quantization term), "uniform" (evenly
                          spaced over the candidates' timesteps) or "all".
    num_samples           how many samples to keep (0 = all).
    salient_dt            timestep offset used for the diffusion term ||f(x, t) - f(x, t - dt)|| / ||f(x, t)||.

    MSAD (multi-scale salient attention distillation), block by block:
    msad_steps            optimizer steps per block (0 = keep round-to-nearest weights).
    msad_lr               Adam learning rate of the log weight scales.
    lambda_global         weight of the MSE between average-pooled attention maps (student vs teacher).
    lambda_local          weight of the salient-token term (token-weighted output error on the top tokens).
    global_pool_blocks    the global term pools attention maps to at most this many blocks per side.
    salient_token_fraction  share of tokens (by attention received) the local term looks at.

    dfa                   MSFP's denoising-factor loss alignment (dfa.py) for MSAD and TALoRA: each sample's loss is
                          weighted by the squared denoising factor of its timestep (normalised to mean 1).
    dfa_flow_shift        the sampler's flow shift s (diffusers' FlowMatchEulerDiscreteScheduler ``shift``; Wan
                          480p: 3.0) that sets the factors; with s = 1 every step weighs the same.

    Timestep-aware LoRA (MSFP's TALoRA, lora.py), trained after the scales, with the scales frozen (so the plan's
    weights stay right where the LoRA is not applied, e.g. the backend's reported fallback without a timestep):
    lora_rank             rank of each correction; 0 = off (the default). The backend applies it in the compiled
                          graph (compiler/passes/apply_lora.py): 2·rank·(K + N) extra multiply-adds per token and linear.
    lora_bucket_edges     ascending timestep edges; len + 1 LoRA pairs per linear.
    lora_steps, lora_lr   Adam steps and learning rate per block.

    SSAR (residual cache) settings per attention layer:
    ssar_samples          how many of the selected samples start a measured trajectory (highest timesteps first).
    ssar_steps            length of the flow-matching Euler trajectory the residual is measured on (>= 3 for order 2).
    ssar_step_size        timestep decrement per measured step (timesteps are in [0, 1000], sigma = t / 1000).
    ssar_tolerance        relative residual prediction error that a reuse step may reach before a refresh.
    ssar_max_every        longest refresh interval considered.
    ssar_refresh_first    the least number of leading steps that always refresh.
    ssar_max_tokens       residuals are measured on at most this many evenly spaced tokens (host memory bound).
    ssar_rank_energy      low-rank option: smallest rank keeping this share of the residual's energy (per head);
                          a rank >= head_dim / 2 is stored as 0 (full residual: low rank would not save memory).
    ssar_delta_ranks      ranks of QuantSparse's SVD-denoised second order (CacheConfig.delta_rank) that are replayed
                          beside order 1 and plain order 2; each layer keeps what predicts its residual best
                          (ssar.py). () (the default) compares only orders 1 and 2: a denoised refresh runs the
                          plain-torch SVD on CUDA (the fused step has none) and its cost there is not measured yet,
                          so the variant is opt-in, e.g. (4,).
    refresh_budget        None: each layer's "first k, then every n-th" schedule within ``ssar_tolerance``. A share
                          in (0, 1]: at most this share of the layer-steps of a nominal run (1000 / ``ssar_step_size``
                          steps) run dense attention; each layer gets refresh steps in proportion to how fast its
                          residual drifts, staggered across layers (ssar.py ``budget_schedules``).

    Attention precision per site (attention_precision.py):
    attention_int8_min_sqnr_db  None (the default): no measurement, the plan sets no precision and every site follows
                          the compile's ``sparsity.attention_precision``. A number (dB): the ``attention_precision``
                          stage measures each video attention's output SQNR of int8_fp8 vs bf16 attention on the
                          selected samples, per third of the timestep axis, and the plan sets "int8_fp8" where the
                          worst third reaches this floor and "bf16" elsewhere (the plan's setting wins over the
                          option). 30.0 keeps every layer of the reference DiT in 8 bits (35.6-40.9 dB, FIDELITY.md).

    seed, progress        reproducibility and a rich progress bar.
    """

    density_budget: float = 0.15
    recall_bound: float = 0.9
    candidate_patterns: tuple[str, ...] | None = None
    candidate_densities: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
    block_q: int = 128
    block_kv: int = 128
    cost_table: Mapping[float, float] | None = None
    attention_chunk_elements: int = 1 << 24

    group_size: int = 128
    act_format: str = "fp8_e4m3"
    scale_dtype: str = "bfloat16"
    site_pattern: str = QuantConfig().site_pattern
    msfp: bool = True
    msfp_max_negative_share: float = 0.1
    conditioning_linears: str = "keep"

    selection: str = "salient"
    num_samples: int = 8
    salient_dt: float = 20.0

    msad_steps: int = 100
    msad_lr: float = 1e-3
    lambda_global: float = 1.0
    lambda_local: float = 1.0
    global_pool_blocks: int = 8
    salient_token_fraction: float = 0.05
    dfa: bool = False
    dfa_flow_shift: float = 1.0

    lora_rank: int = 0
    lora_bucket_edges: tuple[float, ...] = (250.0, 500.0, 750.0)
    lora_steps: int = 100
    lora_lr: float = 1e-3

    ssar_samples: int = 2
    ssar_steps: int = 6
    ssar_step_size: float = 20.0
    ssar_tolerance: float = 0.1
    ssar_max_every: int = 5
    ssar_refresh_first: int = 1
    ssar_max_tokens: int = 1024
    ssar_rank_energy: float = 0.99
    ssar_delta_ranks: tuple[int, ...] = ()
    refresh_budget: float | None = None

    attention_int8_min_sqnr_db: float | None = None

    seed: int = 0
    progress: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        if not _is_fraction(self.density_budget):
            _fail("density_budget", self.density_budget, "must be in (0, 1], e.g. 0.15")
        if not _is_fraction(self.recall_bound, allow_zero=True):
            _fail("recall_bound", self.recall_bound, "must be in [0, 1], e.g. 0.9")
        if self.candidate_patterns is not None:
            if isinstance(self.candidate_patterns, str) or not self.candidate_patterns:
                _fail("candidate_patterns", self.candidate_patterns, "must be a non-empty tuple of names or None")
            unknown = [name for name in self.candidate_patterns if name not in PATTERNS]
            if unknown:
                _fail("candidate_patterns", self.candidate_patterns, f"names unknown patterns {unknown}; known: {sorted(PATTERNS)}")
        if not self.candidate_densities or not all(_is_fraction(d) for d in self.candidate_densities):
            _fail("candidate_densities", self.candidate_densities, "must be a non-empty tuple of numbers in (0, 1]")
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                _fail(name, value, "must be a power of two >= 16 (the kernel tile), e.g. 128")
        if self.cost_table is not None:
            if not isinstance(self.cost_table, Mapping) or not self.cost_table:
                _fail("cost_table", self.cost_table, "must be a non-empty {density: ms} dict or None")
            for density, ms in self.cost_table.items():
                if not _is_fraction(float(density)) or not isinstance(ms, (int, float)) or not ms >= 0:
                    _fail("cost_table", self.cost_table, f"has a bad entry {density!r}: {ms!r} (need density in (0, 1], ms >= 0)")
        if not isinstance(self.attention_chunk_elements, int) or self.attention_chunk_elements < 1024:
            _fail("attention_chunk_elements", self.attention_chunk_elements, "must be an int >= 1024")
        if not isinstance(self.group_size, int) or self.group_size < 0 or self.group_size % 2:
            _fail("group_size", self.group_size, "must be 0 (per channel) or a positive even int such as 64 or 128")
        if self.act_format not in ACT_FORMATS:
            _fail("act_format", self.act_format, f"must be one of {ACT_FORMATS}")
        if self.scale_dtype not in SCALE_DTYPES:
            _fail("scale_dtype", self.scale_dtype, f"must be one of {SCALE_DTYPES}")
        QuantConfig(site_pattern=self.site_pattern)  # validates the regex with the backend's own message
        if not isinstance(self.msfp, bool):
            _fail("msfp", self.msfp, "must be True or False")
        if not _is_fraction(self.msfp_max_negative_share, allow_zero=True):
            _fail("msfp_max_negative_share", self.msfp_max_negative_share, "must be in [0, 1], e.g. 0.1")
        if self.conditioning_linears not in CONDITIONING_LINEAR_MODES:
            _fail("conditioning_linears", self.conditioning_linears, f"must be one of {CONDITIONING_LINEAR_MODES}")
        if self.selection not in SELECTIONS:
            _fail("selection", self.selection, f"must be one of {SELECTIONS}")
        if not isinstance(self.lora_bucket_edges, tuple) or any(
            not isinstance(e, (int, float)) or math.isnan(e) for e in self.lora_bucket_edges
        ) or list(self.lora_bucket_edges) != sorted(set(self.lora_bucket_edges)):
            _fail("lora_bucket_edges", self.lora_bucket_edges, "must be a tuple of strictly ascending timesteps, e.g. (250.0, 500.0, 750.0)")
        for name in ("num_samples", "msad_steps", "seed", "lora_rank", "lora_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(name, value, "must be an int >= 0")
        for name in ("salient_dt", "ssar_step_size", "msad_lr", "lora_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                _fail(name, value, "must be a positive number")
        for name in ("lambda_global", "lambda_local"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                _fail(name, value, "must be a number >= 0 (0 turns the term off)")
        if not isinstance(self.global_pool_blocks, int) or self.global_pool_blocks < 1:
            _fail("global_pool_blocks", self.global_pool_blocks, "must be an int >= 1, e.g. 8")
        if not _is_fraction(self.salient_token_fraction):
            _fail("salient_token_fraction", self.salient_token_fraction, "must be in (0, 1], e.g. 0.05")
        if not isinstance(self.ssar_steps, int) or self.ssar_steps < 2:
            _fail("ssar_steps", self.ssar_steps, "must be an int >= 2 (>= 3 to judge order 2)")
        if not _is_fraction(self.ssar_tolerance):
            _fail("ssar_tolerance", self.ssar_tolerance, "must be in (0, 1], e.g. 0.1")
        for name in ("ssar_samples", "ssar_max_every", "ssar_refresh_first", "ssar_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _fail(name, value, "must be an int >= 1")
        if not isinstance(self.ssar_delta_ranks, tuple) or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in self.ssar_delta_ranks
        ) or list(self.ssar_delta_ranks) != sorted(set(self.ssar_delta_ranks)):
            _fail("ssar_delta_ranks", self.ssar_delta_ranks,
                  "must be a tuple of ascending ints >= 1, e.g. (4,), or () to compare only orders 1 and 2")
        if self.refresh_budget is not None and not _is_fraction(self.refresh_budget):
            _fail("refresh_budget", self.refresh_budget,
                  "must be None (a tolerance-driven schedule per layer) or a share of layer-steps in (0, 1], e.g. 0.1")
        if not _is_fraction(self.ssar_rank_energy):
            _fail("ssar_rank_energy", self.ssar_rank_energy, "must be in (0, 1], e.g. 0.99")
        if not isinstance(self.dfa, bool):
            _fail("dfa", self.dfa, "must be True or False")
        if isinstance(self.dfa_flow_shift, bool) or not isinstance(self.dfa_flow_shift, (int, float)) \
                or not self.dfa_flow_shift >= 1.0 or math.isinf(self.dfa_flow_shift):
            _fail("dfa_flow_shift", self.dfa_flow_shift,
                  "must be a finite number >= 1 (the sampler's flow shift; 1 = no shift), e.g. 3.0 for Wan 480p")
        floor = self.attention_int8_min_sqnr_db
        if floor is not None and (isinstance(floor, bool) or not isinstance(floor, (int, float))
                                  or not 0.0 <= floor < math.inf):
            _fail("attention_int8_min_sqnr_db", floor,
                  "must be None (no per-site precision in the plan) or a finite SQNR floor in dB >= 0, e.g. 30.0")
        if not isinstance(self.progress, bool):
            _fail("progress", self.progress, "must be True or False")
        if self.version != 1:
            _fail("version", self.version, "is not supported by this release (knows version 1)")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "CalibrationConfig":
        """Build from a dict (CLI / JSON); unknown keys are an error that lists the valid ones."""
        values = dict(values or {})
        _check_known_fields(cls, "CalibrationConfig", values, where="qsparse_compiler.calibration")
        for name in ("candidate_patterns", "candidate_densities", "lora_bucket_edges", "ssar_delta_ranks"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        if isinstance(values.get("cost_table"), Mapping):
            values["cost_table"] = {float(k): float(v) for k, v in values["cost_table"].items()}
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.cost_table is not None:
            data["cost_table"] = {str(float(k)): float(v) for k, v in sorted(self.cost_table.items())}
        return data

    def stage_hash(self, *names: str) -> str:
        """Hash of the fields a stage depends on: a checkpoint made with other values is stale."""
        data = self.to_json()
        picked = {name: data[name] for name in names} if names else data
        return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]
