"""MatFormer nested FFNs: one checkpoint whose every FFN prefix is a usable sub-network.

1. Sort each layer's FFN neurons by importance (importance.py's magnitude or Taylor scores), so the first m neurons are
   the best m a static cut can keep.
2. Nested recovery training: every step runs the model at each width fraction f (the first nested_width(d, f)
   neurons of every layer: fc1 rows [:m], fc2 columns [:m]) and sums the distillation losses against the original
   model, or samples one width per step (seeded).
3. Record the fractions in `ModelConfig.nested_ffn`; `pocketformer extract` then cuts any per-layer mix
   (Mix'n'Match) out as a plain dense model.

Nesting needs dense FFN linears and float weights: put `lowrank` and `quantize` after this stage (or run them on the
extracted model). Pruning before it is fine: fractions are of each layer's own width.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from pydantic import Field, field_validator

from ..errors import RecipeError
from ..models.canonical import CanonicalTransformer
from ..progress import info
from ..train import evaluate, predict, seed_everything
from .amounts import round_to_multiple
from .base import Context, Stage, StageResult, factorized
from .distill import DistillConfig, check_topk, distill_loss, stored_topk, topk_details
from .importance import calibration_batches, magnitude_scores, taylor_scores, usable_importance

DEFAULT_FRACTIONS = (1.0, 0.5, 0.25, 0.125)
ROUND_TO = 8  # nested widths are multiples of this where the layer allows: kernel-friendly matmul shapes


def nested_width(width: int, fraction: float, multiple: int = ROUND_TO) -> int:
    """Neurons in the `fraction` prefix of a `width`-neuron FFN: the nearest multiple of `multiple` (at least one),
    the whole layer for fraction 1, and the nearest count (at least 1) in layers narrower than `multiple`."""
    if fraction >= 1 or width == 0:
        return width
    return round_to_multiple(fraction * width, multiple if width >= multiple else 1, "nearest", width)


def widths_at(model: CanonicalTransformer, fraction: float) -> list[int]:
    """Every layer's nested width at one fraction (the uniform sub-model)."""
    return [nested_width(layer.ffn.width, fraction) for layer in model.layers]


@contextmanager
def active_widths(model: CanonicalTransformer, widths: list[int]) -> Iterator[CanonicalTransformer]:
    """Run each layer's FFN on only its first `widths[i]` neurons inside the block; all neurons again after it."""
    for layer, w in zip(model.layers, widths):
        layer.ffn.active_width = w if w < layer.ffn.width else None
    try:
        yield model
    finally:
        for layer in model.layers:
            layer.ffn.active_width = None


class MatformerConfig(DistillConfig):
    widths: list[float] = Field(list(DEFAULT_FRACTIONS),  # pydantic copies a mutable default per instance
                                description="fractions of each layer's FFN width trained as nested sub-models")
    importance: Literal["magnitude", "taylor"] = Field("taylor", description="how neurons are sorted before training")
    calibration_examples: int = Field(512, ge=8, le=100000, description="taylor: train examples scored")
    sampling: Literal["sum", "sample"] = Field("sum", description="sum: every width each step; sample: one width "
                                                                  "per step, drawn with the run's seed")

    @field_validator("widths")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f <= 1 for f in v):
            raise ValueError("must be a non-empty list of fractions in (0, 1], e.g. [1, 0.5, 0.25, 0.125]")
        return sorted(set(float(f) for f in v), reverse=True)


def neuron_importance(model: CanonicalTransformer, ctx: Context, cfg: MatformerConfig) -> list[torch.Tensor]:
    """One score per FFN neuron of each layer (higher = keep first); a language model's on its train text."""
    if ctx.text:
        from . import lm_prune

        if cfg.importance == "taylor":
            return lm_prune.taylor_scores(model, lm_prune.calibration_windows(ctx, cfg.calibration_examples))[1]
        return lm_prune.magnitude_scores(model)[1]
    if usable_importance(cfg.importance, model, ctx.teacher, "matformer") == "taylor":
        return taylor_scores(model, ctx.teacher, calibration_batches(ctx, cfg.calibration_examples))[1]
    return magnitude_scores(model)[1]


def sort_neurons(model: CanonicalTransformer, scores: list[torch.Tensor]) -> None:
    """Most important neurons first in every layer (ties keep their order)."""
    for li, s in enumerate(scores):
        model.order_neurons(li, torch.argsort(s, descending=True, stable=True).tolist())


FFN_LINEARS = {"fc1", "fc2", "gate", "up", "down"}  # an encoder's FFN, a decoder's gated FFN


def _refuse_unnestable(model: CanonicalTransformer) -> None:
    for i, shape in enumerate(model.config.layers):
        factorized = sorted(set(shape.linears) & FFN_LINEARS)
        if factorized:
            raise RecipeError(f"matformer needs dense FFN linears, but layer {i}'s {factorized[0]} is "
                              f"{shape.linears[factorized[0]].kind}.",
                              "put lowrank after matformer in the recipe, or factorize the model that "
                              "`pocketformer extract` writes.")
    if model.spec.quantization:
        raise RecipeError("matformer trains the weights, which would move quantized weights off their int grid.",
                          "put quantize after matformer in the recipe, or quantize the extracted model.")


def width_quality(model: CanonicalTransformer, ctx: Context, plans: dict[float, list[int]],
                  teacher: CanonicalTransformer) -> tuple[str, dict[str, float]]:
    """The validation quality at each nested width, and its name: accuracy %, for an embedding model 100 x mean
    cosine with the original model's outputs, for a language model the perplexity of the validation text."""
    from ..models.causal import window_perplexity

    result = {}
    reference = None if ctx.text else predict(teacher, ctx.validation, ctx.encoder).numpy()
    for fraction, widths in plans.items():
        with active_widths(model, widths):
            if ctx.text:
                result[f"{fraction:g}"] = window_perplexity(model, ctx.text["validation"])
            else:
                result[f"{fraction:g}"] = evaluate(model, ctx.validation, ctx.encoder,
                                                   reference)[model.task.quality_key]
    return ("validation_perplexity" if ctx.text else f"validation_{model.task.quality_key}"), result


class Matformer(Stage[MatformerConfig], name="matformer", version=2,  # 2: as distill
                summary="MatFormer nested FFNs: sort neurons by importance, then train every width prefix against "
                        "the original (a language model's gated FFNs too, on its text)"):
    kinds = frozenset({"encoder", "causal_lm"})
    excludes = factorized(sorted(FFN_LINEARS)) | {"quantized"}
    provides = frozenset({"nested_ffn"})
    ships_plain = False
    reasons = {**{f"factorized:{n}": "nested widths need dense FFN linears" for n in FFN_LINEARS},
               "quantized": "it trains the weights, which would move quantized weights off their int grid"}
    remedies = {**{f"factorized:{n}": "run {other} on the model `pocketformer extract` writes" for n in FFN_LINEARS},
                "quantized": "quantize the model `pocketformer extract` writes"}

    def check_model(self, model, where: str = "") -> None:
        super().check_model(model, where)
        check_topk(self.config, model, where, self.name)

    def apply(self, model: CanonicalTransformer, ctx: Context) -> StageResult:
        cfg = self.config
        _refuse_unnestable(model)
        seed_everything(ctx.seed)
        sort_neurons(model, neuron_importance(model, ctx, cfg))
        plans = {f: widths_at(model, f) for f in cfg.widths}
        info("matformer: nested widths " + "; ".join(f"{f:g}: {w}" for f, w in plans.items()))
        teacher = ctx.teacher.eval()
        draw = random.Random(ctx.seed)

        def nested_loss(m, inputs, labels):
            fractions = cfg.widths if cfg.sampling == "sum" else [draw.choice(cfg.widths)]
            total = torch.zeros(())
            for f in fractions:
                # The slices are recorded in the autograd graph, so resetting the widths before backward is safe.
                with active_widths(m, plans[f]):
                    total = total + distill_loss(m, teacher, inputs, labels, cfg, stored)
            return total

        with stored_topk(cfg, teacher) as stored:
            losses = self.fit(model, ctx, nested_loss, "matformer")
        model.spec.nested_ffn = list(cfg.widths)
        metric, quality = width_quality(model, ctx, plans, teacher)
        details = {"final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                   "widths": {f"{f:g}": w for f, w in plans.items()}, metric: quality,
                   **topk_details(stored)}
        info(f"matformer: {metric.replace('_', ' ')} by width: "
             + ", ".join(f"{f}: {v:.4g}" for f, v in quality.items()))
        return StageResult(model, details)
