"""Progress bars for the long loops of calibration (rich.progress; silent when disabled)."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

__all__ = ["track"]

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
