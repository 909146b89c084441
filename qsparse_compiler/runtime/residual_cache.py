"""Residual-cache state and the denoising-step clock (SSAR runtime).

One ``ResidualCacheRuntime`` belongs to one compiled model (``qs.optimize`` makes one; plain ``torch.compile`` users
pass ``options={"runtime": rt}`` or share the process-wide ``default_runtime``). It keeps, per attention site (module
FQN) and per branch (the n-th call of that site within one step: conditional / unconditional CFG passes), the
buffers of ``qsparse::residual_attention`` and the host-side facts the schedule needs. The device never reports
back: which step refreshes is decided on the host from the step counter, so the hot path has no sync.

Step tracking:
- a diffusers pipeline: ``qs.optimize(pipe, ...)`` resets at the start of every ``pipe(...)`` call and advances after
  every ``pipe.scheduler.step``;
- a bare model in a loop: ``with runtime.generation(): for ...: runtime.step(); model(...)`` (or ``runtime.reset()``
  and ``runtime.step(i)`` by hand).

A change of batch size, resolution or dtype at a site drops that site's buffers and starts it over (a refresh), and
the report counts it; it never reuses a residual of another shape.

Sites are keyed by module FQN, and two models of one architecture have the same FQNs: each site remembers (weakly)
a parameter of the model that uses it, and another live model using the same site before the next ``reset()`` raises
CacheError instead of reading the first model's residual. A site whose model is gone, or after ``reset()``, passes
to whichever model calls it next.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..config import CacheConfig

__all__ = ["ResidualCacheRuntime", "default_runtime", "CacheError", "state_layout"]


class CacheError(RuntimeError):
    """The residual cache was used in a way that would give wrong results; the message says how to fix it."""


@dataclass
class _Branch:
    state: list[torch.Tensor]
    refreshed_at: int | None = None  # step of the last refresh (host-side), None = empty


@dataclass
class _Site:
    schedule: CacheConfig
    branches: dict[int, _Branch] = field(default_factory=dict)
    calls_this_step: int = 0
    refreshes: int = 0
    reuses: int = 0
    resets: int = 0
    owner: weakref.ref | None = None  # a parameter of the model using this site


class ResidualCacheRuntime:
    def __init__(self) -> None:
        self._sites: dict[str, _Site] = {}
        self._step = 0
        self._lock = threading.Lock()

    # -- the clock ---------------------------------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        return self._step

    def reset(self) -> None:
        """Start a new generation: step 0, every cache empty (buffers are kept for reuse, marked empty)."""
        with self._lock:
            self._step = 0
            for site in self._sites.values():
                site.calls_this_step = 0
                site.owner = None
                _empty(site)

    def step(self, index: int | None = None) -> int:
        """Advance to the next denoising step (or to ``index``)."""
        with self._lock:
            self._step = self._step + 1 if index is None else int(index)
            for site in self._sites.values():
                site.calls_this_step = 0
            return self._step

    @contextlib.contextmanager
    def generation(self) -> Iterator["ResidualCacheRuntime"]:
        """``with rt.generation(): for i in range(n): rt.step(i); model(...)`` - resets before and after."""
        self.reset()
        try:
            yield self
        finally:
            self.reset()

    # -- called by the backend's runtime wrapper, once per site per graph call ----------------------------------
    def acquire(
        self, fqn: str, schedule: CacheConfig, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
        owner: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], bool]:
        """The state buffers of this call's branch, and whether this call refreshes. ``owner``: a parameter of the
        calling model (the backend passes one), so that two models never share a site's residuals."""
        with self._lock:
            site = self._sites.setdefault(fqn, _Site(schedule))
            if owner is not None:
                _claim(site, fqn, owner)
            branch_index = site.calls_this_step
            site.calls_this_step += 1
            if branch_index >= schedule.max_branches:
                raise CacheError(
                    f"qsparse_compiler.runtime: attention {fqn} ran {branch_index + 1} times in step {self._step} "
                    f"(max_branches={schedule.max_branches}); advance the step between denoising steps "
                    "(qs.optimize(pipe) does it, or call runtime.step() in your loop), or raise cache.max_branches"
                )
            branch = site.branches.get(branch_index)
            layout = state_layout(shape, schedule, dtype)
            if branch is None or [(tuple(t.shape), t.dtype) for t in branch.state] != layout \
                    or branch.state[0].device != device:
                if branch is not None:
                    site.resets += 1
                state = [torch.zeros(s, dtype=d, device=device) for s, d in layout[:-1]]
                state.append(torch.full((1,), -1.0, dtype=torch.float32, device=device))
                branch = site.branches[branch_index] = _Branch(state)
            refresh = branch.refreshed_at is None or schedule.is_refresh_step(self._step)
            if refresh:
                branch.refreshed_at = self._step
                site.refreshes += 1
            else:
                site.reuses += 1
            return branch.state, refresh

    def will_refresh(self, fqn: str, schedule: CacheConfig) -> bool:
        """Whether the next call of ``fqn`` would refresh (used to pick a refresh or reuse graph)."""
        site = self._sites.get(fqn)
        if site is None:
            return True
        branch = site.branches.get(site.calls_this_step)
        return branch is None or branch.refreshed_at is None or schedule.is_refresh_step(self._step)

    def needs_refresh(self, schedule: CacheConfig) -> bool:
        """Whether the next call refreshes under one schedule shared by every site (picks the refresh or the reuse
        graph when each path is its own CUDA graph): the step says so, or a site has no residual yet."""
        if not self._sites or schedule.is_refresh_step(self._step):
            return True
        return any(
            (branch := site.branches.get(site.calls_this_step)) is None or branch.refreshed_at is None
            for site in self._sites.values()
        )

    # -- reporting -------------------------------------------------------------------------------------------------
    def memory_report(self) -> dict[str, dict[str, int]]:
        """Bytes of cache per site (all branches), refresh/reuse counts, and the total."""
        report: dict[str, dict[str, int]] = {}
        for fqn, site in sorted(self._sites.items()):
            nbytes = sum(t.numel() * t.element_size() for b in site.branches.values() for t in b.state)
            report[fqn] = {"bytes": nbytes, "branches": len(site.branches), "refreshes": site.refreshes,
                           "reuses": site.reuses, "resets": site.resets}
        report["total"] = {key: sum(entry[key] for entry in report.values())
                           for key in ("bytes", "branches", "refreshes", "reuses", "resets")}
        return report

    def clear(self) -> None:
        """Free every buffer."""
        with self._lock:
            self._sites.clear()
            self._step = 0


def _empty(site: _Site) -> None:
    """Mark every branch of ``site`` empty: its next call refreshes."""
    for branch in site.branches.values():
        branch.refreshed_at = None
        branch.state[-1].fill_(-1.0)


def _claim(site: _Site, fqn: str, owner: torch.Tensor) -> None:
    current = site.owner() if site.owner is not None else None
    if current is owner:
        return
    if current is not None:
        raise CacheError(
            f"qsparse_compiler.runtime: two compiled models use the residual cache of {fqn} in one "
            "ResidualCacheRuntime (the process-wide default_runtime when the backend options name none), and one "
            "would read the other's residuals; give each model its own: options={'runtime': "
            "qs.ResidualCacheRuntime()} or qs.optimize(...), or call runtime.reset() between their generations"
        )
    site.owner = weakref.ref(owner)
    _empty(site)  # residuals left by a model that is gone are not this model's


def state_layout(shape: tuple, schedule: CacheConfig, dtype: torch.dtype) -> list[tuple[tuple, torch.dtype]]:
    """(shape, dtype) of each state tensor of a site whose attention output is ``shape`` (B, H, S, D) in ``dtype``:

        full rank            [R, dR, steps]                                   R, dR (B,H,S,D) in ``dtype``
        full rank, fp8_e4m3  [R codes, R scales, dR codes, dR scales, steps]  codes (B,H,S,D) e4m3, scales (B,H,S,1) fp32
        rank r               [R_u (B,H,S,r), R_v (B,H,r,D), dR_u, dR_v, steps] in ``dtype``

    ``steps`` is (1,) fp32 (ops/residual_attention.py). A rank > D stores in full (it cannot be factored). Order 1
    never reads dR: its full-rank dR tensors have no tokens (S = 0), which halves the cache."""
    b, h, s, d = shape
    steps = ((1,), torch.float32)
    if schedule.rank and schedule.rank <= d:
        r = schedule.rank
        return [((b, h, s, r), dtype), ((b, h, r, d), dtype), ((b, h, s, r), dtype), ((b, h, r, d), dtype), steps]
    delta_tokens = s if schedule.order == 2 else 0
    if schedule.storage == "fp8_e4m3":
        codes, scales = torch.float8_e4m3fn, torch.float32
        return [((b, h, s, d), codes), ((b, h, s, 1), scales), ((b, h, delta_tokens, d), codes),
                ((b, h, delta_tokens, 1), scales), steps]
    return [((b, h, s, d), dtype), ((b, h, delta_tokens, d), dtype), steps]


default_runtime = ResidualCacheRuntime()
