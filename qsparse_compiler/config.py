"""Typed, versioned configuration of the ``quantsparse`` backend.

Modelled on torchao's ``AOBaseConfig`` dataclasses: every config is a frozen dataclass with a ``version``,
validated in ``__post_init__``, so a bad value fails at ``torch.compile`` time with a message that names the
field, the value and the fix — never halfway through a forward.

    torch.compile(model, backend="quantsparse",
                  options={"quant": {"group_size": 64}, "sparsity": {"density": 0.2}, "report": True})

``QuantSparseConfig.from_options`` turns the ``options`` dict of ``torch.compile`` into a config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .formats.quantization import ATTENTION_PRECISIONS

__all__ = [
    "ACT_FORMATS",
    "CACHE_MODES",
    "CACHE_STORAGES",
    "SCHEDULE_KEYS",
    "ATTENTION_PRECISIONS",
    "CONDITIONING_LINEAR_MODES",
    "WEIGHT_ONLY",
    "ConfigError",
    "QuantConfig",
    "SparsityConfig",
    "CacheConfig",
    "ParallelConfig",
    "QuantSparseConfig",
]

# Per-token dynamic activation formats of qsparse::w4a8_linear (see formats/quantization.py for the math):
#   fp8_e4m3   signed e4m3, scale = amax / 448 (Hopper tensor cores)
#   int8       signed int8, scale = amax / 127 (portable)
#   uint8_msfp unsigned int8 with a per-token zero at the row minimum (MSFP: for (near) non-negative inputs
#              such as GELU/SiLU outputs, all 256 codes cover [min, max] instead of half of them unused)
ACT_FORMATS = ("fp8_e4m3", "int8", "uint8_msfp")
SCALE_DTYPES = ("bfloat16", "float16", "float32")
# What becomes of a block linear whose input has no token dimension (an adaptive norm's modulation linear: (B, D),
# one row per sample), see QuantConfig.conditioning_linears:
#   keep              stays as it is, in the model's dtype
#   int4_weight_only  int4 weights (packed like the W4A8 linears), dequantized in the graph, the linear in the
#                     model's dtype; activations are not quantized
CONDITIONING_LINEAR_MODES = ("keep", "int4_weight_only")
# A plan's act_format for a linear calibrated as int4 weight-only (its activations are not quantized): what
# calibration writes for the conditioning linears under conditioning_linears="int4_weight_only" (plan schema >= 2).
WEIGHT_ONLY = "none"
# How the residual-cache node of a compiled graph decides between refresh and reuse:
#   auto     per call, from the runtime's step schedule (host-side; one graph serves every step)
#   refresh  always refresh (a graph for refresh steps)      } qs.optimize compiles these two variants so CUDA graphs
#   reuse    always reuse   (a graph for reuse steps)        } can capture each path
CACHE_MODES = ("auto", "refresh", "reuse")
# How a full-rank residual cache stores R and dR (runtime/residual_cache.py state_layout):
#   model     in the attention's dtype (bf16 for bf16 models)
#   fp8_e4m3  e4m3 codes + one fp32 scale per (batch, head, token) row: ~half of bf16's bytes. Wan-1.3B at 480p
#             with order 2 holds 5.6 GiB of bf16 residuals, more than the bf16 model's whole peak (BENCHMARKS.md)
CACHE_STORAGES = ("model", "fp8_e4m3")
# The CacheConfig fields that only say which steps refresh: decided on the host per call, they never change a compiled
# graph (a regional graph serves blocks whose schedules differ in them).
SCHEDULE_KEYS = ("refresh_first", "refresh_every", "refresh_steps", "num_steps")


class ConfigError(ValueError):
    """A backend option or config field has a bad value. The message names the field and the fix."""


def _fail(owner: str, name: str, value: Any, why: str, where: str = "qsparse_compiler.config") -> None:
    raise ConfigError(f"{where}: {owner}.{name}={value!r} {why}")


def _refuse_bools(owner: str, config: Any, names: tuple[str, ...]) -> None:
    """Numeric fields take numbers: a bool is an int to Python (True == 1), so density=True would read as 1."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool):
            _fail(owner, name, value, "must be a number, not a bool")


def _check_known_fields(cls: type, owner: str, value: Mapping[str, Any], where: str = "qsparse_compiler.config") -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown {owner} option(s) {unknown}; valid: {sorted(known)}")


def _build(cls: type, owner: str, value: Any) -> Any:
    """Accept an instance of ``cls``, a mapping of its fields, or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        _check_known_fields(cls, owner, value)
        return cls(**value)
    raise ConfigError(
        f"qsparse_compiler.config: {owner} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}"
    )


@dataclass(frozen=True)
class QuantConfig:
    """W4A8 linears: signed int4 weights (symmetric, per output channel and K-group), 8-bit activations.

    enabled        rewrite block linears into ``qsparse::w4a8_linear``.
    group_size     weights share a scale per ``group_size`` consecutive input features; 0 = one scale per
                   output channel (per-channel). Must be 0 or a positive even number.
    act_format     per-token dynamic activation format, one of ``ACT_FORMATS``.
    scale_dtype    storage dtype of the weight scales (bf16 keeps the block weights >= 3.7x smaller than bf16).
    site_pattern   regex on the module FQN of a linear: which linears are "inside the transformer blocks".
                   Default: a child of a top-level ModuleList (``blocks.3.attn1.to_q``,
                   ``single_transformer_blocks.0.proj_mlp``); embedders, refiners and the head stay bf16.
    act_quant_in_graph
                   emit the per-token activation quantization as ordinary graph ops feeding ``qsparse::w4a8_gemm``,
                   so Inductor fuses it into the op that produced the activation (norm, modulation, GELU, residual
                   add) - on the H100 a separate quantization pass cost 31 ms of a 228 ms Wan-1.3B forward. False
                   keeps one ``qsparse::w4a8_linear`` per linear (its own quantization kernel). "uint8_msfp" always
                   takes the one-op form (its zero point needs the weight row sums inside the op).
    conditioning_linears
                   block linears whose input has no token dimension (HunyuanVideo's / CogVideoX's adaptive-norm
                   modulation linears ``norm1.linear`` ...: (batch, dim) in, one row per sample; 27% of a
                   HunyuanVideo block's parameters), one of ``CONDITIONING_LINEAR_MODES``. "int4_weight_only" stores
                   them as int4 (``group_size``/``scale_dtype`` as above, round-to-nearest) and dequantizes the
                   weight in the graph on every call - their activations are never quantized (M = batch: nothing to
                   gain, and every token of the sample depends on them). A plan calibrated with
                   ``CalibrationConfig.conditioning_linears="int4_weight_only"`` lists them (act_format
                   ``WEIGHT_ONLY``) with their distilled weights: a listed linear follows the plan, whatever this
                   field says (the plan's fidelity was measured with it quantized).
    """

    enabled: bool = True
    group_size: int = 128
    act_format: str = "fp8_e4m3"
    scale_dtype: str = "bfloat16"
    site_pattern: str = r"^[A-Za-z_]\w*\.\d+(\.|$)"
    act_quant_in_graph: bool = True
    conditioning_linears: str = "keep"
    version: int = 1

    def __post_init__(self) -> None:
        _refuse_bools("QuantConfig", self, ("group_size",))
        for name in ("enabled", "act_quant_in_graph"):
            if not isinstance(getattr(self, name), bool):
                _fail("QuantConfig", name, getattr(self, name), "must be True or False")
        if not isinstance(self.group_size, int) or self.group_size < 0 or self.group_size % 2:
            _fail("QuantConfig", "group_size", self.group_size,
                  "must be 0 (per channel) or a positive even int such as 64 or 128")
        if self.act_format not in ACT_FORMATS:
            _fail("QuantConfig", "act_format", self.act_format, f"must be one of {ACT_FORMATS}")
        if self.scale_dtype not in SCALE_DTYPES:
            _fail("QuantConfig", "scale_dtype", self.scale_dtype, f"must be one of {SCALE_DTYPES}")
        if self.conditioning_linears not in CONDITIONING_LINEAR_MODES:
            _fail("QuantConfig", "conditioning_linears", self.conditioning_linears,
                  f"must be one of {CONDITIONING_LINEAR_MODES}")
        _check_regex("QuantConfig", "site_pattern", self.site_pattern)
        if self.version != 1:
            _fail("QuantConfig", "version", self.version, "is not supported by this release (knows version 1)")


@dataclass(frozen=True)
class SparsityConfig:
    """Block-sparse video self-attention.

    enabled     rewrite video self-attention (and the video part of joint text+video attention) into
                ``qsparse::sparse_attention``.
    density     fraction of (query block, key block) pairs computed in the video x video region, in (0, 1].
                Text rows and columns of joint attention are always dense.
    block_q     query block size in tokens (the kernel's tile); block_kv likewise for keys.
    pattern     static pattern spec used when no plan says otherwise (see formats/pattern_spec.py): ``local3d`` keeps,
                for every query block, the key blocks nearest to it in the (frame, height, width) token grid.
    attention_precision
                one of ``ATTENTION_PRECISIONS``, for every sparsified site (and its residual cache's refresh). A site
                whose kernel cannot run "int8_fp8" (head dim, tiling, GPU) stays "bf16" and the report says why.
    """

    enabled: bool = True
    density: float = 0.15
    block_q: int = 128
    block_kv: int = 128
    pattern: str = "local3d"
    attention_precision: str = "bf16"
    version: int = 1

    def __post_init__(self) -> None:
        _refuse_bools("SparsityConfig", self, ("density", "block_q", "block_kv"))
        if not isinstance(self.enabled, bool):
            _fail("SparsityConfig", "enabled", self.enabled, "must be True or False")
        if self.attention_precision not in ATTENTION_PRECISIONS:
            _fail("SparsityConfig", "attention_precision", self.attention_precision,
                  f"must be one of {ATTENTION_PRECISIONS}")
        if not isinstance(self.density, (int, float)) or not (0.0 < float(self.density) <= 1.0) or math.isnan(self.density):
            _fail("SparsityConfig", "density", self.density, "must be a number in (0, 1], e.g. 0.15")
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                _fail("SparsityConfig", name, value, "must be a power of two >= 16 (the kernel tile), e.g. 128")
        from .formats.pattern_spec import PATTERNS, parse_pattern_spec

        try:
            parse_pattern_spec(self.pattern, self.density)
        except (ValueError, AttributeError):
            _fail("SparsityConfig", "pattern", self.pattern, f"must be a pattern spec of {sorted(PATTERNS)}")
        if self.version != 1:
            _fail("SparsityConfig", "version", self.version, "is not supported by this release (knows version 1)")


@dataclass(frozen=True)
class CacheConfig:
    """Residual cache (SSAR) around each sparsified attention; see runtime/residual_cache.py.

    enabled        insert residual-cache nodes (a plan can enable it per site through AttentionPlan.cache).
    refresh_first  the first k denoising steps refresh (O_dense: the sparse attention completed over the complement
                   tiles; store R = O_dense - O_sparse).
    refresh_every  afterwards every step that is a multiple of n refreshes; 0 = never again.
    refresh_steps  instead of refresh_first / refresh_every: exactly these steps refresh (a per-layer schedule that
                   calibration's ``refresh_budget`` picks; ascending, starting at 0). Needs ``num_steps``.
    num_steps      the number of denoising steps ``refresh_steps`` was made for; a generation of another length is
                   refused (runtime/residual_cache.py), since the schedule would not fit its steps.
    order          1: reuse R; 2: R + (steps since refresh) * dR, dR the per-step change between two refreshes.
    rank           0: store R per head in full; r > 0: a rank-r factorization (truncated SVD) per head.
    delta_rank     order 2 only, full-rank caches: 0 extrapolates with dR as measured; r > 0 stores dR's best rank-r
                   approximation per head instead (QuantSparse's SVD-denoised second order, the beta term;
                   ops/residual_attention.py). A refresh then runs an SVD, which the fused CUDA step lacks: it runs
                   the op's reference (reuse steps stay fused). Calibration picks it per layer where it predicts better.
    storage        see CACHE_STORAGES (full rank only).
    max_branches   calls of one site within one step (2 = conditional + unconditional CFG passes).
    mode           see CACHE_MODES.
    override_plan  True: this schedule applies to every sparsified site even when a plan has per-site settings
                   (ablations); False: a plan's per-site settings win.
    """

    enabled: bool = False
    refresh_first: int = 2
    refresh_every: int = 5
    refresh_steps: tuple[int, ...] = ()
    num_steps: int = 0
    order: int = 2
    rank: int = 0
    delta_rank: int = 0
    storage: str = "model"
    max_branches: int = 2
    mode: str = "auto"
    override_plan: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        _refuse_bools("CacheConfig", self, ("refresh_first", "refresh_every", "order", "rank", "delta_rank",
                                           "max_branches"))
        if not isinstance(self.enabled, bool):
            _fail("CacheConfig", "enabled", self.enabled, "must be True or False")
        if not isinstance(self.refresh_first, int) or self.refresh_first < 1:
            _fail("CacheConfig", "refresh_first", self.refresh_first, "must be an int >= 1 (step 0 always refreshes)")
        if not isinstance(self.refresh_every, int) or self.refresh_every < 0:
            _fail("CacheConfig", "refresh_every", self.refresh_every, "must be an int >= 0 (0 = only the first steps)")
        if self.order not in (1, 2):
            _fail("CacheConfig", "order", self.order, "must be 1 or 2")
        if isinstance(self.refresh_steps, list):  # from JSON (a plan)
            object.__setattr__(self, "refresh_steps", tuple(self.refresh_steps))
        if self.refresh_steps or self.num_steps:
            self._check_refresh_steps()
        elif self.order == 2 and self.refresh_first < 2 and self.refresh_every == 0:
            _fail("CacheConfig", "order", self.order, "needs two refreshes to form dR: refresh_first >= 2")
        if not isinstance(self.rank, int) or self.rank < 0:
            _fail("CacheConfig", "rank", self.rank, "must be 0 (full) or a positive int")
        if not isinstance(self.delta_rank, int) or self.delta_rank < 0:
            _fail("CacheConfig", "delta_rank", self.delta_rank, "must be 0 (dR as measured) or a positive int")
        if self.delta_rank and self.order != 2:
            _fail("CacheConfig", "delta_rank", self.delta_rank,
                  f"denoises the second-order term dR, which order={self.order} does not use; use order=2 or delta_rank=0")
        if self.delta_rank and self.rank:
            _fail("CacheConfig", "delta_rank", self.delta_rank,
                  f"applies to full-rank caches only: rank={self.rank} already stores dR as its rank-{self.rank} "
                  "truncated SVD; use rank=0 or delta_rank=0")
        if self.storage not in CACHE_STORAGES:
            _fail("CacheConfig", "storage", self.storage, f"must be one of {CACHE_STORAGES}")
        if self.storage != "model" and self.rank:
            _fail("CacheConfig", "storage", self.storage,
                  f"applies to full-rank caches only (rank={self.rank}); use rank=0 or storage='model'")
        if not isinstance(self.max_branches, int) or self.max_branches < 1:
            _fail("CacheConfig", "max_branches", self.max_branches, "must be an int >= 1")
        if self.mode not in CACHE_MODES:
            _fail("CacheConfig", "mode", self.mode, f"must be one of {CACHE_MODES}")
        if self.version != 1:
            _fail("CacheConfig", "version", self.version, "is not supported by this release (knows version 1)")

    def _check_refresh_steps(self) -> None:
        steps = self.refresh_steps
        if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 1:
            _fail("CacheConfig", "num_steps", self.num_steps,
                  "must be the int >= 1 number of denoising steps that refresh_steps was made for")
        if not isinstance(steps, tuple) or not steps or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                 for s in steps):
            _fail("CacheConfig", "refresh_steps", steps, "must be a non-empty list of step indices, e.g. (0, 1, 9, 23)")
        if steps[0] != 0 or list(steps) != sorted(set(steps)) or steps[-1] >= self.num_steps:
            _fail("CacheConfig", "refresh_steps", steps,
                  f"must ascend strictly from step 0 (the first step has no residual to reuse) and stay below "
                  f"num_steps={self.num_steps}")
        if self.order == 2 and len(steps) < 2:
            _fail("CacheConfig", "order", self.order, "needs two refresh steps to form dR: give refresh_steps two")

    def is_refresh_step(self, step: int) -> bool:
        if self.refresh_steps:
            return step in self.refresh_steps
        return step < self.refresh_first or (self.refresh_every > 0 and step % self.refresh_every == 0)


@dataclass(frozen=True)
class ParallelConfig:
    """The context parallelism a compiled graph runs under: diffusers' Ulysses attention (runtime/parallel.py).

    Under Ulysses each rank holds a shard of the sequence; around every parallel attention an all-to-all turns it
    into a shard of the heads, so the attention sees every token of the video but H / ulysses_degree heads.
    (Not diffusers' ``ParallelConfig``: ``qs.optimize(pipe, parallel=ContextParallelConfig(...))`` fills this in.)

    ulysses_degree  ranks that share each attention's heads; 1 = no context parallelism.
    ulysses_rank    this process's rank in the Ulysses group: its attentions hold heads
                    [rank * H / degree, (rank + 1) * H / degree) of the model, so a per-head pattern (a plan's
                    ``head_patterns`` or ``sparsity.pattern``) is sliced to those heads; residual caches are
                    allocated for the local heads only (they follow the graph's shapes).
    """

    ulysses_degree: int = 1
    ulysses_rank: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        _refuse_bools("ParallelConfig", self, ("ulysses_degree", "ulysses_rank"))
        if not isinstance(self.ulysses_degree, int) or self.ulysses_degree < 1:
            _fail("ParallelConfig", "ulysses_degree", self.ulysses_degree, "must be an int >= 1 (1 = no parallelism)")
        if not isinstance(self.ulysses_rank, int) or not 0 <= self.ulysses_rank < self.ulysses_degree:
            _fail("ParallelConfig", "ulysses_rank", self.ulysses_rank,
                  f"must be an int in [0, ulysses_degree={self.ulysses_degree}): this rank in the Ulysses group")
        if self.version != 1:
            _fail("ParallelConfig", "version", self.version, "is not supported by this release (knows version 1)")


@dataclass(frozen=True)
class QuantSparseConfig:
    """Everything the backend needs; built from ``torch.compile(..., options=...)``.

    plan        directory of a calibrated Plan (plan.json + plan.safetensors); None = defaults
                (round-to-nearest weights, the static pattern of ``sparsity``), and the report says so.
    dump_dir    directory that receives the FX graph before/after each pass and the report as JSON.
    report      True prints the rewrite report table after each compile; False keeps quiet.
    inductor    config patches handed to Inductor's ``compile_fx`` (e.g. {"triton.cudagraphs": True}).
    runtime     the ``runtime.ResidualCacheRuntime`` that owns this model's residual caches and step counter
                (``qs.optimize`` makes one per model); None = the session's.
    session     the ``runtime.Session`` that owns what this model's compiled graphs read at run time (packed
                weights, LoRA tensors, residual caches) and their reports; None = the process's default session.
    parallel    the ``ParallelConfig`` (Ulysses degree and rank) the graph runs under; ``qs.optimize`` sets it for a
                transformer with diffusers' context parallelism.
    mode        a ``torch.compile`` mode ("max-autotune", ...) for Inductor, given here because torch.compile takes
                ``mode=`` or ``options=``, not both; ``inductor`` patches apply over it.

    A static ``skip`` pattern (a head that computes nothing and reads its output from the residual cache) needs the
    cache: without it the head's output would be zeros, so that combination is refused.
    """

    quant: QuantConfig = field(default_factory=QuantConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    plan: str | None = None
    dump_dir: str | None = None
    report: bool = False
    inductor: Mapping[str, Any] = field(default_factory=dict)
    runtime: Any = None
    session: Any = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    mode: str | None = None
    version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.cache, CacheConfig):
            _fail("QuantSparseConfig", "cache", self.cache, "must be a CacheConfig")
        if not isinstance(self.quant, QuantConfig):
            _fail("QuantSparseConfig", "quant", self.quant, "must be a QuantConfig (use from_options for dicts)")
        if not isinstance(self.sparsity, SparsityConfig):
            _fail("QuantSparseConfig", "sparsity", self.sparsity, "must be a SparsityConfig")
        if not isinstance(self.parallel, ParallelConfig):
            _fail("QuantSparseConfig", "parallel", self.parallel, "must be a ParallelConfig")
        for name in ("plan", "dump_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, Path)):
                _fail("QuantSparseConfig", name, value, "must be a path (str or pathlib.Path) or None")
        if self.plan is not None and not Path(self.plan).is_dir():
            _fail("QuantSparseConfig", "plan", self.plan,
                  "is not a directory; pass the folder written by `qsparse calibrate --out DIR`")
        if not isinstance(self.report, bool):
            _fail("QuantSparseConfig", "report", self.report, "must be True or False")
        if not isinstance(self.inductor, Mapping):
            _fail("QuantSparseConfig", "inductor", self.inductor, "must be a dict of Inductor config patches")
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if self.mode is not None and self.mode not in modes:
            _fail("QuantSparseConfig", "mode", self.mode, f"must be one of {modes} or None")
        from .ops.video_layout import parse_pattern_spec

        skips = [name for name, _ in parse_pattern_spec(self.sparsity.pattern, self.sparsity.density) if name == "skip"]
        if self.plan is None and self.sparsity.enabled and not self.cache.enabled and skips:
            _fail("QuantSparseConfig", "sparsity.pattern", self.sparsity.pattern,
                  "has skip heads, which compute nothing and read their output from the residual cache: enable the "
                  "cache (options['cache'] = {'enabled': True}, or qs.optimize(..., cache=True)) or use another pattern")
        if self.version != 1:
            _fail("QuantSparseConfig", "version", self.version, "is not supported by this release (knows version 1)")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "QuantSparseConfig":
        """Validate the ``options`` dict given to ``torch.compile(..., backend="quantsparse")``."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"qsparse_compiler.config: unknown backend option(s) {unknown}; valid options: {sorted(known)}"
            )
        options["quant"] = _build(QuantConfig, "quant", options.get("quant"))
        options["sparsity"] = _build(SparsityConfig, "sparsity", options.get("sparsity"))
        options["cache"] = _build(CacheConfig, "cache", options.get("cache"))
        options["parallel"] = _build(ParallelConfig, "parallel", options.get("parallel"))
        for name in ("plan", "dump_dir"):
            if isinstance(options.get(name), Path):
                options[name] = str(options[name])
        return cls(**options)


def _check_regex(owner: str, name: str, pattern: str) -> None:
    import re

    try:
        re.compile(pattern)
    except (re.error, TypeError) as exc:
        _fail(owner, name, pattern, f"is not a valid regular expression ({exc})")
