"""Progress for long jobs (`track`) and for training steps (`StepProgress`): a rich bar on a terminal,
plain periodic lines in a SLURM log."""

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


class StepProgress:
    """Training steps: a rich bar with loss, lr and episodes/s on a terminal; plain one-line summaries in a
    log file. Silent where not enabled (every rank but the main one)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled, self.total, self.bar = enabled, total, None
        if enabled and is_terminal():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"))
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, logs: dict[str, float]) -> None:
        if not self.enabled:
            return
        info = f"loss {logs['train/loss']:.4f} lr {logs['train/lr']:.2e} {logs['perf/episodes_per_s']:.1f} ep/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            print(f"step {step}/{self.total} {info}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
