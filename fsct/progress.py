"""Progress for long jobs: a rich bar on a terminal, plain periodic lines in a SLURM log."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def is_terminal() -> bool:
    return sys.stdout.isatty()


def track(items: Iterable[T], total: int | None = None, desc: str = "", every_s: float = 10.0,
          enabled: bool = True) -> Iterator[T]:
    """Iterate `items` while reporting progress; never changes what is yielded."""
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if is_terminal():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn()]
        with Progress(*cols, transient=False) as bar:
            task = bar.add_task(desc, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    t0 = last = time.monotonic()
    n = 0
    for item in items:
        yield item
        n += 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            of = f"/{total}" if total else ""
            print(f"{desc}: {n}{of} ({n / (now - t0):.1f}/s)", flush=True)
    of = f"/{total}" if total else ""
    print(f"{desc}: {n}{of} done in {time.monotonic() - t0:.1f}s", flush=True)
