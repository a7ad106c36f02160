"""Early exit (DeeBERT, PABEE): classifier heads after chosen layers, and the gate that stops at one of them.

Training:
- deebert: the backbone and the final head stay frozen; only the exit heads learn, each distilled from the model's
  own final head (T^2 KL at temperature T) plus cross-entropy on the true labels. The full-depth model is unchanged.
- pabee: every head (exits and final) is trained with the backbone, on a weighted average of per-head losses whose
  weight is the head's depth (PABEE's weighted all-layer loss), distilled from the reference model (the teacher).
Gating, at batch 1, one head after another:
- entropy (DeeBERT): stop at the first head whose softmax entropy, divided by log(labels) so thresholds lie in [0, 1]
  whatever the label count, is below `threshold`.
- patience (PABEE): stop once `patience` heads in a row after the first agree with it (patience + 1 equal labels).
The final head always stops. The gate is stored in the model (ModelConfig.exit_gate) as the exported default; the
target's validation calibrates it to the accuracy budget (pocketformer.targets.early_exit).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, Optional, Union

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from ..errors import RecipeError
from ..models.canonical import CanonicalTransformer
from ..models.exits import Gate, decide, head_logits
from ..models.tasks import Task
from ..train import seed_everything
from ..space import searchable
from .base import Context, Stage, StageResult, TrainingConfig

# Heads alone learn fast; a backbone trained along (pabee) needs a fine-tuning rate.
DEFAULT_LR = {"deebert": 1e-3, "pabee": 5e-5}


class EarlyExitConfig(TrainingConfig):
    exits: Union[Literal["all"], list[int]] = Field("all", description="0-based layers followed by an exit head, "
                                                                        "or all (every layer but the last)")
    mode: Literal["deebert", "pabee"] = Field("deebert", description="deebert: frozen backbone, train the heads; "
                                                                     "pabee: weighted all-layer loss, backbone too")
    gate: Gate = Field(Gate(), description="the exported default: {kind: entropy, threshold: 0..1} or "
                                           "{kind: patience, patience: n}; validation calibrates it")
    lr: Optional[float] = Field(None, gt=0, lt=1, description="default: 1e-3 (deebert), 5e-5 (pabee)",
                                json_schema_extra=searchable(1e-5, 1e-2, log=True))
    temperature: float = Field(2.0, gt=0, description="softens the head's and the teacher's label distributions "
                                                      "before they are matched")
    kd: float = Field(1.0, ge=0, description="weight of matching the teacher's logits")
    label: float = Field(1.0, ge=0, description="weight of the cross-entropy on true labels")

    @field_validator("exits")
    @classmethod
    def _layers(cls, v):
        if v != "all" and (not v or any(i < 0 for i in v)):
            raise ValueError("give at least one layer index >= 0, or all")
        return v

    @model_validator(mode="after")
    def _lr(self):
        if self.lr is None:
            self.lr = DEFAULT_LR[self.mode]
        return self


# -- training ------------------------------------------------------------------------------------------------

def head_loss(task: Task, logits: torch.Tensor, teacher: Optional[torch.Tensor], labels: torch.Tensor,
              cfg: EarlyExitConfig) -> torch.Tensor:
    """kd * the task's distillation term (T^2 KL(head/T || teacher/T)) + label * its loss on the true labels, for one
    head's logits."""
    loss = cfg.label * task.label_loss(logits, labels) if cfg.label else torch.zeros(())
    if cfg.kd and teacher is not None:
        loss = loss + cfg.kd * task.distill(logits, teacher, cfg.temperature)
    return loss


def deebert_loss(model: CanonicalTransformer, inputs, labels, cfg: EarlyExitConfig) -> torch.Tensor:
    """Mean over exit heads of head_loss against the model's own (frozen) final head."""
    mask = model.attention_mask(inputs)
    with torch.no_grad():  # the backbone is frozen: one forward without a graph, heads trained on its states
        last, hidden = model.encode(*inputs, all_hidden=True)
        final = model.head_output(last, mask)
    losses = [head_loss(model.task, model.exit_output(i, hidden[layer + 1], mask), final, labels, cfg)
              for i, layer in enumerate(model.spec.exits)]
    return torch.stack(losses).mean()


def pabee_loss(model: CanonicalTransformer, teacher: Optional[CanonicalTransformer], inputs, labels,
               cfg: EarlyExitConfig) -> torch.Tensor:
    """PABEE's weighted average: head after layer j (1-based) weighs j; the final head weighs the layer count."""
    target = None
    if teacher is not None:
        with torch.no_grad():
            target = teacher(*inputs)
    depths = [layer + 1 for layer in model.spec.exits] + [len(model.layers)]
    losses = [d * head_loss(model.task, z, target, labels, cfg) for d, z in zip(depths, model.exit_logits(*inputs))]
    return torch.stack(losses).sum() / sum(depths)


def exit_layers(cfg: EarlyExitConfig, n_layers: int) -> list[int]:
    if cfg.exits == "all":
        return list(range(n_layers - 1))
    bad = [i for i in cfg.exits if i >= n_layers - 1]
    if bad:
        raise RecipeError(f"early_exit: exit after layer {bad[0]} but the model has {n_layers} layers (0-based; "
                          f"the last one, {n_layers - 1}, already ends in the final head).",
                          f"use layers 0..{n_layers - 2}, or `exits: all`.")
    return sorted(set(cfg.exits))


class EarlyExit(Stage[EarlyExitConfig], name="early_exit", version=1,
                summary="exit heads after chosen layers (DeeBERT frozen backbone or PABEE all-layer loss), "
                        "entropy/patience gate"):
    requires = frozenset({"labels"})
    excludes = frozenset({"quantized"})
    provides = frozenset({"exits"})
    ships_plain = False
    reasons = {"labels": "an exit head predicts the task's labels",
               "quantized": "pabee trains the backbone, which would move quantized weights off their int grid"}
    remedies = {"quantized": "use mode deebert, whose backbone stays frozen"}

    def effects(self):
        full = super().effects()
        # deebert trains only the new heads: a quantized backbone keeps its grid
        return full if self.config.mode == "pabee" else replace(full, excludes=frozenset())

    def min_layers(self) -> tuple[int, str]:
        cfg = self.config
        if cfg.exits == "all":
            return 2, "the last layer ends in the final head, so exits need a layer before it"
        return max(cfg.exits) + 2, f"an exit after layer {max(cfg.exits)} needs a later last layer"

    def apply(self, model: CanonicalTransformer, ctx: Context) -> StageResult:
        cfg = self.config
        if not model.task.has_labels:
            raise RecipeError(f"early_exit needs a classifier: an exit head predicts the task's labels, and a "
                              f"{model.task.name} model has none.",
                              "put a finetune stage (in prepare) before early_exit.")
        if len(model.layers) < 2:
            raise RecipeError("early_exit needs at least 2 layers: the last one ends in the final head.",
                              "remove fewer layers before adding exits.")
        seed_everything(ctx.seed)
        model.set_exits(exit_layers(cfg, len(model.layers)))
        model.spec.exit_gate = cfg.gate.model_dump()
        if cfg.mode == "deebert":
            model.requires_grad_(False)
            model.exit_heads.requires_grad_(True)
            loss_fn = lambda m, x, y: deebert_loss(m, x, y, cfg)  # noqa: E731
        else:
            teacher = ctx.teacher.eval() if ctx.teacher.task.has_labels else None
            loss_fn = lambda m, x, y: pabee_loss(m, teacher, x, y, cfg)  # noqa: E731
        losses = self.fit(model, ctx, loss_fn, f"early exit ({cfg.mode})")
        return StageResult(model.eval(), {"exits": list(model.spec.exits), "gate": cfg.gate.model_dump(),
                                          "final_loss": float(np.mean(losses[-20:])),
                                          **exit_summary(model, ctx, cfg.gate)})


def exit_summary(model: CanonicalTransformer, ctx: Context, gate: Gate) -> dict:
    """On the validation split, in PyTorch: each head's accuracy, and the gate's accuracy and mean depth."""
    logits = np.concatenate([head_logits(model, inputs) for _, inputs in ctx.encoder.batches(ctx.validation, 64)])
    labels = ctx.validation.labels
    decided = decide(gate, logits)
    depths = np.asarray([layer + 1 for layer in model.spec.exits] + [len(model.layers)])
    return {"head_validation_accuracy": [model.task.quality(logits[:, h], labels, None)
                                         for h in range(logits.shape[1])],
            "gate_validation_accuracy": float((decided.labels == labels).mean() * 100),
            "gate_mean_layers": float(depths[decided.exits].mean())}
