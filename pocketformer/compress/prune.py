"""Structured pruning: remove whole layers, attention heads and FFN neurons, physically shrinking the matrices.

Importance, per unit:
- magnitude: weight norms (a head: its q/k/v rows and out-projection columns; a neuron: fc1 row x fc2 column;
  a layer: the mean size of the change it makes to the hidden state on calibration data).
- taylor: first-order estimate of the loss change when the unit is removed, |dL/dgate| summed over calibration
  batches with a gate of ones on each head's context and each neuron's activation (GTSP / Michel et al.); a layer:
  |g . (x_out - x_in)|, removing the layer being x_out -> x_in.
- accuracy (AxFormer): walk layers from the output side, then heads, then neuron groups; delete each, re-evaluate
  the validation loss on a calibration subset, keep the deletion if the loss does not rise by more than
  `tolerance`. Targets, when given, cap how much is removed.
Heads and neurons are ranked globally after normalising scores within each layer; every layer keeps at least one
head and a multiple of `round_to` neurons, so matmul shapes stay kernel-friendly.
"""

from __future__ import annotations

import copy
import math
from typing import Literal, Optional, Union

import numpy as np
import torch
from pydantic import Field, field_validator
from torch.nn import functional as F

from ..models.canonical import CanonicalTransformer
from ..progress import info, progress_bar
from .base import Context, Stage, StageConfig

Amount = Union[int, float]


class PruneConfig(StageConfig):
    layers: Amount = Field(0, description="layers to remove: a fraction in [0, 1) or a count")
    heads: Amount = Field(0, description="attention heads to remove (of all remaining): fraction or count")
    ffn: Amount = Field(0, description="FFN neurons to remove (of all remaining): fraction or count")
    importance: Literal["magnitude", "taylor", "accuracy"] = "taylor"
    calibration_examples: int = Field(512, ge=8, le=100000)
    tolerance: float = Field(0.0, ge=0, description="accuracy mode: allowed validation-loss rise per deletion")
    round_to: int = Field(8, ge=1, le=256, description="FFN widths kept as multiples of this")

    @field_validator("layers", "heads", "ffn", mode="before")
    @classmethod
    def _not_bool(cls, v):  # before coercion, or `heads: true` would silently mean 1
        if isinstance(v, bool):
            raise ValueError("must be a fraction in [0, 1) or a whole count >= 0, not true/false")
        return v

    @field_validator("layers", "heads", "ffn")
    @classmethod
    def _amount(cls, v):
        if isinstance(v, bool) or v < 0 or (isinstance(v, float) and v >= 1):
            raise ValueError("must be a fraction in [0, 1) or a whole count >= 0")
        return v


def resolve(amount: Amount, total: int) -> int:
    """A fraction of `total`, or a count, as a number of units to remove."""
    n = int(round(amount * total)) if isinstance(amount, float) else int(amount)
    return min(n, total)


# -- importance scorers: plain functions of (model, batches) -------------------------------------------------------

def _task_loss(model: CanonicalTransformer, teacher: Optional[CanonicalTransformer], inputs, labels):
    out = model(*inputs)
    if model.classifier is not None:
        return F.cross_entropy(out, labels)
    with torch.no_grad():
        target = teacher(*inputs)
    return F.mse_loss(out, target)


def _calibration(ctx: Context, n: int):
    ds = ctx.train.head(n)
    return ds, list(ctx.encoder.batches(ds, ctx.batch_size))


def magnitude_scores(model: CanonicalTransformer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    heads, neurons = [], []
    for layer in model.layers:
        a, d = layer.attn, layer.attn.head_dim
        per_head = []
        for h in range(a.heads):  # weights only: no autograd needed
            rows = slice(h * d, (h + 1) * d)
            per_head.append(sum(getattr(a, n).weight[rows].detach().norm().item() ** 2 for n in "qkv")
                            + a.o.weight[:, rows].detach().norm().item() ** 2)
        heads.append(torch.tensor(per_head).sqrt())
        f = layer.ffn
        neurons.append((f.fc1.weight.norm(dim=1) * f.fc2.weight.norm(dim=0)).detach() if f.width else torch.zeros(0))
    return heads, neurons


def taylor_scores(model: CanonicalTransformer, teacher, batches, labels_of) -> tuple[list, list]:
    """|dL/dgate| accumulated over batches, gates of ones on each head's context and each FFN activation."""
    head_gates = [torch.ones(l.attn.heads, requires_grad=True) for l in model.layers]
    neuron_gates = [torch.ones(l.ffn.width, requires_grad=True) for l in model.layers]
    hooks = []
    for layer, hg, ng in zip(model.layers, head_gates, neuron_gates):
        d = layer.attn.head_dim

        def gate_heads(_m, args, hg=hg, d=d):
            x = args[0]
            return (x.reshape(*x.shape[:-1], -1, d) * hg[:, None]).reshape(x.shape)

        hooks.append(layer.attn.o.register_forward_pre_hook(gate_heads))
        hooks.append(layer.ffn.fc2.register_forward_pre_hook(lambda _m, args, ng=ng: args[0] * ng))
    head_acc = [torch.zeros_like(g) for g in head_gates]
    neuron_acc = [torch.zeros_like(g) for g in neuron_gates]
    model.eval()
    try:
        with progress_bar("importance (taylor)", len(batches)) as advance:
            for idx, inputs in batches:
                loss = _task_loss(model, teacher, inputs, labels_of(idx))
                grads = torch.autograd.grad(loss, head_gates + neuron_gates, allow_unused=True)
                for acc, g in zip(head_acc + neuron_acc, grads):
                    if g is not None:
                        acc += g.abs()
                advance()
    finally:
        for h in hooks:
            h.remove()
    return head_acc, neuron_acc


def layer_scores(model: CanonicalTransformer, teacher, batches, labels_of, method: str) -> list[float]:
    """magnitude: mean relative change a layer makes; taylor: |g . (x_out - x_in)| summed over batches."""
    scores = np.zeros(len(model.layers))
    model.eval()
    for idx, inputs in batches:
        captured = []
        hooks = [layer.register_forward_hook(lambda m, args, out: captured.append((args[0], out)))
                 for layer in model.layers]
        try:
            if method == "taylor":
                loss = _task_loss(model, teacher, inputs, labels_of(idx))
                grads = torch.autograd.grad(loss, [out for _, out in captured])
                for i, ((x_in, x_out), g) in enumerate(zip(captured, grads)):
                    scores[i] += (g * (x_out - x_in)).sum().abs().item()
            else:
                with torch.no_grad():
                    model(*inputs)
                for i, (x_in, x_out) in enumerate(captured):
                    scores[i] += ((x_out - x_in).norm() / x_in.norm()).item()
        finally:
            for h in hooks:
                h.remove()
    return scores.tolist()


def _same_weights(a: CanonicalTransformer, b: CanonicalTransformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


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
        k = w - r
        k = max(round_to, int(round(k / round_to)) * round_to) if w >= round_to else w
        k = min(k, w)
        keep.append(sorted(torch.argsort(s, descending=True)[:k].tolist()))
    return keep


# -- the stage ------------------------------------------------------------------------------------------------

class Prune(Stage):
    name = "prune"
    summary = "structured pruning of layers, attention heads and FFN neurons (magnitude, taylor or accuracy)"
    Config = PruneConfig

    def apply(self, model: CanonicalTransformer, ctx: Context) -> CanonicalTransformer:
        cfg: PruneConfig = self.config
        calib, batches = _calibration(ctx, cfg.calibration_examples)

        def labels_of(idx):
            return torch.from_numpy(calib.labels[idx])

        teacher = ctx.teacher if model.classifier is None else None
        importance = cfg.importance
        if importance == "taylor" and model.classifier is None and _same_weights(model, ctx.teacher):
            # An embedding model pruned before any training is its own teacher: the loss and every gradient are
            # zero, so first-order scores would rank by position. Weight magnitude is the honest fallback.
            info("prune: taylor importance needs a loss the model does not already minimise (no classifier, "
                 "model == teacher); using magnitude instead")
            importance = "magnitude"
        if cfg.importance == "accuracy":
            self._accuracy_driven(model, ctx, cfg, batches, labels_of)
            return model
        n_layers = resolve(cfg.layers, len(model.layers))
        if n_layers:
            scores = layer_scores(model, teacher, batches, labels_of, importance)
            keep = sorted(np.argsort(scores)[n_layers:].tolist())
            info(f"prune: removing layers {sorted(set(range(len(model.layers))) - set(keep))} "
                 f"(scores {', '.join(f'{s:.3g}' for s in scores)})")
            model.keep_layers(keep)
        if cfg.heads or cfg.ffn:
            if importance == "taylor":
                head_s, neuron_s = taylor_scores(model, teacher, batches, labels_of)
            else:
                head_s, neuron_s = magnitude_scores(model)
            total_heads = sum(l.attn.heads for l in model.layers)
            for li, k in enumerate(select_heads(head_s, resolve(cfg.heads, total_heads))):
                model.keep_heads(li, k)
            total_neurons = sum(l.ffn.width for l in model.layers)
            for li, k in enumerate(select_neurons(neuron_s, resolve(cfg.ffn, total_neurons), cfg.round_to)):
                model.keep_neurons(li, k)
        return model

    def _accuracy_driven(self, model, ctx, cfg: PruneConfig, batches, labels_of) -> None:
        """AxFormer's greedy walk from the output side: delete, re-evaluate, keep if the loss does not rise."""
        teacher = ctx.teacher

        def val_loss() -> float:
            with torch.no_grad():
                return float(np.mean([float(_task_loss(model, teacher, x, labels_of(i))) for i, x in batches]))

        budget_layers = resolve(cfg.layers, len(model.layers)) if cfg.layers else math.inf
        total_heads = sum(l.attn.heads for l in model.layers)
        budget_heads = resolve(cfg.heads, total_heads) if cfg.heads else math.inf
        total_neurons = sum(l.ffn.width for l in model.layers)
        budget_neurons = resolve(cfg.ffn, total_neurons) if cfg.ffn else math.inf
        base = val_loss()
        log = []
        with progress_bar("prune (accuracy-driven)", len(model.layers)) as advance:
            for li in reversed(range(len(model.layers))):
                layer = model.layers[li]
                # 1. the whole layer
                if budget_layers > 0 and len(model.layers) > 1:
                    model.layers = torch.nn.ModuleList([l for j, l in enumerate(model.layers) if j != li])
                    loss = val_loss()
                    if loss <= base + cfg.tolerance:
                        base, budget_layers = loss, budget_layers - 1
                        log.append(("layer", li, loss))
                        advance()
                        continue
                    model.layers.insert(li, layer)
                # 2. heads, one at a time
                for h in reversed(range(layer.attn.heads)):
                    if budget_heads <= 0 or layer.attn.heads <= 1:
                        break
                    saved = layer.attn
                    trial = copy.deepcopy(saved)
                    trial.keep_heads([k for k in range(saved.heads) if k != h])
                    layer.attn = trial
                    loss = val_loss()
                    if loss <= base + cfg.tolerance:
                        base, budget_heads = loss, budget_heads - 1
                        log.append(("head", li, loss))
                    else:
                        layer.attn = saved
                # 3. neuron groups of `round_to`, least-magnitude first
                _, neuron_s = magnitude_scores(model)
                order = torch.argsort(neuron_s[li]).tolist()
                group = max(cfg.round_to, layer.ffn.width // 8)
                removed: set[int] = set()
                for g in range(0, len(order) - group, group):
                    if budget_neurons < group:
                        break
                    saved = layer.ffn
                    trial = copy.deepcopy(saved)
                    gone = removed | set(order[g:g + group])
                    trial.keep_neurons([k for k in range(saved.width) if k not in gone])
                    layer.ffn = trial
                    loss = val_loss()
                    layer.ffn = saved
                    if loss <= base + cfg.tolerance:
                        removed = gone
                        base, budget_neurons = loss, budget_neurons - group
                    else:
                        break
                if removed:
                    layer.ffn.keep_neurons([k for k in range(layer.ffn.width) if k not in removed])
                    log.append(("neurons", li, base))
                advance()
        info(f"prune (accuracy): {len(log)} deletions kept, calibration loss {base:.4f}")

