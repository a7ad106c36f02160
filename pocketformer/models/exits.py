"""Early-exit gates: when to stop at an exit head, as pure functions of logits, and the PyTorch reference.

- entropy (DeeBERT): stop at the first head whose softmax entropy, divided by log(labels) so thresholds lie in [0, 1]
  whatever the label count, is below `threshold`.
- patience (PABEE): stop once `patience` heads in a row after the first agree with it (patience + 1 equal labels).
The final head always stops. The gate is stored in the model (ModelConfig.exit_gate) as the exported default. The
stage that trains the heads (compress.early_exit), the exporter that cuts segments and the driver that runs them on a
target all read the gate from here.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import RecipeError
from ..space import searchable
from .canonical import CanonicalTransformer


class Gate(BaseModel):
    """When to stop: `entropy` below `threshold`, or `patience` further heads agreeing."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["entropy", "patience"] = Field("entropy", description="entropy (DeeBERT) or patience (PABEE)")
    threshold: float = Field(0.3, ge=0, le=1, description="entropy gate: stop below this normalised entropy",
                             json_schema_extra=searchable(0.05, 0.9))
    patience: int = Field(1, ge=1, description="patience gate: stop once this many further heads agree")

    def summary(self) -> str:
        return f"entropy < {self.threshold:.4g}" if self.kind == "entropy" else f"patience {self.patience}"


# -- the gate: pure functions of logits ----------------------------------------------------------------------

def entropy(logits: np.ndarray) -> np.ndarray:
    """Softmax entropy over the last axis divided by log(labels): 0 = certain, 1 = uniform."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -(np.exp(log_p) * log_p).sum(axis=-1) / np.log(z.shape[-1])


def stops(gate: Gate, head_logits: np.ndarray, entropies: Optional[np.ndarray] = None) -> np.ndarray:
    """(N, heads) booleans: would the gate stop at head h, having seen heads 0..h? `head_logits` is (N, heads,
    labels); `entropies`, if given, their entropy(), computed once by a caller that tries many gates. The one
    implementation of the gate: the driver asks it after each head, the reference for all."""
    if gate.kind == "entropy":
        return (entropy(head_logits) if entropies is None else entropies) < gate.threshold
    labels = head_logits.argmax(-1)
    agreeing = np.zeros(labels.shape, dtype=np.int64)  # heads in a row before h that agree with head h
    for h in range(1, labels.shape[1]):
        agreeing[:, h] = np.where(labels[:, h] == labels[:, h - 1], agreeing[:, h - 1] + 1, 0)
    return agreeing >= gate.patience


def should_stop(gate: Gate, head_logits: list[np.ndarray]) -> bool:
    """After the last of `head_logits` (one example's logits from each head run so far), stop there?"""
    return bool(stops(gate, np.stack(head_logits)[None])[0, -1])


def exit_indices(gate: Gate, head_logits: np.ndarray, entropies: Optional[np.ndarray] = None) -> np.ndarray:
    """(N,) the head each example stops at: the first exit head where the gate stops, else the final head."""
    early = stops(gate, head_logits, entropies)[:, :-1]
    n_heads = head_logits.shape[1]
    return np.where(early.any(axis=1), early.argmax(axis=1), n_heads - 1)


def gate_of(model: CanonicalTransformer) -> Gate:
    """The gate stored in the model (the default of its exported artifacts)."""
    return Gate.model_validate(model.spec.exit_gate or {})


class ExitPrediction(NamedTuple):
    labels: np.ndarray  # (N,) predicted class ids
    exits: np.ndarray  # (N,) head index each example stopped at (len(spec.exits) = the final head)
    logits: np.ndarray  # (N, labels) logits of that head


def decide(gate: Gate, head_logits: np.ndarray) -> ExitPrediction:
    """Apply the gate to every example of `head_logits` (N, heads, labels)."""
    exits = exit_indices(gate, head_logits)
    logits = head_logits[np.arange(len(exits)), exits]
    return ExitPrediction(logits.argmax(-1), exits, logits)


def head_logits(model: CanonicalTransformer, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    """(N, heads, labels): every exit head's logits, then the final head's, in PyTorch."""
    require_exits(model)
    with torch.no_grad():
        return torch.stack(model.eval().exit_logits(*inputs), dim=1).numpy()


def predict_with_exits(model: CanonicalTransformer, inputs: tuple[torch.Tensor, ...],
                       gate: Optional[Gate] = None) -> ExitPrediction:
    """The PyTorch reference: where each example of the batch exits under `gate` (default: the model's own)."""
    return decide(gate or gate_of(model), head_logits(model, inputs))


def require_exits(model: CanonicalTransformer) -> None:
    if not model.spec.exits:
        raise RecipeError("The model has no exit heads.", "add an early_exit stage to the recipe's stages.")
