"""The ablation of FIDELITY.md at the reference DiT's trained size, with peers, with and without guidance (issue #22).

The reference DiT (eval/reference_model.py: 8 layers x 4 heads x 64, 8.0 M parameters) trained at 16 frames x 64 x 64
(16 x 32 x 32 = 16,384 tokens). Every row samples the same 4 seeds (prompt and starting noise per seed, as
``qsparse eval``) for 50 flow-matching Euler steps (eval/reference_model.py ``sample_videos``), once without guidance
and once with classifier-free guidance 5.0 (the all-zero prompt as the negative one); PSNR / SSIM of its videos
against the dense eager model's at the same seeds and guidance, the SQNR of every block's output on one noised
input (eval/fidelity.py), and the share of dense layer-steps: the share of (attention layer, transformer call)
pairs that ran dense attention (the residual cache's refreshes over its refreshes + reuses, counted by its runtime;
1 for dense attention, 0 for a sparse layout without a cache).

Rows (the table's order; eval/ablation.py makes the qsparse rows through the real backend):
    w4a8      int4 round-to-nearest weights (group 128) + fp8 per-token activations, dense attention
    sparse    the static ``local3d`` pattern at 15% of the tiles, bf16 linears, no cache; it is also the "static
              local window" peer (a window of the nearest tiles in (frame, row, col): the same computation)
    naive     both, no calibration, no cache
    msad      the calibrated plan (searched per-head patterns + MSAD weights), no cache
    ssar1     the plan + residual cache order 1, refresh steps 0, 1 and every 5th
    ssar2     the same, order 2
    lowrank   order 2 with rank-16 residuals
    talora    lowrank's settings with the TALoRA plan (MSAD + timestep-aware LoRA)
    plan      the full plan: the TALoRA plan with its own per-layer SSAR settings (refresh_budget 0.22, the fixed
              schedule's share of refresh steps at 50 steps, so it is compared at equal dense share)
    flex-fp8  peer: FlexAttention, random 15% of 128x128 tiles + diagonal, torchao fp8 rowwise linears (on the CPU:
              bf16 linears, as torchao's fp8 needs CUDA compute capability >= 8.9), blocks compiled
    topk      peer: dynamic top-k, per head and query block the 15% key blocks of highest pooled q.k scores
              (ops/dynamic_layout.py), computed at every call, through qsparse::sparse_attention, bf16 linears

``--calibrate`` makes the two plans instead, with ``qsparse calibrate reference`` (cli.py) on held-out seeds 4, 5
(the rows evaluate seeds 0-3): ``plan/`` then ``plan_talora/``, which resumes plan/'s stage checkpoints up to MSAD
(same samples, same settings: only MSAD + LoRA run again). The JSON (--out) is rewritten after every row and
guidance setting (or plan), so a time limit keeps what finished; ``--append`` adds to an existing file.

    python benchmarks/bench_ablation.py --calibrate --plans /tmp/qsparse-ablation --out calib.json
    python benchmarks/bench_ablation.py --rows w4a8,sparse,naive --plans /tmp/qsparse-ablation --out ablation.json
    python benchmarks/bench_ablation.py --smoke ... # 2 frames, seed 0, 3 steps, tiny calibration (CPU test)

Time estimates for an H100 (from the reference DiT's GPU runs: 1.67 s for a 30-step dense run of 4 videos, 10.8 s
for a compiled sparse row including its compile; docs/reference_model/): dense ~8 s per part (both guidance
settings), a qsparse row ~20-30 s (its compile ~10 s, 150 transformer calls of batch 4; the first row of a process
~60 s: Triton's compiles and autotuning), flex-fp8 ~100-160 s (Flex's compile), topk ~15 s; calibration (float32,
batch 2) ~130 s for plan/ (MSAD: 8 blocks x 100 steps of ~0.1 s) and ~170 s for plan_talora/ (MSAD + 50 LoRA steps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402  (the Flex block mask and its processor)

ROWS = ("w4a8", "sparse", "naive", "msad", "ssar1", "ssar2", "lowrank", "talora", "plan", "flex-fp8", "topk",
        "local")
PLAN_ROWS = {"msad": "plan", "ssar1": "plan", "ssar2": "plan", "lowrank": "plan", "talora": "plan_talora",
             "plan": "plan_talora"}
DENSITY = 0.15
GUIDANCE = 5.0  # WanPipeline's default guidance_scale (bench_generation.py's too)
CALIBRATION_SEEDS = "4,5"
# plan/: FIDELITY.md's ablation settings at full length (4 of 10 recorded steps, MSAD at its 100 steps), the SSAR
# schedule held to the fixed schedule's share of refresh steps; plan_talora/: the same + TALoRA (as FIDELITY.md's
# TALoRA run, 50 steps).
PLAN_CONFIG: dict[str, Any] = {"num_samples": 4, "ssar_samples": 2, "ssar_steps": 6, "refresh_budget": 0.22,
                               "progress": False}
TALORA_CONFIG: dict[str, Any] = {**PLAN_CONFIG, "lora_rank": 4, "lora_steps": 50, "lora_lr": 0.003}
# The CPU smoke test's (tiny) calibration: the same code path, a few steps.
SMOKE_CONFIG: dict[str, Any] = {"num_samples": 1, "msad_steps": 1, "ssar_samples": 1, "ssar_steps": 3,
                                "refresh_budget": 0.5, "progress": False}
# Both: the SSAR measurement steps by 1000 / steps, so refresh_budget's nominal run has the rows' number of steps
# (its per-layer refresh steps are made for, and only accepted by, runs of that length).


class Setup:
    """The reference model's data, prompts and seeds for this run, and the dense model builder."""

    def __init__(self, args: argparse.Namespace) -> None:
        import dataclasses

        from qsparse_compiler.eval.reference_model import load_reference_metadata
        from qsparse_compiler.eval.synthetic_video import SyntheticVideoConfig, SyntheticVideos

        self.device = args.device
        self.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        meta = load_reference_metadata()
        self.data = dataclasses.replace(SyntheticVideoConfig.from_dict(meta["data"]), frames=args.frames)
        self.seeds = [int(s) for s in args.seeds.split(",")]
        self.steps = args.steps
        self.videos = SyntheticVideos(self.data, device="cpu")
        self.scenes = self.videos.scenes_for_seeds(self.seeds)
        self.prompts = self.videos.embed(self.scenes)
        self.config = meta["model"]
        self.workload = dict(model="wan", config=meta["model"],
                             latents=(1, self.data.channels, self.data.frames, self.data.height, self.data.width),
                             text=(1, *self.prompts.shape[1:]))

    def dense(self) -> torch.nn.Module:
        from qsparse_compiler.eval.reference_model import load_reference_model

        return load_reference_model(self.device, self.dtype)

    def sqnr_inputs(self) -> dict[str, torch.Tensor]:
        """The first seed's data video noised to sigma 0.5 (eval/fidelity.py ``evaluate``'s per-block SQNR input)."""
        sigma = 0.5
        x0 = self.videos.render(self.scenes.select(0))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(self.seeds[0]))
        return {"hidden_states": ((1 - sigma) * x0 + sigma * noise).to(self.device, self.dtype),
                "timestep": torch.tensor([1000.0 * sigma], device=self.device),
                "encoder_hidden_states": self.prompts[:1].to(self.device, self.dtype)}


class Row:
    """A row's model, the context its calls run in, and how to read its share of dense layer-steps."""

    def __init__(self, model: torch.nn.Module, context: Callable[[], Any] = contextlib.nullcontext,
                 dense_share: float | None = None, note: str = "") -> None:
        self.model, self.context, self.note = model, context, note
        self.runtime = getattr(model, "_qsparse_runtime", None)
        self.static_share = dense_share
        self._counts = (0, 0)

    def begin(self) -> None:
        if self.runtime is not None:
            self.runtime.reset()
            total = self.runtime.memory_report()["total"]
            self._counts = (total["refreshes"], total["reuses"])

    def dense_share(self) -> float | None:
        if self.runtime is None:
            return self.static_share
        total = self.runtime.memory_report()["total"]
        refreshes, reuses = total["refreshes"] - self._counts[0], total["reuses"] - self._counts[1]
        return refreshes / (refreshes + reuses) if refreshes + reuses else None


def _topk_context(model: torch.nn.Module, density: float, block: int) -> Callable[[], Any]:
    """Every video self-attention through a dynamic top-k layout of its own q, k (computed per call)."""
    from qsparse_compiler.calibration.hooks import AttentionInterceptor
    from qsparse_compiler.ops.dynamic_layout import dynamic_topk_blocks

    def attend(call) -> torch.Tensor:
        kv_num_blocks, kv_indices = dynamic_topk_blocks(call.q, call.k, block, block, density, scale=call.scale)
        out, _lse = torch.ops.qsparse.sparse_attention(call.q, call.k, call.v, kv_num_blocks, kv_indices, block,
                                                       block, call.scale, call.key_padding_mask)
        return out

    return lambda: AttentionInterceptor(model, attend)


def make_row(name: str, setup: Setup, plans: Path, density: float) -> Row:
    """A fresh dense reference model turned into ``name``'s configuration."""
    from qsparse_compiler.eval.ablation import ablation_variants

    if name not in ROWS:
        raise ValueError(f"bench_ablation: unknown row {name!r}; rows: {', '.join(ROWS)}")
    plan = plans / PLAN_ROWS.get(name, "")
    if name in PLAN_ROWS and not (plan / "plan.json").is_file():
        raise FileNotFoundError(f"{plan}/plan.json is missing: run bench_ablation.py --calibrate --plans {plans} "
                                "first (device_suite.sh part ablation-calib, on the same machine)")
    model = setup.dense()
    if name in ("w4a8", "sparse", "local", "naive"):
        variant = "sparse" if name == "local" else name
        make = next(iter(ablation_variants(density, None, (variant,)).values()))
        return Row(make(model), dense_share=1.0 if name == "w4a8" else 0.0)
    if name in PLAN_ROWS:
        variant = {"talora": "lowrank", "plan": "ssar_plan"}.get(name, name)
        make = next(iter(ablation_variants(density, str(plan), (variant,)).values()))
        share = _plan_dense_share(plan) if name == "msad" else None
        return Row(make(model), dense_share=share)
    if name == "flex-fp8":
        note = ""
        if setup.device == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

            quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                      filter_fn=bench_e2e.block_linear_filter(setup.workload, model))
        else:
            note = "bf16 linears: torchao's fp8 needs CUDA compute capability >= 8.9"
        mask_inputs = {"hidden_states": torch.zeros(setup.workload["latents"], device=setup.device, dtype=setup.dtype)}
        bench_e2e.install_flex_attention(model, setup.workload,
                                         bench_e2e.flex_block_masks(setup.workload, mask_inputs, density))
        # Compiled on every device: eager flex_attention evaluates only the mask_mod, and this block mask has none
        # (its block tables are the mask), so eager it would compute dense attention. Each block's forward, one
        # graph for the 8 identical blocks (Dynamo guards on their structure, not identity), as bench_generation.py.
        for block in model.blocks:
            block.forward = torch.compile(block.forward, fullgraph=True)
        return Row(model, dense_share=0.0, note=note)
    return Row(model, _topk_context(model, density, 128), dense_share=0.0)  # topk


def _plan_dense_share(plan: Path) -> float:
    """Share of the plan's attention layers whose heads are all dense (without a cache, the rest is sparse)."""
    from qsparse_compiler.formats.pattern_spec import parse_pattern_spec
    from qsparse_compiler.plan import load_plan

    attentions = load_plan(plan).attentions.values()
    dense = [all(p == "dense" or d >= 1.0 for p, d in parse_pattern_spec(a.pattern_spec, DENSITY)) for a in attentions]
    return sum(dense) / len(dense) if dense else 0.0


def sample(row_model: torch.nn.Module, setup: Setup, guidance: float, on_step: Callable | None) -> torch.Tensor:
    from qsparse_compiler.eval.reference_model import sample_videos

    return sample_videos(row_model, setup.prompts, setup.seeds, frames=setup.data.frames, height=setup.data.height,
                         width=setup.data.width, channels=setup.data.channels, num_steps=setup.steps,
                         guidance_scale=guidance, device=setup.device, dtype=setup.dtype, on_step=on_step).cpu()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "nan")


class Results:
    """The rows so far, rewritten to ``out`` (json + a markdown table next to it) after every one."""

    def __init__(self, out: Path, meta: dict[str, Any], append: bool) -> None:
        self.out, self.meta = out, meta
        old = json.loads(out.read_text()) if append and out.is_file() else {}
        self.rows: list[dict[str, Any]] = old.get("rows", [])
        self.runs: list[dict[str, Any]] = [*old.get("runs", []), meta]
        self.write()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"runs": self.runs, "rows": self.rows}, indent=1) + "\n")
        tmp.replace(self.out)
        self.out.with_suffix(".md").write_text(markdown(self.rows))


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| row | guidance | PSNR mean / min dB | SSIM | output SQNR dB | min block SQNR dB | dense layer-steps "
             "| s |", "|---|---|---|---|---|---|---|---|"]

    def f(x: Any, spec: str) -> str:
        return x if isinstance(x, str) else "-" if x is None else format(x, spec)

    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['row']} | {r.get('guidance', '-')} | error: {str(r['error'])[:80]} | | | | | |")
            continue
        if "psnr_mean" not in r:  # a calibration: its density and time
            lines.append(f"| {r['row']} | - | density {f(r.get('density'), '.3f')} | | | | | {r['seconds']:.1f} |")
            continue
        lines.append(f"| {r['row']} | {r['guidance']:g} | {f(r['psnr_mean'], '.2f')} / {f(r['psnr_min'], '.2f')} | "
                     f"{f(r['ssim_mean'], '.4f')} | {f(r.get('output_sqnr_db'), '.2f')} | "
                     f"{f(r.get('min_block_sqnr_db'), '.2f')} | {f(r['dense_share'], '.3f')} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def run_rows(args: argparse.Namespace, setup: Setup, results: Results) -> None:
    from qsparse_compiler.eval.fidelity import layer_sqnr, psnr, ssim

    guidances = [float(g) for g in args.guidance.split(",")]
    dense_model = setup.dense()
    dense: dict[float, torch.Tensor] = {}
    for guidance in guidances:
        _sync(setup.device)
        start = time.perf_counter()
        with torch.no_grad():
            dense[guidance] = sample(dense_model, setup, guidance, None)
        _sync(setup.device)
        results.add({"row": "dense", "guidance": guidance, "psnr_mean": "inf", "psnr_min": "inf", "ssim_mean": 1.0,
                     "dense_share": 1.0, "seconds": round(time.perf_counter() - start, 2)})
        print(f"dense guidance {guidance:g}: {results.rows[-1]['seconds']} s", flush=True)
    sqnr_inputs = setup.sqnr_inputs()
    for name in [r for r in args.rows.split(",") if r]:
        torch._dynamo.reset()  # each row compiles afresh (eval/fidelity.py evaluate: Dynamo's recompile limit)
        try:
            row = make_row(name, setup, args.plans, args.density)
        except Exception as err:  # one row's failure is recorded; the next row runs
            results.add({"row": name, "error": f"{type(err).__name__}: {err}"})
            print(f"{name}: {results.rows[-1]['error']}", flush=True)
            continue
        sq: dict[str, float] | None = None
        for guidance in guidances:
            record: dict[str, Any] = {"row": name, "guidance": guidance, "note": row.note}
            try:
                row.begin()
                on_step = None if row.runtime is None else (lambda _i, _t, rt=row.runtime: rt.step())
                _sync(setup.device)
                start = time.perf_counter()
                with torch.no_grad(), row.context():
                    videos = sample(row.model, setup, guidance, on_step)
                _sync(setup.device)
                record["seconds"] = round(time.perf_counter() - start, 2)
                record["dense_share"] = row.dense_share()
                if sq is None:
                    row.begin()  # the SQNR call is a refresh step of the cache: dense attention where it has one
                    with torch.no_grad(), row.context():
                        sq = layer_sqnr(dense_model, row.model, sqnr_inputs)
                p = [float(x) for x in psnr(dense[guidance], videos)]
                s = [float(x) for x in ssim(dense[guidance], videos)]
                blocks = [v for k, v in sq.items() if k != "output"]
                record.update(psnr_db=[_finite(x) for x in p], psnr_mean=_finite(sum(p) / len(p)),
                              psnr_min=_finite(min(p)), ssim=s, ssim_mean=sum(s) / len(s),
                              output_sqnr_db=_finite(sq.get("output", math.nan)),
                              min_block_sqnr_db=_finite(min(blocks)) if blocks else None,
                              block_sqnr_db={k: _finite(v) for k, v in sq.items()},
                              finite=bool(torch.isfinite(videos).all()))
            except Exception as err:
                record["error"] = f"{type(err).__name__}: {err}"
            results.add(record)
            print(f"{name} guidance {guidance:g}: " + (record.get("error") or
                  f"{record['psnr_mean']} dB, dense share {record['dense_share']}, {record['seconds']} s"), flush=True)
        del row


def calibrate_plans(args: argparse.Namespace, results: Results) -> None:
    """plan/ then plan_talora/ (resuming plan/'s stages up to MSAD) with ``qsparse calibrate reference``."""
    plans: Path = args.plans
    plans.mkdir(parents=True, exist_ok=True)
    base = SMOKE_CONFIG if args.smoke else PLAN_CONFIG
    talora = {**base, "lora_rank": 4, "lora_steps": 1 if args.smoke else TALORA_CONFIG["lora_steps"],
              "lora_lr": TALORA_CONFIG["lora_lr"]}
    for name, config in (("plan", base), ("plan_talora", talora)):
        config = {**config, "ssar_step_size": 1000.0 / args.steps}
        out = plans / name
        config_path = plans / f"{name}_config.json"
        config_path.write_text(json.dumps(config))
        command = [sys.executable, "-m", "qsparse_compiler.cli", "calibrate", "reference", "--out", str(out),
                   "--config", str(config_path), "--frames", str(args.frames), "--steps", str(args.steps),
                   "--every", str(args.every), "--device", args.device]
        if name == "plan_talora":
            # same samples and settings up to MSAD: its stage checkpoints resume, only MSAD (+ LoRA) runs again
            shutil.copytree(plans / "plan" / "calibration", out / "calibration", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("msad"))
            command += ["--samples", str(plans / "plan" / "samples.safetensors")]
        else:
            command += ["--seeds", args.calibration_seeds]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        record: dict[str, Any] = {"row": f"calibrate {name}", "config": config,
                                  "seconds": round(time.perf_counter() - start, 1)}
        if done.returncode:
            record["error"] = (done.stderr or done.stdout).strip().splitlines()[-1:]
        else:
            info = json.loads((out / "plan.json").read_text())["metadata"]["calibration"]
            record.update(stages=info["stages"], stage_seconds=info["seconds"],
                          density=info["search"]["total_density"],
                          msad=[{k: b[k] for k in ("block", "loss_rtn", "loss_msad", "kept")} for b in info["msad"]])
        results.add(record)
        print(f"calibrate {name}: {record.get('error') or 'done'} in {record['seconds']} s", flush=True)
        if done.returncode:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(r for r in ROWS if r != "local"),
                        help=f"comma-separated, of {','.join(ROWS)} (the dense reference always runs first)")
    parser.add_argument("--calibrate", action="store_true", help="make plan/ and plan_talora/ in --plans instead")
    parser.add_argument("--plans", type=Path, default=Path("/tmp/qsparse-ablation"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", default=f"1,{GUIDANCE:g}", help="guidance scales; 1 = no guidance")
    parser.add_argument("--density", type=float, default=DENSITY)
    parser.add_argument("--calibration-seeds", default=CALIBRATION_SEEDS)
    parser.add_argument("--every", type=int, default=5, help="--calibrate: record every n-th sampling step")
    parser.add_argument("--smoke", action="store_true",
                        help="the CPU test's size: 2 frames, seed 0, 3 steps, every step recorded, tiny calibration")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--append", action="store_true", help="add to the rows already in --out")
    args = parser.parse_args(argv)
    if args.smoke:
        args.frames, args.seeds, args.steps, args.every, args.calibration_seeds = 2, "0", 3, 1, "4"
    meta = {"benchmark": "bench_ablation", "mode": "calibrate" if args.calibrate else "rows",
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
            "frames": args.frames, "seeds": args.seeds, "steps": args.steps, "guidance": args.guidance,
            "density": args.density, "smoke": args.smoke}
    results = Results(args.out, meta, args.append)
    if args.calibrate:
        calibrate_plans(args, results)
    else:
        run_rows(args, Setup(args), results)
    return int(any(r.get("error") for r in results.rows))


if __name__ == "__main__":
    raise SystemExit(main())
