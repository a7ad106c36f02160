"""The prune stage on a decoder-only language model (models/causal.py): whole layers, key-value groups with their
query heads, query heads within their groups, and gated-FFN neurons (gate, up and down together), ranked by
magnitude or taylor importance on token windows of the train text, or chosen by a perplexity-driven walk. Every
edit goes through the model's own keep_* methods, so grouped-query attention stays consistent (each kept key-value
head serves the same number of query heads) and the KV cache shrinks with the groups.

Importance, per unit:
- magnitude: a neuron: |gate row| x |up row| x |down column|; a query head: its q rows and o columns; a group: its
  query heads plus its k and v rows.
- taylor: |sum over tokens of a . dL/da| per window, summed over windows, where a is the unit's output before the
  output projection (a head's attention output, a neuron's gated activation); a group: the sum of its heads'.
  L is next-token cross-entropy on the text.
- layers, either way: how much the calibration loss rises when the layer alone is skipped (a causal LM has few
  enough layers to measure each; the encoder's proxies rank them worse).
- accuracy (perplexity-driven, AxFormer's walk as on encoders): from the output side, per layer, delete the whole
  layer, else its key-value groups one at a time, then one query head from every group (each group's weakest by
  magnitude), then blocks of max(round_to, width / 8) neurons, weakest magnitude first; re-measure the calibration
  loss after each and keep the deletion if it holds (`tolerance` per deletion, `max_perplexity_increase` over the
  whole walk). The amounts, when given, cap what is removed.
Selection is global across layers after normalising scores within each layer; every layer keeps at least one group,
one query head per group and `round_to` neurons (FFN widths stay multiples of it).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch.nn import functional as F

from ..errors import RecipeError
from ..models.factorized import linear_shape
from ..progress import info, progress_bar
from .amounts import resolve, select_heads, select_neurons
from .base import Context, StageResult
from .walk import Budget, Deletion, Walk, cap, remove_layer, remove_neuron_blocks

# Settings of the prune stage that do not apply to a language model (yet), and what to do instead.
UNSUPPORTED = {
    "max_drop": "max_drop is validation accuracy points, for classifiers: a language model's walk is bounded by "
                "max_perplexity_increase (percent)",
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
    per_layer = [magnitude_scores_of(layer) for layer in model.layers]
    return [h for h, _ in per_layer], [n for _, n in per_layer]


def magnitude_scores_of(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's: each query head's |q rows, o columns| and each neuron's |gate row| x |up row| x |down column|."""
    a, f = layer.attn, layer.ffn
    d = a.head_dim
    q = a.q.weight.detach().reshape(a.heads, d, -1).pow(2).sum((1, 2))
    o = a.o.weight.detach().reshape(-1, a.heads, d).pow(2).sum((0, 2))
    return (q + o).sqrt(), (f.gate.weight.detach().norm(dim=1) * f.up.weight.detach().norm(dim=1)
                            * f.down.weight.detach().norm(dim=0))


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
                    prod = (a.detach() * a.grad).reshape(*a.shape[:-1], -1, d).sum((0, 1, 3))
                    heads[li] += prod.abs().double()
                    h = captured[("neuron", li)]
                    neurons[li] += (h.detach() * h.grad).sum((0, 1)).abs().double()
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
    if cfg.latency_target:  # PruneConfig names its importance fisher; on an LM it is taylor's loss estimate
        if cfg.groups:
            raise RecipeError("prune's speedup / latency_ms choose the groups (and layers, heads and neurons) "
                              "themselves.", "leave out groups, or the latency target.")
    elif cfg.importance not in ("magnitude", "taylor", "accuracy"):
        raise RecipeError(f"prune's importance {cfg.importance!r} does not apply to a language model yet.",
                          "use importance: magnitude, taylor or accuracy.")


def apply(model, ctx: Context, cfg) -> StageResult:
    """Prune `model` (a CausalLM) as `cfg` (PruneConfig) asks: layers first, then the units of the layers left,
    scored on the model as it is then."""
    check(cfg)
    _dense(model)
    windows = calibration_windows(ctx, cfg.calibration_examples)
    details: dict[str, Any] = {"calibration_windows": len(windows),
                               "calibration_tokens": sum(len(w) - 1 for w in windows),
                               "loss_before": mean_loss(model, windows)}
    if cfg.latency_target or cfg.importance == "accuracy":
        details.update(_to_latency(model, windows, cfg, ctx) if cfg.latency_target
                       else accuracy_walk(model, windows, cfg))
        details["loss_after"] = mean_loss(model, windows)
        info(f"prune: calibration loss {details['loss_before']:.4f} -> {details['loss_after']:.4f} on "
             f"{details['calibration_tokens']:,} train tokens")
        return StageResult(model, details)
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


# -- the perplexity-driven walk ---------------------------------------------------------------------------------

def accuracy_walk(model, windows: list[list[int]], cfg) -> dict[str, Any]:
    """Prune `model` in place by AxFormer's walk (module docstring) on the calibration loss of `windows`; returns
    the walk's record: the deletions kept, in order (replaying them on the model before rebuilds it), and the loss
    and calibration perplexity before and after."""
    layers = model.layers
    budget = Budget(layers=cap(cfg.layers, len(layers)), groups=cap(cfg.groups, sum(la.attn.kv_heads for la in layers)),
                    heads=cap(cfg.heads, sum(la.attn.heads // la.attn.kv_heads for la in layers)),
                    neurons=cap(cfg.ffn, sum(la.ffn.width for la in layers)))
    pct = cfg.max_perplexity_increase
    tolerance = cfg.tolerance if pct is None or "tolerance" in cfg.model_fields_set else math.inf
    walk = Walk(model, lambda m: mean_loss(m, windows), tolerance, math.inf if pct is None else math.log1p(pct / 100))
    with progress_bar("prune (perplexity-driven walk)", len(model.layers)) as advance:
        for li in reversed(range(len(model.layers))):
            if not remove_layer(walk, li, budget):
                _remove_groups(walk, li, budget)
                _remove_head_slots(walk, li, budget)
                remove_neuron_blocks(walk, li, budget, cfg.round_to, lambda layer: magnitude_scores_of(layer)[1])
            advance()
    kinds = {kind: sum(d.kind == kind for d in walk.kept) for kind in ("layer", "groups", "head", "neurons")}
    info(f"prune (perplexity-driven): {len(walk.kept)} of {walk.tried} deletions kept ({kinds['layer']} layers, "
         f"{kinds['groups']} key-value groups, {kinds['head']} query-head slots, {kinds['neurons']} neuron blocks); "
         f"calibration perplexity {math.exp(walk.start):.3f} -> {math.exp(walk.loss):.3f}")
    return {"walk": {"deletions": [{"kind": d.kind, "layer": d.layer, "keep": list(d.keep)} for d in walk.kept],
                     "tried": walk.tried, "kept": kinds, "tolerance": tolerance if tolerance < math.inf else None,
                     "max_perplexity_increase": pct,
                     "perplexity_before": math.exp(walk.start), "perplexity_after": math.exp(walk.loss)}}


def _remove_groups(walk: Walk, li: int, budget: Budget) -> None:
    """One key-value group (with its query heads) at a time, the last first; the layer keeps at least one."""
    for g in reversed(range(walk.model.layers[li].attn.kv_heads)):
        kv = walk.model.layers[li].attn.kv_heads
        if budget.groups <= 0 or kv <= 1:
            break
        if walk.attempt(Deletion("groups", li, tuple(k for k in range(kv) if k != g))):
            budget.groups -= 1


def _remove_head_slots(walk: Walk, li: int, budget: Budget) -> None:
    """One query head from every group at a time (each group's weakest by magnitude), until one costs too much;
    every group keeps one."""
    while budget.heads > 0:
        attn = walk.model.layers[li].attn
        g = attn.heads // attn.kv_heads
        if g <= 1:
            break
        scores = magnitude_scores_of(walk.model.layers[li])[0].reshape(attn.kv_heads, g)
        keep = [grp * g + h for grp in range(attn.kv_heads) for h in sorted(scores[grp].argsort(descending=True)
                                                                               [:g - 1].tolist())]
        if not walk.attempt(Deletion("head", li, tuple(keep))):
            break
        budget.heads -= 1


# -- to a latency target --------------------------------------------------------------------------------------------

def _to_latency(model, windows: list[list[int]], cfg, ctx: Context) -> dict[str, Any]:
    """Prune to `cfg.speedup` / `cfg.latency_ms` of the target's decode table: greedily remove whichever unit costs
    the least calibration loss per millisecond the table says it saves (a whole layer, a key-value group, one query
    head from every group of a layer, or `round_to` FFN neurons), until the predicted decode step is within budget.
    Layers cost their measured loss rise when skipped alone; the others their taylor scores, per window (first-order
    loss changes: the same units)."""
    from ..latency import lm_units

    if ctx.latency_table is None or (cfg.target or ctx.target) is None:
        raise RecipeError("prune's speedup / latency_ms needs a target to measure decode latency on, and none is "
                          "named.", "add a target to the recipe's targets, or set prune's target.")
    target, table = ctx.latency_table(cfg.target or ctx.target, cfg.table, cfg.precision, model)
    before = table.predict(lm_units(model.config))
    budget = cfg.latency_ms if cfg.latency_ms is not None else before / cfg.speedup
    info(f"prune: {target} ({table.runtime} {table.runtime_version}, {table.threads} threads, {table.measure}, "
         f"{table.precision}): the model is predicted at {before:.2f} ms a token; pruning to {budget:.2f} ms")
    n = len(windows)
    heads, neurons = taylor_scores(model, windows)
    heads, neurons = [h / n for h in heads], [w / n for w in neurons]
    layer_loss = layer_scores(model, windows)
    plan = [{"groups": list(range(layer.attn.kv_heads)), "slots": layer.attn.heads // layer.attn.kv_heads,
             "neurons": neurons[li].argsort(descending=True).tolist(),
             "heads": heads[li].reshape(layer.attn.kv_heads, -1)}  # [group, head in group]
            for li, layer in enumerate(model.layers)]
    alive = list(range(len(plan)))

    def units(li: int) -> tuple[int, int]:
        q = plan[li]
        return len(q["groups"]) * (q["slots"] + 1), len(q["neurons"])

    def predicted() -> float:
        return table.predict([units(li) for li in alive])

    removed = {"layers": 0, "groups": 0, "head_slots": 0, "neurons": 0}
    while predicted() > budget:
        options = []  # (calibration loss, uncalibrated ms the table says it saves, kind, layer)
        for li in alive:
            q, (u, w) = plan[li], units(li)
            if len(alive) > 1:
                options.append((layer_loss[li], table.layer_cost(u, w), "layers", li))
            if len(q["groups"]) > 1:
                options.append((min(_group_sums(q).values()), table.attention(u) - table.attention(
                    u - q["slots"] - 1), "groups", li))
            if q["slots"] > 1:
                options.append((_weakest_slot(q), table.attention(u) - table.attention(u - len(q["groups"])),
                                "head_slots", li))
            if w > cfg.round_to:
                block = neurons[li][q["neurons"][-cfg.round_to:]].sum()
                options.append((float(block), table.ffn(w) - table.ffn(w - cfg.round_to), "neurons", li))
        scale = table.calibration.scale  # the calibration scales every block's cost alike
        options = [(loss / (scale * saved), kind, li) for loss, saved, kind, li in options if scale * saved > 1e-9]
        if not options:
            break
        _, kind, li = min(options)
        removed[kind] += 1
        q = plan[li]
        if kind == "layers":
            alive.remove(li)
        elif kind == "groups":
            sums = _group_sums(q)
            q["groups"].remove(min(sums, key=sums.get))
        elif kind == "head_slots":
            q["slots"] -= 1
        else:
            del q["neurons"][-cfg.round_to:]
    after = predicted()
    # apply the plan through the model's own edits: units first (layer indices as they are), then the layers
    for li in alive:
        q, attn = plan[li], model.layers[li].attn
        g = attn.heads // attn.kv_heads
        if q["slots"] < g:
            model.keep_heads(li, [grp * g + int(h) for grp in range(attn.kv_heads)
                                  for h in q["heads"][grp].argsort(descending=True)[:q["slots"]]])
        if len(q["groups"]) < attn.kv_heads:
            model.keep_groups(li, sorted(q["groups"]))
        if len(q["neurons"]) < model.layers[li].ffn.width:
            model.keep_neurons(li, sorted(q["neurons"]))
    if len(alive) < len(model.layers):
        model.keep_layers(alive)
    reached = after <= budget
    info(f"prune: predicted {after:.2f} ms a token ({before / after:.2f}x); removed {removed['layers']} layers, "
         f"{removed['groups']} key-value groups, {removed['head_slots']} query-head slots, "
         f"{removed['neurons'] * cfg.round_to} FFN neurons" + ("" if reached else
                                                               f"; the {budget:.2f} ms budget is out of reach"))
    return {"latency_target": {"target": target, "asked": {"speedup": cfg.speedup, "latency_ms": cfg.latency_ms},
                               "measure": table.measure, "predicted_before_ms": before, "predicted_after_ms": after,
                               "predicted_speedup": before / after, "reached": reached, "removed": removed,
                               "precision": table.precision, "runtime": table.runtime,
                               "runtime_version": table.runtime_version, "threads": table.threads,
                               "prompt_tokens": table.seq_len, "cpu": table.cpu.get("fingerprint"),
                               "table_sha256": table.digest}}


def _group_sums(q: dict) -> dict[int, float]:
    """Each remaining group's score: its remaining query heads' (the strongest `slots` of the group)."""
    return {g: float(q["heads"][g].sort(descending=True).values[:q["slots"]].sum()) for g in q["groups"]}


def _weakest_slot(q: dict) -> float:
    """What dropping one more query head from every remaining group costs: each group's weakest kept head."""
    return float(sum(q["heads"][g].sort(descending=True).values[q["slots"] - 1] for g in q["groups"]))
