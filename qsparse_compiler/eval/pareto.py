"""Speed against quality per configuration: (seconds per video, PSNR dB) points and their Pareto front.

Inputs are the two JSONs of benchmarks/bench_generation.py: a speed run (``meta.mode == "speed"``, rows with
``seconds_per_video``, measured on a GPU at workload W) and a fidelity run (``--fidelity``: the same row names on the
reference DiT, rows with ``psnr_mean`` / ``ssim_mean`` against the dense run). A configuration is a point when it has
both a time and a finite PSNR; the front is the points no other point beats on both axes (faster or as fast, and
as good or better, one of them strictly). ``pareto_plot`` draws every point and the front as a PNG.

Several fidelity runs may be joined (rows of later files replace same-named rows of earlier ones) when they share
their settings (steps, seeds, latents, guidance, scheduler, density). A row that cannot run where the fidelity is
measured (torchao's fp8 linears need a CUDA GPU; a CPU fidelity run has ``flex`` where the speed run has
``flex-fp8``) takes a stand-in's PSNR only when asked by name (``stand_ins={"flex-fp8": "flex"}``), and its point's
label says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ParetoPoint", "pareto_points", "pareto_front", "pareto_plot"]


@dataclass(frozen=True)
class ParetoPoint:
    system: str
    seconds: float
    psnr_db: float
    ssim: float | None


def _load(path: str | Path, mode: str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    found = data.get("meta", {}).get("mode")
    if found != mode:
        raise ValueError(f"qsparse_compiler.eval.pareto: {path} is a {found!r} run of bench_generation.py, "
                         f"expected a {mode!r} run (fidelity: bench_generation.py --fidelity)")
    return data


_FIDELITY_SETTINGS = ("steps", "seeds", "latents", "guidance", "scheduler", "density", "workload")


def _fidelity_rows(paths: list[str | Path]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    first: dict[str, Any] | None = None
    for path in paths:
        data = _load(path, "fidelity")
        settings = {k: data["meta"].get(k) for k in _FIDELITY_SETTINGS}
        if first is None:
            first = settings
        elif settings != first:
            differ = {k: (first[k], settings[k]) for k in _FIDELITY_SETTINGS if first[k] != settings[k]}
            raise ValueError(f"qsparse_compiler.eval.pareto: {path} was measured with other settings than "
                             f"{paths[0]} ({differ}); join only fidelity runs of the same steps, seeds and video")
        rows.update({r["system"]: r for r in data["rows"]})
    return rows


def pareto_points(speed_json: str | Path, fidelity_json: str | Path | list[str | Path],
                  stand_ins: dict[str, str] | None = None) -> tuple[list[ParetoPoint], list[str]]:
    """The configurations with a time and a finite PSNR, and a line per row left out saying why. ``stand_ins`` maps
    a speed row to the fidelity row whose PSNR it takes (named in the point's label)."""
    speed = {r["system"]: r for r in _load(speed_json, "speed")["rows"]}
    fidelity = _fidelity_rows(fidelity_json if isinstance(fidelity_json, list) else [fidelity_json])
    stand_ins = dict(stand_ins or {})
    for system, stand_in in stand_ins.items():
        if system not in speed or stand_in not in fidelity:
            raise ValueError(f"qsparse_compiler.eval.pareto: stand-in {system}={stand_in}: "
                             + (f"{system!r} is not a row of {speed_json}" if system not in speed
                                else f"{stand_in!r} is not a row of the fidelity run(s)"))
    points, skipped = [], []
    for system, row in speed.items():
        seconds = row.get("seconds_per_video")
        source = stand_ins.get(system, system)
        quality = fidelity.get(source, {})
        psnr = quality.get("psnr_mean")
        label = system if source == system else f"{system} [PSNR of {source}]"
        if seconds is None or not math.isfinite(seconds):
            skipped.append(f"{system}: no time ({row.get('error') or row.get('note') or 'not measured'})")
        elif source not in fidelity:
            skipped.append(f"{system}: not in the fidelity run")
        elif psnr is None or not math.isfinite(psnr):
            skipped.append(f"{system}: no finite PSNR ({quality.get('error') or 'identical to the dense run or failed'})")
        else:
            points.append(ParetoPoint(label, float(seconds), float(psnr), quality.get("ssim_mean")))
    return points, skipped


def pareto_front(points: list[ParetoPoint]) -> list[ParetoPoint]:
    """The points no other point dominates, fastest first."""
    def dominated(p: ParetoPoint) -> bool:
        return any(q.seconds <= p.seconds and q.psnr_db >= p.psnr_db and (q.seconds < p.seconds or q.psnr_db > p.psnr_db)
                   for q in points)

    return sorted((p for p in points if not dominated(p)), key=lambda p: p.seconds)


def pareto_plot(speed_json: str | Path, fidelity_json: str | Path | list[str | Path], out: str | Path,
                stand_ins: dict[str, str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Draw every configuration (one labelled point each) and the front (a line) to ``out`` (PNG); returns the path
    and a summary {points, front, skipped} (also written next to the PNG as .json)."""
    from .plots import line_plot

    points, skipped = pareto_points(speed_json, fidelity_json, stand_ins)
    if not points:
        raise ValueError("qsparse_compiler.eval.pareto: no configuration has both a time and a finite PSNR: "
                         + "; ".join(skipped))
    front = pareto_front(points)
    series = {f"{p.system} ({p.seconds:.1f} s, {p.psnr_db:.1f} dB)": ([p.seconds], [p.psnr_db]) for p in points}
    series["Pareto front"] = ([p.seconds for p in front], [p.psnr_db for p in front])
    speed_meta = json.loads(Path(speed_json).read_text())["meta"]
    path = line_plot(series, out, size=(960, 520), xlabel="seconds per video (lower is better)",
                     ylabel="PSNR dB vs dense, reference DiT",
                     title=f"speed ({speed_meta['workload']}, {speed_meta['device']}) vs fidelity")
    summary = {"points": [vars(p) for p in points], "front": [p.system for p in front], "skipped": skipped}
    Path(path).with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    return path, summary
