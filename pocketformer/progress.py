"""Progress for long work: a rich bar on a terminal, a line every few seconds otherwise (CI logs, pipes)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console

console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


def info(msg: str) -> None:
    console.print(msg)


@contextmanager
def progress_bar(desc: str, total: int):
    """Yields advance(**metrics); shows step/total, rate and the metrics."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[metrics]}"), console=console, transient=False) as prog:
            task = prog.add_task(desc, total=total, metrics="")

            def advance(**metrics):
                prog.update(task, advance=1, metrics=_fmt(metrics))

            yield advance
        return
    start = last = time.monotonic()
    done = 0

    def advance(**metrics):
        nonlocal done, last
        done += 1
        now = time.monotonic()
        if now - last >= 10 or done == total:
            last = now
            eta = (now - start) / done * (total - done)
            console.print(f"{desc}: {done}/{total} ({100 * done // total}%, eta {eta:.0f}s) {_fmt(metrics)}")

    yield advance


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
