"""Residual-cache state and the denoising-step clock (SSAR runtime).

One ``ResidualCacheRuntime`` belongs to one compiled model (``qs.optimize`` makes one; plain ``torch.compile`` users
pass ``options={"runtime": rt}`` or share the process-wide ``default_runtime``). It keeps, per attention site (module
FQN) and per CFG branch, the buffers of ``qsparse::residual_attention`` and the host-side facts the schedule needs.
The device never reports back: which step refreshes is decided on the host from the step counter, so the hot path
has no sync.

Branches: the name of diffusers' ``cache_context`` ("cond" / "uncond") where the pipeline sets one
(ops/context.py ``forward_branch``); else the n-th call of the site within one step.

Step tracking:
- a diffusers pipeline: ``qs.optimize(pipe, ...)`` installs a hook (runtime/hooks.py) that reads the step from the
  pipeline's cache context or its scheduler and starts over at every new generation;
- a bare model in a loop: ``with runtime.generation(): for ...: runtime.step(); model(...)`` (or ``runtime.reset()``
  and ``runtime.step(i)`` by hand).

Skipped steps (a step cache such as diffusers' FirstBlockCache skips the blocks, so a site is not called at every
step): each branch remembers the step of its last call. A refresh step that fell in the gap is owed and the next call
refreshes; a reuse after a gap first sets the device step counter to the steps since the refresh, so order 2 adds
``(step - refresh step) * dR`` and a refresh's dR divides by the true distance between the two refreshes.

Per-layer schedules (a plan's ``refresh_steps``, calibration's refresh budget): each site follows its own steps; the
refresh flag is a per-call graph input (or, under CUDA graphs, each block picks its refresh or reuse graph:
``will_refresh_under``), so nothing recompiles. Such a schedule is made for ``num_steps`` steps: a generation of
another length (the pipeline says how long, ``set_num_steps``) or a step past its end raises CacheError.

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
from ..ops.context import current_branch

__all__ = ["ResidualCacheRuntime", "default_runtime", "CacheError", "state_layout"]


class CacheError(RuntimeError):
    """The residual cache was used in a way that would give wrong results; the message says how to fix it."""


@dataclass
class _Branch:
    state: list[torch.Tensor]
    refreshed_at: int | None = None  # step of the last refresh (host-side), None = empty
    last_step: int | None = None  # step of the last call (host-side): a larger gap than 1 means skipped steps


@dataclass
class _Site:
    schedule: CacheConfig
    branches: dict[int | str, _Branch] = field(default_factory=dict)  # by cache-context name or call position
    calls_this_step: int = 0
    named_calls: dict[str, int] = field(default_factory=dict)  # calls of each cache-context name this step
    refreshes: int = 0
    reuses: int = 0
    resets: int = 0
    owner: weakref.ref | None = None  # a parameter of the model using this site


class ResidualCacheRuntime:
    def __init__(self) -> None:
        self._sites: dict[str, _Site] = {}
        self._step = 0
        self._num_steps: int | None = None  # of the current generation, when its driver knows it
        self._lock = threading.Lock()

    # -- the clock ---------------------------------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        return self._step

    def reset(self) -> None:
        """Start a new generation: step 0, every cache empty (buffers are kept for reuse, marked empty)."""
        with self._lock:
            self._step = 0
            self._num_steps = None
            for site in self._sites.values():
                site.calls_this_step = 0
                site.named_calls.clear()
                site.owner = None
                _empty(site)

    def step(self, index: int | None = None) -> int:
        """Advance to the next denoising step (or to ``index``)."""
        with self._lock:
            self._step = self._step + 1 if index is None else int(index)
            for site in self._sites.values():
                site.calls_this_step = 0
                site.named_calls.clear()
            return self._step

    def set_num_steps(self, num_steps: int | None) -> None:
        """The number of denoising steps of the current generation (qs.optimize's hook reads it from the pipeline):
        a per-layer schedule made for another number is refused at its first call, not followed off its end."""
        self._num_steps = None if num_steps is None else int(num_steps)

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
        if schedule.refresh_steps:
            _check_fits(fqn, schedule, self._step, self._num_steps)
        with self._lock:
            site = self._sites.setdefault(fqn, _Site(schedule))
            if owner is not None:
                _claim(site, fqn, owner)
            key = _branch_key(site)
            site.calls_this_step += 1
            if isinstance(key, str):
                site.named_calls[current_branch()] = site.named_calls.get(current_branch(), 0) + 1
            branch = site.branches.get(key)
            if branch is None and len(site.branches) >= schedule.max_branches:
                # Branches left empty by reset() (e.g. call positions before the pipeline named its branches).
                for stale in [k for k, b in site.branches.items() if b.refreshed_at is None]:
                    del site.branches[stale]
                if len(site.branches) >= schedule.max_branches:
                    raise CacheError(
                        f"qsparse_compiler.runtime: attention {fqn} ran {site.calls_this_step} times in step "
                        f"{self._step}: branch {key!r} is one more than max_branches={schedule.max_branches} "
                        f"(branches {sorted(map(str, site.branches))}); "
                        "advance the step between denoising steps (qs.optimize(pipe) does it, or call "
                        "runtime.step() in your loop), or raise cache.max_branches"
                    )
            layout = state_layout(shape, schedule, dtype)
            if branch is None or [(tuple(t.shape), t.dtype) for t in branch.state] != layout \
                    or branch.state[0].device != device:
                if branch is not None:
                    site.resets += 1
                state = [torch.zeros(s, dtype=d, device=device) for s, d in layout[:-1]]
                state.append(torch.full((1,), -1.0, dtype=torch.float32, device=device))
                branch = site.branches[key] = _Branch(state)
            refresh = _refresh_due(schedule, branch, self._step)
            if schedule.mode == "refresh":
                refresh = True  # a refresh graph refreshes every site it holds, due or not
            elif schedule.mode == "reuse" and refresh:
                raise CacheError(
                    f"qsparse_compiler.runtime: the reuse graph ran attention {fqn} at step {self._step}, where its "
                    "schedule refreshes (or it holds no residual yet): pick the graph with "
                    "runtime.needs_refresh(schedule) / will_refresh_under(block prefix), as qs.optimize(cuda_graphs="
                    "True) does"
                )
            if branch.refreshed_at is not None and branch.last_step is not None \
                    and self._step - branch.last_step > 1 and self._step > branch.refreshed_at:
                # Skipped steps: the op counts its calls; make it count steps (no sync: a host value).
                branch.state[-1].fill_(float(self._step - branch.refreshed_at - 1))
            branch.last_step = self._step
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
        return _refresh_due(schedule, site.branches.get(_branch_key(site)), self._step)

    def will_refresh_under(self, prefix: str) -> bool:
        """Whether the next call of a block (its sites' FQNs start with ``prefix``, e.g. "blocks.3.") refreshes any
        of them under their own schedules (picks a block's refresh or reuse graph with per-layer schedules); True
        before its sites are known."""
        sites = [site for fqn, site in self._sites.items() if fqn.startswith(prefix)]
        return not sites or any(_refresh_due(site.schedule, site.branches.get(_branch_key(site)), self._step)
                                for site in sites)

    def needs_refresh(self, schedule: CacheConfig) -> bool:
        """Whether the next call refreshes under one schedule shared by every site (picks the refresh or the reuse
        graph when each path is its own CUDA graph): the step says so (or a refresh step was skipped), or a site has
        no residual yet."""
        if not self._sites:
            return True
        return any(_refresh_due(schedule, site.branches.get(_branch_key(site)), self._step)
                   for site in self._sites.values())

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


def _check_fits(fqn: str, schedule: CacheConfig, step: int, num_steps: int | None) -> None:
    """A per-layer schedule (``refresh_steps``) holds for the number of steps it was made for, and no other."""
    if num_steps is not None and num_steps != schedule.num_steps:
        seen = f"this generation runs {num_steps} steps"
    elif step >= schedule.num_steps:
        seen = f"this generation is at step {step}"
    else:
        return
    raise CacheError(
        f"qsparse_compiler.runtime: attention {fqn} follows the refresh schedule of its plan (CacheConfig.num_steps="
        f"{schedule.num_steps}, refresh_steps {list(schedule.refresh_steps)[:6]}...), but {seen}; run "
        f"num_inference_steps={schedule.num_steps}, or calibrate for this length (CalibrationConfig.ssar_step_size = "
        "1000 / steps), or pass qs.optimize(cache={...}) to override the plan's schedules"
    )


def _branch_key(site: _Site) -> int | str:
    """The branch of the call about to run: its cache-context name (a second call under one name in one step is a
    branch of its own, "cond#1"), else its position among this step's calls."""
    name = current_branch()
    if name is None:
        return site.calls_this_step
    repeat = site.named_calls.get(name, 0)
    return name if repeat == 0 else f"{name}#{repeat}"


def _refresh_due(schedule: CacheConfig, branch: _Branch | None, step: int) -> bool:
    """A call at ``step`` refreshes when the branch is empty, or a refresh step of ``schedule`` lies in
    (last call, step] - one that a step cache skipped is owed, not dropped - or the clock went back. A repeated
    call at its last step (a benchmark timing one step) follows the schedule."""
    if branch is None or branch.refreshed_at is None or branch.last_step is None or step < branch.last_step:
        return True
    if step == branch.last_step:
        return schedule.is_refresh_step(step)
    return any(schedule.is_refresh_step(s) for s in range(branch.last_step + 1, step + 1))


def _empty(site: _Site) -> None:
    """Mark every branch of ``site`` empty: its next call refreshes."""
    for branch in site.branches.values():
        branch.refreshed_at = None
        branch.last_step = None
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
