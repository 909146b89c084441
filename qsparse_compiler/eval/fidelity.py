"""Fidelity of a compressed model against the dense one: video metrics, per-layer SQNR, attention recall, harness.

Metrics (all torch, device-agnostic):
- ``psnr(a, b)``: per video, over all its pixels, channels and frames; ``inf`` for identical videos (checked against
  torchmetrics' PSNR in the tests).
- ``ssim(a, b)``: per video, the mean over frames of torchmetrics' SSIM (Gaussian window 11, sigma 1.5).
- ``sqnr_db(test, ref)`` (from eval/metrics.py): 10 log10(|ref|^2 / |ref - test|^2), ``inf`` when equal.
- ``layer_sqnr(dense, variant, inputs)``: SQNR of every transformer block's output (forward hooks), dense vs
  variant run on the same model inputs (errors accumulate through depth, as in a real forward).
- ``attention_recall(q, k, layout)``: the share of dense softmax probability mass inside the tiles a
  ``BlockSparseLayout`` keeps, computed one chunk of query blocks at a time (never S x S at once).
- ``capture_attention_qk(model, inputs)``: the q, k that each self-attention of a diffusers Wan model feeds to its
  attention kernel (after QK-norm and RoPE), for ``attention_recall``.

Harness: ``evaluate(variants, ...)`` samples videos from the dense model and from every variant (a function that
turns a freshly loaded dense transformer into the compressed one, e.g.
``lambda m: torch.compile(m, backend="quantsparse", options=...)``) at the same seeds (same prompts and starting
noise), and writes ``results.json``, ``results.md`` (a table), ``psnr.png``, ``layer_sqnr.png`` and
``videos.png`` (the first seed's video, dense then each variant).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.layout import BlockSparseLayout
from ..formats.pattern_spec import build_video_layout
from ..formats.patterns import TokenGrid
from ..ops.context import latent_grid
from .metrics import sqnr_db

__all__ = [
    "EvalResult",
    "attention_recall",
    "block_modules",
    "capture_attention_qk",
    "evaluate",
    "layer_sqnr",
    "psnr",
    "random_wan_inputs",
    "sqnr_db",
    "ssim",
]


def _where(fn: str) -> str:
    return f"qsparse_compiler.eval.fidelity.{fn}"


# ---------------------------------------------------------------------------------------------------- metrics
def _check_pair(fn: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{_where(fn)}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}; compare videos of one size")
    if a.ndim not in (4, 5):
        raise ValueError(
            f"{_where(fn)}: expected videos [N, C, T, H, W] or images [N, C, H, W], got {tuple(a.shape)}"
        )


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """float64 [N]: PSNR in dB of each video (or image) of ``b`` against ``a``; ``data_range`` is max - min of the
    signal (2 for [-1, 1]). Identical inputs give ``inf``."""
    _check_pair("psnr", a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 -> +inf


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """float64 [N]: SSIM of each video (or image) of ``b`` against ``a`` - torchmetrics'
    ``structural_similarity_index_measure`` (Gaussian window 11, sigma 1.5) per frame, averaged over frames.
    Identical inputs give 1."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair("ssim", a, b)
    if a.ndim == 4:
        a, b = a.unsqueeze(2), b.unsqueeze(2)
    n, c, t, h, w = a.shape
    frames_a = a.transpose(1, 2).reshape(n * t, c, h, w).double()
    frames_b = b.transpose(1, 2).reshape(n * t, c, h, w).double()
    per_frame = structural_similarity_index_measure(frames_b, frames_a, data_range=data_range, reduction="none")
    return per_frame.reshape(n, t).mean(1)


# ---------------------------------------------------------------------------------------------------- layers
def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile returns an OptimizedModule holding the original module; hooks go on the original's submodules
    # (Dynamo traces registered hooks into the compiled graph, so they see the compiled computation).
    return getattr(model, "_orig_mod", model)


def block_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The transformer blocks (``blocks.0`` ... for Wan; any ``nn.ModuleList`` called ``blocks`` or
    ``transformer_blocks``), keyed by FQN relative to the unwrapped model."""
    inner = _unwrap(model)
    for attr in ("blocks", "transformer_blocks"):
        blocks = getattr(inner, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return {f"{attr}.{i}": b for i, b in enumerate(blocks)}
    raise ValueError(
        f"{_where('block_modules')}: {type(inner).__name__} has no `blocks` or `transformer_blocks` ModuleList; "
        "pass the transformer (not a pipeline) or a module that keeps its blocks"
    )


@contextlib.contextmanager
def record_block_outputs(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Inside the context, every call of a block appends its output (float32, detached) under the block's FQN."""
    store: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, block in block_modules(model).items():
        store[name] = []

        def hook(_module: nn.Module, _args: Any, output: Any, _name: str = name) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            store[_name].append(out.detach().float())

        handles.append(block.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def random_wan_inputs(
    model: nn.Module,
    *,
    frames: int,
    height: int,
    width: int,
    text_len: int = 512,
    batch: int = 1,
    sigma: float = 0.5,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Keyword inputs for a diffusers Wan transformer (any size, e.g. random-weight Wan2.1-1.3B for
    ``layer_sqnr``): standard-normal latents [batch, in_channels, frames, height, width] and text tokens
    [batch, text_len, text_dim] from CPU generators seeded ``seed`` / ``seed + 1``, timestep 1000 * sigma."""
    cfg = _unwrap(model).config
    latents = torch.randn(batch, cfg.in_channels, frames, height, width, generator=torch.Generator().manual_seed(seed))
    text = torch.randn(batch, text_len, cfg.text_dim, generator=torch.Generator().manual_seed(seed + 1))
    return {
        "hidden_states": latents.to(device, dtype),
        "timestep": torch.full((batch,), 1000.0 * sigma, device=device),
        "encoder_hidden_states": text.to(device, dtype),
    }


@torch.no_grad()
def layer_sqnr(dense: nn.Module, variant: nn.Module, inputs: Mapping[str, Any]) -> dict[str, float]:
    """SQNR (dB) of each block's output and of the model output ("output"), variant vs dense, both called with
    ``**inputs`` (e.g. hidden_states, timestep, encoder_hidden_states). Blocks are matched by FQN."""
    results = {}
    outs = []
    for model in (dense, variant):
        with record_block_outputs(model) as store:
            out = model(**inputs, return_dict=False)[0]
        outs.append((store, out.detach().float()))
    (d_store, d_out), (v_store, v_out) = outs
    for name, d_list in d_store.items():
        v_list = v_store.get(name, [])
        if len(v_list) != len(d_list) or not d_list:
            raise RuntimeError(
                f"{_where('layer_sqnr')}: block {name} ran {len(d_list)} times in the dense model but {len(v_list)} "
                "times in the variant; the variant must keep the block structure (and hooks must not be dropped by "
                "its compilation)"
            )
        results[name] = sqnr_db(torch.cat([t.flatten() for t in v_list]), torch.cat([t.flatten() for t in d_list]))
    results["output"] = sqnr_db(v_out, d_out)
    return results


# ---------------------------------------------------------------------------------------------------- attention
def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    scale: float | None = None,
    per_query_block: bool = False,
    max_chunk_bytes: int = 1 << 28,
) -> torch.Tensor:
    """Share of the dense attention probability mass that falls inside the layout's kept tiles.

    q: [B, H, Sq, D], k: [B, H, Skv, D] (any float dtype; computed in fp32); layout: q_len = Sq, kv_len = Skv,
    B and H equal or 1 (broadcast). ``scale`` defaults to 1/sqrt(D), as in SDPA.
    Returns float32 [B, H]: the mean over queries of the kept mass per query row (1.0 = lossless), or with
    ``per_query_block`` float32 [B, H, QB]: the mean within each query block.
    Works one chunk of query blocks at a time so that one chunk's fp32 probabilities take at most
    ``max_chunk_bytes`` (at least one query block per chunk; the peak is about three times that).
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{_where('attention_recall')}: q and k must be [B, H, S, D] with equal B, H, D; got {tuple(q.shape)} and "
            f"{tuple(k.shape)}"
        )
    b, h, sq, d = q.shape
    skv = k.shape[2]
    lb, lh, qb, kvb = layout.shape
    if layout.q_len != sq or layout.kv_len != skv:
        raise ValueError(
            f"{_where('attention_recall')}: layout is for q_len={layout.q_len}, kv_len={layout.kv_len} but q has "
            f"{sq} and k {skv} tokens; build the layout for this sequence"
        )
    if lb not in (1, b) or lh not in (1, h):
        raise ValueError(
            f"{_where('attention_recall')}: layout batch/heads ({lb}, {lh}) must be 1 or equal q's ({b}, {h})"
        )
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    tiles = layout.to_dense().to(q.device)  # [lb, lh, QB, KVB]
    bq = layout.block_q
    rows_per_chunk = max(bq, (max_chunk_bytes // max(4 * b * h * skv, 1)) // bq * bq)
    kf = k.float()
    row_mass = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    for r0 in range(0, sq, rows_per_chunk):
        r1 = min(sq, r0 + rows_per_chunk)
        logits = torch.matmul(q[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale  # [B, H, rows, Skv]
        probs = torch.softmax(logits, dim=-1)
        del logits
        # Kept mass per row = sum over kept key blocks of the probability mass in that key block.
        pad = kvb * layout.block_kv - skv
        block_mass = F.pad(probs, (0, pad)).view(b, h, r1 - r0, kvb, layout.block_kv).sum(-1)  # [B, H, rows, KVB]
        del probs
        row_block = torch.arange(r0, r1, device=q.device) // bq  # query block of each row
        kept = tiles[:, :, row_block]  # [lb, lh, rows, KVB]
        row_mass[:, :, r0:r1] = (block_mass * kept).sum(-1)
    if not per_query_block:
        return row_mass.mean(-1)
    pad = qb * bq - sq
    sums = F.pad(row_mass, (0, pad)).view(b, h, qb, bq).sum(-1)
    counts = torch.full((qb,), float(bq), device=q.device)
    counts[-1] = sq - (qb - 1) * bq
    return sums / counts


@contextlib.contextmanager
def _intercept_wan_attention(model: nn.Module, layers: Sequence[str] | None) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    import diffusers.models.transformers.transformer_wan as wan

    inner = _unwrap(model)
    targets = {name: m for name, m in inner.named_modules() if name.endswith("attn1") and (layers is None or name in layers)}
    if not targets:
        raise ValueError(
            f"{_where('capture_attention_qk')}: no self-attention modules (names ending in 'attn1') matched {layers!r}"
        )
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    current: list[str] = []
    original_dispatch = wan.dispatch_attention_fn
    originals = {}

    def dispatch(query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if current:
            # diffusers passes [B, S, H, D]; recall works on [B, H, S, D].
            captured[current[-1]] = (query.detach().transpose(1, 2), key.detach().transpose(1, 2))
        return original_dispatch(query, key, *args, **kwargs)

    for name, module in targets.items():
        proc = module.processor

        def wrapped(attn: nn.Module, *args: Any, _proc: Any = proc, _name: str = name, **kwargs: Any) -> torch.Tensor:
            current.append(_name)
            try:
                return _proc(attn, *args, **kwargs)
            finally:
                current.pop()

        originals[name] = proc
        module.processor = wrapped
    wan.dispatch_attention_fn = dispatch
    try:
        yield captured
    finally:
        wan.dispatch_attention_fn = original_dispatch
        for name, proc in originals.items():
            targets[name].processor = proc


@torch.no_grad()
def capture_attention_qk(
    model: nn.Module, inputs: Mapping[str, Any], layers: Sequence[str] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run the (uncompiled) diffusers Wan model once on ``inputs`` and return, per self-attention FQN
    (``blocks.{i}.attn1``), the (q, k) it gives its attention kernel, as [B, H, S, D] after QK-norm and RoPE."""
    with _intercept_wan_attention(model, layers) as captured:
        _unwrap(model)(**inputs, return_dict=False)
    return dict(captured)


# ---------------------------------------------------------------------------------------------------- harness
@dataclass
class VariantResult:
    psnr_db: list[float]
    ssim: list[float]
    layer_sqnr_db: dict[str, float]
    seconds: float
    notes: list[str] = field(default_factory=list)
    psnr_mean: float = 0.0
    psnr_min: float = 0.0
    ssim_mean: float = 0.0

    def __post_init__(self) -> None:
        # The mean of per-video PSNRs (the usual report); one identical video makes it inf, which is honest.
        self.psnr_mean = sum(self.psnr_db) / len(self.psnr_db)
        self.psnr_min = min(self.psnr_db)
        self.ssim_mean = sum(self.ssim) / len(self.ssim)


@dataclass
class EvalResult:
    """What ``evaluate`` measured; ``to_json()`` is what it writes to results.json."""

    settings: dict[str, Any]
    dense_seconds: float
    variants: dict[str, VariantResult] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return "inf" if x > 0 else "-inf" if x < 0 else "nan"
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        return clean(
            {
                "settings": self.settings,
                "prompts": self.prompts,
                "dense_seconds": self.dense_seconds,
                "variants": {k: asdict(v) for k, v in self.variants.items()},
            }
        )

    def markdown(self) -> str:
        s = self.settings
        lines = [
            f"Fidelity vs the dense model: {s['num_videos']} videos (seeds {s['seeds']}), {s['num_steps']} sampling "
            f"steps, guidance {s['guidance_scale']}, {s['frames']}x{s['height']}x{s['width']}, {s['dtype']} on "
            f"{s['device']}. PSNR/SSIM over whole videos; SQNR of block outputs at sigma={s['sqnr_sigma']}. "
            "Seconds are one whole sampling run, first call included (so compilation time, if any).",
            "",
            "| variant | PSNR mean (dB) | PSNR min (dB) | SSIM mean | output SQNR (dB) | min block SQNR (dB) | s per run |",
            "|---|---|---|---|---|---|---|",
            f"| dense | inf | inf | 1.0000 | inf | inf | {self.dense_seconds:.2f} |",
        ]

        def f(x: float, spec: str) -> str:
            return "inf" if math.isinf(x) else format(x, spec)

        for name, r in self.variants.items():
            blocks = [v for k, v in r.layer_sqnr_db.items() if k != "output"]
            lines.append(
                f"| {name} | {f(r.psnr_mean, '.2f')} | {f(r.psnr_min, '.2f')} | {r.ssim_mean:.4f} | "
                f"{f(r.layer_sqnr_db.get('output', math.nan), '.2f')} | {f(min(blocks) if blocks else math.nan, '.2f')} | "
                f"{r.seconds:.2f} |"
            )
        notes = [f"- {name}: {note}" for name, r in self.variants.items() for note in r.notes]
        return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(
    variants: Mapping[str, Callable[[nn.Module], nn.Module]],
    *,
    out_dir: str | Path | None = None,
    model_factory: Callable[[], nn.Module] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seeds: Sequence[int] = (0, 1, 2, 3),
    num_steps: int | None = None,
    guidance_scale: float = 1.0,
    data: Any = None,
    sqnr_sigma: float = 0.5,
    batch_size: int | None = None,
) -> EvalResult:
    """Sample from the dense model and from each variant at the same seeds; compare.

    variants: name -> function turning a freshly built dense model into the variant (it may modify it in place or
    wrap it, e.g. ``torch.compile``). Each variant gets its own fresh model from ``model_factory`` (default: the
    committed reference model on ``device`` in ``dtype``).
    seeds: one video per seed; the seed picks both the prompt (``SyntheticVideos.scenes_for_seeds``) and the
    starting noise. data: a ``SyntheticVideoConfig`` (default: the reference model's).
    batch_size: videos per sampling call (default: all at once).
    Writes results.json, results.md, psnr.png, layer_sqnr.png and videos.png to ``out_dir`` when given.
    """
    from . import plots
    from .reference_model import DEFAULT_STEPS, load_reference_metadata, load_reference_model, sample_videos
    from .synthetic_video import SyntheticVideoConfig, SyntheticVideos

    device = torch.device(device)
    if not seeds:
        raise ValueError(f"{_where('evaluate')}: seeds must not be empty")
    if model_factory is None:

        def model_factory() -> nn.Module:
            return load_reference_model(device, dtype)

    if data is None:
        meta = load_reference_metadata()
        data = SyntheticVideoConfig.from_dict(meta["data"])
        num_steps = num_steps or meta.get("sampler", {}).get("num_steps", DEFAULT_STEPS)
    num_steps = num_steps or DEFAULT_STEPS
    gen = SyntheticVideos(data, device="cpu")
    scenes = gen.scenes_for_seeds(list(seeds))
    prompts = gen.embed(scenes)
    bs = batch_size or len(seeds)

    def run(model: nn.Module) -> tuple[torch.Tensor, float]:
        # A variant made by qs.optimize carries a residual-cache runtime: one generation per sampling call.
        runtime = getattr(model, "_qsparse_runtime", None)
        _sync(device)
        t0 = time.perf_counter()
        chunks = []
        for i in range(0, len(seeds), bs):
            if runtime is not None:
                runtime.reset()
            chunks.append(
                sample_videos(
                    model, prompts[i : i + bs], list(seeds[i : i + bs]), frames=data.frames, height=data.height,
                    width=data.width, channels=data.channels, num_steps=num_steps, guidance_scale=guidance_scale,
                    device=device, dtype=dtype, on_step=None if runtime is None else lambda _i, _t: runtime.step(),
                ).cpu()
            )
        if runtime is not None:
            runtime.reset()  # the per-layer SQNR below is one more call: a refresh step
        _sync(device)
        return torch.cat(chunks), time.perf_counter() - t0

    # Fixed input for the per-layer SQNR: the first seed's data video noised to sqnr_sigma.
    x0 = gen.render(scenes.select(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(seeds[0])))
    x_t = (1 - sqnr_sigma) * x0 + sqnr_sigma * noise
    sqnr_inputs = {
        "hidden_states": x_t.to(device, dtype),
        "timestep": torch.tensor([1000.0 * sqnr_sigma], device=device),
        "encoder_hidden_states": prompts[:1].to(device, dtype),
    }

    dense = model_factory()
    dense_videos, dense_seconds = run(dense)
    settings = {
        "seeds": list(seeds), "num_videos": len(seeds), "num_steps": num_steps, "guidance_scale": guidance_scale,
        "frames": data.frames, "height": data.height, "width": data.width, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "sqnr_sigma": sqnr_sigma, "torch": torch.__version__,
    }
    result = EvalResult(settings=settings, dense_seconds=dense_seconds, prompts=gen.describe(scenes))
    first_videos = [dense_videos[:1]]
    for name, make in variants.items():
        # Compiled variants of one model class share Dynamo's per-code-object cache and its recompile limit (past
        # it, a model silently runs uncompiled); each variant is finished before the next, so start each afresh.
        torch._dynamo.reset()
        variant = make(model_factory())
        videos, seconds = run(variant)
        notes = []
        try:
            sq = layer_sqnr(dense, variant, sqnr_inputs)
        except (ValueError, RuntimeError) as err:  # a variant without block structure still gets video metrics
            sq, notes = {}, [f"no per-block SQNR: {err}"]
        result.variants[name] = VariantResult(
            psnr_db=[float(x) for x in psnr(dense_videos, videos)],
            ssim=[float(x) for x in ssim(dense_videos, videos)],
            layer_sqnr_db=sq,
            seconds=seconds,
            notes=notes,
        )
        first_videos.append(videos[:1])
        del variant

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        (out / "results.md").write_text(result.markdown())
        if result.variants:
            plots.bar_plot({k: v.psnr_mean for k, v in result.variants.items()}, out / "psnr.png",
                           title="PSNR of each variant's videos vs the dense model's (same seeds)", ylabel="dB")
            series = {}
            for k, v in result.variants.items():
                blocks = [(int(n.split(".")[-1]), x) for n, x in v.layer_sqnr_db.items() if n != "output"]
                if blocks:
                    series[k] = ([i for i, _ in blocks], [x for _, x in blocks])
            if series and any(math.isfinite(y) for _, ys in series.values() for y in ys):
                plots.line_plot(series, out / "layer_sqnr.png", title="block output SQNR vs dense",
                                xlabel="block", ylabel="SQNR dB")
        plots.video_strip(torch.cat(first_videos), out / "videos.png", scale=2 if data.height >= 32 else 4)
    return result


@torch.no_grad()
def layout_recall(
    model: nn.Module, inputs: Mapping[str, Any], specs: Mapping[str, str], density: float, block: int = 128
) -> dict[str, list[float]]:
    """Attention recall per head of the layouts the backend would use: ``specs`` maps a self-attention FQN to a
    pattern spec (``local3d``, or a plan's per-head ``local3d:0.1;skip;...``); the grid comes from the latents."""
    captured = capture_attention_qk(model, inputs, list(specs))
    frames, height, width = latent_grid(_unwrap(model), inputs["hidden_states"])
    recall = {}
    for name, (q, k) in captured.items():
        grid = TokenGrid(frames, height, width, q.shape[2])
        layout = build_video_layout(grid, specs[name], density, block, block)
        recall[name] = [float(x) for x in attention_recall(q, k, layout)[0]]
    return recall
