"""The one progress helper: a rich progress bar with items/s that `--quiet` turns off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def update(self, **kwargs: object) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, **kwargs)  # type: ignore[arg-type]


@contextmanager
def progress_bar(description: str, total: float | None, unit: str = "spectra", quiet: bool = False) -> Iterator[_Bar]:
    """Yield an object with ``advance(n)``; shows rate in ``unit``/s on stderr unless quiet."""
    if quiet:
        yield _Bar(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, rate="")
        bar = _RateBar(progress, task, unit)
        yield bar


class _RateBar(_Bar):
    def __init__(self, progress: Progress, task: int, unit: str) -> None:
        super().__init__(progress, task)
        self._unit = unit

    def advance(self, n: float = 1) -> None:
        assert self._progress is not None and self._task is not None
        self._progress.advance(self._task, n)
        speed = self._progress.tasks[self._task].speed
        if speed:
            self._progress.update(self._task, rate=f"{speed:,.1f} {self._unit}/s")
