"""Structured pruning: remove whole layers, attention heads and FFN neurons, physically shrinking the matrices.

Importance, per unit: magnitude or taylor (scored in importance.py), or
- accuracy (AxFormer): walk layers from the output side, then heads, then neuron groups; delete each, re-evaluate
  the task loss on a calibration subset of the train split, keep the deletion if the loss does not rise by more than
  `tolerance`. Targets, when given, cap how much is removed. Each deletion is tried on a copy of the model and
  kept through the model's own shrink methods, so its invariants hold. The walk chooses on train examples; what it
  kept is then confirmed on the validation split: the paired accuracy drop against the model before the walk, with
  its interval (pocketformer.verdict). With `max_drop`, the walk's deletions are tested on validation in the order
  the walk made them, and undone from the first whose model does not PASS.
- to a latency target (`speedup` or `latency_ms` on a target): Kwon et al.'s retraining-free pruning
  (compress/retraining_free.py): Fisher information of head and neuron masks on calibration examples, a mask search
  under the target's measured latency table, mask rearrangement, layer-wise least-squares tuning; no gradient training.
Heads and neurons are ranked globally after normalising scores within each layer; every layer keeps at least one
head and a multiple of `round_to` neurons, so matmul shapes stay kernel-friendly. Layers are never removed from a
model with early exits: the exits are placed after layers by index.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Literal, Optional

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..errors import RecipeError
from ..models.canonical import CanonicalTransformer
from ..models.tasks import cosine_rows
from ..progress import info, progress_bar
from ..space import searchable
from ..train import predict
from ..verdict import DEFAULT_CONFIDENCE, Confidence, PairedDrop, accuracy_check, paired_drop
from .amounts import Removal, resolve, select_heads, select_neurons
from .base import Context, Effects, Stage, StageConfig, StageResult
from .importance import (calibration_batches, layer_scores, magnitude_scores, mean_task_loss, neuron_magnitudes,
                         taylor_scores, usable_importance)
from .walk import Budget, Deletion, Walk, cap, remove_layer, remove_neuron_blocks, replay


# Calibration examples of a latency-targeted prune unless set: Kwon et al.'s 2,048. Measured on MiniLM sentiment at
# 2x (benchmarks/latency_pruning.py): 1,024 examples lost 1.15 points in 34 s, 2,048 lost 0.50 in 46 s.
LATENCY_CALIBRATION = 2048


class PruneConfig(StageConfig):
    added_settings = frozenset({"groups", "max_perplexity_increase"})  # with language models; unset on encoders
    layers: Removal = Field(0, description="layers to remove: a fraction in [0, 1) or a count",
                            json_schema_extra=searchable(0, 0.5))
    heads: Removal = Field(0, description="attention heads to remove (of all remaining): fraction or count. On a "
                                          "language model, query heads within their key-value groups: a count "
                                          "counts one head from every group of a layer",
                           json_schema_extra=searchable(0, 0.5))
    groups: Removal = Field(0, description="language models: key-value groups to remove, each with its query heads "
                                           "(fraction or count; every layer keeps one)")
    ffn: Removal = Field(0, description="FFN neurons to remove (of all remaining): fraction or count",
                         json_schema_extra=searchable(0, 0.75))
    importance: Literal["magnitude", "taylor", "accuracy", "fisher"] = Field(
        "taylor", description="how units are ranked: weight magnitude, first-order loss change (taylor), "
                              "accuracy (delete, re-evaluate, keep if the loss holds), or fisher (Fisher information "
                              "of head and neuron masks: what speedup / latency_ms prune by, and only they)",
        json_schema_extra=searchable(choices=["magnitude", "taylor", "accuracy"]))
    # Latency-targeted (retraining-free) pruning: not searchable here, the search varies the target itself.
    speedup: Optional[float] = Field(None, gt=1, le=100, description=(
        "prune to this predicted speedup over the model before pruning, on the target's measured latency table "
        "(retraining-free: Fisher masks, latency search, rearrangement, least-squares tuning)"))
    latency_ms: Optional[float] = Field(None, gt=0, description=(
        "prune to this predicted latency (ms, p50 at the target's batch, sequence length and threads)"))
    target: Optional[str] = Field(None, description="the target of speedup / latency_ms (default: the recipe's "
                                                    "first target, or compress --target)")
    table: Optional[str] = Field(None, description=(
        "a latency table measured on the device (JSON, format in `pocketformer profile --help`): for targets whose "
        "runtime cannot run here, or to use a table measured elsewhere"))
    precision: Optional[str] = Field(None, description="the artifact precision whose latency is targeted "
                                                       "(default: the target's first precision)")
    tune: Literal["auto", "none", "mask", "weights"] = Field(
        "auto", description="least-squares tuning after a latency-targeted prune: per-unit scales (mask, as Kwon "
                            "et al.), full output weights (weights), the better per block on held-out tokens (auto)")
    calibration_examples: int = Field(512, ge=8, le=100000, description=(
        "train examples the importance is scored on (a latency target: 2048 unless set, as Kwon et al.)"))
    tolerance: float = Field(0.0, ge=0, description="accuracy mode: allowed rise of the calibration (train) loss per "
                                                        "deletion")
    round_to: int = Field(8, ge=1, le=256, description="FFN widths kept as multiples of this")
    # Not searchable: a budget the user states, not a knob to tune.
    max_drop: Optional[float] = Field(None, ge=0, le=100, description=(
        "accuracy mode: the most validation accuracy (points) the pruned model may lose against the model before "
        "the walk, at `confidence`: the walk's deletions are tested on the validation split in the order made, "
        "and undone from the first whose model does not PASS (none: the drop is only measured)"))
    confidence: Confidence = Field(DEFAULT_CONFIDENCE, description=(
        "accuracy mode: two-sided confidence of the validation drop's interval that `max_drop` is checked with"))
    max_perplexity_increase: Optional[float] = Field(None, gt=0, le=10000, description=(
        "accuracy mode on a language model: the most the calibration (train) perplexity may rise over the whole "
        "walk, in percent; each deletion is kept while the model stays within it (and within `tolerance` of the "
        "loss before the deletion, when tolerance is set)"))

    @model_validator(mode="after")
    def _latency_mode(self):
        if self.speedup is not None and self.latency_ms is not None:
            raise ValueError("speedup and latency_ms both set: give one target")
        if self.speedup is None and self.latency_ms is None:
            for name in ("target", "table", "precision"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to a latency target only: set speedup or latency_ms, or "
                                     f"remove {name}")
            if self.importance == "fisher":
                raise ValueError("importance fisher ranks units for a latency target: set speedup or latency_ms")
            return self
        amounts = [n for n in ("layers", "heads", "ffn") if getattr(self, n)]
        if amounts:
            raise ValueError(f"{', '.join(amounts)} and a latency target both set: the target decides what is "
                             f"removed; remove {', '.join(amounts)}")
        if "importance" in self.model_fields_set and self.importance != "fisher":
            raise ValueError(f"a latency target prunes by Fisher importance, not {self.importance}: remove "
                             "importance or set it to fisher")
        self.importance = "fisher"
        if "calibration_examples" not in self.model_fields_set:
            self.calibration_examples = LATENCY_CALIBRATION
        return self

    @property
    def latency_target(self) -> bool:
        return self.speedup is not None or self.latency_ms is not None

    @field_validator("max_drop", "max_perplexity_increase")
    @classmethod
    def _accuracy_only(cls, v, info: ValidationInfo):
        importance = info.data.get("importance")
        if v is not None and importance != "accuracy":
            raise ValueError(f"applies to the accuracy-driven walk only, and importance is {importance}: "
                             f"set `importance: accuracy`, or remove {info.field_name}")
        return v


# -- the stage ------------------------------------------------------------------------------------------------

class Prune(Stage[PruneConfig], name="prune", version=3,  # 3: layer tuning ties within rounding keep the weights
            summary="structured pruning of layers, attention heads and FFN neurons (magnitude, taylor or accuracy), "
                    "or to a latency target on a device (retraining-free); on language models, layers, key-value "
                    "groups, heads within groups and gated-FFN neurons (magnitude, taylor, a perplexity-driven "
                    "walk, or to a decode latency)"):
    kinds = frozenset({"encoder", "causal_lm"})
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
                       invalidates=self.invalidates if cfg.ffn or cfg.importance in ("accuracy", "fisher")
                       else frozenset())

    def layers_after(self, layers: int):
        if self.config.importance in ("accuracy", "fisher"):
            return None  # as many as the walk deletes, or the latency search empties
        return layers - resolve(self.config.layers, layers)

    def _table(self, model: CanonicalTransformer, ctx: Context):
        cfg = self.config
        if ctx.latency_table is None or (cfg.target or ctx.target) is None:
            raise RecipeError("prune's speedup / latency_ms needs a target to measure latency on, and none is named.",
                              "set prune's `target: NAME`, list one under the recipe's `targets:`, or pass "
                              "`compress --target NAME`.")
        return ctx.latency_table(cfg.target, cfg.table, cfg.precision, model)

    def check_model(self, model, where: str = "") -> None:
        super().check_model(model, where)
        if model.kind == "causal_lm":
            from . import lm_prune

            lm_prune.check(self.config)
        elif self.config.groups:
            raise RecipeError(f"{where}prune's groups are a language model's key-value groups; this model's "
                              "attention has none.", "remove groups, or prune attention heads with `heads`.")
        elif self.config.max_perplexity_increase is not None:
            raise RecipeError(f"{where}prune's max_perplexity_increase is a language model's budget, and this "
                              "model is an encoder.", "use max_drop (validation accuracy points) instead.")

    def key_inputs(self, model: CanonicalTransformer, ctx: Context) -> dict[str, Any]:
        """A latency-targeted prune depends on the table it prunes by (measured on this host, or the user's)."""
        if not self.config.latency_target:
            return {}
        target, table = self._table(model, ctx)
        return {"target": target, "latency_table": table.digest}

    def apply(self, model: CanonicalTransformer, ctx: Context) -> StageResult:
        cfg = self.config
        if model.kind == "causal_lm":
            from . import lm_prune

            return lm_prune.apply(model, ctx, cfg)
        self.check_model(model)
        if cfg.layers and model.spec.exits:
            raise RecipeError(f"prune cannot remove layers from a model with early exits (after layers "
                              f"{model.spec.exits}): the exits are placed after layers by index.",
                              "put prune before early_exit in the recipe, or set `layers: 0`.")
        if cfg.max_drop is not None and not model.task.has_labels:
            raise RecipeError(f"prune's max_drop is an accuracy budget, and a {model.task.name} model has no labels "
                              "to be right or wrong against.",
                              "remove max_drop (the validation cosine is still recorded), or put a finetune stage "
                              "(in prepare) before prune.")
        batches = calibration_batches(ctx, cfg.calibration_examples)
        if cfg.latency_target:
            return self._to_latency(model, ctx, batches)
        if cfg.importance == "accuracy":
            before = copy.deepcopy(model)
            deletions = accuracy_walk(model, ctx, cfg, batches)
            model, confirmation = confirm(before, model, deletions, ctx, cfg.max_drop, cfg.confidence)
            return StageResult(model, {"confirmation": confirmation})
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


    def _to_latency(self, model: CanonicalTransformer, ctx: Context, batches) -> StageResult:
        from .retraining_free import layer_shapes, prune_to_latency

        cfg = self.config
        target, table = self._table(model, ctx)
        before = table.predict(layer_shapes(model))
        budget = cfg.latency_ms if cfg.latency_ms is not None else before / cfg.speedup
        wanted = f"{cfg.latency_ms:g} ms" if cfg.latency_ms is not None else f"{cfg.speedup:g}x"
        info(f"prune: {target} ({table.runtime} {table.runtime_version}, {table.threads} threads, "
             f"{table.batch}x{table.seq_len}, {table.precision}): the model is predicted at {before:.2f} ms; "
             f"target {wanted} = {budget:.2f} ms")
        model, details = prune_to_latency(model, ctx.teacher, batches, table, budget, round_to=cfg.round_to,
                                          tune=cfg.tune)
        after = table.predict(layer_shapes(model))
        info(f"prune: predicted {before:.2f} -> {after:.2f} ms on {target} ({before / after:.2f}x; target "
             f"{budget:.2f} ms); measured latency comes with `pocketformer validate`")
        details.update({"latency_target": {
            "target": target, "asked": {"speedup": cfg.speedup, "latency_ms": cfg.latency_ms},
            "budget_ms": budget, "predicted_before_ms": before, "predicted_ms": after,
            "predicted_speedup": before / after, "precision": table.precision, "runtime": table.runtime,
            "runtime_version": table.runtime_version, "threads": table.threads, "seq_len": table.seq_len,
            "batch": table.batch, "cpu": table.cpu.get("fingerprint"), "table_sha256": table.digest,
            "table_file": cfg.table}})
        return StageResult(model, details)


# -- the accuracy-driven walk ---------------------------------------------------------------------------------

def accuracy_walk(model: CanonicalTransformer, ctx: Context, cfg: PruneConfig, batches) -> list[Deletion]:
    """AxFormer's greedy walk from the output side: per layer, the whole layer, else its heads, then its neuron
    groups; each deletion is kept if the calibration loss does not rise by more than the tolerance. Prunes
    `model` in place and returns the deletions kept, in order."""
    budget = Budget(layers=cap(cfg.layers, len(model.layers)),
                     heads=cap(cfg.heads, sum(l.attn.heads for l in model.layers)),
                     neurons=cap(cfg.ffn, sum(l.ffn.width for l in model.layers)))
    if model.spec.exits:  # an explicit `layers` was refused in apply
        budget.layers = 0
        info(f"prune (accuracy): keeping every layer: the model has early exits after layers {model.spec.exits},"
             " placed by index (put prune before early_exit to let it remove layers)")
    walk = Walk(model, lambda m: mean_task_loss(m, ctx.teacher, batches), cfg.tolerance)
    with progress_bar("prune (accuracy-driven)", len(model.layers)) as advance:
        for li in reversed(range(len(model.layers))):
            if not remove_layer(walk, li, budget):
                _remove_heads(walk, li, budget)
                remove_neuron_blocks(walk, li, budget, cfg.round_to, lambda layer: neuron_magnitudes(layer.ffn))
            advance()
    info(f"prune (accuracy): {len(walk.kept)} deletions kept, calibration loss {walk.loss:.4f}")
    return walk.kept


# -- confirmation on the validation split ---------------------------------------------------------------------

def confirm(before: CanonicalTransformer, after: CanonicalTransformer, deletions: list[Deletion], ctx: Context,
            max_drop: Optional[float], confidence: float) -> tuple[CanonicalTransformer, dict[str, Any]]:
    """What the walk kept, measured on the validation split against the model before it (`before`; `after` is
    `before` with `deletions` made): the paired accuracy drop and its interval at `confidence`, or for a model
    without labels the mean cosine of the two models' outputs. With `max_drop`, the longest prefix of `deletions`
    whose every prefix passes it is kept (fixed_sequence), rebuilt from `before`. Returns the model and the record."""
    data = ctx.validation
    record: dict[str, Any] = {"split": "validation", "examples": len(data)}
    reference = predict(before, data, ctx.encoder).numpy()
    if not after.task.has_labels:
        cosine = float(cosine_rows(predict(after, data, ctx.encoder).numpy(), reference).mean())
        info(f"prune (accuracy): validation mean cosine {cosine:.4f} with the model before the walk "
             f"({len(data)} examples)")
        return after, {**record, "cosine": cosine, "verdict": None, "deletions_kept": len(deletions),
                       "deletions_undone": 0}
    reference_correct = after.task.correct(reference, data.labels)
    drops: dict[int, PairedDrop] = {}

    def drop_of(k: int, model: CanonicalTransformer) -> PairedDrop:
        """The drop of `model`, `before` with the first k deletions made (measured once per k)."""
        if k not in drops:
            correct = model.task.correct(predict(model, data, ctx.encoder).numpy(), data.labels)
            drops[k] = paired_drop(reference_correct, correct, confidence)
        return drops[k]

    def measured(k: int, model: CanonicalTransformer) -> dict[str, Any]:
        if not k:  # the model before the walk is the reference itself: its drop is exactly 0, not an estimate
            return {"drop": 0.0, "interval": [0.0, 0.0], "lost": 0, "gained": 0,
                    "verdict": None if max_drop is None else "PASS"}
        return _drop_record(drop_of(k, model), max_drop)

    record.update(confidence=confidence, budget=max_drop,
                  walk={"deletions": len(deletions), **measured(len(deletions), after)})
    kept, tested = len(deletions), []
    if max_drop is not None and deletions:
        kept, tested = fixed_sequence(before, deletions, drop_of, max_drop)
    model = after if kept == len(deletions) else replay(before, deletions[:kept])
    record.update(measured(kept, model), deletions_kept=kept, deletions_undone=len(deletions) - kept, tested=tested)
    info("prune (accuracy): " + _confirmation_line(record))
    return model, record


def fixed_sequence(before: CanonicalTransformer, deletions: list[Deletion],
                   drop_of: Callable[[int, CanonicalTransformer], PairedDrop], max_drop: float
                   ) -> tuple[int, list[dict[str, Any]]]:
    """How many of the walk's deletions to keep: `before` with the first 1, 2, ... deletions made is tested against
    `max_drop` in that order, stopping at the first that does not PASS; the deletions from it on are undone.

    The order was fixed on the train split alone (the walk's), before any validation example was seen, and every
    test is the same one-sided check (the upper end of the two-sided interval within the budget). That is
    fixed-sequence testing (as in Learn-then-Test, Angelopoulos et al. 2021): the first model in the order whose
    true drop is over the budget must PASS for any wrong model to be kept, so the kept model exceeds the budget with
    probability at most (1 - confidence) / 2, however many models were tested. Testing from the walk's end instead,
    undoing until one passes, would give every tested model its own chance to pass by luck; so the undoing here
    stops where the sequence first fails, not where a test first passes. Returns the count kept and the tests."""
    model, tested, kept = copy.deepcopy(before), [], 0
    with progress_bar("prune: confirming deletions on validation", len(deletions)) as advance:
        for k, deletion in enumerate(deletions, 1):
            deletion.apply(model)
            result = _drop_record(drop_of(k, model), max_drop)
            tested.append({"deletions": k, **result})
            advance()
            if result["verdict"] != "PASS":
                break
            kept = k
    return kept, tested


def _drop_record(drop: PairedDrop, budget: Optional[float]) -> dict[str, Any]:
    low, high = drop.interval
    record: dict[str, Any] = {"drop": drop.drop, "interval": [low, high], "lost": drop.lost, "gained": drop.gained,
                              "verdict": None}
    if budget is not None:
        check = accuracy_check(drop, budget)
        record["verdict"] = check.verdict
        if "reason" in check.detail:
            record["reason"] = check.detail["reason"]
    return record


def _confirmation_line(record: dict[str, Any]) -> str:
    """`validation (180 examples): the walk's 11 deletions drop accuracy +5.00 pts (95% interval +1.2..+9.1) vs
    max_drop 1: FAIL; 8 undone, the first 3 kept: +0.56 pts (95% interval -0.9..+2.0): PASS`."""
    def drop_text(r: dict[str, Any]) -> str:
        low, high = r["interval"]
        return f"{r['drop']:+.2f} pts ({record['confidence']:.0%} interval {low:+.2f}..{high:+.2f})"

    walk, budget = record["walk"], record["budget"]
    text = (f"validation ({record['examples']} examples): the walk's {walk['deletions']} deletions drop accuracy "
            f"{drop_text(walk)} against the model before it")
    if budget is None:
        return text
    text += f" vs max_drop {budget:g}: {walk['verdict']}"
    if record["deletions_undone"]:
        kept = record["deletions_kept"]
        text += (f"; {record['deletions_undone']} undone (fixed-sequence test), the first {kept} kept: "
                 f"{drop_text(record)}: {record['verdict']}" if kept else
                 f"; all {record['deletions_undone']} undone (the first does not PASS: "
                 f"{drop_text(record['tested'][0])}: {record['tested'][0]['verdict']})")
    return text


# -- the accuracy-driven walk's steps -----------------------------------------------------------------------------

def _remove_heads(walk: Walk, li: int, budget: Budget) -> None:
    """One head at a time, the last first; the layer keeps at least one."""
    for h in reversed(range(walk.model.layers[li].attn.heads)):
        heads = walk.model.layers[li].attn.heads
        if budget.heads <= 0 or heads <= 1:
            break
        keep = [k for k in range(heads) if k != h]
        if walk.attempt(Deletion("head", li, tuple(keep))):
            budget.heads -= 1
