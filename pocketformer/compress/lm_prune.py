"""The prune stage on a decoder-only language model (models/causal.py): whole layers, key-value groups with their
query heads, query heads within their groups, and gated-FFN neurons (gate, up and down together), ranked by
magnitude or taylor importance on token windows of the train text. Every edit goes through the model's own keep_*
methods, so grouped-query attention stays consistent (each kept key-value head serves the same number of query
heads) and the KV cache shrinks with the groups.

Importance, per unit:
- magnitude: a neuron: |gate row| x |up row| x |down column|; a query head: its q rows and o columns; a group: its
  query heads plus its k and v rows.
- taylor: |sum over tokens of a . dL/da| per window, summed over windows, where a is the unit's output before the
  output projection (a head's attention output, a neuron's gated activation); a group: the sum of its heads'.
  L is next-token cross-entropy on the text.
- layers, either way: how much the calibration loss rises when the layer alone is skipped (a causal LM has few
  enough layers to measure each; the encoder's proxies rank them worse).
Selection is global across layers after normalising scores within each layer; every layer keeps at least one group,
one query head per group and `round_to` neurons (FFN widths stay multiples of it).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.nn import functional as F

from ..errors import RecipeError
from ..models.factorized import linear_shape
from ..progress import info, progress_bar
from .amounts import resolve, select_heads, select_neurons
from .base import Context, StageResult

# Settings of the prune stage that do not apply to a language model (yet), and what to do instead.
UNSUPPORTED = {
    "speedup": "latency-targeted pruning of language models needs decode/prefill latency tables (the next step): "
               "set layers, groups, heads or ffn",
    "latency_ms": "latency-targeted pruning of language models needs decode/prefill latency tables (the next "
                  "step): set layers, groups, heads or ffn",
    "max_drop": "the accuracy budget is for classifiers: a language model's perplexity is validated per target",
}


def calibration_windows(ctx: Context, n: int) -> list[list[int]]:
    windows = ctx.text.get("train") or []
    if not windows:
        raise RecipeError("prune on a language model scores units on train text, and the run has none.",
                          "set the recipe's data to a text corpus (wikipedia, botchan or a .txt file).")
    return windows[:n]


def next_token_loss(model, window: list[int]) -> torch.Tensor:
    ids = torch.tensor([window])
    logits = model(ids)
    return F.cross_entropy(logits[0, :-1], ids[0, 1:])


@torch.no_grad()
def mean_loss(model, windows: list[list[int]]) -> float:
    return float(torch.stack([next_token_loss(model, w) for w in windows]).mean())


def _dense(model) -> None:
    factorized = sorted({name for _, name, _, lin in model.linears() if linear_shape(lin) is not None})
    if factorized:
        raise RecipeError(f"prune needs dense linears, and this model's {', '.join(factorized)} are factorized.",
                          "put prune before lowrank / dense_sparse in the recipe.")


# -- scores -----------------------------------------------------------------------------------------------------

def magnitude_scores(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: each query head's score and each FFN neuron's."""
    heads, neurons = [], []
    for layer in model.layers:
        a, f = layer.attn, layer.ffn
        d = a.head_dim
        q = a.q.weight.detach().reshape(a.heads, d, -1).pow(2).sum((1, 2))
        o = a.o.weight.detach().reshape(-1, a.heads, d).pow(2).sum((0, 2))
        heads.append((q + o).sqrt())
        neurons.append(f.gate.weight.detach().norm(dim=1) * f.up.weight.detach().norm(dim=1)
                       * f.down.weight.detach().norm(dim=0))
    return heads, neurons


def taylor_scores(model, windows: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: |a . dL/da| of each query head's attention output and each neuron's gated activation, summed over
    the windows (the absolute value taken per window)."""
    n = len(model.layers)
    heads = [torch.zeros(layer.attn.heads, dtype=torch.float64) for layer in model.layers]
    neurons = [torch.zeros(layer.ffn.width, dtype=torch.float64) for layer in model.layers]
    captured: dict[tuple[str, int], torch.Tensor] = {}

    def keep(kind: str, li: int):
        def hook(_module, args):
            x = args[0]
            x.retain_grad()
            captured[(kind, li)] = x
        return hook

    handles = []
    for li, layer in enumerate(model.layers):
        handles.append(layer.attn.o.register_forward_pre_hook(keep("head", li)))
        handles.append(layer.ffn.down.register_forward_pre_hook(keep("neuron", li)))
    was_training = model.training
    model.eval()
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with progress_bar("prune: taylor importance", len(windows)) as advance:
            for w in windows:
                captured.clear()
                with torch.enable_grad():
                    x = model.embed(torch.tensor([w]))  # a leaf that needs grad, so the graph reaches every unit
                    x.requires_grad_(True)
                    loss = _loss_from_embeddings(model, w, x)
                    loss.backward()
                for li in range(n):
                    a = captured[("head", li)]
                    d = model.layers[li].attn.head_dim
                    prod = (a * a.grad).reshape(*a.shape[:-1], -1, d).sum((0, 1, 3))
                    heads[li] += prod.abs().double()
                    h = captured[("neuron", li)]
                    neurons[li] += (h * h.grad).sum((0, 1)).abs().double()
                advance()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(model.parameters(), params):
            p.requires_grad_(flag)
        model.train(was_training)
    return [s.float() for s in heads], [s.float() for s in neurons]


def _loss_from_embeddings(model, window: list[int], x: torch.Tensor) -> torch.Tensor:
    """The next-token loss of `window` from its (already looked-up) embeddings `x`: the model's body with the
    embedding lookup replaced, so gradients flow to every unit without training any weight."""
    original = model.embed.forward
    model.embed.forward = lambda _ids: x
    try:
        return next_token_loss(model, window)
    finally:
        model.embed.forward = original


def layer_scores(model, windows: list[list[int]]) -> list[float]:
    """How much the calibration loss rises with each layer alone skipped."""
    base = mean_loss(model, windows)
    scores = []
    with progress_bar("prune: layer importance", len(model.layers)) as advance:
        for li in range(len(model.layers)):
            trial = copy.deepcopy(model)
            trial.keep_layers([i for i in range(len(model.layers)) if i != li])
            scores.append(mean_loss(trial, windows) - base)
            advance()
    return scores


def group_scores(model, heads: list[torch.Tensor]) -> list[torch.Tensor]:
    """A key-value group's score: its query heads' summed."""
    return [s.reshape(layer.attn.kv_heads, -1).sum(1) for layer, s in zip(model.layers, heads)]


def slot_scores(model, heads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pruning within groups removes one query head from every group of a layer at a time: slot j of a layer is
    the j-th weakest head of each group, its score their sum (non-decreasing in j)."""
    return [s.reshape(layer.attn.kv_heads, -1).sort(dim=1).values.sum(0) for layer, s in zip(model.layers, heads)]


# -- the stage on a language model ------------------------------------------------------------------------------

def check(cfg) -> None:
    """Refuse prune settings (PruneConfig) that do not apply to a language model, in one line."""
    asked = [name for name in UNSUPPORTED if getattr(cfg, name, None) is not None]
    if asked:
        raise RecipeError(f"prune's {asked[0]} does not apply to a decoder-only language model.",
                          UNSUPPORTED[asked[0]] + ".")
    if cfg.importance not in ("magnitude", "taylor"):
        raise RecipeError(f"prune's importance {cfg.importance!r} does not apply to a language model yet.",
                          "use importance: magnitude or taylor.")


def apply(model, ctx: Context, cfg) -> StageResult:
    """Prune `model` (a CausalLM) as `cfg` (PruneConfig) asks: layers first, then the units of the layers left,
    scored on the model as it is then."""
    check(cfg)
    _dense(model)
    windows = calibration_windows(ctx, cfg.calibration_examples)
    details: dict[str, Any] = {"calibration_windows": len(windows),
                               "calibration_tokens": sum(len(w) - 1 for w in windows),
                               "loss_before": mean_loss(model, windows)}
    n_layers = resolve(cfg.layers, len(model.layers))
    if n_layers:
        scores = layer_scores(model, windows)
        keep = sorted(sorted(range(len(scores)), key=lambda i: scores[i])[n_layers:])
        gone = sorted(set(range(len(model.layers))) - set(keep))
        info(f"prune: removing layers {gone} (calibration loss rises when skipped alone: "
             f"{', '.join(f'{scores[i]:.3g}' for i in gone)})")
        details["layers_removed"] = gone
        details["layer_scores"] = scores
        model.keep_layers(keep)
    if cfg.groups or cfg.heads or cfg.ffn:
        heads, neurons = taylor_scores(model, windows) if cfg.importance == "taylor" else magnitude_scores(model)
        if cfg.groups:
            total = sum(layer.attn.kv_heads for layer in model.layers)
            for li, keep in enumerate(select_heads(group_scores(model, heads), resolve(cfg.groups, total))):
                kept_heads = torch.cat([heads[li].reshape(model.layers[li].attn.kv_heads, -1)[g] for g in keep])
                model.keep_groups(li, keep)
                heads[li] = kept_heads
        if cfg.heads:
            total = sum(layer.attn.heads // layer.attn.kv_heads for layer in model.layers)
            for li, slots in enumerate(select_heads(slot_scores(model, heads), resolve(cfg.heads, total))):
                attn = model.layers[li].attn
                g = attn.heads // attn.kv_heads
                per_group = heads[li].reshape(attn.kv_heads, g)
                model.keep_heads(li, [grp * g + int(h) for grp in range(attn.kv_heads)
                                      for h in per_group[grp].argsort(descending=True)[:len(slots)]])
        if cfg.ffn:
            total = sum(layer.ffn.width for layer in model.layers)
            for li, keep in enumerate(select_neurons(neurons, resolve(cfg.ffn, total), cfg.round_to)):
                model.keep_neurons(li, keep)  # never empty: select_neurons keeps round_to (or all) per layer
    details["loss_after"] = mean_loss(model, windows)
    info(f"prune: calibration loss {details['loss_before']:.4f} -> {details['loss_after']:.4f} on "
         f"{details['calibration_tokens']:,} train tokens")
    return StageResult(model, details)
