"""Latency tables: what one block of a model costs on one target, measured in the target's runtime, and the
predicted latency of any canonical model of the same family as the sum of its blocks.

A table is plain JSON, so a user can measure one on a device pocketformer cannot reach (an iPhone) and bring it
(`prune: {table: FILE}`, `pocketformer profile --table FILE`). Its fields (schema `pocketformer-latency-table/1`):

  schema            "pocketformer-latency-table/1"
  target            profile name the table was measured for (e.g. "host-ort")
  runtime           runtime that ran the files ("onnxruntime", "litert", "coreml", ...), runtime_version its version
  threads, batch, seq_len, precision
                    the settings every measurement used (precision: the artifact's, "fp32", "int8", ...)
  measure           what is timed: "latency" (one forward of batch x seq_len, an encoder's), or for a language
                    model "decode" (one generated token after a prompt of seq_len tokens) or "prefill" (that prompt);
                    a language model's attention points count query heads + key-value heads (targets/lm_latency.py)
  cpu               {"model": ..., "features": [...], "fingerprint": ...} of the measuring machine
  family            what the table is valid for: {"modality", "hidden", "head_dim", "act", "norm", "vocab_size",
                    "max_positions"}; a model of another family is refused
  base_ms           a model with no layers: embeddings, pooling and head
  layer_ms          one layer with no heads and no FFN neurons (its norms and residual adds)
  attention         {"points": [heads...], "ms": [...]}: what h heads add to one layer (ms, h=0 -> 0)
  ffn               {"points": [neurons...], "ms": [...]}: what w FFN neurons add to one layer (ms, w=0 -> 0)
  calibration       {"scale": a, "offset_ms": b, "models": n}: measured whole models fit a * blocks + b
                    (fusion, memory); {"scale": 1, "offset_ms": 0, "models": 0} if not calibrated
  measured          {"date": ..., "seconds": ..., "by": "pocketformer X.Y", "repeats": ..., "warmup": ...}

Curves are piecewise linear between their points and extended along the last segment beyond the last point.
The predicted latency of a model whose layer i has h_i heads and w_i FFN neurons is
  scale * (base_ms + sum_i (layer_ms + attention(h_i) + ffn(w_i))) + offset_ms.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import TargetError, first_error

SCHEMA = "pocketformer-latency-table/1"
FAMILY_KEYS = ("modality", "kind", "hidden", "head_dim", "act", "norm", "vocab_size", "max_positions",
               "tie_embeddings")


class Curve(BaseModel):
    """ms added by `points` units (heads, or FFN neurons) in one layer; piecewise linear."""

    model_config = ConfigDict(extra="forbid")
    points: list[int] = Field(min_length=2)
    ms: list[float] = Field(min_length=2)

    @model_validator(mode="after")
    def _consistent(self):
        if len(self.points) != len(self.ms):
            raise ValueError(f"{len(self.points)} points but {len(self.ms)} ms values")
        if sorted(set(self.points)) != self.points or self.points[0] < 0:
            raise ValueError("points must be distinct non-negative counts in increasing order")
        return self

    def __call__(self, units: float) -> float:
        p, m = np.asarray(self.points, float), np.asarray(self.ms, float)
        if units <= p[-1]:
            return float(np.interp(units, p, m))
        slope = (m[-1] - m[-2]) / (p[-1] - p[-2])
        return float(m[-1] + slope * (units - p[-1]))


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(1.0, gt=0)
    offset_ms: float = 0.0
    models: int = Field(0, ge=0)


class LatencyTable(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_: str = Field(SCHEMA, alias="schema")
    target: str
    runtime: str
    runtime_version: str = ""
    threads: int = Field(ge=1)
    batch: int = Field(1, ge=1)
    seq_len: int = Field(ge=1)
    precision: str = "fp32"
    measure: Literal["latency", "decode", "prefill"] = "latency"
    cpu: dict[str, Any] = Field(default_factory=dict)
    family: dict[str, Any]
    base_ms: float = Field(ge=0)
    layer_ms: float = Field(ge=0)
    attention: Curve
    ffn: Curve
    calibration: Calibration = Calibration()
    measured: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _schema(self):
        if self.schema_ != SCHEMA:
            raise ValueError(f"schema {self.schema_!r} is not {SCHEMA!r}")
        return self

    # -- prediction ----------------------------------------------------------------------------------------------
    def layer_cost(self, heads: int, ffn: int) -> float:
        """Uncalibrated ms of one layer with `heads` heads and `ffn` FFN neurons."""
        return self.layer_ms + self.attention(heads) + self.ffn(ffn)

    def blocks_ms(self, shapes: Sequence[tuple[int, int]]) -> float:
        """Uncalibrated sum of the blocks of a model whose layers have these (heads, ffn) shapes."""
        return self.base_ms + sum(self.layer_cost(h, w) for h, w in shapes)

    def predict(self, shapes: Sequence[tuple[int, int]]) -> float:
        """Predicted latency (ms) of a model whose layers have these (heads, ffn) shapes."""
        return self.calibration.scale * self.blocks_ms(shapes) + self.calibration.offset_ms

    def calibrated(self, blocks: Sequence[float], measured: Sequence[float]) -> "LatencyTable":
        """This table with its calibration fitted to whole models: measured ~ scale * blocks + offset (least
        squares; with one model, scale alone)."""
        x, y = np.asarray(blocks, float), np.asarray(measured, float)
        scale, offset = np.polyfit(x, y, 1) if len(x) >= 2 and np.ptp(x) > 0 else (0.0, 0.0)
        if scale <= 0:  # one model, or a nonsense fit (noise larger than the spread of the models): ratio only
            scale, offset = float(np.sum(x * y) / np.sum(x * x)), 0.0
        return self.model_copy(update={"calibration": Calibration(scale=float(scale), offset_ms=float(offset),
                                                                   models=len(x))})

    # -- identity ------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(by_alias=True)
        if data["measure"] == "latency":  # an encoder's table reads (and hashes) as it did before LMs had tables
            del data["measure"]
        return data

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def check_family(self, family: dict[str, Any], what: str) -> None:
        """Refuse a model the table was not measured for (another hidden size, head size, vocabulary...)."""
        differ = [k for k in FAMILY_KEYS if k in self.family and self.family[k] != family.get(k)]
        if differ:
            shown = ", ".join(f"{k} {family.get(k)!r} (table: {self.family[k]!r})" for k in differ)
            raise TargetError(f"The latency table for {self.target} was measured for another model family than "
                              f"{what}: {shown}.", "build a table for this model (`pocketformer profile --target "
                                                   f"{self.target} --model MODEL`), or bring one measured for it.")


def lm_units(spec) -> list[tuple[int, int]]:
    """(attention units = query heads + key-value heads, FFN neurons) of each layer of a language model's config:
    what its decode and prefill tables predict from (targets/lm_latency.py)."""
    return [(s.heads + s.kv_heads, s.ffn) for s in spec.layers]


def monotone(values: Sequence[float]) -> list[float]:
    """The closest non-decreasing sequence (least squares; pool adjacent violators): more heads or neurons never
    cost less, so a measured dip is noise, and a curve through it would reward pruning nothing."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]


def read_table(path: Path) -> LatencyTable:
    """A latency table from a JSON file (see this module's docstring for the format); one clear error if not."""
    path = Path(path)
    fix = "write it in the format `pocketformer profile --help` documents, or build one with `pocketformer profile`."
    if not path.is_file():
        raise TargetError(f"Latency table {path} does not exist.", "check the path, or build one with "
                                                                   "`pocketformer profile --target NAME`.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TargetError(f"Latency table {path} is not readable JSON ({first_error(e)}).", fix) from None
    try:
        return LatencyTable.model_validate(data)
    except ValidationError as e:
        raise TargetError(f"Latency table {path} is invalid: {first_error(e).replace('Value error, ', '')}.",
                          fix) from None


def write_table(table: LatencyTable, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table.to_json(), indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def prediction_errors(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, Any]:
    """How a predictor did on models measured: relative errors, the share within +-10% and the worst error."""
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    rel = p / m - 1.0
    worst = int(np.argmax(np.abs(rel))) if len(rel) else None
    return {"models": len(rel), "within_10pct": float(np.mean(np.abs(rel) <= 0.10 + 1e-9)) if len(rel) else None,
            "within_5pct": float(np.mean(np.abs(rel) <= 0.05 + 1e-9)) if len(rel) else None,
            "mean_abs_error": float(np.mean(np.abs(rel))) if len(rel) else None,
            "worst_error": float(rel[worst]) if worst is not None else None}
