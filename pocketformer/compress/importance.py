"""Importance of a model's units (layers, attention heads, FFN neurons): plain functions that prune and matformer
rank by, and the calibration data and task loss they score on.

- magnitude: weight norms (a head: its q/k/v rows and out-projection columns; a neuron: fc1 row x fc2 column;
  a layer: the mean size of the change it makes to the hidden state on calibration data).
- taylor: first-order estimate of the loss change when the unit is removed, |dL/dgate| summed over calibration
  batches with a gate of ones on each head's context and each neuron's activation (GTSP / Michel et al.); a layer:
  |g . (x_out - x_in)|, removing the layer being x_out -> x_in.
The loss is the model's task loss: against the labels, or against the teacher's outputs where the task has none.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence

import numpy as np
import torch

from ..models.canonical import CanonicalTransformer
from ..progress import info, progress_bar
from .base import Context

# (inputs, labels) per calibration batch
Batches = list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]


def calibration_batches(ctx: Context, n: int) -> Batches:
    """The first `n` train examples, in (inputs, labels) batches of the run's batch size."""
    ds = ctx.train.head(n)
    return [(inputs, torch.from_numpy(ds.labels[idx])) for idx, inputs in ctx.encoder.batches(ds, ctx.batch_size)]


def task_loss(model: CanonicalTransformer, teacher: Optional[CanonicalTransformer], inputs, labels) -> torch.Tensor:
    """The model's task loss on one batch; the teacher runs only where the task's loss needs a reference."""
    task = model.task
    out = model(*inputs)
    reference = None
    if task.loss_needs_reference:
        with torch.no_grad():
            reference = teacher(*inputs)
    return task.loss(out, labels, reference)


def mean_task_loss(model: CanonicalTransformer, teacher: Optional[CanonicalTransformer], batches: Batches) -> float:
    with torch.no_grad():
        return float(np.mean([float(task_loss(model, teacher, inputs, labels)) for inputs, labels in batches]))


def same_weights(a: CanonicalTransformer, b: CanonicalTransformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def usable_importance(importance: str, model: CanonicalTransformer, teacher: CanonicalTransformer,
                      stage: str) -> str:
    """`importance`, or magnitude where taylor would measure nothing: a model whose loss is scored against a teacher
    it still equals (an embedding model compressed before any training) has zero loss and zero gradients, so
    first-order scores would rank units by position."""
    if importance == "taylor" and model.task.loss_needs_reference and same_weights(model, teacher):
        info(f"{stage}: taylor importance needs a loss the model does not already minimise (its {model.task.name} "
             "loss is measured against the original model, which it still equals); using magnitude instead")
        return "magnitude"
    return importance


# -- scorers ----------------------------------------------------------------------------------------------------

def head_magnitudes(attn) -> torch.Tensor:
    """Per head: the norm of its q/k/v rows and out-projection columns together."""
    d, per_head = attn.head_dim, []
    for h in range(attn.heads):  # weights only: no autograd needed
        rows = slice(h * d, (h + 1) * d)
        per_head.append(sum(getattr(attn, n).weight[rows].detach().norm().item() ** 2 for n in "qkv")
                        + attn.o.weight[:, rows].detach().norm().item() ** 2)
    return torch.tensor(per_head).sqrt()


def neuron_magnitudes(ffn) -> torch.Tensor:
    """Per FFN neuron: its fc1 row norm times its fc2 column norm."""
    return (ffn.fc1.weight.norm(dim=1) * ffn.fc2.weight.norm(dim=0)).detach() if ffn.width else torch.zeros(0)


def magnitude_scores(model: CanonicalTransformer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(per layer: head scores, per layer: neuron scores) from the weights alone."""
    return ([head_magnitudes(layer.attn) for layer in model.layers],
            [neuron_magnitudes(layer.ffn) for layer in model.layers])


@contextmanager
def gated(model: CanonicalTransformer, head_gates: Sequence[torch.Tensor], neuron_gates: Sequence[torch.Tensor]):
    """Multiply each head's context (per layer, a gate per head) and each FFN activation by the gates: the masks
    whose gradients taylor and Fisher importance read."""
    hooks = []
    for layer, hg, ng in zip(model.layers, head_gates, neuron_gates):
        d = layer.attn.head_dim

        def gate_heads(_m, args, hg=hg, d=d):
            x = args[0]
            return (x.reshape(*x.shape[:-1], -1, d) * hg[:, None]).reshape(x.shape)

        hooks.append(layer.attn.o.register_forward_pre_hook(gate_heads))
        hooks.append(layer.ffn.fc2.register_forward_pre_hook(lambda _m, args, ng=ng: args[0] * ng))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def taylor_scores(model: CanonicalTransformer, teacher, batches: Batches) -> tuple[list, list]:
    """|dL/dgate| accumulated over batches, gates of ones on each head's context and each FFN activation."""
    head_gates = [torch.ones(l.attn.heads, requires_grad=True) for l in model.layers]
    neuron_gates = [torch.ones(l.ffn.width, requires_grad=True) for l in model.layers]
    head_acc = [torch.zeros_like(g) for g in head_gates]
    neuron_acc = [torch.zeros_like(g) for g in neuron_gates]
    model.eval()
    with gated(model, head_gates, neuron_gates), progress_bar("importance (taylor)", len(batches)) as advance:
        for inputs, labels in batches:
            loss = task_loss(model, teacher, inputs, labels)
            grads = torch.autograd.grad(loss, head_gates + neuron_gates, allow_unused=True)
            for acc, g in zip(head_acc + neuron_acc, grads):
                if g is not None:
                    acc += g.abs()
            advance()
    return head_acc, neuron_acc


def layer_scores(model: CanonicalTransformer, teacher, batches: Batches, method: str) -> list[float]:
    """magnitude: mean relative change a layer makes; taylor: |g . (x_out - x_in)| summed over batches."""
    scores = np.zeros(len(model.layers))
    model.eval()
    for inputs, labels in batches:
        captured = []
        hooks = [layer.register_forward_hook(lambda m, args, out: captured.append((args[0], out)))
                 for layer in model.layers]
        try:
            if method == "taylor":
                loss = task_loss(model, teacher, inputs, labels)
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
