"""The runtime contract: one class per runtime, one Session type with one `run(feeds) -> outputs by name`.

What every runtime shares is written here once: choosing an artifact's inputs among the feeds, casting them to its
dtypes (int64 token ids to a file's int32), checking them against its fixed shapes, running a file of fixed batch in
chunks (the last one filled up by repeating its last row), and timing repeated runs after warm-up. A runtime module
says only how to open a file and invoke it once; it registers itself in RUNTIMES by subclassing Runtime, and
`pocketformer.targets` imports every module of this package, so a new runtime is one module plus its test.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np

from ..errors import TargetError

RUNTIMES: dict[str, "Runtime"] = {}


class Session(ABC):
    """One opened graph of an artifact: a file, or one signature of a multi-signature file."""

    def __init__(self, path: Path, inputs: dict[str, list], dtypes: dict[str, Any], outputs: list[str]):
        self.path = Path(path)
        self.inputs = inputs  # name -> dims, in the graph's input order (ints fixed; strings or None dynamic)
        self.dtypes = dtypes  # name -> numpy dtype the graph takes
        self.outputs = outputs  # output names, in order

    @abstractmethod
    def invoke(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call at the graph's shapes; `feeds` are already the graph's inputs, cast."""

    # -- written once for every runtime ----------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    @property
    def static_batch(self) -> Optional[int]:
        dims = next(iter(self.inputs.values()), [])
        return dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None

    @property
    def static_seq(self) -> Optional[int]:
        """The fixed second axis of the first input (the tokens of a text model), or None."""
        dims = next(iter(self.inputs.values()), [])
        return dims[1] if len(dims) > 1 and isinstance(dims[1], int) and dims[1] > 0 else None

    def select(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's inputs among `feeds` (others ignored), by name. Runtimes whose files may carry other names
        (LiteRT: args_0 from other converters) override this."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise TargetError(f"{self.path.name} takes {', '.join(self.inputs)}; no feed for {', '.join(missing)}.",
                              "feed the inputs by the names `pocketformer inspect` lists for the artifact.")
        return {n: feeds[n] for n in self.inputs}

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Selected, cast to the graph's dtypes and checked against its fixed axes (batch aside)."""
        out = {}
        for name, value in self.select(feeds).items():
            value = np.ascontiguousarray(value, dtype=self.dtypes[name])
            fixed = self.inputs[name]
            if len(value.shape) != len(fixed) or any(isinstance(d, int) and d > 0 and d != v
                                                     for d, v in zip(fixed[1:], value.shape[1:])):
                raise TargetError(f"{self.path.name} takes {name} of shape {list(fixed)}, got {list(value.shape)}.",
                                  "pad or truncate inputs to the artifact's fixed shape, or re-export it with "
                                  "--static matching the target.")
            out[name] = value
        return out

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output by name for all rows of `feeds`; a graph of fixed batch runs in chunks of that batch."""
        feeds = self.prepare(feeds)
        n, batch = len(next(iter(feeds.values()))), self.static_batch
        if batch is None or n == batch:
            return self.invoke(feeds)
        parts = []
        for start in range(0, n, batch):
            chunk = {k: v[start:start + batch] for k, v in feeds.items()}
            short = batch - len(next(iter(chunk.values())))
            if short:  # repeat the last row up to the fixed batch, then drop the extra outputs
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in chunk.items()}
            parts.append({k: np.asarray(v)[:batch - short] for k, v in self.invoke(chunk).items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def output(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The first output: the logits or embedding of a plain artifact."""
        return self.run(feeds)[self.outputs[0]]


class Runtime(ABC):
    """A runtime that runs one format's files here. Subclasses register an instance in RUNTIMES by `name`."""

    name: ClassVar[str]
    format: ClassVar[str]
    display: ClassVar[str] = ""  # how reports name what runs the files ("ONNX Runtime"); default: name
    distribution: ClassVar[str] = ""  # the package whose version is the runtime's
    # Test inputs the export parity check runs per file; None = all. A reference interpreter that takes seconds
    # per example checks a few.
    check_examples: ClassVar[Optional[int]] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            RUNTIMES[cls.name] = cls()

    @property
    def measures_latency(self) -> bool:
        """Does a time measured here say anything about the target? (Not for a reference interpreter.)"""
        return True

    def version(self) -> str:
        from importlib.metadata import version

        return version(self.distribution)

    def execution(self) -> str:
        """What actually runs the files here, for reports."""
        return self.display or self.name

    @abstractmethod
    def open(self, path: Path, threads: int, *, signature: Optional[str] = None,
             sequential: bool = False) -> Session:
        """Open one graph of `path` on `threads` threads. `signature`: one graph of a multi-signature file.
        `sequential`: sessions run one after another (segments), so none may hold the cores between runs."""

    def no_latency(self) -> str:
        """Why a time measured here says nothing, for runtimes that do not measure latency."""
        return f"{self.name} measures no latency here ({self.execution()})."

    def benchmark(self, session: Session, feeds: dict[str, np.ndarray], warmup: int, repeats: int) -> list[float]:
        """Latency in ms of each of `repeats` runs after `warmup` untimed ones; refused where it means nothing."""
        if not self.measures_latency:
            raise TargetError(self.no_latency(), "measure latency where the target's runtime runs.")
        return benchmark(session, feeds, warmup, repeats)

    def open_graphs(self, files: list[tuple[Path, Optional[str]]], threads: int) -> list[Session]:
        """One session per (file, signature), for graphs run one after another."""
        return [self.open(path, threads, signature=signature, sequential=True) for path, signature in files]


def benchmark(session: Session, feeds: dict[str, np.ndarray], warmup: int, repeats: int) -> list[float]:
    """Latency in ms of each of `repeats` runs after `warmup` untimed runs: one call on feeds prepared once when
    they fit the file's batch, else the whole chunked run (a profile batch larger than the file's)."""
    prepared = session.prepare(feeds)
    rows = len(next(iter(prepared.values())))
    if session.static_batch is None or rows == session.static_batch:
        call = lambda: session.invoke(prepared)  # noqa: E731
    else:
        call = lambda: session.run(feeds)  # noqa: E731
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def discover() -> dict[str, "Runtime"]:
    """Every runtime of this package, registered by importing its modules (a new runtime is one module)."""
    import importlib
    import pkgutil

    from .. import targets

    for module in pkgutil.iter_modules(targets.__path__):
        if module.name != "probe":
            importlib.import_module(f"{targets.__name__}.{module.name}")
    return RUNTIMES


def get_runtime(name: str) -> Runtime:
    discover()
    if name not in RUNTIMES:
        raise TargetError(f"Unknown runtime {name!r}.", f"use one of {', '.join(sorted(RUNTIMES))}.")
    return RUNTIMES[name]


def runtime_for_format(fmt: str) -> Runtime:
    """The runtime the format names for checking its files here."""
    from ..export import FORMATS

    if fmt not in FORMATS:
        raise TargetError(f"Unknown format {fmt!r}.", f"use one of {', '.join(FORMATS)}.")
    return get_runtime(FORMATS[fmt].runtime)
