"""Pattern search (Sparse-vDiT): per layer and head, the cheapest pattern that keeps enough attention, under a budget.

Candidates come from the registry ``formats.pattern_spec.PATTERNS`` (name -> fn(grid, block_q, block_kv, density) ->
bool [QB, KVB]), so a pattern registered there is searched without a change here: each name is tried at every
``candidate_densities`` value, and candidates with identical tile bitmaps are merged (a pattern that ignores the
density, like ``dense`` or ``skip``, becomes one candidate with a bare name). ``dense`` is always a candidate (it
bounds every head); ``skip`` is one when the candidate list names it (every registered pattern, by default).

For head h of a site, candidate c:
    recall(h, c)  = sum(mass_h * bitmap_c over video x video tiles) / sum(mass_h over video x video tiles)
    density(c)    = kept video x video tiles / all video x video tiles
    cost(c)       = measured kernel time at density(c) (``CostModel`` from a {density: ms} table) or, without a
                    table, the tiles computed (a FLOP proxy).
1. Each head takes the cheapest candidate with recall >= ``recall_bound`` (ties: higher recall).
2. If the tiles kept over all searched heads exceed ``density_budget`` x all video x video tiles, heads move to
   cheaper candidates greedily: each move is the one with the least recall lost per tile saved over all heads
   (a head steps along its upper concave hull of (tiles, recall), nearest step first among equal slopes), until the
   budget holds (or no head can go lower; the result says so).
3. Discrete steps overshoot the budget: the tiles left are spent on the upgrades with the most recall gained per
   tile added that still fit.
A site calibrated on several video sizes has a map per grid: a candidate's recall is the call-weighted mean over the
grids and its tiles (and density) the sum over them.
Heads of one layer that end on the same pattern share a spec entry, and the kernel runs all heads of a layer in one
launch (the per-head spec string lists them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..formats.pattern_spec import PATTERNS
from ..formats.layout import num_blocks
from ..formats.patterns import TokenGrid
from .attention_maps import video_tile_mask
from .config import CalibrationConfig
from .statistics import AttentionStats

__all__ = ["CostModel", "Candidate", "HeadChoice", "SearchResult", "build_candidates", "search_patterns"]


class CostModel:
    """Cost of one head's attention at a density: interpolated kernel time, or tiles computed (FLOP proxy)."""

    def __init__(self, table: Mapping[float, float] | None = None) -> None:
        self.table = None if table is None else sorted((float(d), float(ms)) for d, ms in table.items())

    @property
    def kind(self) -> str:
        return "flop_proxy" if self.table is None else "measured"

    def cost(self, density: float, tiles: int) -> float:
        if self.table is None:
            return float(tiles)
        if density <= 0.0:
            return 0.0  # nothing computed (a skipped head)
        points = self.table
        if density <= points[0][0]:
            return points[0][1] * density / points[0][0]  # below the table: proportional to the work
        for (d0, ms0), (d1, ms1) in zip(points, points[1:]):
            if density <= d1:
                return ms0 + (ms1 - ms0) * (density - d0) / (d1 - d0)
        if len(points) == 1:
            return points[0][1] * density / points[0][0]
        (d0, ms0), (d1, ms1) = points[-2], points[-1]
        return ms1 + (ms1 - ms0) * (density - d1) / (d1 - d0)  # past the table: extend the last segment

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "unit": "tiles" if self.table is None else "ms",
            "table": None if self.table is None else {str(d): ms for d, ms in self.table},
        }


@dataclass(frozen=True)
class Candidate:
    spec: str  # entry of a pattern spec: "name:density" or a bare name
    bitmaps: tuple[torch.Tensor, ...]  # bool [QB, KVB] per calibration grid
    tiles: int  # video x video tiles kept, summed over the grids
    density: float  # tiles / all video x video tiles of the grids
    cost: float

    @property
    def bitmap(self) -> torch.Tensor:
        """The tile bitmap on the first grid (the only one when calibrating at one video size)."""
        return self.bitmaps[0]


@dataclass
class HeadChoice:
    spec: str
    recall: float
    density: float
    tiles: int
    reason: str  # "bound" (cheapest meeting the recall bound) or "budget" (moved lower to meet the budget)


@dataclass
class SearchResult:
    heads: dict[str, list[HeadChoice]]
    budget: float
    total_density: float
    budget_met: bool
    cost_model: dict[str, Any]
    candidates: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    recalls: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # {fqn: {spec: recall per head}}

    def head_patterns(self, fqn: str) -> list[str]:
        return [choice.spec for choice in self.heads[fqn]]

    def to_json(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "total_density": self.total_density,
            "budget_met": self.budget_met,
            "cost_model": self.cost_model,
            "candidates": self.candidates,
            "notes": self.notes,
            "recalls": self.recalls,
            "heads": {
                fqn: [{"spec": c.spec, "recall": round(c.recall, 6), "density": round(c.density, 6), "tiles": c.tiles,
                       "reason": c.reason} for c in choices]
                for fqn, choices in self.heads.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SearchResult":
        heads = {fqn: [HeadChoice(**c) for c in choices] for fqn, choices in data["heads"].items()}
        return cls(heads, data["budget"], data["total_density"], data["budget_met"], data["cost_model"],
                   data.get("candidates", {}), list(data.get("notes", [])), data.get("recalls", {}))


def _format_density(density: float) -> str:
    return f"{density:.6g}"


def _bitmaps_of(
    name: str, grid: TokenGrid, block_q: int, block_kv: int, densities: Sequence[float], notes: list[str]
) -> list[tuple[float, torch.Tensor]] | None:
    """(density, bitmap) for each density, or None (noted) if the pattern fails on this grid."""
    expected = (num_blocks(grid.seq_len, block_q), num_blocks(grid.seq_len, block_kv))
    out = []
    for density in sorted(densities):
        try:
            bitmap = PATTERNS[name](grid, block_q, block_kv, float(density))
        except Exception as exc:  # a registered pattern that cannot serve this grid is left out, not fatal
            notes.append(f"pattern {name}:{density:g} failed on grid {grid}: {exc}")
            return None
        if not isinstance(bitmap, torch.Tensor) or bitmap.dtype != torch.bool or tuple(bitmap.shape) != expected:
            notes.append(f"pattern {name} returned {getattr(bitmap, 'shape', type(bitmap))} on grid {grid}, expected bool {expected}")
            return None
        out.append((float(density), bitmap))
    return out


def build_candidates(
    grids: TokenGrid | Sequence[TokenGrid],
    block_q: int,
    block_kv: int,
    names: Sequence[str] | None,
    densities: Sequence[float],
    cost_model: CostModel,
) -> tuple[list[Candidate], list[str]]:
    """Every distinct set of tile bitmaps the registry yields on ``grids`` (the video sizes calibrated on); a
    pattern that fails on one of them is noted and left out. Candidates whose bitmaps equal an earlier one's on
    every grid are merged into the earlier one."""
    grids = [grids] if isinstance(grids, TokenGrid) else list(grids)
    chosen = list(PATTERNS) if names is None else list(names)
    if "dense" not in chosen:  # dense bounds every head; skip is only tried when listed (or with names=None)
        chosen.append("dense")
    videos = [video_tile_mask(grid, block_q, block_kv) for grid in grids]
    video_tiles = sum(int(video.sum()) for video in videos)
    candidates: list[Candidate] = []
    notes: list[str] = []
    for name in chosen:
        per_grid = [_bitmaps_of(name, grid, block_q, block_kv, densities, notes) for grid in grids]
        if any(entry is None for entry in per_grid):
            continue
        ignores_density = all(torch.equal(entry[0][1], b) for entry in per_grid for _, b in entry[1:])
        for index, (density, _) in enumerate(per_grid[0]):
            bitmaps = tuple(entry[index][1] for entry in per_grid)
            if any(all(torch.equal(a, b) for a, b in zip(bitmaps, c.bitmaps)) for c in candidates):
                continue  # same tiles as a candidate already listed (e.g. a density that rounds to the same count)
            tiles = sum(int((bitmap & video).sum()) for bitmap, video in zip(bitmaps, videos))
            spec = name if ignores_density else f"{name}:{_format_density(density)}"
            share = tiles / max(video_tiles, 1)
            candidates.append(Candidate(spec, bitmaps, tiles, share, cost_model.cost(share, tiles)))
    if not any(c.spec == "dense" for c in candidates):
        full = tuple(torch.ones_like(video) for video in videos)
        candidates.append(Candidate("dense", full, video_tiles, 1.0, cost_model.cost(1.0, video_tiles)))
    return candidates, notes


def search_patterns(
    attentions: Mapping[str, AttentionStats | Sequence[AttentionStats]],
    config: CalibrationConfig,
    cost_model: CostModel | None = None,
) -> SearchResult:
    """Choose a pattern per (site, head); see the module docstring. A site calibrated on several video grids has
    one ``AttentionStats`` per grid: a candidate's recall is the call-weighted mean over the grids and its tiles
    the sum."""
    cost_model = cost_model or CostModel(config.cost_table)
    candidate_cache: dict[tuple[TokenGrid, ...], list[Candidate]] = {}
    # Per head: (fqn, head, candidates, recalls)
    heads: list[tuple[str, int, list[Candidate], list[float]]] = []
    notes: list[str] = []
    recall_table: dict[str, dict[str, list[float]]] = {}
    total_video_tiles = 0
    for fqn, entry in attentions.items():
        per_grid = [entry] if isinstance(entry, AttentionStats) else list(entry)
        grids = tuple(stats.grid for stats in per_grid)
        if grids not in candidate_cache:
            candidate_cache[grids], more = build_candidates(
                grids, config.block_q, config.block_kv, config.candidate_patterns, config.candidate_densities, cost_model
            )
            notes += more
        candidates = candidate_cache[grids]
        head_count = per_grid[0].heads
        calls = sum(stats.calls for stats in per_grid)
        weights = [stats.calls / calls if calls else 1.0 / len(per_grid) for stats in per_grid]
        recalls = torch.zeros(head_count, len(candidates), dtype=torch.float64)
        for g, stats in enumerate(per_grid):
            video = video_tile_mask(stats.grid, config.block_q, config.block_kv)
            total_video_tiles += int(video.sum()) * stats.heads
            mass = stats.mass.to(torch.float64) * video  # [H, QB, KVB] on the video x video tiles
            totals = mass.sum((1, 2))
            kept = torch.stack([(mass * c.bitmaps[g]).sum((1, 2)) for c in candidates], dim=1)  # [H, C]
            share = torch.where(totals[:, None] > 0, kept / totals.clamp_min(1e-300)[:, None], torch.ones_like(kept))
            recalls += share * weights[g]
        for head in range(head_count):
            heads.append((fqn, head, candidates, recalls[head].tolist()))
        recall_table[fqn] = {c.spec: [round(float(r), 6) for r in recalls[:, i]] for i, c in enumerate(candidates)}

    # 1. the cheapest candidate meeting the recall bound (dense always does).
    current: list[int] = []
    for _, _, candidates, recalls in heads:
        feasible = [i for i, r in enumerate(recalls) if r >= config.recall_bound - 1e-12 or candidates[i].spec == "dense"]
        current.append(min(feasible, key=lambda i: (candidates[i].cost, -recalls[i])))
    reasons = ["bound"] * len(heads)

    # 2. meet the density budget greedily: least recall lost per tile saved first.
    budget_tiles = config.density_budget * total_video_tiles
    kept = sum(heads[h][2][current[h]].tiles for h in range(len(heads)))
    def best_move(h: int) -> tuple[float, int] | None:
        """The next point down this head's upper concave hull of (tiles, recall): the step with the least recall
        lost per tile saved. Walking hulls (slopes only grow along each) is the classic greedy of the
        multiple-choice knapsack: no head jumps past a cheaper step another head could take first."""
        _, _, candidates, recalls = heads[h]
        now = current[h]
        move = None
        for i, cand in enumerate(candidates):
            saved = candidates[now].tiles - cand.tiles
            if saved <= 0:
                continue
            ratio = (recalls[now] - recalls[i]) / saved
            # Least ratio; among (near-)equal ratios the nearest step (fewest tiles saved), to not overshoot.
            if move is None or ratio < move[0] - 1e-12 or (abs(ratio - move[0]) <= 1e-12 and saved < move[2]):
                move = (ratio, i, saved)
        return None if move is None else (move[0], move[1])

    moves = [best_move(h) for h in range(len(heads))] if kept > budget_tiles + 1e-9 else []
    while kept > budget_tiles + 1e-9:
        open_moves = [(move[0], h) for h, move in enumerate(moves) if move is not None]
        if not open_moves:
            notes.append(f"density budget {config.density_budget:g} cannot be met: every head is at its cheapest pattern")
            break
        _, h = min(open_moves)
        i = moves[h][1]
        kept -= heads[h][2][current[h]].tiles - heads[h][2][i].tiles
        current[h] = i
        reasons[h] = "budget"
        moves[h] = best_move(h)  # only this head's options changed

    # 3. discrete steps overshoot: spend the budget left over on the upgrades with the most recall per tile added.
    if any(reason == "budget" for reason in reasons):
        while True:
            best_up: tuple[float, int, int] | None = None
            for h, (_, _, candidates, recalls) in enumerate(heads):
                now = current[h]
                for i, cand in enumerate(candidates):
                    added = cand.tiles - candidates[now].tiles
                    gain = recalls[i] - recalls[now]
                    if added <= 0 or gain <= 0 or kept + added > budget_tiles + 1e-9:
                        continue
                    if best_up is None or gain / added > best_up[0]:
                        best_up = (gain / added, h, i)
            if best_up is None:
                break
            _, h, i = best_up
            kept += heads[h][2][i].tiles - heads[h][2][current[h]].tiles
            current[h] = i

    result: dict[str, list[HeadChoice]] = {fqn: [] for fqn in attentions}
    for h, (fqn, _, candidates, recalls) in enumerate(heads):
        cand = candidates[current[h]]
        result[fqn].append(HeadChoice(cand.spec, recalls[current[h]], cand.density, cand.tiles, reasons[h]))
    total_density = kept / total_video_tiles if total_video_tiles else 0.0
    return SearchResult(
        heads=result,
        budget=config.density_budget,
        total_density=total_density,
        budget_met=total_density <= config.density_budget + 1e-9,
        cost_model=cost_model.to_json(),
        candidates={
            " + ".join(str(grid) for grid in grids): [f"{c.spec} (density {c.density:.3f})" for c in cands]
            for grids, cands in candidate_cache.items()
        },
        notes=notes,
        recalls=recall_table,
    )

