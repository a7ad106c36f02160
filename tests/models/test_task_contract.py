"""The task contract, for every registered task: the model's declared output is the task's, its loss trains, and its
quality, agreement and reduced-precision rule say yes to a perfect copy and no to an unrelated output."""

import numpy as np
import pytest
import torch

from pocketformer.export.base import parity
from pocketformer.models.tasks import TASKS, Task, task_of

LABELS = ("neg", "pos", "neu")
# The encoder tasks; causal_lm (one output row per token, perplexity) has its own contract test in tests/lm.
ENCODER_TASKS = sorted(name for name, task in TASKS.items() if not task.per_position)


def model_for(task: Task, make_model):
    """A tiny model of this task (the task is read from the head, as importers set it)."""
    for labels in ((), LABELS):
        model = make_model("text", labels=labels)
        if task_of(model.spec) is task:
            return model
    pytest.skip(f"no tiny model of task {task.name}")


@pytest.mark.parametrize("name", ENCODER_TASKS)
def test_the_model_declares_the_tasks_output(name, make_model):
    task = TASKS[name]
    model = model_for(task, make_model)
    assert model.task is task and model.io.output_names == [task.output] and model.output_name == task.output


@pytest.mark.parametrize("name", ENCODER_TASKS)
def test_the_tasks_loss_trains(name, make_model, make_text_inputs):
    task = TASKS[name]
    model = model_for(task, make_model).train()
    inputs = make_text_inputs(batch=4, seq=10)
    labels = torch.tensor([0, 1, 2, 0])
    reference = torch.randn_like(model(*inputs)).detach() if task.loss_needs_reference else None
    loss = task.loss(model(*inputs), labels, reference)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert torch.isfinite(task.distill(model(*inputs), model(*inputs).detach(), 2.0))


@pytest.mark.parametrize("name", ENCODER_TASKS)
def test_quality_agreement_and_precision_rule(name, make_model, make_text_inputs):
    task = TASKS[name]
    model = model_for(task, make_model)
    with torch.no_grad():
        out = model(*make_text_inputs(batch=6, seq=10)).numpy()
    labels = out.argmax(-1) if task.has_labels else None
    assert task.quality(out, labels, out) == pytest.approx(100.0)
    assert task.agreement(out, out) == pytest.approx(1.0)
    assert task.reduced_precision_ok(parity(out, out))
    unrelated = np.random.default_rng(0).standard_normal(out.shape).astype(np.float32)
    unrelated[np.arange(len(out)), out.argmax(-1)] = -10.0  # never the same decision
    assert not task.reduced_precision_ok(parity(out, unrelated))
    assert task.agreement(unrelated, out) < 1.0
    if task.has_labels:  # the paired accuracy tests compare correctness example by example
        assert task.correct(out, labels).all() and not task.correct(unrelated, labels).any()


def test_a_config_may_name_its_task_and_an_unknown_one_is_refused(make_config):
    from pydantic import ValidationError

    cfg = make_config("text", labels=LABELS)
    assert cfg.task == "classification" and cfg.model_copy(update={"task_kind": "embedding"}).task == "embedding"
    with pytest.raises(ValidationError, match="unknown task"):
        type(cfg).model_validate({**cfg.model_dump(), "task_kind": "speech"})
