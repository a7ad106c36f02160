"""Fine-tune on the labelled train split: turns an embedding checkpoint into a classifier (a fresh head on the
mean-pooled embedding, with the dataset's labels), or keeps training an existing classifier."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch.nn import functional as F

from ..errors import RecipeError
from ..models.canonical import CanonicalTransformer
from ..train import seed_everything
from .base import Context, Stage, TrainingConfig


class FinetuneConfig(TrainingConfig):
    lr: float = Field(5e-5, gt=0, lt=1)
    pooling: Literal["mean", "cls"] = "mean"


class Finetune(Stage):
    name = "finetune"
    summary = "supervised fine-tuning on the train split (adds a classifier to an embedding model)"
    Config = FinetuneConfig

    def apply(self, model: CanonicalTransformer, ctx: Context) -> CanonicalTransformer:
        cfg: FinetuneConfig = self.config
        seed_everything(ctx.seed)
        labels = ctx.train.label_names
        if model.classifier is None:
            model.set_labels(labels, pooling=cfg.pooling)
        elif len(model.spec.head.labels) != len(labels):
            raise RecipeError(f"The model has {len(model.spec.head.labels)} labels but the data has {len(labels)}.",
                              "fine-tune on data with the model's labels, or start from an embedding model.")
        self.fit(model, ctx, lambda m, x, y: F.cross_entropy(m(*x), y), "finetune")
        return model
