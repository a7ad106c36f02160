"""Retraining-free structured pruning to a latency budget: Kwon et al. 2022, "A Fast Post-Training Pruning Framework
for Transformers" (code: github.com/WoosukKwon/retraining-free-pruning), for the canonical model, on a CPU, with
no gradient step on the model's weights.

1. Fisher importance of masks: a gate of ones on each head's context (the input of `attn.o`) and on each FFN
   activation (the input of `ffn.fc2`); per calibration batch the gradient of the task loss with respect to the
   gates alone (weights frozen, so no weight gradient is computed). The diagonal Fisher of a unit is the sum of its
   squared per-batch gradients; heads and neurons are ranked on it together, unnormalised as Kwon's code does: both
   estimate the same loss's change when the unit goes, so they are already in one unit. A model scored against a
   teacher it still equals (an embedding model before any training) has zero loss and zero gradients: squared
   weight magnitudes are used instead, each kind scaled to sum to 1 (magnitudes of heads and of neurons are not in
   one unit), and the details say so.
2. Search: per layer, how many heads and FFN neurons to keep (each layer keeping its most important ones) so that
   the retained Fisher is largest and the latency table's prediction meets the budget. The objective is a sum over
   (layer, block) and so is the cost, a multiple-choice knapsack, solved exactly by dynamic programming on a grid of
   the budget (costs rounded up to the grid, so the answer always fits). Kwon's MAC search scans the number of heads
   over a global sort, which is exact only when every head and every neuron costs the same; their latency search
   adds a heuristic enumeration of layers to drop for a fitted "constant then linear" cost. Our table's curves are
   any piecewise-linear function per layer, and the program takes them as they are, a layer's fixed cost
   (`layer_ms`) included, which it saves when both counts of a layer are 0 and the model may lose layers.
3. Rearrangement (Kwon's greedy_rearrange): within a layer, with the counts fixed, units are swapped greedily to
   lower (1-m)^T F (1-m), F the layer's block of the empirical Fisher (the pruned units' gradients summed per batch,
   squared); never raises it. Then layer-wise least squares, layer by layer from the input side, each layer's inputs
   the already-tuned student's: the attention block's output is fitted to (the reference's residual stream after
   attention, before a post-LN norm) minus the student's residual input, and likewise the FFN block, on the real
   tokens of the calibration batches (the class token alone in the last layer of a class-token-pooled model, as
   Kwon's cls_only). Two tunings: Kwon's one scalar per kept head / neuron (folded into the o-projection / fc2
   columns) and a ridge refit of the kept output weights and bias; per block, the one with the lowest error on
   held-out batches (every 5th) is kept, or none. Only X^T X and X^T Y are accumulated, so memory stays small.
   The reference is the model before pruning; the student's layers correspond to its layers by index (by a map,
   once layers are removed).
4. A layer left with no heads and no neurons is removed if the calibration task loss does not rise, or if the
   budget needs it (the search counted on it); never from a model with early exits. The layers after a removed one
   were fitted with it in place, so they are fitted again to the inputs they now get.

Every pass runs on the calibration examples regrouped by length (`by_length`): text batches of mixed lengths are
mostly padding, which a CPU would otherwise compute on. `prune_to_latency` prunes a deep copy; the model given is
left as it was (it is the reconstruction reference).
"""

from __future__ import annotations

import copy
import math
from collections import Counter
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import RecipeError
from ..latency import LatencyTable
from ..models.canonical import CanonicalTransformer, Layer, attention_bias
from ..progress import info, progress_bar
from .importance import (Batches, gated, head_magnitudes, mean_task_loss, neuron_magnitudes, same_weights,
                         task_loss)

Tuning = Literal["auto", "none", "mask", "weights"]
# Ridge strengths tried for each tuning, relative to the mean diagonal of its normal equations.
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)
HOLD_OUT_EVERY = 5  # every 5th calibration batch chooses the tuning of each block
CHOICE_MARGIN = 1e-6  # relative: a held-out error lower by less than this is a tie, and the simpler tuning wins
# ... and so is one lower by less than this share of the target's mean square: the statistics are accumulated in
# float32 before float64, so errors of a block already at its target (an unpruned layer, ~1e-9) differ by rounding
# alone (measured: "full" won by 5e-4 relative at an error of 1e-9 and rewrote an unpruned layer's weights).
NOISE_FLOOR = 1e-6
SEARCH_BINS = 4096  # grid of the latency budget the search rounds costs up to


# -- 1. Fisher importance of masks ----------------------------------------------------------------------------------

@dataclass
class MaskGrads:
    """Per-batch gradients of the task loss w.r.t. gates of ones: per layer, (batches, heads) and (batches, neurons)."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]

    def fisher(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Diagonal empirical Fisher per layer: squared gradients summed over batches."""
        return [g.double().pow(2).sum(0) for g in self.heads], [g.double().pow(2).sum(0) for g in self.neurons]

    def all_zero(self) -> bool:
        return all(not g.any() for g in self.heads + self.neurons)


@contextmanager
def frozen_weights(model: nn.Module):
    """Every parameter's requires_grad off for the duration (so backward computes no weight gradient), then back."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def mask_grads(model: CanonicalTransformer, teacher: Optional[CanonicalTransformer], batches: Batches) -> MaskGrads:
    """Gradients of the task loss w.r.t. head and neuron gates of ones, one row per calibration batch."""
    head_gates = [torch.ones(layer.attn.heads, requires_grad=True) for layer in model.layers]
    neuron_gates = [torch.ones(layer.ffn.width, requires_grad=True) for layer in model.layers]
    rows: list[list[torch.Tensor]] = [[] for _ in range(2 * len(model.layers))]
    model.eval()
    with frozen_weights(model), gated(model, head_gates, neuron_gates), \
            progress_bar("retraining-free: mask gradients", len(batches)) as advance:
        for inputs, labels in batches:
            loss = task_loss(model, teacher, inputs, labels)
            gates = head_gates + neuron_gates
            grads = torch.autograd.grad(loss, gates, allow_unused=True) if loss.requires_grad else [None] * len(gates)
            for acc, g, gate in zip(rows, grads, gates):
                acc.append(torch.zeros_like(gate) if g is None else g.detach().clone())
            advance()
    stacked = [torch.stack(r) if r else torch.zeros(0, 0) for r in rows]
    n = len(model.layers)
    return MaskGrads(stacked[:n], stacked[n:])


def magnitude_importance(model: CanonicalTransformer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Squared weight magnitudes, heads and neurons each scaled to sum to 1 over the model."""
    heads = [head_magnitudes(layer.attn).pow(2).double() for layer in model.layers]
    neurons = [neuron_magnitudes(layer.ffn).pow(2).double() for layer in model.layers]
    for scores in (heads, neurons):
        total = float(sum(s.sum() for s in scores)) or 1.0
        scores[:] = [s / total for s in scores]
    return heads, neurons


# -- 2. the search --------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What the search chose, per layer: heads and FFN neurons kept; `removed` the layers it emptied and counted as
    removed (their layer_ms saved)."""

    heads: list[int]
    neurons: list[int]
    removed: list[bool]
    importance: float  # retained importance
    predicted_ms: float

    def shapes(self) -> list[tuple[int, int]]:
        """(heads, neurons) of the layers the plan keeps: what the table predicts from."""
        return [(h, w) for h, w, gone in zip(self.heads, self.neurons, self.removed) if not gone]


def retained_importance(head_scores, neuron_scores, heads: Sequence[int], neurons: Sequence[int]) -> float:
    """Importance kept when each layer keeps its `heads[i]` / `neurons[i]` highest-scoring units."""
    return float(sum(_prefix_sums(s)[k] for s, k in zip(list(head_scores) + list(neuron_scores),
                                                        list(heads) + list(neurons))))


def ffn_widths(width: int, round_to: int) -> list[int]:
    """Widths a layer of `width` neurons may keep: multiples of round_to, and its whole width (left as it is)."""
    return sorted(set(range(0, width + 1, round_to)) | {width})


def search(head_scores: Sequence[torch.Tensor], neuron_scores: Sequence[torch.Tensor], table: LatencyTable,
           budget_ms: float, *, round_to: int = 8, removable: bool = True, bins: int = SEARCH_BINS) -> Plan:
    """Heads and neurons to keep per layer, the most important of each layer, maximising the retained importance
    with table.predict(shapes) <= budget_ms. Exact up to the grid: costs are rounded up to bins of budget / bins.
    `removable`: a layer left with no heads and no neurons is removed, saving its layer_ms."""
    n_layers = len(head_scores)
    scale, offset = table.calibration.scale, table.calibration.offset_ms
    full = [(len(h), len(w)) for h, w in zip(head_scores, neuron_scores)]
    head_opts = [list(range(len(s) + 1)) for s in head_scores]
    neuron_opts = [ffn_widths(len(s), round_to) for s in neuron_scores]
    head_cost = [np.array([table.attention(h) for h in opts]) for opts in head_opts]
    neuron_cost = [np.array([table.ffn(w) for w in opts]) for opts in neuron_opts]
    head_value = [_prefix_sums(s)[opts] for s, opts in zip(head_scores, head_opts)]
    neuron_value = [_prefix_sums(s)[opts] for s, opts in zip(neuron_scores, neuron_opts)]

    # The budget in uncalibrated ms of the layers, after the embeddings and head (and, for layers that stay, their
    # fixed cost).
    cap = (budget_ms - offset) / scale - table.base_ms - (0.0 if removable else n_layers * table.layer_ms)
    least = 0.0 if removable else sum(c.min() for c in head_cost) + sum(c.min() for c in neuron_cost)
    if cap < least - 1e-9:
        floor = scale * (table.base_ms + (0 if removable else n_layers * table.layer_ms) + least) + offset
        what = ("its embeddings and head alone take" if removable else
                f"with its {n_layers} layers emptied (layers cannot be removed: the model has early exits) it takes")
        raise RecipeError(f"The latency budget of {budget_ms:.2f} ms cannot be met on {table.target}: {what} "
                          f"{floor:.2f} ms.", f"raise the budget to at least {floor:.2f} ms (the unpruned model "
                                              f"takes {table.predict(full):.2f} ms), or use a faster target.")
    if table.predict(full) <= budget_ms:  # nothing to remove
        heads, neurons = [h for h, _ in full], [w for _, w in full]
        return Plan(heads, neurons, [False] * n_layers,
                    retained_importance(head_scores, neuron_scores, heads, neurons), table.predict(full))

    step = max(cap, 1e-12) / bins

    def to_bins(ms):  # rounded up, so whatever the grid fits, the table fits
        return np.maximum(np.ceil(np.asarray(ms, float) / step - 1e-9), 0).astype(np.int64)

    layer_bins = int(to_bins(table.layer_ms)) if removable else 0
    # value[c]: the most importance layers so far can keep within c bins; one (layer, block) at a time.
    value = np.zeros(bins + 1)
    trail = []
    for li in range(n_layers):
        after_heads, head_pick = _add_group(value, to_bins(head_cost[li]), head_value[li])
        after_ffn, neuron_pick = _add_group(after_heads, to_bins(neuron_cost[li]), neuron_value[li])
        if removable:
            kept = _shifted(after_ffn, layer_bins)
            gone = value >= kept  # an emptied layer is better removed: same importance, less latency
            value = np.where(gone, value, kept)
        else:
            gone = np.zeros(bins + 1, bool)
            value = after_ffn
        trail.append((head_pick, neuron_pick, gone))
    if not np.isfinite(value[bins]):  # only when the budget is within rounding of the least possible latency
        raise RecipeError(f"The latency budget of {budget_ms:.2f} ms is within rounding of the least latency the "
                          f"model can have on {table.target}.", "raise the budget a little.")

    heads, neurons, removed = [0] * n_layers, [0] * n_layers, [False] * n_layers
    c = bins
    for li in reversed(range(n_layers)):
        head_pick, neuron_pick, gone = trail[li]
        if gone[c]:
            removed[li] = True
            continue
        c -= layer_bins
        j = neuron_pick[c]
        neurons[li] = neuron_opts[li][j]
        c -= int(to_bins(neuron_cost[li][j]))
        i = head_pick[c]
        heads[li] = head_opts[li][i]
        c -= int(to_bins(head_cost[li][i]))
    plan = Plan(heads, neurons, removed, retained_importance(head_scores, neuron_scores, heads, neurons), 0.0)
    plan.predicted_ms = table.predict(plan.shapes())
    return plan


def _prefix_sums(scores) -> np.ndarray:
    """[0, best 1, best 2, ...]: the importance kept by keeping the k highest scores."""
    s = np.sort(np.asarray(torch.as_tensor(scores, dtype=torch.float64)))[::-1]
    return np.concatenate([[0.0], np.cumsum(s)])


def _shifted(value: np.ndarray, k: int) -> np.ndarray:
    out = np.full_like(value, -np.inf)
    if k < len(value):
        out[k:] = value[:len(value) - k]
    return out


def _add_group(value: np.ndarray, costs: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """new[c] = max_j value[c - costs[j]] + values[j], and the j that achieves it."""
    best = np.full_like(value, -np.inf)
    pick = np.zeros(len(value), np.int64)
    for j, (k, v) in enumerate(zip(costs, values)):
        candidate = _shifted(value, int(k)) + v
        better = candidate > best
        best[better] = candidate[better]
        pick[better] = j
    return best, pick


# -- 3a. rearrangement ----------------------------------------------------------------------------------------------

def pruned_fisher(grads: torch.Tensor, keep: Sequence[int]) -> float:
    """(1-m)^T F (1-m) for the mask keeping `keep`, F = sum over batches of g g^T (grads: batches x units)."""
    pruned = torch.ones(grads.shape[1], dtype=torch.bool)
    pruned[list(keep)] = False
    return float(grads[:, pruned].double().sum(1).pow(2).sum())


def most_important(scores: torch.Tensor, n_keep: int) -> list[int]:
    """The `n_keep` units of highest score, sorted (ties: the later unit kept)."""
    order = torch.argsort(torch.as_tensor(scores), stable=True).tolist()
    return sorted(order[len(order) - n_keep:])


def rearrange(grads: torch.Tensor, n_keep: int) -> tuple[list[int], int]:
    """Units to keep of one layer's heads or neurons (grads: batches x units), `n_keep` of them: start from the
    highest diagonal Fisher, then Kwon's greedy swaps. Each unit kept by the start joins the pruned set in turn, from
    the least important, and the pruned unit whose return lowers (1-m)^T F (1-m) most goes back; the newcomer
    itself may go back, so the objective never rises. Returns the units kept (sorted) and how many differ from
    the start."""
    units = grads.shape[1]
    order = torch.argsort(grads.double().pow(2).sum(0), stable=True).tolist()  # least important first
    n_pruned = units - n_keep
    start = most_important(grads.double().pow(2).sum(0), n_keep)
    if n_keep == 0 or n_pruned == 0:
        return start, 0
    g = grads.double().T.contiguous()  # units x batches
    pruned = list(order[:n_pruned])
    total = g[pruned].sum(0)
    for unit in order[n_pruned:]:
        pruned.append(unit)
        total = total + g[unit]
        vecs = g[pruned]
        # |total - g_r|^2 for every r of the candidate set: the objective if r goes back to the kept units
        after = (total - vecs).pow(2).sum(1)
        r = int(torch.argmin(after))
        total = total - vecs[r]
        del pruned[r]
    kept = sorted(set(range(units)) - set(pruned))
    return kept, len(set(kept) - set(start))


# -- 3b. layer-wise least squares -----------------------------------------------------------------------------------

@dataclass
class NormalEquations:
    """X^T X, X^T Y and |Y|^2 of one block's fit, X = [block input, 1], Y = the target of its output; float64."""

    xtx: torch.Tensor
    xty: torch.Tensor
    yy: float = 0.0
    rows: int = 0

    @classmethod
    def empty(cls, n_in: int, n_out: int) -> "NormalEquations":
        return cls(torch.zeros(n_in + 1, n_in + 1, dtype=torch.float64),
                   torch.zeros(n_in + 1, n_out, dtype=torch.float64))

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not len(x):
            return
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        self.xtx += (x.T @ x).double()
        self.xty += (x.T @ y).double()
        self.yy += float(y.double().pow(2).sum())
        self.rows += len(x)

    def __add__(self, other: "NormalEquations") -> "NormalEquations":
        return NormalEquations(self.xtx + other.xtx, self.xty + other.xty, self.yy + other.yy, self.rows + other.rows)

    def error(self, theta: torch.Tensor) -> float:
        """Mean squared error per output element of X theta against Y (theta: (n_in + 1) x n_out)."""
        sse = float((theta * (self.xtx @ theta)).sum() - 2 * (theta * self.xty).sum()) + self.yy
        return max(sse, 0.0) / max(self.rows * self.xty.shape[1], 1)


def _scalar_fit(stats: NormalEquations, theta0: torch.Tensor, group: int, ridge: float) -> Optional[torch.Tensor]:
    """Kwon's tuning: one scalar per unit (a head's `group` input columns, or one neuron) multiplying its output
    weights, the bias fixed; least squares with a ridge pulling the scalars to 1. Returns the scaled theta."""
    n = theta0.shape[0] - 1
    wt, bias = theta0[:n], theta0[n:]
    units = n // group
    gram = (stats.xtx[:n, :n] * (wt @ wt.T)).reshape(units, group, units, group).sum((1, 3))
    residual = stats.xty[:n] - stats.xtx[:n, n:] @ bias  # X^T (Y - 1 b^T)
    rhs = (wt * residual).sum(1).reshape(units, group).sum(1)
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    try:
        delta = torch.linalg.solve(gram + lam * torch.eye(units, dtype=gram.dtype), rhs - gram.sum(1))
    except RuntimeError:
        return None
    scales = 1.0 + delta
    if not torch.isfinite(scales).all():
        return None
    return torch.cat([wt * scales.repeat_interleave(group)[:, None], bias])


def _full_fit(stats: NormalEquations, theta0: torch.Tensor, ridge: float) -> Optional[torch.Tensor]:
    """Least-squares refit of the output weights and bias, with a ridge pulling them to the current ones."""
    n = theta0.shape[0] - 1
    diag = stats.xtx.diagonal()
    lam = ridge * float(diag[:n].mean() if n else diag[n]) + 1e-12
    eye = torch.eye(n + 1, dtype=torch.float64)
    try:
        theta = torch.linalg.solve(stats.xtx + lam * eye, stats.xty + lam * theta0)
    except RuntimeError:
        return None
    return theta if torch.isfinite(theta).all() else None


def fit_block(linear: nn.Module, fit: NormalEquations, held: NormalEquations, group: int, mode: Tuning = "auto",
              ridges: Sequence[float] = RIDGES) -> dict[str, Any]:
    """Tune one block's output linear (attn.o or ffn.fc2) in place from its normal equations: for each tuning, the
    ridge with the lowest held-out error; then `mode` (auto: the lowest held-out error of none, scalar and full)
    refitted on all the tokens. Returns what was chosen and the held-out errors."""
    record: dict[str, Any] = {"choice": "none", "tokens": {"fit": fit.rows, "held_out": held.rows}}
    if not isinstance(linear, nn.Linear) or linear.bias is None:
        record["reason"] = "the output linear is factorized (or has no bias): not tuned"
        return record
    theta0 = torch.cat([linear.weight.detach().T, linear.bias.detach()[None]]).double()
    n = theta0.shape[0] - 1
    errors: dict[str, float] = {"none": held.error(theta0)}
    ridge_of: dict[str, float] = {}
    kinds = {"auto": ("scalar", "full"), "mask": ("scalar",), "weights": ("full",), "none": ()}[mode]
    for kind in kinds:
        if kind == "scalar" and n == 0:
            continue
        for ridge in ridges:
            theta = _scalar_fit(fit, theta0, group, ridge) if kind == "scalar" else _full_fit(fit, theta0, ridge)
            if theta is None:
                continue
            err = held.error(theta)
            if kind not in errors or err < errors[kind]:
                errors[kind], ridge_of[kind] = err, ridge
    if mode == "auto":  # from the simplest on, a tuning must beat what comes before it beyond rounding
        choice = "none"
        floor = NOISE_FLOOR * held.yy / max(held.rows * held.xty.shape[1], 1)
        for kind in ("scalar", "full"):
            if kind in errors and errors[kind] < errors[choice] * (1 - CHOICE_MARGIN) - floor:
                choice = kind
    else:
        wanted = {"mask": "scalar", "weights": "full", "none": "none"}[mode]
        choice = wanted if wanted in errors else "none"
    record.update(errors=errors, choice=choice)
    if choice != "none":
        every = fit + held
        theta = (_scalar_fit(every, theta0, group, ridge_of[choice]) if choice == "scalar" else
                 _full_fit(every, theta0, ridge_of[choice]))
        if theta is None:  # solvable on the fit part but not on all of it: keep the weights
            record.update(choice="none", reason="the refit on all tokens was singular")
            return record
        with torch.no_grad():
            linear.weight.copy_(theta[:n].T.to(linear.weight.dtype))
            linear.bias.copy_(theta[n].to(linear.bias.dtype))
        record["ridge"] = ridge_of[choice]
    return record


# Layer.forward in steps: post-LN  mid = ln1(x + attn(x)),        out = ln2(mid + ffn(mid));
#                          pre-LN  mid = x + attn(ln1(x)),        out = mid + ffn(ln2(mid)).
def _attention_input(layer: Layer, x):
    return layer.ln1(x) if layer.pre_norm else x


def _after_attention(layer: Layer, total):
    return total if layer.pre_norm else layer.ln1(total)


def _ffn_input(layer: Layer, mid):
    return layer.ln2(mid) if layer.pre_norm else mid


def _after_ffn(layer: Layer, total):
    return total if layer.pre_norm else layer.ln2(total)


@contextmanager
def _captured_input(linear: nn.Module, into: list):
    hook = linear.register_forward_pre_hook(lambda _m, args: into.append(args[0]))
    try:
        yield
    finally:
        hook.remove()


@dataclass
class _Batch:
    """One calibration batch on its way through the layers: the student's and the reference's residual streams."""

    student: torch.Tensor  # the input of the layer being tuned (batch x tokens x hidden)
    reference: torch.Tensor
    mask_add: Optional[torch.Tensor]
    real: torch.Tensor  # flat indices of the real (unpadded) tokens
    first: torch.Tensor  # flat indices of each example's first token
    held_out: torch.Tensor  # flat bool over all tokens: held out to choose the tuning
    student_mid: Optional[torch.Tensor] = None  # after the layer's attention block
    reference_mid: Optional[torch.Tensor] = None
    block_input: Optional[torch.Tensor] = None  # the input of the output linear of the block being tuned


def _held_out_batches(n: int) -> set[int]:
    """Every HOLD_OUT_EVERY-th batch; with fewer, the last; with one batch, none (its tokens are split instead)."""
    if n >= HOLD_OUT_EVERY:
        return {b for b in range(n) if b % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1}
    return {n - 1} if n >= 2 else set()


def tune_layers(student: CanonicalTransformer, reference: CanonicalTransformer, batches: Batches,
                mode: Tuning = "auto", *, kept: Optional[Sequence[int]] = None, tune_from: int = 0,
                ridges: Sequence[float] = RIDGES) -> list[dict[str, Any]]:
    """Layer-wise least-squares tuning of a pruned `student` against the unpruned `reference`, in place, layer by
    layer from the input side, each layer fed the already-tuned student's outputs. `kept[j]` is the reference layer
    student layer j stands for (default: the same index); a reference layer no student layer stands for was removed,
    and the next student layer's fit makes up for it as it can. Layers before reference layer `tune_from` are run,
    not tuned. Returns one record per block tuned (reference layer, block, choice, held-out error of each tuning)."""
    kept = list(range(len(student.layers))) if kept is None else list(kept)
    if len(kept) != len(student.layers):
        raise ValueError(f"kept names {len(kept)} reference layers for {len(student.layers)} student layers")
    student.eval()
    reference.eval()
    held_batches = _held_out_batches(len(batches))
    states: list[_Batch] = []
    with torch.no_grad():
        for b, (inputs, _) in enumerate(batches):
            x = reference.embed(*inputs)
            mask = reference.attention_mask(inputs)
            n_tok = x.shape[0] * x.shape[1]
            real = (mask.reshape(-1) > 0).nonzero().squeeze(1) if mask is not None else torch.arange(n_tok)
            if b in held_batches:
                held = torch.ones(n_tok, dtype=torch.bool)
            elif len(batches) == 1:
                held = torch.arange(n_tok) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
            else:
                held = torch.zeros(n_tok, dtype=torch.bool)
            states.append(_Batch(student.embed(*inputs), x,
                                 attention_bias(mask, x.dtype) if mask is not None else None, real,
                                 torch.arange(x.shape[0]) * x.shape[1], held))
    records: list[dict[str, Any]] = []
    # The last layer of a class-token-pooled model matters at the class token alone (Kwon's cls_only).
    cls_only = student.spec.head.pooling == "cls"
    with progress_bar("retraining-free: least-squares tuning", len(reference.layers)) as advance:
        for r, r_layer in enumerate(reference.layers):
            j = kept.index(r) if r in kept else None
            if j is None or r < tune_from:  # run, not tuned
                with torch.no_grad():
                    for st in states:
                        st.reference = r_layer(st.reference, st.mask_add)
                        if j is not None:
                            st.student = student.layers[j](st.student, st.mask_add)
            else:
                last = cls_only and j == len(student.layers) - 1
                records += [{"layer": r, **record}
                            for record in _tune_layer(student.layers[j], r_layer, states, last, mode, ridges)]
            advance()
    return records


def _tune_layer(s_layer: Layer, r_layer: Layer, states: list[_Batch], cls_only: bool, mode: Tuning,
                ridges: Sequence[float]) -> list[dict[str, Any]]:
    """Tune one student layer's attention, then (on the tuned attention's outputs) its FFN; move every batch's
    student and reference streams past the layer. Each block's input is kept from its first pass, so the second
    (after its output linear is tuned) runs that linear alone."""
    rows_of = (lambda st: st.first) if cls_only else (lambda st: st.real)
    hidden = s_layer.ln1.normalized_shape[0]
    o, fc2 = s_layer.attn.o, s_layer.ffn.fc2
    # attention: the student's x + attn(x) to match the reference's, before a post-LN norm
    fit, held = (NormalEquations.empty(o.in_features, hidden) for _ in range(2))
    with torch.no_grad():
        for st in states:
            total = st.reference + r_layer.attn(_attention_input(r_layer, st.reference), st.mask_add)
            st.reference_mid = _after_attention(r_layer, total)
            seen: list = []
            with _captured_input(o, seen):
                s_layer.attn(_attention_input(s_layer, st.student), st.mask_add)
            st.block_input = seen[0] if seen else None  # none: no heads left, the block is its bias
            _accumulate(fit, held, st, rows_of(st), total - st.student)
    records = [{"block": "attention", **fit_block(o, fit, held, s_layer.attn.head_dim, mode, ridges)}]
    # FFN: the student's mid + ffn(mid) to match the reference's
    fit, held = (NormalEquations.empty(fc2.in_features, hidden) for _ in range(2))
    with torch.no_grad():
        for st in states:
            attended = o(st.block_input) if st.block_input is not None else o.bias.expand_as(st.student)
            st.student_mid = _after_attention(s_layer, st.student + attended)
            total = st.reference_mid + r_layer.ffn(_ffn_input(r_layer, st.reference_mid))
            st.reference = _after_ffn(r_layer, total)
            seen = []
            with _captured_input(fc2, seen):
                s_layer.ffn(_ffn_input(s_layer, st.student_mid))
            st.block_input = seen[0] if seen else None
            _accumulate(fit, held, st, rows_of(st), total - st.student_mid)
    records.append({"block": "ffn", **fit_block(fc2, fit, held, 1, mode, ridges)})
    with torch.no_grad():
        for st in states:
            fed = fc2(st.block_input) if st.block_input is not None else fc2.bias.expand_as(st.student_mid)
            st.student = _after_ffn(s_layer, st.student_mid + fed)
            st.student_mid = st.reference_mid = st.block_input = None
    return records


def _accumulate(fit: NormalEquations, held: NormalEquations, st: _Batch, rows: torch.Tensor, target: torch.Tensor):
    """Rows `rows` of one batch into the fit or held-out normal equations: the block's input (none when the block
    has no units left: only its bias remains) and the target of its output."""
    n_out = target.shape[-1]
    y = target.reshape(-1, n_out)[rows]
    x = st.block_input
    x = x.reshape(-1, x.shape[-1])[rows] if x is not None else torch.zeros(len(rows), 0, dtype=y.dtype)
    out = st.held_out[rows]
    held.add(x[out], y[out])
    fit.add(x[~out], y[~out])


# -- 4. whole layers ------------------------------------------------------------------------------------------------

def remove_empty_layers(model: CanonicalTransformer, teacher: Optional[CanonicalTransformer], batches: Batches,
                        table: LatencyTable, budget_ms: float) -> list[dict[str, Any]]:
    """Remove, in place, layers with no heads and no FFN neurons: each (from the output side) whose removal does
    not raise the calibration task loss, then, while the model is over budget, the rest by least loss rise (the
    search counted on them). Never from a model with early exits. Returns a record per empty layer."""
    empty = [i for i, layer in enumerate(model.layers) if layer.attn.heads == 0 and layer.ffn.width == 0]
    if not empty:
        return []
    if model.spec.exits:
        info(f"retraining-free: keeping the empty layers {empty}: the model has early exits after layers "
             f"{model.spec.exits}, placed by index")
        return [{"layer": i, "removed": False, "reason": "early exits"} for i in empty]
    alive = list(range(len(model.layers)))  # original index of each current layer
    loss = mean_task_loss(model, teacher, batches)
    records: dict[int, dict[str, Any]] = {}
    for i in reversed(empty):
        trial = copy.deepcopy(model)
        trial.keep_layers([j for j in range(len(alive)) if alive[j] != i])
        trial_loss = mean_task_loss(trial, teacher, batches)
        removed = trial_loss <= loss
        records[i] = {"layer": i, "removed": removed, "loss_before": loss, "loss_after": trial_loss,
                      "reason": "the calibration loss did not rise" if removed else "the calibration loss rose"}
        if removed:
            model.keep_layers([j for j in range(len(alive)) if alive[j] != i])
            alive.remove(i)
            loss = trial_loss
    for i in sorted((i for i in empty if not records[i]["removed"]),
                    key=lambda i: records[i]["loss_after"] - records[i]["loss_before"]):
        if table.predict(layer_shapes(model)) <= budget_ms:
            break
        model.keep_layers([j for j in range(len(alive)) if alive[j] != i])
        alive.remove(i)
        records[i].update(removed=True, reason="the latency budget needs it (the calibration loss rose)")
    return [records[i] for i in empty]


def layer_shapes(model: CanonicalTransformer) -> list[tuple[int, int]]:
    """(heads, FFN neurons) of each layer: what a latency table predicts from."""
    return [(layer.attn.heads, layer.ffn.width) for layer in model.layers]


# -- the whole method -----------------------------------------------------------------------------------------------

def by_length(model: CanonicalTransformer, batches: Batches) -> Batches:
    """The same examples in batches of the same size, sorted by length and each cut to its longest: far fewer pad
    tokens for every pass below to compute on (inputs without a sequence axis: unchanged)."""
    io = model.io
    if not io.has_axis("sequence") or len(batches) < 2 or model.attention_mask(batches[0][0]) is None:
        return batches
    size = len(batches[0][1])
    longest = max(model.attention_mask(inputs).shape[1] for inputs, _ in batches)
    inputs = [torch.cat(parts) for parts in zip(*(io.fit(b, {"sequence": longest}) for b, _ in batches))]
    labels = torch.cat([labels for _, labels in batches])
    lengths = model.attention_mask(tuple(inputs)).sum(1)
    order = torch.argsort(lengths, stable=True)
    out = []
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        chunk = tuple(t[idx] for t in inputs)
        out.append((io.fit(chunk, {"sequence": max(int(lengths[idx].max()), 1)}), labels[idx]))
    return out



def apply_masks(model: CanonicalTransformer, plan: Plan, head_scores, neuron_scores,
                grads: Optional[MaskGrads]) -> list[dict[str, Any]]:
    """Keep, in place, the plan's count of heads and neurons in each layer: with gradients, the units Kwon's
    rearrangement picks; without, the highest-scoring. Returns per layer the swaps made and (1-m)^T F (1-m) before
    and after them."""
    records = []
    for li, (h, w) in enumerate(zip(plan.heads, plan.neurons)):
        record: dict[str, Any] = {"layer": li}
        for kind, n_keep, scores, unit_grads, keep_units in (
                ("heads", h, head_scores[li], grads.heads[li] if grads else None, model.keep_heads),
                ("ffn", w, neuron_scores[li], grads.neurons[li] if grads else None, model.keep_neurons)):
            if unit_grads is not None:
                keep, swaps = rearrange(unit_grads, n_keep)
                record[kind] = {"kept": n_keep, "swaps": swaps,
                                "pruned_fisher": [pruned_fisher(unit_grads, most_important(scores, n_keep)),
                                                  pruned_fisher(unit_grads, keep)]}
            else:
                keep = most_important(scores, n_keep)
                record[kind] = {"kept": n_keep, "swaps": 0}
            if len(keep) != len(scores):
                keep_units(li, keep)
        records.append(record)
    return records


def prune_to_latency(model: CanonicalTransformer, teacher: Optional[CanonicalTransformer], batches: Batches,
                     table: LatencyTable, budget_ms: float, *, round_to: int = 8, tune: Tuning = "auto"
                     ) -> tuple[CanonicalTransformer, dict[str, Any]]:
    """A copy of `model` pruned to table.predict(...) <= budget_ms without retraining (Kwon et al. 2022): Fisher
    importance of masks, an exact search of per-layer counts, rearranged masks, layer-wise least-squares tuning
    (`tune`: auto chooses per block on held-out tokens; none; mask, Kwon's scalars; weights, a ridge refit), then
    empty layers removed. `teacher` is what the task loss compares with where the task has no labels; `model` is
    left unchanged and is the reference each pruned layer is fitted to. Returns the model and JSON-able details."""
    if not batches:
        raise RecipeError("Retraining-free pruning needs calibration batches, and got none.",
                          "give it at least one batch of train examples.")
    seconds: dict[str, float] = {}
    start = clock = time.perf_counter()
    batches = by_length(model, batches)

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now

    before = layer_shapes(model)
    latency_before = table.predict(before)
    # 1. importance
    grads: Optional[MaskGrads] = None
    if model.task.loss_needs_reference and teacher is not None and same_weights(model, teacher):
        note = (f"its {model.task.name} loss is measured against the original model, which it still equals: zero "
                "loss, zero gradients")
    else:
        grads = mask_grads(model, teacher, batches)
        note = "every mask gradient is zero" if grads.all_zero() else ""
    if note:
        info(f"retraining-free: Fisher importance needs a loss the model does not already minimise ({note}); "
             "ranking by squared weight magnitudes instead")
        head_scores, neuron_scores = magnitude_importance(model)
        importance = "magnitude"
        grads = None
    else:
        head_scores, neuron_scores = grads.fisher()
        importance = "fisher"
    lap("importance")
    # 2. search
    removable = not model.spec.exits
    plan = search(head_scores, neuron_scores, table, budget_ms, round_to=round_to, removable=removable)
    info(f"retraining-free: {latency_before:.2f} ms -> {plan.predicted_ms:.2f} ms predicted on {table.target} "
         f"(budget {budget_ms:.2f}); heads {plan.heads}, FFN {plan.neurons}")
    lap("search")
    # 3. masks: rearranged, then applied to a copy
    student = copy.deepcopy(model)
    rearranged = apply_masks(student, plan, head_scores, neuron_scores, grads)
    lap("rearrange")
    if tune != "none" and model.spec.quantization:
        info("retraining-free: not tuning: the weights lie on a quantization grid that a refit would leave")
        tune = "none"
    pruned_units = plan.heads != [h for h, _ in before] or plan.neurons != [w for _, w in before]
    tuning = tune_layers(student, model, batches, tune) if tune != "none" and pruned_units else []
    lap("tune")
    # 4. whole layers
    layers_removed = remove_empty_layers(student, teacher, batches, table, budget_ms)
    removed = [r["layer"] for r in layers_removed if r["removed"]]
    retuning: list[dict[str, Any]] = []
    if removed and tune != "none" and len(student.layers):
        # the layers after the first removed one were fitted with it in place: fit them again to what they now get
        retuning = tune_layers(student, model, batches, tune, kept=[i for i in range(len(model.layers))
                                                                    if i not in removed], tune_from=min(removed) + 1)
    lap("layers")
    latency_after = table.predict(layer_shapes(student))
    seconds["total"] = round(time.perf_counter() - start, 3)
    chosen = Counter(r["choice"] for r in tuning)
    tuned = ", ".join(f"{k} x{v}" for k, v in sorted(chosen.items())) if tuning else "none"
    layers = f"{len(removed)} empty layer{'' if len(removed) == 1 else 's'} removed"
    info(f"retraining-free: tuning {tuned}; {layers}; {latency_after:.2f} ms predicted; {seconds['total']:.1f} s")
    details = {
        "method": "retraining-free pruning (Kwon et al. 2022)",
        "target": table.target,
        "budget_ms": budget_ms,
        "latency_before_ms": latency_before,
        "latency_after_ms": latency_after,
        "importance": importance,
        "importance_note": note,
        "retained_importance": plan.importance,
        "total_importance": retained_importance(head_scores, neuron_scores, [h for h, _ in before],
                                                [w for _, w in before]),
        "layers_before": [{"heads": h, "ffn": w} for h, w in before],
        "layers": [{"heads": h, "ffn": w, "removed_by_search": gone}
                   for h, w, gone in zip(plan.heads, plan.neurons, plan.removed)],
        "rearrangement": rearranged,
        "tuning": tuning,
        "layers_removed": layers_removed,
        "retuning": retuning,
        "seconds": seconds,
    }
    return student, _jsonable(details)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value
