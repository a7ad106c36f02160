"""Recovery distillation: train the compressed student to match the original model (the teacher).

Loss = kd * the task's distillation term on the outputs (a classifier: T^2 KL(student/T || teacher/T); an embedding
model: 1 - cosine between embeddings; a causal LM: the same KL on every position's next-token distribution) + hidden
* MSE of hidden states (each student layer matched to the teacher layer at the same relative depth, TinyBERT's
uniform map; with hidden_norm: channel, each channel's error over the teacher's variance of that channel) + label
* the task's loss on the true labels (a causal LM: the next tokens of its train text).

With teacher_topk: k (a causal LM), the output term matches the teacher's k largest logits per position, computed
once per train window and stored (teacher_topk.py) instead of the whole vocabulary every step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal, Optional

import torch
from pydantic import Field

from ..errors import RecipeError
from ..models.canonical import CanonicalTransformer
from ..train import seed_everything
from ..space import searchable
from .base import Context, Stage, StageResult, TrainingConfig
from .teacher_topk import TeacherTopK


class DistillConfig(TrainingConfig):
    added_settings = frozenset({"hidden_norm", "teacher_topk"})
    temperature: float = Field(2.0, gt=0, description="softens both output distributions before they are matched",
                               json_schema_extra=searchable(1.0, 8.0))
    kd: float = Field(1.0, ge=0, description="weight of the output-matching term")
    hidden: float = Field(1.0, ge=0, description="weight of the hidden-state MSE term")
    hidden_norm: Literal["none", "channel"] = Field(
        "none", description="channel: each hidden channel's squared error divided by the teacher's variance of it "
                            "(in the batch), so a few huge channels (an LM's residual outliers) do not drown the rest")
    label: float = Field(0.0, ge=0, description="weight of the cross-entropy on true labels")
    teacher_topk: int = Field(0, ge=0, le=4096,
                              description="a language model: match the teacher's k largest next-token logits per "
                                          "position, computed once per train window and stored (shared by later "
                                          "stages and runs with the same teacher), not its whole vocabulary every "
                                          "step; 0: the whole distribution")


def check_topk(cfg: DistillConfig, model, where: str, stage: str) -> None:
    """Refuse teacher_topk where the model's outputs are distilled whole (an encoder's labels or embedding)."""
    if cfg.teacher_topk and not model.task.distills_topk:
        raise RecipeError(f"{where}stage {stage!r}: teacher_topk applies to language models; this model's "
                          f"outputs ({model.task.name}) are matched whole.", "remove teacher_topk.")


@contextmanager
def stored_topk(cfg: DistillConfig, teacher: CanonicalTransformer) -> Iterator[Optional[TeacherTopK]]:
    """The teacher's stored top-k logits for a stage's training (None without teacher_topk); what the stage computed
    is saved when it ends, also when interrupted."""
    stored = TeacherTopK(teacher, cfg.teacher_topk) if cfg.teacher_topk else None
    try:
        yield stored
    finally:
        if stored is not None:
            stored.save()


def topk_details(stored: Optional[TeacherTopK]) -> dict:
    """A stage's details entry for its stored top-k logits (none without them)."""
    return {"teacher_topk": stored.details()} if stored is not None else {}


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher hidden-state index for each student hidden state (index 0 = embeddings)."""
    return [0] + [round((j + 1) * n_teacher / n_student) for j in range(n_student)]


def distill_loss(student: CanonicalTransformer, teacher: CanonicalTransformer, inputs, labels,
                 cfg: DistillConfig, stored: Optional[TeacherTopK] = None) -> torch.Tensor:
    """The loss of one batch; with `stored` (teacher_topk), the output term reads the teacher's stored top-k
    logits, and the teacher runs only for hidden states or windows not stored yet."""
    task, mask = student.task, student.attention_mask(inputs)
    t_last = t_hidden = t_out = topk = None
    with torch.no_grad():
        if stored is None or cfg.hidden or stored.missing(inputs[0]):
            t_last, t_hidden = teacher.encode(*inputs, all_hidden=True)
        if stored is None:
            t_out = teacher.head_output(t_last, mask)
        elif cfg.kd:
            topk = stored.take(inputs[0], lambda: teacher.head_output(t_last, mask))
    s_last, s_hidden = student.encode(*inputs, all_hidden=True)
    s_out = student.head_output(s_last, mask)
    loss = torch.zeros(())
    if cfg.kd:
        loss = loss + cfg.kd * (task.distill(s_out, t_out, cfg.temperature) if topk is None
                                else task.distill_topk(s_out, *topk, cfg.temperature))
    if cfg.hidden:
        weight = mask[..., None].to(s_last.dtype) if mask is not None else torch.ones_like(s_last[..., :1])
        for s_i, t_i in enumerate(layer_map(len(s_hidden) - 1, len(t_hidden) - 1)):
            if s_i == 0:
                continue  # embeddings are shared and untouched by the stages
            err = (s_hidden[s_i] - t_hidden[t_i]) ** 2
            if cfg.hidden_norm == "channel":
                t = t_hidden[t_i]
                mean = (t * weight).sum((0, 1)) / weight.sum()
                err = err / (((t - mean) ** 2 * weight).sum((0, 1)) / weight.sum() + 1e-6)
            sq = (err * weight).sum() / (weight.sum() * s_last.shape[-1])
            loss = loss + cfg.hidden * sq / (len(s_hidden) - 1)
    label_term = task.label_loss(s_out, labels) if cfg.label else None
    if label_term is not None:
        loss = loss + cfg.label * label_term
    return loss


class Distill(Stage[DistillConfig], name="distill", version=2,  # 2: embeddings distilled by cosine
              summary="recovery distillation from the original model (outputs + hidden states; a language model: "
                      "next-token distributions on its train text)"):
    kinds = frozenset({"encoder", "causal_lm"})
    excludes = frozenset({"quantized"})
    reasons = {"quantized": "training would move quantized weights off their int grid"}

    def check_model(self, model, where: str = "") -> None:
        super().check_model(model, where)
        check_topk(self.config, model, where, self.name)

    def apply(self, model: CanonicalTransformer, ctx: Context) -> StageResult:
        cfg = self.config
        seed_everything(ctx.seed)
        teacher = ctx.teacher.eval()  # its forward runs under no_grad in distill_loss
        with stored_topk(cfg, teacher) as stored:
            losses = self.fit(model, ctx, lambda m, x, y: distill_loss(m, teacher, x, y, cfg, stored), "distill")
        return StageResult(model, {"final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                                   **topk_details(stored)})
