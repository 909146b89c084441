"""The ``qsparse`` command line (typer + rich); also ``python -m qsparse_compiler``.

A user error (a bad option value or JSON, a plan that does not fit, a missing file) is one line that names the cause
and the fix, as typer's own parameter errors are; ``qsparse --debug COMMAND`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="qsparse_compiler: W4A8 + block-sparse attention for video diffusion transformers.",
                  no_args_is_help=True, add_completion=False)
console = Console()

TINY = ("wan-tiny", "hunyuan-tiny", "cogvideox-tiny")
# The built-in models are this wide so that every block linear has K a multiple of the default group size (128).
TINY_WIDTH = 128


def _user_errors() -> tuple[type[BaseException], ...]:
    from .calibration.config import CalibrationError
    from .config import ConfigError
    from .plan import PlanError
    from .formats.layout import LayoutError

    return ConfigError, PlanError, LayoutError, CalibrationError, FileNotFoundError, json.JSONDecodeError


def _version(value: bool) -> None:
    if value:
        from ._version import __version__

        console.print(f"qsparse_compiler {__version__}")
        raise typer.Exit()


# Set by the top-level options of each invocation (typer runs commands outside any context a helper can reach).
_invocation = {"debug": False}


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
) -> None:
    _invocation["debug"] = debug


def _one_line_errors(command: Callable) -> Callable:
    """A user error raised by ``command`` (directly, or wrapped by torch.compile's BackendCompilerFailed) becomes a
    one-line typer error; anything else, and any error under --debug, keeps its traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a user error
            cause = exc
            while cause is not None and not isinstance(cause, _user_errors()):
                cause = getattr(cause, "inner_exception", None) or cause.__cause__
            if cause is None or _invocation["debug"]:
                raise
            message = f"{cause.msg} (line {cause.lineno}, column {cause.colno})" if isinstance(
                cause, json.JSONDecodeError) else str(cause)
            raise typer.BadParameter(message.splitlines()[0] + " (--debug shows the traceback)") from None

    return run


def _default_device() -> str:
    """The available accelerator, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _parse_options(options: str) -> dict[str, Any]:
    """--options JSON, validated as backend options; errors name the fix."""
    from .config import QuantSparseConfig

    try:
        parsed = json.loads(options)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(
            f"not valid JSON ({exc.msg} at column {exc.colno}); quote it for the shell, e.g. "
            "--options '{\"sparsity\": {\"density\": 0.2}}'", param_hint="--options") from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter(f"must be a JSON object, got {options!r}", param_hint="--options")
    QuantSparseConfig.from_options(parsed)
    return parsed


def _load_model(model: str):
    """A built-in tiny model of one of the three supported architectures, with example inputs. Its random weights
    are seeded: `qsparse calibrate hunyuan-tiny` and a later `qsparse compile hunyuan-tiny` with that plan see the same
    model (a plan's distilled weights replace the model's own at compile)."""
    import torch

    from .eval.models import TINY_MODELS

    if model not in TINY:
        raise typer.BadParameter(f"{model!r} is not one of {TINY}; compile your own model from Python (README)")
    torch.manual_seed(0)
    tiny = TINY_MODELS[model.removesuffix("-tiny")](width=TINY_WIDTH)
    return tiny.model, tiny.make_inputs()


@app.command("compile")
@_one_line_errors
def compile_command(
    model: Optional[str] = typer.Argument(None, help=f"one of {', '.join(TINY)} (not with --coverage)"),
    options: str = typer.Option("{}", help='backend options as JSON, e.g. \'{"sparsity": {"density": 0.2}}\''),
    dump_dir: Optional[Path] = typer.Option(None, help="write the FX graph before/after each pass and the report"),
    coverage: bool = typer.Option(False, "--coverage", help="print the coverage matrix of the diffusers video DiT "
                                  "classes instead (eval/video_dits.py; options default to its tiny sizes)"),
    only: Optional[str] = typer.Option(None, help="with --coverage: comma-separated class keys"),
    inductor: bool = typer.Option(True, help="with --coverage: also compile through Inductor (minutes on a CPU)"),
) -> None:
    """Compile a model with backend="quantsparse", run it once, print the rewrite report (about a minute on CPU); or,
    with --coverage, the coverage matrix."""
    import torch

    from .compiler.backend import reports
    from .eval.metrics import relative_error

    parsed = _parse_options(options)
    if coverage:
        _print_coverage(parsed, only, inductor)
        return
    if model is None:
        raise typer.BadParameter(f"name a model ({', '.join(TINY)}) or pass --coverage")
    parsed["report"] = True
    if parsed.get("plan"):
        # A plan's skip heads read their output from the residual cache: run it (step 0 refreshes).
        parsed.setdefault("cache", {"enabled": True})
    if dump_dir is not None:
        parsed["dump_dir"] = str(dump_dir)
    module, inputs = _load_model(model)
    with torch.no_grad():
        expected = module(**inputs)[0]
        actual = torch.compile(module, backend="quantsparse", options=parsed, fullgraph=True)(**inputs)[0]
    console.print(f"output vs eager: relative error {relative_error(actual, expected):.4g}")
    if reports() and reports()[-1].compression:
        console.print(f"block weights {reports()[-1].compression:.2f}x smaller than bf16")


def _print_coverage(options: dict, only: Optional[str], inductor: bool) -> None:
    from .eval.coverage import coverage_markdown, measure_coverage
    from .eval.video_dits import COVERAGE_OPTIONS, VIDEO_DITS, tiny_video_dit

    names = [name.strip() for name in only.split(",")] if only else list(VIDEO_DITS)
    unknown = sorted(set(names) - set(VIDEO_DITS))
    if unknown:
        raise typer.BadParameter(f"--only: {unknown} not among {sorted(VIDEO_DITS)}")
    rows = []
    for name in names:
        rows.append(measure_coverage(tiny_video_dit(name), options or COVERAGE_OPTIONS, compile_with_inductor=inductor))
        console.print(f"[dim]{name}: done[/dim]")
    typer.echo(coverage_markdown(rows))


def _reference_data(frames: Optional[int]):
    """The reference model's video config, with another frame count if asked (shorter videos for CPU runs)."""
    import dataclasses

    from .eval.reference_model import load_reference_metadata
    from .eval.synthetic_video import SyntheticVideoConfig

    data = SyntheticVideoConfig.from_dict(load_reference_metadata()["data"])
    return data if frames is None else dataclasses.replace(data, frames=frames)


@app.command("calibrate")
@_one_line_errors
def calibrate_command(
    model: str = typer.Argument(..., help=f"'reference' (the committed reference video DiT) or one of {', '.join(TINY)}"),
    out: Path = typer.Option(..., help="plan directory to write (plan.json + plan.safetensors)"),
    samples: Optional[Path] = typer.Option(None, help="calibration inputs (calibration.save_samples); default: "
                                                      "recorded from a sampling run of the model"),
    config: Optional[Path] = typer.Option(None, help="CalibrationConfig fields as JSON"),
    seeds: str = typer.Option("0,1,2,3", help="videos sampled to record inputs when --samples is not given"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)"),
    resume: bool = typer.Option(True, help="continue from the checkpoints in --out"),
    frames: Optional[int] = typer.Option(None, help="frames of the recorded videos (reference model)"),
    steps: int = typer.Option(30, help="sampling steps of the recorded videos (reference model)"),
    every: int = typer.Option(5, min=1, help="record the transformer's inputs at every n-th sampling step, 1 = every "
                                             "step (reference model); each recorded step, all seeds' videos in one "
                                             "batch, is one candidate sample of the data selection"),
) -> None:
    """Calibrate a Plan: salient samples, per-head pattern search, MSAD distillation, residual-cache settings.
    The reference DiT at its defaults takes ~40 min on 2 CPU cores (FIDELITY.md's short run: 4 min)."""
    import torch

    device = device or _default_device()
    from .calibration.driver import calibrate_cli_main
    from .calibration.pipeline import record_transformer_calls
    from .calibration.driver import save_samples

    if model == "reference":
        from .eval.reference_model import load_reference_model, sample_videos
        from .eval.synthetic_video import SyntheticVideos

        module = load_reference_model(device, torch.float32)
        if samples is None:
            data = _reference_data(frames)
            videos = SyntheticVideos(data, device="cpu")
            chosen = [int(s) for s in seeds.split(",")]
            prompts = videos.embed(videos.scenes_for_seeds(chosen))
            with torch.no_grad(), record_transformer_calls(module, every=every) as recorder:
                sample_videos(module, prompts, chosen, frames=data.frames, height=data.height, width=data.width,
                              channels=data.channels, num_steps=steps, device=device, dtype=torch.float32)
            samples = out / "samples.safetensors"
            out.mkdir(parents=True, exist_ok=True)
            save_samples(recorder.samples, samples)
    else:
        module, inputs = _load_model(model)
        if samples is None:
            samples = out / "samples.safetensors"
            out.mkdir(parents=True, exist_ok=True)
            save_samples([{k: v for k, v in inputs.items() if k != "return_dict"}], samples)
    calibrate_cli_main(module, samples, out, config, resume=resume)


@app.command("eval")
@_one_line_errors
def eval_command(
    out: Path = typer.Option(Path("fidelity"), help="where results.json, results.md and the plots go"),
    variants: str = typer.Option("w4a8,sparse,naive,ssar1,ssar2,lowrank",
                                 help="ablation rows (eval/ablation.py); msad and ssar_plan need --plan"),
    plan: Optional[Path] = typer.Option(None, help="a calibrated plan for the msad / SSAR rows"),
    density: float = typer.Option(0.15, help="attention density of the sparse rows without a plan"),
    seeds: str = typer.Option("0,1,2,3", help="one video per seed"),
    steps: Optional[int] = typer.Option(None, help="sampling steps (default: the reference model's)"),
    device: Optional[str] = typer.Option(None, help="cuda or cpu (default: cuda when available; cpu is slow: 16,384 "
                                                    "tokens per video)"),
    frames: Optional[int] = typer.Option(None, help="video frames (default: the reference model's 16)"),
    pareto: Optional[Path] = typer.Option(None, help="instead: draw seconds per video vs PSNR from this speed JSON of "
                                                     "bench_generation.py and --fidelity-json, into --out/pareto.png"),
    fidelity_json: Optional[list[Path]] = typer.Option(None, help="with --pareto: bench_generation.py --fidelity's "
                                                                  "JSON (repeat to join runs of the same settings)"),
    stand_in: Optional[list[str]] = typer.Option(None, help="with --pareto: SPEED_ROW=FIDELITY_ROW, a row measured "
                                                            "for speed only that takes another row's PSNR (e.g. "
                                                            "flex-fp8=flex from a CPU fidelity run); repeatable"),
) -> None:
    """Dense vs compressed variants of the reference video DiT over whole sampling runs: PSNR, SSIM, layer SQNR.
    FIDELITY.md's CPU run (2 frames, 16 steps, 2 seeds, 8 variants) took 14 min on 2 cores."""
    if pareto is not None:
        from .eval.pareto import pareto_plot

        if not fidelity_json:
            raise typer.BadParameter("--pareto needs --fidelity-json (bench_generation.py --fidelity --out FILE)")
        pairs = [item.partition("=") for item in stand_in or []]
        if any(not speed_row or not sep or not fid_row for speed_row, sep, fid_row in pairs):
            raise typer.BadParameter(f"--stand-in {stand_in}: write SPEED_ROW=FIDELITY_ROW, e.g. flex-fp8=flex")
        try:
            path, summary = pareto_plot(pareto, list(fidelity_json), out / "pareto.png",
                                        {speed_row: fid_row for speed_row, _, fid_row in pairs})
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None
        for point in summary["points"]:
            front = "front" if point["system"] in summary["front"] else ""
            console.print(f"{point['system']}: {point['seconds']:.2f} s per video, {point['psnr_db']:.2f} dB {front}")
        for line in summary["skipped"]:
            console.print(f"left out: {line}")
        console.print(f"wrote {path}")
        return
    import torch

    device = device or _default_device()
    from .eval.ablation import ablation_variants
    from .eval.fidelity import evaluate

    chosen = ablation_variants(density, str(plan) if plan else None, tuple(v for v in variants.split(",") if v))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.no_grad():
        result = evaluate(chosen, out_dir=out, device=device, dtype=dtype, data=_reference_data(frames),
                          seeds=[int(s) for s in seeds.split(",")], num_steps=steps)
    console.print(result.markdown())
    recall = _recall_report(plan, density, frames, device, dtype)
    (out / "recall.json").write_text(json.dumps(recall, indent=2) + "\n")
    for name, per_site in recall.items():
        console.print(f"attention recall, {name}: " + ", ".join(
            f"{site} {min(heads):.2f}-{max(heads):.2f}" for site, heads in per_site.items()))


def _recall_report(plan: Optional[Path], density: float, frames: Optional[int], device: str, dtype) -> dict:
    """Attention recall per head of the static pattern and (with a plan) the plan's patterns, on the dense reference
    model at seeded random latents (timestep 500)."""
    from .plan import load_plan
    from .eval.fidelity import layout_recall, random_wan_inputs
    from .eval.reference_model import load_reference_model

    model = load_reference_model(device, dtype)
    data = _reference_data(frames)
    inputs = random_wan_inputs(model, frames=data.frames, height=data.height, width=data.width,
                               text_len=8, device=device, dtype=dtype)
    sites = [f"blocks.{i}.attn1" for i in range(len(model.blocks))]
    report = {f"local3d @ {density:g}": layout_recall(model, inputs, {s: "local3d" for s in sites}, density)}
    if plan is not None:
        loaded = load_plan(plan)
        specs = {s: loaded.attentions[s].pattern_spec for s in sites if s in loaded.attentions}
        report["plan"] = layout_recall(model, inputs, specs, density)
    return report


def _run_generation_benchmark(arguments: list[str]) -> None:
    """benchmarks/bench_generation.py of this checkout with ``arguments`` (its --help lists them)."""
    import runpy
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generation.py"
    if not script.is_file():
        raise typer.BadParameter(f"--generation runs {script}, which this installation does not have; run it from a "
                                 "checkout of the repository")
    argv = sys.argv
    sys.argv = [str(script), *arguments]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_command(
    ctx: typer.Context,
    generation: bool = typer.Option(False, "--generation", help="whole videos instead: benchmarks/bench_generation.py "
                                    "with the remaining arguments (--rows, --steps, --workload, --fidelity, ...)"),
    kernels: bool = typer.Option(True, "--kernels/--no-kernels", help="time the sparse attention kernel per density"),
    out: Path = typer.Option(Path("kernel_costs.json"), help="the cost table: {density: ms}, for CalibrationConfig"),
    heads: int = typer.Option(12), seq_len: int = typer.Option(32760), head_dim: int = typer.Option(128),
    densities: str = typer.Option("0.05,0.1,0.15,0.2,0.3,0.5,1.0"),
) -> None:
    """The cost model of the pattern search: block-sparse attention time per density on this GPU (random layouts
    with the diagonal). Without CUDA there is nothing to time: the search then uses its FLOP proxy."""
    if generation:
        _run_generation_benchmark(list(ctx.args))
        return
    if ctx.args:
        raise typer.BadParameter(f"unknown arguments {ctx.args} (they are passed on only with --generation)")
    import torch

    if not kernels:
        raise typer.BadParameter("only --kernels is available here; end-to-end: benchmarks/bench_e2e.py")
    if not torch.cuda.is_available():
        console.print("no CUDA device: nothing to time; calibration uses the FLOP proxy (cost = tiles computed)")
        raise typer.Exit(1)
    import triton.testing

    from .formats.layout import BlockSparseLayout, num_blocks

    q, k, v = (torch.randn(1, heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    blocks = num_blocks(seq_len, 128)
    table = {}
    for density in (float(d) for d in densities.split(",")):
        bitmap = torch.rand(1, 1, blocks, blocks, device="cuda") < density
        bitmap |= torch.eye(blocks, dtype=torch.bool, device="cuda")
        layout = BlockSparseLayout.from_bitmap(bitmap, 128, 128, seq_len, seq_len)
        run = lambda: torch.ops.qsparse.sparse_attention(  # noqa: E731
            q, k, v, layout.kv_num_blocks, layout.kv_indices, 128, 128, head_dim**-0.5, None)
        table[density] = float(triton.testing.do_bench(run, return_mode="median"))
        console.print(f"density {density:g}: {table[density]:.3f} ms")
    out.write_text(json.dumps({"cost_table": table, "device": torch.cuda.get_device_name(),
                               "shape": [1, heads, seq_len, head_dim]}, indent=2))
    console.print(f"wrote {out}: pass its cost_table to the calibration config")


@app.command("inspect")
@_one_line_errors
def inspect_command(plan: Path = typer.Argument(..., help="a plan directory (plan.json + plan.safetensors)")) -> None:
    """Print a plan readably: model, schema, per-site settings."""
    from .plan import load_plan

    loaded = load_plan(plan)
    fp = loaded.fingerprint
    console.print(f"[bold]plan[/bold] {plan}  schema v{loaded.schema_version}")
    console.print(f"model {fp.model_class}  config hash {fp.config_hash}  {len(fp.parameter_shapes)} parameters")
    if loaded.metadata:
        console.print("metadata: " + ", ".join(f"{k}={v}" for k, v in loaded.metadata.items() if not isinstance(v, dict)))
    # Block families (transformer_blocks, single_transformer_blocks) are abbreviated to their initials, with a legend
    # printed once, so that the names fit 80 columns; what still does not fit wraps instead of being cut.
    short = _family_abbreviations([*loaded.linears, *loaded.attentions])
    if short:
        console.print("FQNs: " + ", ".join(f"{abbreviation} = {family}" for family, abbreviation in short.items()))
    fqn_column = "FQN"
    linears = Table(title=f"linears ({len(loaded.linears)})")
    for column in (fqn_column, "group", "activations", "scales", "calibrated weights"):
        linears.add_column(column, overflow="fold")
    for fqn, entry in loaded.linears.items():
        calibrated = "yes" if loaded.packed_weight(fqn) is not None else "round-to-nearest"
        linears.add_row(_abbreviate(fqn, short), str(entry.group_size or "per-channel"), entry.act_format,
                        entry.scale_dtype, calibrated)
    console.print(linears)
    attentions = Table(title=f"attentions ({len(loaded.attentions)})")
    for column in (fqn_column, "head patterns", "blocks", "residual cache", "precision"):
        attentions.add_column(column, overflow="fold")
    for fqn, entry in loaded.attentions.items():
        cache = ", ".join(f"{k}={v}" for k, v in entry.cache.items()) or "-"
        attentions.add_row(_abbreviate(fqn, short), entry.pattern_spec, f"{entry.block_q}x{entry.block_kv}", cache,
                           entry.precision or "option")
    console.print(attentions)


def _family_abbreviations(fqns: list[str]) -> dict[str, str]:
    """{family: initials} for the block lists the FQNs index ("single_transformer_blocks.3..." -> "stb"), when the
    initials tell the families apart; {} otherwise."""
    families = sorted({fqn.split(".", 1)[0] for fqn in fqns if fqn.split(".")[1:2] and fqn.split(".")[1].isdigit()})
    short = {family: "".join(word[0] for word in family.split("_") if word) for family in families}
    if len(set(short.values())) != len(short) or any(family == initials for family, initials in short.items()):
        return {}
    return short


def _abbreviate(fqn: str, short: dict[str, str]) -> str:
    family, _, rest = fqn.partition(".")
    return f"{short[family]}.{rest}" if family in short else fqn


def main() -> None:
    app(prog_name="qsparse")


if __name__ == "__main__":
    main()
