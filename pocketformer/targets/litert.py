"""LiteRT (TFLite) on CPU with XNNPACK: load, run, benchmark. Same interface as targets/ort.py.

Exported .tflite files have static shapes: a feed with more rows than the artifact's batch runs in chunks of that
batch. Inputs are found by name (signature key, or tensor name without the `serving_default_` prefix), else by
position, so files from other converters (inputs `args_0`, `args_1`) run too.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import TargetError
from .ort import Run

NAME = "litert"
FORMAT = "tflite"
# Our canonical input names in forward order: the fallback when an artifact's inputs carry other names.
CANONICAL_ORDERS = (["input_ids", "attention_mask"], ["pixel_values"])


@dataclass
class Session:
    interpreter: object
    names: list[str]  # input names in forward order
    indices: list[int]  # tensor index of each input
    shapes: list[list[int]]
    dtypes: list[type]
    output: int


def version() -> str:
    import ai_edge_litert

    return ai_edge_litert.__version__


@contextlib.contextmanager
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


def load(path: Path, threads: int) -> Session:
    """An Interpreter with the default delegate (XNNPACK) on `threads` threads, tensors allocated."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from ai_edge_litert.interpreter import Interpreter

    try:
        with silenced_stderr():
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise TargetError(f"LiteRT cannot load {Path(path).name}: {' '.join(str(e).split())[:300]}",
                          "re-export the file with `pocketformer export --to tflite`.") from None
    details = sorted(interpreter.get_input_details(), key=lambda d: d["index"])  # forward order
    by_index = {}
    signatures = interpreter.get_signature_list()
    if signatures:
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        by_index = {d["index"]: key for key, d in runner.get_input_details().items()}
    names = [by_index.get(d["index"]) or _strip(d["name"]) for d in details]
    return Session(interpreter, names, [d["index"] for d in details], [list(map(int, d["shape"])) for d in details],
                   [d["dtype"] for d in details], interpreter.get_output_details()[0]["index"])


def _strip(tensor_name: str) -> str:
    name = tensor_name.split(":")[0]
    return name[len("serving_default_"):] if name.startswith("serving_default_") else name


def input_names(session: Session) -> list[str]:
    return list(session.names)


def input_shapes(session: Session) -> dict[str, list]:
    return dict(zip(session.names, session.shapes))


def position(names: list[str], name: str) -> int:
    """Where input `name` goes among an artifact's inputs `names`: by name, else by our canonical input order."""
    if name in names:
        return names.index(name)
    for order in CANONICAL_ORDERS:
        if name in order and len(order) == len(names):
            return order.index(name)
    raise TargetError(f"The artifact has no input {name!r} (its inputs: {', '.join(names)}).",
                      "feed the inputs by the names `pocketformer inspect` lists for the artifact.")


def ordered_feeds(session: Session, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Feeds in the artifact's input order, each checked against the artifact's fixed shape (batch aside)."""
    ordered: list = [None] * len(session.names)
    for name, value in feeds.items():
        ordered[position(session.names, name)] = np.asarray(value)
    missing = [n for n, v in zip(session.names, ordered) if v is None]
    if missing:
        raise TargetError(f"No feed for input(s) {', '.join(missing)}.", "feed every input of the artifact.")
    for name, value, shape in zip(session.names, ordered, session.shapes):
        if list(value.shape[1:]) != shape[1:]:
            raise TargetError(f"Input {name} has shape {list(value.shape)} but the artifact is fixed at {shape}.",
                              "pad/truncate inputs to the artifact's shape, or re-export it with "
                              "--static-shape matching the target.")
    return ordered


def run(session: Session, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first output. Rows beyond the artifact's static batch run in chunks of that batch."""
    ordered = ordered_feeds(session, feeds)
    n, batch = len(ordered[0]), session.shapes[0][0]
    if n == batch:
        return _invoke(session, ordered)
    outs = []
    for start in range(0, n, batch):
        chunk = [v[start:start + batch] for v in ordered]
        short = batch - len(chunk[0])
        if short:  # repeat the last row up to the fixed batch, then drop the extra outputs
            chunk = [np.concatenate([c, np.repeat(c[-1:], short, axis=0)]) for c in chunk]
        outs.append(_invoke(session, chunk)[:batch - short])
    return np.concatenate(outs)


def _invoke(session: Session, ordered: list[np.ndarray]) -> np.ndarray:
    it = session.interpreter
    for index, value, dtype in zip(session.indices, ordered, session.dtypes):
        it.set_tensor(index, np.ascontiguousarray(value, dtype=dtype))  # int64 token ids -> the model's int32
    it.invoke()
    return it.get_tensor(session.output).copy()


def benchmark(session: Session, feeds: dict[str, np.ndarray], warmup: int, repeats: int) -> list[float]:
    """Latency in ms of each of `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        run(session, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(session, feeds)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times

def segment_runs(segments: list[tuple[Path, Optional[str]]], threads: int) -> list[Run]:
    """One signature runner per segment (feeds by name in, every output by name out), for the early-exit driver;
    one Interpreter per file, with XNNPACK on every signature's subgraph."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from ai_edge_litert.interpreter import Interpreter

    interpreters: dict[Path, Any] = {}
    runs = []
    for path, signature in segments:
        try:
            with silenced_stderr():
                if path not in interpreters:
                    interpreters[path] = Interpreter(model_path=str(path), num_threads=threads)
                runner = interpreters[path].get_signature_runner(signature)
        except (ValueError, RuntimeError) as e:
            raise TargetError(f"LiteRT cannot load signature {signature!r} of {path.name}: "
                              f"{' '.join(str(e).split())[:300]}",
                              "re-export the model with `pocketformer export --to tflite`.") from None
        dtypes = {k: d["dtype"] for k, d in runner.get_input_details().items()}

        def run(feeds, runner=runner, dtypes=dtypes):  # int64 token ids -> the file's int32
            return runner(**{k: np.ascontiguousarray(feeds[k], dtype=t) for k, t in dtypes.items()})

        runs.append(run)
    return runs
