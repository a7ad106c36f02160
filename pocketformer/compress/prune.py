"""Structured pruning: remove whole layers, attention heads and FFN neurons, physically shrinking the matrices.

Importance, per unit: magnitude or taylor (scored in importance.py), or
- accuracy (AxFormer): walk layers from the output side, then heads, then neuron groups; delete each, re-evaluate
  the validation loss on a calibration subset, keep the deletion if the loss does not rise by more than
  `tolerance`. Targets, when given, cap how much is removed. Each deletion is tried on a copy of the model and
  kept through the model's own shrink methods, so its invariants hold.
Heads and neurons are ranked globally after normalising scores within each layer; every layer keeps at least one
head and a multiple of `round_to` neurons, so matmul shapes stay kernel-friendly. Layers are never removed from a
model with early exits: the exits are placed after layers by index.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import Field

from ..errors import RecipeError
from ..models.canonical import CanonicalTransformer
from ..progress import info, progress_bar
from ..space import searchable
from .amounts import Removal, resolve, round_to_multiple
from .base import Context, Effects, Stage, StageConfig, StageResult
from .importance import (calibration_batches, layer_scores, magnitude_scores, mean_task_loss, neuron_magnitudes,
                         taylor_scores, usable_importance)


class PruneConfig(StageConfig):
    layers: Removal = Field(0, description="layers to remove: a fraction in [0, 1) or a count",
                            json_schema_extra=searchable(0, 0.5))
    heads: Removal = Field(0, description="attention heads to remove (of all remaining): fraction or count",
                           json_schema_extra=searchable(0, 0.5))
    ffn: Removal = Field(0, description="FFN neurons to remove (of all remaining): fraction or count",
                         json_schema_extra=searchable(0, 0.75))
    importance: Literal["magnitude", "taylor", "accuracy"] = Field(
        "taylor", description="how units are ranked: weight magnitude, first-order loss change (taylor), or "
                              "accuracy (delete, re-evaluate, keep if the loss holds)",
        json_schema_extra=searchable(choices=["magnitude", "taylor", "accuracy"]))
    calibration_examples: int = Field(512, ge=8, le=100000, description="train examples the importance is scored on")
    tolerance: float = Field(0.0, ge=0, description="accuracy mode: allowed validation-loss rise per deletion")
    round_to: int = Field(8, ge=1, le=256, description="FFN widths kept as multiples of this")


# -- selection ------------------------------------------------------------------------------------------------

def _normalise(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    return [s / (s.norm() + 1e-12) if len(s) else s for s in scores]


def select_heads(scores: list[torch.Tensor], n_remove: int) -> list[list[int]]:
    """Heads to keep per layer: the globally lowest normalised scores go, each layer keeping at least one."""
    scores = _normalise(scores)
    keep = [set(range(len(s))) for s in scores]
    ranked = sorted((float(v), li, h) for li, s in enumerate(scores) for h, v in enumerate(s))
    removed = 0
    for _, li, h in ranked:
        if removed >= n_remove:
            break
        if len(keep[li]) > 1:
            keep[li].discard(h)
            removed += 1
    return [sorted(k) for k in keep]


def select_neurons(scores: list[torch.Tensor], n_remove: int, round_to: int) -> list[list[int]]:
    """Neurons to keep per layer: a global threshold on normalised scores, widths rounded to `round_to`."""
    scores = _normalise(scores)
    widths = [len(s) for s in scores]
    total = sum(widths)
    if n_remove <= 0 or total == 0:
        return [list(range(w)) for w in widths]
    # The n_remove globally lowest go; ties are broken by position, so equal scores (all zero, say) cannot take
    # more than asked, as a strict threshold would.
    owner = torch.cat([torch.full((w,), li, dtype=torch.long) for li, w in enumerate(widths)])
    lowest = torch.argsort(torch.cat(scores), stable=True)[:min(n_remove, total)]
    removed = torch.bincount(owner[lowest], minlength=len(widths)).tolist()
    keep = []
    for s, w, r in zip(scores, widths, removed):
        k = round_to_multiple(w - r, round_to, "nearest_even", w) if w >= round_to else w
        keep.append(sorted(torch.argsort(s, descending=True)[:k].tolist()))
    return keep


# -- the stage ------------------------------------------------------------------------------------------------

class Prune(Stage[PruneConfig], name="prune", version=1,
            summary="structured pruning of layers, attention heads and FFN neurons (magnitude, taylor or accuracy)"):
    excludes = frozenset({"exits"})
    invalidates = frozenset({"nested_ffn"})
    reasons = {"exits": "removing layers would misplace the exit heads, which sit after layers by index",
               "nested_ffn": "removing FFN neurons breaks the nested widths it trained"}
    remedies = {"exits": "set prune's `layers: 0`",
                "nested_ffn": "cut FFN widths with `pocketformer extract` instead of pruning them"}

    def effects(self) -> Effects:
        cfg = self.config
        # Accuracy mode removes layers and neuron groups up to a budget, unbounded when it is 0; with exits present
        # it keeps every layer, so only an explicit `layers` conflicts with exits.
        return Effects(excludes=self.excludes if cfg.layers else frozenset(),
                       invalidates=self.invalidates if cfg.ffn or cfg.importance == "accuracy" else frozenset())

    def layers_after(self, layers: int):
        if self.config.importance == "accuracy":
            return None  # as many as the walk deletes
        return layers - resolve(self.config.layers, layers)

    def apply(self, model: CanonicalTransformer, ctx: Context) -> StageResult:
        cfg = self.config
        if cfg.layers and model.spec.exits:
            raise RecipeError(f"prune cannot remove layers from a model with early exits (after layers "
                              f"{model.spec.exits}): the exits are placed after layers by index.",
                              "put prune before early_exit in the recipe, or set `layers: 0`.")
        batches = calibration_batches(ctx, cfg.calibration_examples)
        if cfg.importance == "accuracy":
            self._accuracy_driven(model, ctx, cfg, batches)
            return StageResult(model)
        importance = usable_importance(cfg.importance, model, ctx.teacher, "prune")
        n_layers = resolve(cfg.layers, len(model.layers))
        if n_layers:
            scores = layer_scores(model, ctx.teacher, batches, importance)
            keep = sorted(np.argsort(scores)[n_layers:].tolist())
            info(f"prune: removing layers {sorted(set(range(len(model.layers))) - set(keep))} "
                 f"(scores {', '.join(f'{s:.3g}' for s in scores)})")
            model.keep_layers(keep)
        if cfg.heads or cfg.ffn:
            if importance == "taylor":
                head_s, neuron_s = taylor_scores(model, ctx.teacher, batches)
            else:
                head_s, neuron_s = magnitude_scores(model)
            total_heads = sum(l.attn.heads for l in model.layers)
            for li, k in enumerate(select_heads(head_s, resolve(cfg.heads, total_heads))):
                model.keep_heads(li, k)
            total_neurons = sum(l.ffn.width for l in model.layers)
            for li, k in enumerate(select_neurons(neuron_s, resolve(cfg.ffn, total_neurons), cfg.round_to)):
                model.keep_neurons(li, k)
        return StageResult(model)

    def _accuracy_driven(self, model: CanonicalTransformer, ctx: Context, cfg: PruneConfig, batches) -> None:
        """AxFormer's greedy walk from the output side: per layer, the whole layer, else its heads, then its neuron
        groups; each deletion is kept if the calibration loss does not rise by more than the tolerance."""
        def cap(amount, total: int) -> float:
            return resolve(amount, total) if amount else math.inf

        budget = _Budget(layers=cap(cfg.layers, len(model.layers)),
                         heads=cap(cfg.heads, sum(l.attn.heads for l in model.layers)),
                         neurons=cap(cfg.ffn, sum(l.ffn.width for l in model.layers)))
        if model.spec.exits:  # an explicit `layers` was refused in apply
            budget.layers = 0
            info(f"prune (accuracy): keeping every layer: the model has early exits after layers {model.spec.exits},"
                 " placed by index (put prune before early_exit to let it remove layers)")
        walk = _Walk(model, lambda m: mean_task_loss(m, ctx.teacher, batches), cfg.tolerance)
        with progress_bar("prune (accuracy-driven)", len(model.layers)) as advance:
            for li in reversed(range(len(model.layers))):
                if not _remove_layer(walk, li, budget):
                    _remove_heads(walk, li, budget)
                    _remove_neuron_groups(walk, li, budget, cfg.round_to)
                advance()
        info(f"prune (accuracy): {len(walk.kept)} deletions kept, calibration loss {walk.loss:.4f}")


# -- the accuracy-driven walk's steps -----------------------------------------------------------------------------

@dataclass
class _Budget:
    """Units the walk may still remove; math.inf where no target is set and the tolerance alone decides."""

    layers: float
    heads: float
    neurons: float


class _Walk:
    """The model being pruned, its calibration loss, and the deletions kept so far."""

    def __init__(self, model: CanonicalTransformer, loss_of: Callable[[CanonicalTransformer], float],
                 tolerance: float):
        self.model, self.loss_of, self.tolerance = model, loss_of, tolerance
        self.loss = loss_of(model)
        self.kept: list[tuple[str, int, float]] = []

    def attempt(self, kind: str, layer: int, edit: Callable[[CanonicalTransformer], None]) -> bool:
        """Run `edit` (a shrink method of the model) on a copy; if the copy's loss rises by at most the tolerance,
        make the same edit on the model."""
        trial = copy.deepcopy(self.model)
        edit(trial)
        loss = self.loss_of(trial)
        if loss > self.loss + self.tolerance:
            return False
        edit(self.model)
        self.loss = loss
        self.kept.append((kind, layer, loss))
        return True


def _remove_layer(walk: _Walk, li: int, budget: _Budget) -> bool:
    if budget.layers <= 0 or len(walk.model.layers) <= 1:
        return False
    keep = [j for j in range(len(walk.model.layers)) if j != li]
    if not walk.attempt("layer", li, lambda m: m.keep_layers(keep)):
        return False
    budget.layers -= 1
    return True


def _remove_heads(walk: _Walk, li: int, budget: _Budget) -> None:
    """One head at a time, the last first; the layer keeps at least one."""
    for h in reversed(range(walk.model.layers[li].attn.heads)):
        heads = walk.model.layers[li].attn.heads
        if budget.heads <= 0 or heads <= 1:
            break
        keep = [k for k in range(heads) if k != h]
        if walk.attempt("head", li, lambda m: m.keep_heads(li, keep)):
            budget.heads -= 1


def _remove_neuron_groups(walk: _Walk, li: int, budget: _Budget, round_to: int) -> None:
    """Groups of max(round_to, width / 8) neurons, least magnitude first, until one costs too much; at least one
    group stays."""
    width = walk.model.layers[li].ffn.width
    group = max(round_to, width // 8)
    removed = 0
    while removed + group < width and budget.neurons >= group:
        ffn = walk.model.layers[li].ffn
        weakest = set(torch.argsort(neuron_magnitudes(ffn), stable=True)[:group].tolist())
        keep = [k for k in range(ffn.width) if k not in weakest]
        if not walk.attempt("neurons", li, lambda m: m.keep_neurons(li, keep)):
            break
        removed += group
        budget.neurons -= group
