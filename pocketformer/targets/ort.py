"""ONNX Runtime (CPU): load, run, benchmark. The runtime module interface every target runtime implements."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

NAME = "onnxruntime"
FORMAT = "onnx"
# A segment runner for the early-exit driver: feeds by name in, every output by name out.
Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def load(path: Path, threads: int, spinning: bool = True):
    """A CPU session on `threads` intra-op threads. `spinning=False` for sessions run one after another (early-exit
    segments): each session owns a thread pool that spins after every run, and on a 2-core host the spinning pool
    of the segment just run starves the next one (measured: 6 segments of MiniLM 259 ms spinning, 64 ms not)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def input_names(session) -> list[str]:
    return [i.name for i in session.get_inputs()]


def input_shapes(session) -> dict[str, list]:
    return {i.name: list(i.shape) for i in session.get_inputs()}


def run(session, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return session.run(None, feeds)[0]


def benchmark(session, feeds: dict[str, np.ndarray], warmup: int, repeats: int) -> list[float]:
    """Latency in ms of each of `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times

def segment_runs(segments: list[tuple[Path, Optional[str]]], threads: int) -> list[Run]:
    """One runner per segment file (feeds by name in, every output by name out), for the early-exit driver. Pools
    do not spin: the segments run one after another, and a pool spinning after its run starves the next one."""

    def runner(path: Path) -> Run:
        session = load(path, threads, spinning=False)
        names = [o.name for o in session.get_outputs()]
        inputs = {i.name for i in session.get_inputs()}
        return lambda feeds: dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in inputs})))

    return [runner(path) for path, _ in segments]
