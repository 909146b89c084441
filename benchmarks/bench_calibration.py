"""Calibration at full size: seconds and peak GPU memory of each stage of ``calibrate`` (issue #22).

What runs is ``qsparse_compiler.calibration.calibrate`` - the function ``qsparse calibrate`` calls once it has the
model and the samples - on workload W of bench_e2e.py (diffusers WanTransformer3DModel with the Wan2.1-1.3B config,
random bf16 weights; 480p x 81 frames = 32,760 video tokens, 30 layers x 12 heads of 128, 512 text tokens). Random
weights are fine for seconds and memory (no stage's cost depends on the values), not for the plan's quality. The
candidate samples are random latents and text states at evenly spread timesteps.

Per stage (selection, statistics, search, ssar, each MSAD block; calibrate's ``on_stage`` callback): wall seconds,
the peak GPU memory allocated and reserved during it (peaks reset after every stage; the first stage's peak includes
the model), and the JSON (--out) is rewritten after every stage, so a time limit keeps what finished. MSAD's cost
grows with the block index (block b's inputs come from a dense forward cut at b): the JSON carries a linear fit
a + c * b of the finished blocks' seconds and its sum over all blocks, so a run cut short still says what the whole
MSAD stage costs.

    python benchmarks/bench_calibration.py --setting h100 --out calibration.json          # ~340 s estimate, H100
    python benchmarks/bench_calibration.py --setting 24gib --out calibration_24gib.json   # ~80 s, capped at 24 GiB
    python benchmarks/bench_calibration.py --setting h100 --stages statistics,ssar --out c.json
    python benchmarks/bench_calibration.py --workload reference --device cpu --setting smoke --out c.json  # CPU smoke

``--stages`` runs a subset: the run stops after the last stage named; a stage before it that is not named runs at
its cheapest (selection "uniform": no model runs; ssar 1 trajectory of 2 steps) and is marked ``prerequisite``.
``--msad-blocks N`` stops MSAD after N blocks. ``--work DIR`` keeps the stage checkpoints: a second run with the
same settings resumes what finished (on the device machine, while it stays warm).

Settings, and what each costs. Estimates for an H100 from the eager bf16 forward of workload W (627 ms,
BENCHMARKS.md) and the stages' work, not measurements - this benchmark is what measures them:

    h100   4 candidates, salient selection of 2, msad_steps 4, ssar 1 trajectory x 4 steps; ~340 s in all.
           selection   3 forwards per candidate (dense, dense at t - dt, round-to-nearest W4A8): ~2.5 s each, ~10 s
           statistics  1 forward per kept sample + the block-pooled attention maps in fp32 chunks (30 layers x
                       32,760^2 x 12 heads of scores): ~5 s per sample, ~10 s
           search      per-head candidate layouts scored on the pooled maps (360 heads): ~10 s
           ssar        per step one forward with the dense and the chunked fp32 sparse attention: ~8 s, ~32 s
           msad        per block: its inputs (a forward cut at the block, per kept sample), the teacher (chunked
                       attention maps), two student evaluations and msad_steps fp32 forward + backward steps with
                       checkpointed chunked sparse attention (~1.2 s each): ~8 s, 30 blocks ~250 s
           The defaults (8 kept samples, msad_steps 100, ssar 2 x 6) would take ~1 h 10 min: MSAD is ~95% of it and
           scales with num_samples x msad_steps; what fewer samples and steps cost is plan quality (noisier
           statistics and residual-drift estimates, less distilled scales), not memory.
    24gib  the same model and video under torch.cuda.set_per_process_memory_fraction(24 GiB): past the cap a stage
           fails with calibrate's out-of-memory error naming the stage. Uniform selection (no scoring forwards),
           1 kept sample (MSAD holds every kept sample's block inputs: 32,760 x 1,536 per tensor), attention
           chunks of 4 M score elements instead of 16 M (4x more, smaller matmuls: the statistics / ssar / MSAD
           attention reference slows by an estimated 10-20%), ssar 1 x 3 steps, msad_steps 2 on the first 3 blocks
           (every block has the same shapes, so 3 show the stage's peak). ~80 s. Its quality cost against the h100
           setting, measured on the reference DiT at the same refresh budget: none consistent over two held-out
           videos (27.6 vs 28.3 dB, per video -2.2 / +0.8; FIDELITY.md "Calibration settings").
    smoke  the tiny CPU config of bench_e2e.py (``--workload reference``): 2 layers, 1,280 tokens; seconds only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402  (the workloads and the model builder)

STAGES = ("selection", "statistics", "search", "ssar", "msad")
SETTINGS: dict[str, dict[str, Any]] = {
    "h100": dict(candidates=4, config=dict(selection="salient", num_samples=2, msad_steps=4, ssar_samples=1,
                                           ssar_steps=4)),
    "24gib": dict(candidates=2, memory_gib=24.0, msad_blocks=3,
                  config=dict(selection="uniform", num_samples=1, msad_steps=2, ssar_samples=1, ssar_steps=3,
                              attention_chunk_elements=1 << 22)),
    "smoke": dict(candidates=2, config=dict(selection="salient", num_samples=1, msad_steps=1, ssar_samples=1,
                                            ssar_steps=3)),
}
# A stage the run needs but was not asked to time runs at these settings.
CHEAPEST = {"selection": dict(selection="uniform"), "ssar": dict(ssar_samples=1, ssar_steps=2)}


class _Done(Exception):
    """Raised from the stage callback once every requested stage finished: ends calibrate early."""


def candidate_samples(workload: dict[str, Any], count: int, device: str, dtype: torch.dtype) -> list[dict[str, Any]]:
    """``count`` forward-kwargs dicts: random latents and text states at timesteps spread evenly over (0, 1000)."""
    samples = []
    for i in range(count):
        generator = torch.Generator(device).manual_seed(100 + i)
        inputs = bench_e2e.make_inputs(workload, device, dtype, generator)
        inputs.pop("return_dict")
        inputs["timestep"] = torch.full((workload["latents"][0],), 1000.0 * (i + 0.5) / count, device=device)
        samples.append(inputs)
    return samples


def msad_fit(blocks: list[tuple[int, float]], total_blocks: int) -> dict[str, Any] | None:
    """Least-squares a + c * index over the finished MSAD blocks, and its sum over all ``total_blocks``."""
    if not blocks:
        return None
    n = len(blocks)
    mean_x = sum(b for b, _ in blocks) / n
    mean_y = sum(s for _, s in blocks) / n
    var = sum((b - mean_x) ** 2 for b, _ in blocks)
    slope = sum((b - mean_x) * (s - mean_y) for b, s in blocks) / var if var else 0.0
    intercept = mean_y - slope * mean_x
    total = sum(intercept + slope * b for b in range(total_blocks))
    return {"blocks_done": n, "seconds_per_block": [round(intercept, 3), round(slope, 4)],
            "all_blocks_s": round(total, 1), "of_blocks": total_blocks}


class Recorder:
    """The per-stage record, rewritten to ``out`` after every stage."""

    def __init__(self, out: Path, meta: dict[str, Any], device: str, requested: tuple[str, ...],
                 msad_blocks: int | None, total_blocks: int) -> None:
        self.out, self.meta, self.device = out, meta, device
        self.requested, self.msad_blocks, self.total_blocks = requested, msad_blocks, total_blocks
        self.stages: list[dict[str, Any]] = []
        self.error: str | None = None
        self.finished = False
        self.start = time.perf_counter()
        self.write()

    def _memory(self) -> dict[str, float]:
        if self.device != "cuda":
            return {}
        peak = {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
                "allocated_after_gib": round(torch.cuda.memory_allocated() / 2**30, 3)}
        torch.cuda.reset_peak_memory_stats()
        return peak

    def on_stage(self, name: str, status: str, seconds: float) -> None:
        family = name.split("/")[0]
        self.stages.append({"stage": name, "status": status, "seconds": round(seconds, 3),
                            "prerequisite": family not in self.requested, **self._memory()})
        self.write()
        print(f"{name}: {status} in {seconds:.1f} s" + (f", peak {self.stages[-1]['peak_allocated_gib']:.2f} GiB"
                                                          if self.device == "cuda" else ""), flush=True)
        last = self.requested[-1]
        msad_done = sum(s["stage"].startswith("msad/") and s["status"] == "computed" for s in self.stages)
        if family == last != "msad" or (last == "msad" and self.msad_blocks is not None
                                        and msad_done >= self.msad_blocks):
            raise _Done

    def summary(self) -> dict[str, Any]:
        totals: dict[str, float] = {}
        peaks: dict[str, float] = {}
        for s in self.stages:
            family = s["stage"].split("/")[0]
            totals[family] = round(totals.get(family, 0.0) + s["seconds"], 3)
            if "peak_allocated_gib" in s:
                peaks[family] = max(peaks.get(family, 0.0), s["peak_allocated_gib"])
        blocks = [(int(s["stage"].rsplit(".", 1)[1]), s["seconds"]) for s in self.stages
                  if s["stage"].startswith("msad/") and s["status"] == "computed"]
        return {"seconds": totals, "peak_allocated_gib": peaks,
                "max_peak_allocated_gib": max(peaks.values(), default=None),
                "msad_fit": msad_fit(blocks, self.total_blocks)}

    def write(self) -> None:
        record = {**self.meta, "stages": self.stages, "summary": self.summary(), "finished": self.finished,
                  "error": self.error, "wall_s": round(time.perf_counter() - self.start, 1)}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(self.out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="wan-1.3b-480p", choices=sorted(bench_e2e.WORKLOADS))
    parser.add_argument("--setting", default="h100", choices=sorted(SETTINGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"a subset of {','.join(STAGES)} (see above)")
    parser.add_argument("--msad-blocks", type=int, default=None, help="stop MSAD after this many blocks")
    parser.add_argument("--candidates", type=int, default=None, help="candidate samples (default: the setting's)")
    parser.add_argument("--config", default="{}", help="JSON of CalibrationConfig fields over the setting's")
    parser.add_argument("--work", type=Path, default=None, help="keep the stage checkpoints here (resumable)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from qsparse_compiler.calibration import CalibrationConfig, CalibrationError, calibrate

    requested = tuple(s for s in args.stages.split(",") if s)
    unknown = [s for s in requested if s not in STAGES]
    if unknown or not requested:
        parser.error(f"--stages {args.stages!r}: use a subset of {','.join(STAGES)}")
    requested = tuple(s for s in STAGES if s in requested)  # in calibrate's order
    setting = SETTINGS[args.setting]
    values: dict[str, Any] = {"progress": False, **setting["config"]}
    last = STAGES.index(requested[-1])
    for stage, cheap in CHEAPEST.items():
        if stage not in requested and STAGES.index(stage) < last:
            values.update(cheap)
    values.update(json.loads(args.config))
    config = CalibrationConfig.from_dict(values)
    workload = bench_e2e.WORKLOADS[args.workload]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    cap = setting.get("memory_gib")
    if args.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        if cap:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))
        torch.cuda.reset_peak_memory_stats()
    model, _ = bench_e2e.build(workload, args.device, dtype)
    samples = candidate_samples(workload, args.candidates or setting["candidates"], args.device, dtype)
    meta = {
        "benchmark": "bench_calibration", "workload": args.workload, "setting": args.setting,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
        "memory_cap_gib": cap, "requested_stages": list(requested), "msad_blocks_limit": args.msad_blocks,
        "candidates": len(samples), "tokens": bench_e2e.video_tokens(workload),
        "model_gib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 3),
        "config": config.to_json(),
    }
    msad_blocks = args.msad_blocks if args.msad_blocks is not None else setting.get("msad_blocks")
    recorder = Recorder(args.out, meta, args.device, requested, msad_blocks, len(model.blocks))
    code = 0
    try:
        with torch.no_grad():
            calibrate(model, samples, config, out=args.work, on_stage=recorder.on_stage)
        recorder.finished = True
    except _Done:
        recorder.finished = True
    except CalibrationError as err:  # the out-of-memory error names the stage and the settings to change
        recorder.error = str(err)
        code = 1
    recorder.write()
    summary = recorder.summary()
    print(json.dumps(summary))
    if recorder.error:
        print(recorder.error, file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
