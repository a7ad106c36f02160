"""The stage contract: a registered class with a pydantic config and one `apply(model, ctx) -> model`.

The registry maps recipe names to stages, so the recipe validator, the CLI help and the docs all read the same
declarations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..data import Dataset, Encoder
from ..models.canonical import CanonicalTransformer, count_params, encoder_macs

REGISTRY: dict[str, type["Stage"]] = {}


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainingConfig(StageConfig):
    """Settings every stage that trains on the train split shares."""

    epochs: float = Field(1.0, gt=0, le=100, description="passes over the train split (fractions allowed)")
    lr: float = Field(1e-4, gt=0, lt=1)
    max_examples: int = Field(0, ge=0, description="train on at most this many examples (0 = all)")
    freeze_embeddings: bool = Field(True, description="keep the token embedding table fixed: no stage changes "
                                                      "it, and updating it slows every step")


@dataclass
class Context:
    """What a stage may use besides the model: the original model as teacher, data, and the run's settings."""

    teacher: CanonicalTransformer
    train: Dataset
    validation: Dataset
    encoder: Encoder
    seed: int = 0
    batch_size: int = 32
    notes: dict[str, Any] = field(default_factory=dict)


class Stage:
    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[StageConfig]]

    def __init__(self, config: StageConfig):
        self.config = config

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        REGISTRY[cls.name] = cls

    def apply(self, model: CanonicalTransformer, ctx: Context) -> CanonicalTransformer:
        raise NotImplementedError

    def fit(self, model: CanonicalTransformer, ctx: Context, loss_fn, desc: str) -> list[float]:
        """Train `model` on the train split with this stage's TrainingConfig; returns the per-step losses."""
        from ..train import train_loop

        cfg = self.config
        data = ctx.train.head(cfg.max_examples) if cfg.max_examples else ctx.train
        if cfg.freeze_embeddings and model.spec.modality == "text":
            model.embeddings.word.weight.requires_grad_(False)
        try:
            return train_loop(model, data, ctx.encoder, loss_fn, epochs=cfg.epochs, lr=cfg.lr,
                              batch_size=ctx.batch_size, seed=ctx.seed, desc=desc)
        finally:
            model.requires_grad_(True)


class StageReport(BaseModel):
    """What a stage changed, measured on the model before and after it."""

    stage: str
    config: dict[str, Any]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    size_bytes_before: int = 0
    size_bytes_after: int = 0
    layers_after: list[dict[str, Any]]
    validation_accuracy: Optional[float] = None
    seconds: float = 0.0
    cached: bool = False
    details: dict[str, Any] = {}


def stored_bytes(model: CanonicalTransformer) -> int:
    """Bytes the weights take stored as the model says: float32, except Linear weights a quantize stage put on an
    int grid (bits per weight plus a float32 scale per row and group); a dense-sparse S counts its kept entries."""
    total = 4 * count_params(model)
    q = model.spec.quantization
    if q.get("bits"):
        import torch

        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.numel():
                groups = 1 if q.get("group_size", -1) <= 0 else -(-m.in_features // q["group_size"])
                total -= m.weight.numel() * 4 - (m.weight.numel() * q["bits"] + 7) // 8 - 4 * m.out_features * groups
    return total


def describe(model: CanonicalTransformer, seq_len: int) -> dict[str, Any]:
    cfg = model.config
    return {"params": count_params(model), "macs": encoder_macs(cfg, seq_len), "size_bytes": stored_bytes(model),
            "layers": [s.summary() for s in cfg.layers]}
