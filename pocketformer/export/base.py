"""The format contract: what a format module says, and nothing else.

A format converts a set of graphs (the canonical model, or its early-exit segments; prefill/decode tomorrow) to files
in each of its precisions, stores mostly-zero weights sparse where it can, says how close each precision must stay to
PyTorch, and describes a file (inputs, outputs, ops, weights) for lint and reports. Everything else (shapes, example
inputs, staging, the parity check on a runtime, records and manifests) is the export loop's (export/loop.py), written
once. A format registers itself in FORMATS by subclassing Format; a new format is one module plus its test.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from ..models.signature import Graph
from ..models.tasks import cosine_rows
from .card import Card

FORMATS: dict[str, "Format"] = {}


@dataclass(frozen=True)
class Tolerance:
    """How close a file must stay to PyTorch. `task`: judged by the model's task (same decisions: label agreement
    or embedding cosine, models/tasks.py) instead of max_abs/min_cosine."""

    max_abs: Optional[float] = None
    min_cosine: Optional[float] = None
    task: bool = False


@dataclass
class Written:
    """One graph as a format wrote it: its file (or package), the signature inside it for multi-signature files,
    and what sparse storage did to it."""

    graph: str
    path: Path
    signature: Optional[str] = None
    storage: Optional[dict[str, Any]] = None


@dataclass
class Plan:
    """What the loop hands a format for one export: the graphs, example inputs of each at the file's shapes, the
    fixed sizes of the symbolic axes (None: dynamic), the options, and a scratch dict the format keeps across its
    precisions (the float file a quantized one is made from)."""

    graphs: dict[str, Graph]
    examples: dict[str, tuple[torch.Tensor, ...]]
    fixed: Optional[dict[str, int]]
    sparse: bool
    options: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    card: Optional[Card] = None  # what the files say about the model (export/card.py), written by annotate


class Format(ABC):
    name: ClassVar[str]
    extension: ClassVar[str]  # ".onnx", ".tflite", ".mlpackage"
    runtime: ClassVar[str]  # the runtime that checks its files here (a targets RUNTIMES name)
    static_only: ClassVar[bool] = True  # files have fixed shapes whatever the caller asks
    default_seq: ClassVar[int] = 128  # tokens of a fixed-shape file when the caller names none
    # Option names this format takes beyond int8/static/sparse (e.g. CoreML's palettize_bits).
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            FORMATS[cls.name] = cls()

    # The precisions written, float first (later ones are made from earlier ones), and with int8 on.
    float_precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    int8_precisions: ClassVar[tuple[str, ...]] = ()
    suffixes: ClassVar[dict[str, str]] = {}  # precision -> its name in file names, where it differs
    fp32_tolerance: ClassVar[Tolerance] = Tolerance(min_cosine=0.9999)  # reduced precisions: the task's rule
    # precision -> what the user can do when a file of it fails its check; "*" for the others
    fixes: ClassVar[dict[str, str]] = {"*": "report this with the model's pocketformer.json."}

    def precisions(self, int8: bool, options: dict[str, Any]) -> list[str]:
        return list(self.float_precisions) + (list(self.int8_precisions) if int8 else [])

    def suffix(self, precision: str) -> str:
        """The precision as it appears in file names."""
        return self.suffixes.get(precision, precision)

    def tolerance(self, precision: str, plan: Optional[Plan] = None) -> Tolerance:
        """How close a file of `precision` must stay to PyTorch; `plan` when the files' form changes it (CoreML's
        stateful decoders keep their cache in fp16 at any compute precision)."""
        return self.fp32_tolerance if precision == "fp32" else Tolerance(task=True)

    def fix(self, precision: str) -> str:
        return self.fixes.get(precision, self.fixes["*"])

    @abstractmethod
    def write(self, plan: Plan, precision: str, paths: dict[str, Path]) -> list[Written]:
        """Write every graph of `plan` in `precision` to `paths` (graph name -> file path; graphs that share a file
        share a path). Sparse storage is applied here when `plan.sparse`."""

    @abstractmethod
    def describe(self, path: Path) -> dict[str, Any]:
        """Inputs, outputs, op counts and weights of a file (every signature's ops for multi-signature files)."""

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse option values the format cannot honour (ExportError), before anything is converted."""

    def content_sha256(self, path: Path) -> str:
        """A hash of what the file holds, equal whenever the same model is exported again (for byte-deterministic
        formats: the file's sha256; a package: every file's relative path and content)."""
        return tree_sha256(path)

    def holds_int8(self, path: Path, description: dict[str, Any]) -> bool:
        """Does the file compute with int8 weights? (Lint warns where int8 buys no speed.) By default the name."""
        return ".int8" in Path(path).name

    def shares_file(self) -> bool:
        """Do several graphs go into one file (as signatures) rather than one file each?"""
        return False

    def annotate(self, path: Path, card: Card, precision: str) -> None:
        """Write the card into the file, in place and in the format's own convention (labels, tokenizer, max
        length, inputs, provenance), before the file's check; a file the format cannot annotate stays as it is."""

    def read_card(self, path: Path) -> Optional[dict[str, Any]]:
        """The card a file carries (export.card.from_metadata's values), plus where its tokenizer is ("embedded"
        or the folder beside it); None when it carries none."""
        return None

    def record_extras(self, plan: Plan, precision: str) -> dict[str, Any]:
        """Format-specific fields of a file's record (CoreML's options)."""
        return {}


# -- what the loop and the formats share ----------------------------------------------------------------------------

def parity(reference: np.ndarray, candidate: np.ndarray, per_position: bool = False) -> dict[str, float]:
    """Max abs diff, and the mean and lowest over examples of the cosine between output vectors. `per_position`:
    each position of the last-but-one axes is an example (a language model's logits: one per token)."""
    rows = (-1, np.shape(reference)[-1]) if per_position else (len(reference), -1)
    ref = np.asarray(reference, dtype=np.float64).reshape(rows)
    cand = np.asarray(candidate, dtype=np.float64).reshape(rows)
    cos = cosine_rows(ref, cand)
    return {"max_abs_diff": float(np.abs(ref - cand).max()), "cosine": float(cos.mean()),
            "min_cosine": float(cos.min()), "argmax_agreement": float((ref.argmax(1) == cand.argmax(1)).mean()),
            "examples": int(len(ref))}


def repeat_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Exactly n rows, repeating the tensor's rows when it has fewer (a file of fixed batch, few examples)."""
    return t[torch.arange(n) % len(t)]


def tree_sha256(path: Path, skip: tuple[str, ...] = (), content=None) -> str:
    """sha256 of a file, or of a folder's files (relative path and content, in path order) except those named in
    `skip`; `content(file) -> bytes` may stand in for a file's raw bytes."""
    path = Path(path)
    files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file() and p.name not in skip)
    h = hashlib.sha256()
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        if content is not None:
            h.update(content(f))
            continue
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def artifact_size(path: Path) -> int:
    """Bytes on disk of an artifact: a file, or a package folder (CoreML .mlpackage)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def first_line(e: BaseException) -> str:
    """An exception's first non-empty line, for one-line errors."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def format_of(path: Path) -> Optional[str]:
    """The format a file's extension names, or None."""
    return next((f.name for f in FORMATS.values() if Path(path).suffix == f.extension), None)
