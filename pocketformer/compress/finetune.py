"""Fine-tune on the labelled train split: turns an embedding checkpoint into a classifier (a fresh head on the
mean-pooled embedding, with the dataset's labels), or keeps training an existing classifier."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..errors import RecipeError
from ..models.canonical import CanonicalTransformer
from ..train import seed_everything
from ..space import searchable
from .base import Context, Stage, StageResult, TrainingConfig


class FinetuneConfig(TrainingConfig):
    lr: float = Field(5e-5, gt=0, lt=1, description="learning rate (AdamW)",
                      json_schema_extra=searchable(1e-5, 1e-3, log=True))
    pooling: Literal["mean", "cls"] = Field("mean", description="how a new classifier pools the tokens (an existing "
                                                                "classifier keeps its own)")


class Finetune(Stage[FinetuneConfig], name="finetune", version=1,
               summary="supervised fine-tuning on the train split (adds a classifier to an embedding model)"):
    excludes = frozenset({"quantized"})
    provides = frozenset({"labels"})
    reasons = {"quantized": "training would move quantized weights off their int grid"}

    def apply(self, model: CanonicalTransformer, ctx: Context) -> StageResult:
        cfg = self.config
        seed_everything(ctx.seed)
        labels = ctx.train.label_names
        if not model.task.has_labels:
            model.set_labels(labels, pooling=cfg.pooling)
        elif len(model.spec.head.labels) != len(labels):
            raise RecipeError(f"The model has {len(model.spec.head.labels)} labels but the data has {len(labels)}.",
                              "fine-tune on data with the model's labels, or start from an embedding model.")
        losses = self.fit(model, ctx, lambda m, x, y: m.task.label_loss(m(*x), y), "finetune")
        return StageResult(model, {"final_loss": sum(losses[-20:]) / max(1, len(losses[-20:]))})
