"""The task registry: what a model's output means, and so how it is trained, scored and compared.

A task owns its output declaration, its training loss (against labels or the reference model), its distillation
term, its quality metric, its agreement with a reference and the bar a reduced-precision file must clear. Stages,
training, export and validation ask the model's task instead of testing `classifier is None`. A new task (a causal
LM with past/present key-values) is one more subclass here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch.nn import functional as F

from .signature import TensorSpec

# `cfg` below is a canonical ModelConfig; not imported, since the model imports its tasks.
TASKS: dict[str, "Task"] = {}


def cosine_rows(a, b) -> np.ndarray:
    """Cosine between matching rows of two arrays (flattened per example): the one cosine every comparison uses."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def label_agreement(a, b) -> float:
    """Share of examples whose argmax is the same in both outputs."""
    return float((np.asarray(a).argmax(-1) == np.asarray(b).argmax(-1)).mean())


class Task:
    """One entry of the registry. Subclasses register themselves by `name`."""

    name: ClassVar[str]
    output: ClassVar[str]  # the output tensor's name
    metric: ClassVar[str]  # what `quality` reports, for humans: "accuracy %" or "cosine x100"
    quality_key: ClassVar[str]  # the same, as a report key: "accuracy" or "cosine_pct"
    has_labels: ClassVar[bool]  # does the output predict the data's labels (exit heads, accuracy budgets)?
    # A reduced-precision file (fp16, int8, palettes) is kept when it makes the float model's decisions: this
    # entry of its parity with PyTorch (export.base.parity) at least `min_agreement`.
    precision_metric: ClassVar[str]
    min_agreement: ClassVar[float]
    lower_is_better: ClassVar[bool] = False  # quality's direction (perplexity: lower)
    per_position: ClassVar[bool] = False  # one output row per token (a language model's logits), not per example
    # Can distillation match the teacher's k largest outputs per row, stored once, instead of its whole output
    # (distill_topk)? For outputs too wide to recompute every step on a CPU: a language model's vocabulary.
    distills_topk: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        TASKS[cls.name] = cls()

    def output_spec(self, cfg: Any) -> TensorSpec:
        return TensorSpec(self.output, "float32", ("batch", self.output_width(cfg)))

    def output_width(self, cfg: Any) -> int:
        raise NotImplementedError

    def loss(self, out: torch.Tensor, labels: torch.Tensor, reference: Optional[torch.Tensor]) -> torch.Tensor:
        """The task's training loss: against the labels, or the reference model's outputs where it has none."""
        raise NotImplementedError

    @property
    def loss_needs_reference(self) -> bool:
        return not self.has_labels

    def distill(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """The output term of recovery distillation."""
        raise NotImplementedError

    def distill_topk(self, student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     temperature: float) -> torch.Tensor:
        """The output term against the teacher's `values`, its k largest outputs of each row, at `indices` (both
        shaped like `student` but k wide): only where `distills_topk`."""
        raise NotImplementedError(f"a {self.name} model's outputs are distilled whole")

    def label_loss(self, out: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """Cross-entropy on the true labels, where the output predicts them."""
        return F.cross_entropy(out, labels) if self.has_labels else None

    def quality(self, out, labels: Optional[np.ndarray], reference) -> float:
        """Higher is better, in percent: accuracy against labels, or 100 x mean cosine with the reference."""
        raise NotImplementedError

    def agreement(self, out, reference) -> float:
        """In [0, 1]: how far `out` makes the same decisions as `reference` on the same examples."""
        raise NotImplementedError

    def correct(self, out, labels: np.ndarray) -> np.ndarray:
        """(N,) booleans: is each example's output right? The paired accuracy tests (pocketformer.verdict) compare
        two models' correctness example by example. Only tasks with labels have it."""
        raise NotImplementedError(f"a {self.name} model's outputs are not right or wrong against labels")

    def reduced_precision_ok(self, parity: dict[str, Any]) -> bool:
        return parity[self.precision_metric] >= self.min_agreement


class Classification(Task):
    name, output, has_labels = "classification", "logits", True
    metric, quality_key = "accuracy %", "accuracy"
    # Argmax agreement: the cosine of a 2-logit vector swings with small shifts near the decision boundary (a
    # fine-tuned MiniLM sentiment model's ORT int8 file: logit cosine 0.985 on 16 test inputs).
    precision_metric, min_agreement = "argmax_agreement", 0.9

    def output_width(self, cfg: Any) -> int:
        return len(cfg.head.labels)

    def loss(self, out, labels, reference):
        return F.cross_entropy(out, labels)

    def distill(self, student, teacher, temperature):
        t = temperature
        return t * t * F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                                reduction="batchmean")

    def quality(self, out, labels, reference):
        return float(self.correct(out, labels).mean() * 100.0)

    def correct(self, out, labels):
        return np.asarray(out).argmax(-1) == np.asarray(labels)

    def agreement(self, out, reference):
        return label_agreement(out, reference)


class Embedding(Task):
    name, output, has_labels = "embedding", "embedding", False
    metric, quality_key = "cosine x100", "cosine_pct"
    precision_metric, min_agreement = "cosine", 0.99  # embeddings: the same direction

    def output_width(self, cfg: Any) -> int:
        return cfg.head.dense or cfg.hidden

    def loss(self, out, labels, reference):
        if reference is None:
            raise ValueError("an embedding model's loss needs the reference model's outputs")
        return F.mse_loss(out, reference)

    def distill(self, student, teacher, temperature):
        """1 - cosine, per example: what retrieval compares. (Per-element MSE of L2-normalised embeddings is
        2 (1 - cos) / dims, a gradient hundreds of times too weak: measured, MiniLM pruned and distilled that way
        kept 0.82 cosine with its original embeddings.)"""
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()

    def quality(self, out, labels, reference):
        return 100.0 * float(cosine_rows(out, reference).mean())

    def agreement(self, out, reference):
        return float(cosine_rows(out, reference).mean())


class CausalLanguageModel(Task):
    """Next-token prediction. Output: logits (batch, sequence, vocab). Quality is perplexity (lower is better, so
    `lower_is_better`); agreement with a reference is top-1 next-token agreement over the real tokens."""

    name, output, has_labels = "causal_lm", "logits", False
    metric, quality_key = "perplexity", "perplexity"
    lower_is_better = per_position = distills_topk = True
    precision_metric, min_agreement = "argmax_agreement", 0.9

    def output_spec(self, cfg: Any) -> TensorSpec:
        return TensorSpec(self.output, "float32", ("batch", "sequence", cfg.vocab_size))

    def output_width(self, cfg: Any) -> int:
        return cfg.vocab_size

    @property
    def loss_needs_reference(self) -> bool:
        return False

    def loss(self, out, labels, reference):
        """Next-token cross-entropy: `labels` are the input ids, -100 where no prediction counts (padding)."""
        return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)

    def distill(self, student, teacher, temperature):
        t = temperature
        s, r = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        return t * t * F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(r / t, -1), log_target=True,
                                reduction="batchmean")

    def distill_topk(self, student, values, indices, temperature):
        """KL from the teacher's distribution restricted to its top k tokens (renormalised there) to the student's
        full distribution at those tokens: the sparse distillation of Sparse/Top-k KD. With k = the vocabulary it
        is `distill` exactly; the student's mass outside the teacher's top k is pushed down only through the
        normalisation of its softmax."""
        t = temperature
        s = student.reshape(-1, student.shape[-1])
        v, i = values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1])
        log_p = F.log_softmax(v / t, -1)
        log_q = F.log_softmax(s / t, -1).gather(-1, i.long())
        return t * t * (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    def label_loss(self, out, labels):
        return self.loss(out, labels, None)

    def quality(self, out, labels, reference):
        """Perplexity of the next tokens `labels` (batch, seq; -100 where none counts) under logits `out`."""
        return perplexity(out, labels)

    def agreement(self, out, reference):
        return label_agreement(out, reference)


def perplexity(logits, ids) -> float:
    """exp(mean next-token negative log-likelihood); `ids` -100 where a token is not predicted (padding)."""
    logits = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=-100)
    return float(torch.exp(nll))


def task_of(cfg: Any) -> Task:
    return TASKS[cfg.task]
