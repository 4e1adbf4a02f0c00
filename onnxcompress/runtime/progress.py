"""Progress display for long loops: rich on a terminal (stderr), silent otherwise.

Every bar of one process shares a single live display, so loops may nest: the ``optimize``
pipeline shows ``pass i/N name`` while a pass's calibration run adds its own ``capturing`` bar
below it, which disappears when that loop ends. Nothing is shown when progress is disabled
(``-q``) or when stderr is not a terminal, so piped output and ``--json -`` stay clean.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["track", "steps", "Steps", "active"]

T = TypeVar("T")

#: The live rich ``Progress`` while at least one bar is shown, and how many bars use it.
_LIVE: dict[str, Any] = {"progress": None, "users": 0}


def active(enabled: bool = True) -> bool:
    """Whether a bar would be shown: enabled and stderr is a terminal."""
    return bool(enabled) and sys.stderr.isatty()


def _new_progress() -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(file=sys.stderr)
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), _rate_column(), console=console, transient=True)


def _rate_column() -> Any:
    """``12.3 samples/s`` for bars that count samples (``track(..., unit=...)``), else nothing."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class SamplesPerSecond(ProgressColumn):
        def render(self, task: Any) -> Text:
            if not task.fields.get("samples") or not task.speed:
                return Text("")
            return Text(f"{task.speed:.1f} samples/s", style="progress.data.speed")

    return SamplesPerSecond()


@contextmanager
def _shared() -> Iterator[Any]:
    """The shared live display, started by the outermost user and stopped when it leaves."""
    if _LIVE["progress"] is None:
        _LIVE["progress"] = _new_progress()
        _LIVE["progress"].start()
    _LIVE["users"] += 1
    try:
        yield _LIVE["progress"]
    finally:
        _LIVE["users"] -= 1
        if _LIVE["users"] == 0:
            progress, _LIVE["progress"] = _LIVE["progress"], None
            progress.stop()


def _length(items: Iterable[Any], total: int | None) -> int | None:
    if total is not None:
        return total
    return len(items) if hasattr(items, "__len__") else None


def track(items: Iterable[T], description: str, *, total: int | None = None, enabled: bool = True,
          unit: Callable[[T], int] | None = None) -> Iterator[T]:
    """Iterate ``items`` with a transient progress bar on stderr when enabled and a terminal.

    Args:
        items: What to iterate.
        description: Text left of the bar.
        total: Number of items (taken from ``len(items)`` when it has one; else the bar pulses).
        enabled: False shows nothing (``-q``, library default).
        unit: Samples in an item (e.g. ``len`` of a batch): the bar then counts samples and shows
            samples/s.
    """
    if not active(enabled):
        yield from items
        return
    with _shared() as progress:
        task = progress.add_task(description, total=None if unit else _length(items, total), samples=bool(unit))
        try:
            for item in items:
                yield item
                progress.advance(task, unit(item) if unit else 1)
        finally:
            progress.remove_task(task)


class Steps:
    """A bar over named steps (``pass 2/3 prune_channels``) with the elapsed time of the whole.

    Call :meth:`done` when a step finishes; the description moves on to the next step's name.
    """

    def __init__(self, names: Sequence[str], label: str, progress: Any = None):
        self.names = list(names)
        self.label = label
        self.finished = 0
        self.started = time.perf_counter()
        self._progress = progress
        self._task = progress.add_task(self._text(), total=len(self.names)) if progress is not None else None

    def _text(self) -> str:
        if self.finished >= len(self.names):
            return f"{self.label}: done"
        return f"{self.label} {self.finished + 1}/{len(self.names)} {self.names[self.finished]}"

    def done(self, *_: Any) -> None:
        """Mark the current step finished (accepts and ignores callback arguments)."""
        self.finished += 1
        if self._progress is not None:
            self._progress.update(self._task, completed=self.finished, description=self._text())

    def close(self) -> None:
        """Remove the bar (the context manager does this)."""
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None


@contextmanager
def steps(names: Sequence[str], label: str, *, enabled: bool = True) -> Iterator[Steps]:
    """A :class:`Steps` bar shown while the block runs (a silent one when not :func:`active`)."""
    if not active(enabled):
        yield Steps(names, label)
        return
    with _shared() as progress:
        bar = Steps(names, label, progress)
        try:
            yield bar
        finally:
            bar.close()
