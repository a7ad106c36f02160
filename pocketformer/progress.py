"""Progress for long work: a rich bar on a terminal, a line every few seconds otherwise (CI logs, pipes)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager

_console = None


def console():
    """The stderr console, made on first use: a latency probe that imports a runtime never loads rich."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
    return _console


def info(msg: str) -> None:
    console().print(msg)


@contextmanager
def quiet(*loggers: str, stderr: bool = False):
    """Silence a third-party library for the duration: its Python warnings, what it prints to stdout (and stderr,
    with `stderr`), and the named loggers and their children below ERROR. Levels are restored afterwards, so our
    own one-line messages are what the user reads."""
    names = [n for n in logging.root.manager.loggerDict
             if any(n == p or n.startswith(p + ".") for p in loggers)]
    levels = {n: logging.getLogger(n).level for n in {*loggers, *names}}
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        if stderr:
            stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        for n in levels:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


@contextmanager
def silenced_stderr():
    """Native code (TFLite's logger, the MLIR converter) writes to fd 2 directly, past Python's sys.stderr."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def progress_bar(desc: str, total: int):
    """Yields advance(**metrics); shows step/total, rate and the metrics."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[metrics]}"), console=console(), transient=False) as prog:
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
            console().print(f"{desc}: {done}/{total} ({100 * done // total}%, eta {eta:.0f}s) {_fmt(metrics)}")

    yield advance


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
