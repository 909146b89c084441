"""Progress for calibration (rich; silent when disabled): a bar with elapsed time and ETA over each stage's loop over
samples or blocks (``track``), and one line per finished stage saying whether it was computed or resumed from its
checkpoint and how long it took (``stage_done``), so a long run shows where it is and a resumed one what it skipped."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

__all__ = ["track", "stage_done"]

T = TypeVar("T")


def track(items: Iterable[T], description: str, enabled: bool, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` while a rich progress bar counts them (``transient``: the bar disappears when done)."""
    if not enabled:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def stage_done(name: str, status: str, seconds: float, enabled: bool) -> None:
    """Print ``calibration: <stage> <computed|resumed> in <s>`` (a line that stays, unlike the transient bars)."""
    if not enabled:
        return
    from rich.console import Console

    Console(highlight=False).print(f"[bold]calibration[/bold]: {name} {status} in {seconds:.1f} s")
