"""Progress bars for long work (B-scans segmented, epochs trained), shown on a terminal only."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

__all__ = ["progress_bar", "progress_bars"]


def _enabled() -> bool:
    return os.environ.get("OCTSEG_PROGRESS", "auto") != "0" and (
        os.environ.get("OCTSEG_PROGRESS") == "1" or sys.stderr.isatty()
    )


@contextlib.contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """Yield ``update(done, total)``; draws a rich progress bar on a terminal (``OCTSEG_PROGRESS=0`` hides it)."""
    if not _enabled():
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        tid = bar.add_task(description, total=total)
        yield lambda done, total_: bar.update(tid, completed=done, total=total_)


@contextlib.contextmanager
def progress_bars(totals: dict[str, int]) -> Iterator[Callable[[str, int], None]]:
    """Several bars in one display (e.g. volumes and B-scans); yield ``update(name, done)``."""
    if not _enabled():
        yield lambda name, done: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        ids = {name: bar.add_task(name, total=total) for name, total in totals.items()}
        yield lambda name, done: bar.update(ids[name], completed=done)
