"""Small PNG figures drawn with Pillow (a dependency of diffusers), so reports need no plotting library.

- ``line_plot``: curves (loss over steps, SQNR over layers), optional log y axis.
- ``bar_plot``: one bar per name (PSNR per variant).
- ``video_strip``: selected frames of videos side by side, one video per row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["bar_plot", "line_plot", "video_strip"]

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _fmt(v: float) -> str:
    if abs(v) >= 1000 and float(v).is_integer():
        return str(int(v))
    return f"{v:.3g}"


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    log_y: bool = False,
    size: tuple[int, int] = (720, 420),
) -> Path:
    """Draw each ``name: (xs, ys)`` as a polyline with a legend; non-finite points are skipped. Returns the path."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 70, 20, 44, 50  # top: the title, then the y label, above the frame
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = _font()

    def ty(v: float) -> float:
        return math.log10(v) if log_y else v

    pts = [(float(x), ty(float(y))) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(float(y)) and (not log_y or float(y) > 0)]
    if not pts:
        raise ValueError("qsparse_compiler.eval.plots.line_plot: no finite points to draw")
    x_lo, x_hi = min(p[0] for p in pts), max(p[0] for p in pts)
    y_lo, y_hi = min(p[1] for p in pts), max(p[1] for p in pts)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi == y_lo:
        y_hi = y_lo + 1
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    pad = 0.03 * (x_hi - x_lo)  # a point at an extreme stays inside the frame
    x_lo, x_hi = x_lo - pad, x_hi + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (w - left - right), top + (y_hi - y) / (y_hi - y_lo) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for yt in _ticks(y_lo, y_hi):
        _, yy = px(x_lo, yt)
        draw.line([left - 4, yy, left, yy], fill="black")
        draw.line([left, yy, w - right, yy], fill=(230, 230, 230))
        draw.text((4, yy - 6), _fmt(10**yt if log_y else yt), fill="black", font=font)
    for xt in _ticks(x_lo, x_hi):
        xx, _ = px(xt, y_lo)
        draw.line([xx, h - bottom, xx, h - bottom + 4], fill="black")
        draw.text((xx - 10, h - bottom + 6), _fmt(xt), fill="black", font=font)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = _PALETTE[i % len(_PALETTE)]
        line = [px(float(x), ty(float(y))) for x, y in zip(xs, ys) if math.isfinite(float(y)) and (not log_y or float(y) > 0)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        elif line:
            x0, y0 = line[0]
            draw.ellipse([x0 - 4, y0 - 4, x0 + 4, y0 + 4], fill=colour)
    # The legend's width follows its longest name, so no name runs past the image's edge.
    legend_x = w - right - 35 - max(draw.textlength(name, font=font) for name in series)
    for i, name in enumerate(series):
        colour = _PALETTE[i % len(_PALETTE)]
        draw.line([legend_x, top + 10 + 14 * i, legend_x + 20, top + 10 + 14 * i], fill=colour, width=3)
        draw.text((legend_x + 25, top + 4 + 14 * i), name, fill="black", font=font)
    draw.text((left, 6), title, fill="black", font=font)
    draw.text(((w - len(xlabel) * 6) / 2, h - 18), xlabel, fill="black", font=font)
    draw.text((4, top - 18), ylabel + (" (log)" if log_y else ""), fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def bar_plot(values: dict[str, float], path: str | Path, *, title: str = "", ylabel: str = "", size: tuple[int, int] = (720, 420)) -> Path:
    """One labelled bar per entry (infinite values drawn at the top and labelled "inf"). Returns the path."""
    from PIL import Image, ImageDraw

    if not values:
        raise ValueError("qsparse_compiler.eval.plots.bar_plot: nothing to draw")
    w, h = size
    left, right, top, bottom = 70, 20, 30, 60
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    finite = [v for v in values.values() if math.isfinite(v)]
    y_hi = max(finite + [1.0]) * 1.1 if finite else 1.0
    y_lo = min(0.0, min(finite)) if finite else 0.0
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for yt in _ticks(y_lo, y_hi):
        yy = top + (y_hi - yt) / (y_hi - y_lo) * (h - top - bottom)
        draw.line([left, yy, w - right, yy], fill=(230, 230, 230))
        draw.text((4, yy - 6), _fmt(yt), fill="black", font=font)
    slot = (w - left - right) / len(values)
    for i, (name, v) in enumerate(values.items()):
        shown = v if math.isfinite(v) else y_hi
        x0 = left + i * slot + slot * 0.15
        x1 = left + (i + 1) * slot - slot * 0.15
        y0 = top + (y_hi - max(shown, y_lo)) / (y_hi - y_lo) * (h - top - bottom)
        y_base = top + (y_hi - 0.0) / (y_hi - y_lo) * (h - top - bottom)
        draw.rectangle([x0, min(y0, y_base), x1, max(y0, y_base)], fill=_PALETTE[i % len(_PALETTE)])
        draw.text((x0, min(y0, y_base) - 12), "inf" if not math.isfinite(v) else _fmt(v), fill="black", font=font)
        draw.text((x0, h - bottom + 6), name[: max(4, int(slot / 6))], fill="black", font=font)
    draw.text((left, 6), title, fill="black", font=font)
    draw.text((4, top - 22), ylabel, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def video_strip(videos: torch.Tensor, path: str | Path, *, frames: Sequence[int] | None = None, scale: int = 2, gap: int = 2) -> Path:
    """Save videos float [N, 3, T, H, W] in [-1, 1] as a PNG grid: one row per video, the chosen frames (default:
    6 evenly spaced) left to right, ``scale``x nearest-neighbour upsampling, ``gap`` white pixels between tiles."""
    from PIL import Image

    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(
            f"qsparse_compiler.eval.plots.video_strip: videos must be [N, 3, T, H, W], got {tuple(videos.shape)}"
        )
    n, _, t, h, w = videos.shape
    if frames is None:
        frames = sorted({round(i * (t - 1) / 5) for i in range(6)}) if t > 1 else [0]
    tiles_h, tiles_w = h * scale, w * scale
    canvas = torch.full((3, n * (tiles_h + gap) - gap, len(frames) * (tiles_w + gap) - gap), 255, dtype=torch.uint8)
    pixels = ((videos.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for i in range(n):
        for j, f in enumerate(frames):
            tile = pixels[i, :, f].repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            y0, x0 = i * (tiles_h + gap), j * (tiles_w + gap)
            canvas[:, y0 : y0 + tiles_h, x0 : x0 + tiles_w] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas.permute(1, 2, 0).contiguous().numpy()).save(path, optimize=True)
    return path
