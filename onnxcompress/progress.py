"""Progress bars for long loops: rich on a terminal, silent otherwise."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

__all__ = ["track"]

T = TypeVar("T")


def track(items: Iterable[T], description: str, *, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` with a transient progress bar on stderr when enabled and a TTY."""
    if not enabled or not sys.stderr.isatty():
        yield from items
        return
    from rich.console import Console
    from rich.progress import track as rich_track

    yield from rich_track(items, description=description, total=total, transient=True,
                          console=Console(stderr=True))
