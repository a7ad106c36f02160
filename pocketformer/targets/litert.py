"""LiteRT (TFLite) on CPU with XNNPACK: open a file (or one signature of a multi-signature file) and run it.

Exported .tflite files have static shapes: a feed with more rows than the file's batch runs in chunks of that batch
(written once, in runtime.Session). Inputs are found by name (signature key, or tensor name without the
`serving_default_` prefix), else by position, so files from other converters (inputs `args_0`, `args_1`) run too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import TargetError
from ..progress import silenced_stderr
from .runtime import Runtime, Session

# Our canonical input names in forward order: the fallback when an artifact's inputs carry other names.
CANONICAL_ORDERS = (["input_ids", "attention_mask"], ["pixel_values"])


def _strip(tensor_name: str) -> str:
    name = tensor_name.split(":")[0]
    return name[len("serving_default_"):] if name.startswith("serving_default_") else name


def position(names: list[str], name: str) -> int:
    """Where input `name` goes among an artifact's inputs `names`: by name, else by our canonical input order."""
    if name in names:
        return names.index(name)
    for order in CANONICAL_ORDERS:
        if name in order and len(order) == len(names):
            return order.index(name)
    raise TargetError(f"The artifact has no input {name!r} (its inputs: {', '.join(names)}).",
                      "feed the inputs by the names `pocketformer inspect` lists for the artifact.")


class LiteRTSession(Session):
    """The file's main graph through the Interpreter's tensors, or one signature through its runner."""

    def __init__(self, path: Path, interpreter, signature: Optional[str]):
        self.interpreter, self.runner = interpreter, None
        if signature is not None:
            self.runner = interpreter.get_signature_runner(signature)
            ins = sorted(self.runner.get_input_details().items(), key=lambda kv: kv[1]["index"])
            outs = list(self.runner.get_output_details().items())
            super().__init__(path, {k: [int(x) for x in d["shape"]] for k, d in ins},
                             {k: d["dtype"] for k, d in ins}, [k for k, _ in outs])
            return
        details = sorted(interpreter.get_input_details(), key=lambda d: d["index"])  # forward order
        by_index: dict[int, str] = {}
        out_by_index: dict[int, str] = {}
        signatures = interpreter.get_signature_list()
        if signatures:
            runner = interpreter.get_signature_runner(next(iter(signatures)))
            by_index = {d["index"]: key for key, d in runner.get_input_details().items()}
            out_by_index = {d["index"]: key for key, d in runner.get_output_details().items()}
        names = [by_index.get(d["index"]) or _strip(d["name"]) for d in details]
        out_details = interpreter.get_output_details()
        super().__init__(path, {n: [int(x) for x in d["shape"]] for n, d in zip(names, details)},
                         {n: d["dtype"] for n, d in zip(names, details)},
                         [out_by_index.get(d["index"]) or _strip(d["name"]) for d in out_details])
        self.indices = [d["index"] for d in details]
        self.output_indices = [d["index"] for d in out_details]

    def select(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """By name; inputs of other names (args_0, args_1 from other converters) take our feeds in our order."""
        names = self.input_names
        chosen = {n: feeds[n] for n in names if n in feeds}
        if len(chosen) < len(names):
            for name, value in feeds.items():
                for order in CANONICAL_ORDERS:
                    if name in order and len(order) == len(names) and name not in names:
                        chosen.setdefault(names[order.index(name)], value)
        missing = [n for n in names if n not in chosen]
        if missing:
            raise TargetError(f"No feed for input(s) {', '.join(missing)} of {self.path.name} (fed "
                              f"{', '.join(feeds)}).", "feed the inputs by the names `pocketformer inspect` lists "
                                                       "for the artifact.")
        return chosen

    def invoke(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.runner is not None:
            return {k: np.asarray(v) for k, v in self.runner(**feeds).items()}
        it = self.interpreter
        for index, name in zip(self.indices, self.input_names):
            it.set_tensor(index, feeds[name])
        it.invoke()
        return {name: it.get_tensor(index).copy() for name, index in zip(self.outputs, self.output_indices)}


class LiteRT(Runtime):
    name, format, display, distribution = "litert", "tflite", "LiteRT", "ai-edge-litert"

    def _interpreter(self, path: Path, threads: int):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        from ai_edge_litert.interpreter import Interpreter

        try:
            with silenced_stderr():
                interpreter = Interpreter(model_path=str(path), num_threads=threads)
                interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise TargetError(f"LiteRT cannot load {Path(path).name}: {' '.join(str(e).split())[:300]}",
                              "re-export the file with `pocketformer export --to tflite`.") from None
        return interpreter

    def open(self, path: Path, threads: int, *, signature: Optional[str] = None,
             sequential: bool = False) -> LiteRTSession:
        """An Interpreter with the default delegate (XNNPACK) on `threads` threads."""
        return self._session(path, self._interpreter(path, threads), signature)

    def _session(self, path: Path, interpreter, signature: Optional[str]) -> LiteRTSession:
        try:
            with silenced_stderr():
                return LiteRTSession(path, interpreter, signature)
        except (ValueError, RuntimeError) as e:
            raise TargetError(f"LiteRT cannot load signature {signature!r} of {Path(path).name}: "
                              f"{' '.join(str(e).split())[:300]}",
                              "re-export the model with `pocketformer export --to tflite`.") from None

    def open_graphs(self, files: list[tuple[Path, Optional[str]]], threads: int) -> list[Session]:
        """One Interpreter per file, one signature runner per graph: XNNPACK runs every signature's subgraph."""
        interpreters: dict[Path, Any] = {}
        sessions = []
        for path, signature in files:
            if path not in interpreters:
                interpreters[path] = self._interpreter(path, threads)
            sessions.append(self._session(path, interpreters[path], signature))
        return sessions
