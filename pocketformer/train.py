"""Training and evaluation loops shared by fine-tuning, importance scoring and recovery distillation."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np
import torch

from .data import Dataset, Encoder
from .models.canonical import CanonicalTransformer
from .progress import progress_bar


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))


def predict(model: CanonicalTransformer, ds: Dataset, enc: Encoder, batch_size: int = 64) -> torch.Tensor:
    """Outputs (logits or embeddings) for every example, in dataset order."""
    model.eval()
    outs = []
    with torch.no_grad():
        for _, inputs in enc.batches(ds, batch_size):
            outs.append(model(*inputs))
    return torch.cat(outs)


def evaluate(model: CanonicalTransformer, ds: Dataset, enc: Encoder, reference: Optional[np.ndarray] = None,
             batch_size: int = 64) -> dict[str, float]:
    """The model's task quality on `ds`, under the task's key: {"accuracy": %} for a classifier; for an embedding
    model {"cosine_pct": 100 x mean cosine} with `reference`, the original model's outputs on `ds`."""
    out = predict(model, ds, enc, batch_size).numpy()
    return {model.task.quality_key: model.task.quality(out, ds.labels, reference)}


def train_loop(model: CanonicalTransformer, ds: Dataset, enc: Encoder, loss_fn: Callable, *, epochs: float,
               lr: float, batch_size: int, seed: int, desc: str, weight_decay: float = 0.01,
               after_step: Optional[Callable[[], None]] = None) -> list[float]:
    """AdamW with linear warm-up/decay over `epochs` passes (fractions allowed) of `ds`'s examples.
    loss_fn(model, inputs, labels)."""
    return optimise(model, *example_batches(ds, enc, batch_size, seed), loss_fn, epochs=epochs, lr=lr, desc=desc,
                    weight_decay=weight_decay, after_step=after_step)


# An epoch's batches: batches(epoch) -> iterable of (inputs, labels), and how many there are per epoch.
Batches = tuple[Callable[[int], Iterable[tuple[tuple[torch.Tensor, ...], torch.Tensor]]], int]


def example_batches(ds: Dataset, enc: Encoder, batch_size: int, seed: int) -> Batches:
    """Labelled examples, encoded, in length buckets, shuffled anew each epoch."""
    def batches(epoch: int):
        for idx, inputs in enc.batches(ds, batch_size, shuffle_seed=seed + epoch, bucket=True):
            yield inputs, torch.from_numpy(ds.labels[idx])
    return batches, (len(ds) + batch_size - 1) // batch_size


def text_batches(windows: list[list[int]], batch_size: int, seed: int) -> Batches:
    """Token windows of equal length stacked into batches ((ids,), ids: the next tokens are the labels), shuffled
    anew each epoch."""
    by_length: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        by_length.setdefault(len(w), []).append(i)
    groups = [idx[i:i + batch_size] for _, idx in sorted(by_length.items()) for i in range(0, len(idx), batch_size)]

    def batches(epoch: int):
        rng = np.random.default_rng(seed + epoch)
        for g in rng.permutation(len(groups)):
            ids = torch.tensor([windows[i] for i in groups[g]])
            yield (ids,), ids
    return batches, len(groups)


def optimise(model, batches: Callable, steps_per_epoch: int, loss_fn: Callable, *, epochs: float, lr: float,
             desc: str, weight_decay: float = 0.01, after_step: Optional[Callable[[], None]] = None) -> list[float]:
    """AdamW with linear warm-up/decay over `epochs` passes of `batches(epoch)`; returns the per-step losses."""
    total = max(1, int(round(epochs * steps_per_epoch)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    losses: list[float] = []
    model.train()
    step, epoch = 0, 0
    with progress_bar(desc, total) as advance:
        while step < total:
            for inputs, labels in batches(epoch):
                if step >= total:
                    break
                loss = loss_fn(model, inputs, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                if after_step is not None:
                    after_step()
                losses.append(loss.item())
                step += 1
                advance(loss=float(np.mean(losses[-20:])))
            epoch += 1
    model.eval()
    return losses
