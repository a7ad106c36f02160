"""The accuracy-driven walk's bookkeeping, shared by prune on encoders (compress/prune.py) and on language models
(compress/lm_prune.py): each deletion is tried on a copy of the model, kept through the model's own keep_* methods
when the calibration loss holds, and recorded as the units it keeps, so the walk can be replayed."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from .amounts import resolve


@dataclass
class Budget:
    """Units the walk may still remove; math.inf where no target is set and the loss alone decides."""

    layers: float
    heads: float  # a language model's: query-head slots (one head from every group of a layer)
    neurons: float
    groups: float = math.inf  # a language model's key-value groups


def cap(amount, total: int) -> float:
    """A prune amount as a cap on the walk: the units it names of `total`, or no cap when it is 0."""
    return resolve(amount, total) if amount else math.inf


@dataclass(frozen=True)
class Deletion:
    """One deletion of the walk, as the units it keeps: made again on a copy of the model before the walk, the
    walk's first k deletions rebuild the model it had after them."""

    kind: Literal["layer", "head", "neurons", "groups"]
    layer: int
    keep: tuple[int, ...]  # layers of the model, heads, neurons or key-value groups of `layer`, as numbered then

    def apply(self, model: Any) -> None:
        """Make this deletion on `model` (a CanonicalTransformer or a CausalLM), through its own shrink methods."""
        if self.kind == "layer":
            model.keep_layers(list(self.keep))
        elif self.kind == "head":
            model.keep_heads(self.layer, list(self.keep))
        elif self.kind == "groups":
            model.keep_groups(self.layer, list(self.keep))
        else:
            model.keep_neurons(self.layer, list(self.keep))


def replay(model: Any, deletions: list[Deletion]) -> Any:
    """A copy of `model` with `deletions` made, in order."""
    model = copy.deepcopy(model)
    for deletion in deletions:
        deletion.apply(model)
    return model


class Walk:
    """The model being pruned, its calibration loss, and the deletions kept so far. A deletion is kept when the
    loss after it is at most `tolerance` above the loss before it and at most `max_rise` above the loss before the
    walk."""

    def __init__(self, model: Any, loss_of: Callable[[Any], float], tolerance: float, max_rise: float = math.inf):
        self.model, self.loss_of, self.tolerance = model, loss_of, tolerance
        self.loss = self.start = loss_of(model)
        self.ceiling = self.start + max_rise
        self.kept: list[Deletion] = []
        self.tried = 0

    def attempt(self, deletion: Deletion) -> bool:
        """Make `deletion` on a copy; if the copy's loss holds, make it on the model."""
        trial = copy.deepcopy(self.model)
        deletion.apply(trial)
        loss = self.loss_of(trial)
        self.tried += 1
        if loss > self.loss + self.tolerance or loss > self.ceiling:
            return False
        deletion.apply(self.model)
        self.loss = loss
        self.kept.append(deletion)
        return True


# -- steps both walks take -------------------------------------------------------------------------------------------

def remove_layer(walk: Walk, li: int, budget: Budget) -> bool:
    """Try deleting layer `li` whole; the model keeps at least one layer."""
    if budget.layers <= 0 or len(walk.model.layers) <= 1:
        return False
    keep = [j for j in range(len(walk.model.layers)) if j != li]
    if not walk.attempt(Deletion("layer", li, tuple(keep))):
        return False
    budget.layers -= 1
    return True


def remove_neuron_blocks(walk: Walk, li: int, budget: Budget, round_to: int,
                         scores: Callable[[Any], torch.Tensor]) -> None:
    """Blocks of max(round_to, width / 8) of layer `li`'s FFN neurons, the lowest `scores(layer)` first, until one
    costs too much; at least one block stays."""
    width = walk.model.layers[li].ffn.width
    block = max(round_to, width // 8)
    removed = 0
    while removed + block < width and budget.neurons >= block:
        layer = walk.model.layers[li]
        weakest = set(torch.argsort(scores(layer), stable=True)[:block].tolist())
        if not walk.attempt(Deletion("neurons", li, tuple(k for k in range(layer.ffn.width) if k not in weakest))):
            break
        removed += block
        budget.neurons -= block
