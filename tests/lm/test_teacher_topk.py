"""Distillation from a language model's stored top-k logits (distill / matformer `teacher_topk`): with k = the whole
vocabulary it is the full KL; the teacher runs once per train window, and a later stage with the same teacher reads
the stored logits without running it; training on them brings the student closer in the full KL; an encoder's
outputs are refused (they are matched whole)."""

from __future__ import annotations

import copy

import pytest
import torch

from pocketformer.compress import REGISTRY, Context
from pocketformer.compress.distill import Distill, DistillConfig, distill_loss
from pocketformer.compress.teacher_topk import TeacherTopK
from pocketformer.errors import RecipeError
from pocketformer.models import import_hf

from .tiny_lms import VOCAB, save_tiny_lm, text_windows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = save_tiny_lm("llama", tmp_path_factory.mktemp("lm-topk") / "hf", initializer_range=0.2)
    teacher, _ = import_hf(hf)
    windows = text_windows(hf)
    student = copy.deepcopy(teacher)
    student.keep_neurons(0, list(range(48)))  # a pruned student: its outputs differ from the teacher's
    student.keep_neurons(1, list(range(48)))
    return teacher.eval(), student, windows


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETFORMER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Counted:
    """The teacher, counting how many windows its layers ran on (a real model; only the count is added)."""

    def __init__(self, model):
        self.model, self.windows = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def eval(self):
        self.model.eval()
        return self

    def encode(self, *inputs, **kw):
        self.windows += len(inputs[0])
        return self.model.encode(*inputs, **kw)


def full_kl(student, teacher, windows) -> float:
    with torch.no_grad():
        ids = torch.tensor(windows)
        t, s = teacher(ids).log_softmax(-1), student(ids).log_softmax(-1)
        return float((t.exp() * (t - s)).sum(-1).mean())


@pytest.mark.parametrize("hidden", [0.0, 1.0])
def test_topk_over_the_whole_vocabulary_is_the_full_kl(tiny, cache, hidden):
    teacher, student, windows = tiny
    batch = (torch.tensor(windows[:4]),)
    cfg = DistillConfig(hidden=hidden, temperature=2.0)
    with torch.no_grad():
        whole = float(distill_loss(student.eval(), teacher, batch, batch[0], cfg))
        stored = TeacherTopK(teacher, VOCAB)
        first = float(distill_loss(student, teacher, batch, batch[0], cfg, stored))  # computes and keeps
        again = float(distill_loss(student, teacher, batch, batch[0], cfg, stored))  # reads what it kept
        narrow = float(distill_loss(student, teacher, batch, batch[0], cfg, TeacherTopK(teacher, 8)))
    assert whole > 1e-3
    assert first == pytest.approx(whole, rel=1e-5) and again == pytest.approx(whole, rel=1e-5)
    assert stored.computed == 4 and stored.reused == 4
    assert narrow != pytest.approx(whole, rel=1e-3)  # 8 of 320 tokens: another loss, not the same one


def test_the_teacher_runs_once_per_window_and_later_stages_read_the_store(tiny, cache):
    teacher, student, windows = tiny
    counted = Counted(teacher)
    ctx = Context(teacher=counted, train=None, validation=None, encoder=None, batch_size=4,
                  text={"train": windows, "validation": windows})
    cfg = DistillConfig(hidden=0.0, teacher_topk=16, epochs=6, lr=3e-3)
    before = full_kl(student, teacher, windows)
    first = Distill(cfg).apply(copy.deepcopy(student), ctx)
    assert first.details["teacher_topk"]["windows_computed"] == 8  # epoch 1: every window once
    assert first.details["teacher_topk"]["windows_reused"] == 40  # epochs 2-6: from the store
    assert counted.windows == 8
    assert full_kl(first.model, teacher, windows) < 0.6 * before  # top-16 of 320 tokens still teach the whole
    files = list((cache / "teacher-topk").glob("*-k16.safetensors"))
    assert len(files) == 1

    counted.windows = 0  # a later stage, another process's view: only the file
    again = Distill(cfg).apply(copy.deepcopy(student), ctx)
    assert again.details["teacher_topk"] == {**first.details["teacher_topk"], "windows_computed": 0,
                                             "windows_reused": 48}
    assert counted.windows == 0  # without hidden-state matching the teacher did not run at all
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        torch.testing.assert_close(a, b)  # the stored logits are the ones the first stage computed

    nested = REGISTRY["matformer"](REGISTRY["matformer"].Config(
        widths=[1, 0.5], importance="magnitude", epochs=1, lr=1e-3, hidden=0.0, teacher_topk=16))
    result = nested.apply(copy.deepcopy(teacher), ctx)
    assert result.details["teacher_topk"]["windows_computed"] == 0 and counted.windows == 0


def test_topk_is_refused_where_outputs_are_matched_whole(make_model):
    encoder = make_model("text", labels=["neg", "pos"])
    for stage in (Distill(DistillConfig(teacher_topk=8)),
                  REGISTRY["matformer"](REGISTRY["matformer"].Config(teacher_topk=8))):
        with pytest.raises(RecipeError, match=r"teacher_topk applies to language models; this model's outputs "
                                              r"\(classification\) are matched whole"):
            stage.check_model(encoder)
