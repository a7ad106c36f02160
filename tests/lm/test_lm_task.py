"""The causal_lm task's contract (the encoder tasks' is tests/models/test_task_contract.py): the decoder declares the
task's output last, next-token loss and distillation train it, perplexity is exp(mean NLL), agreement and the
reduced-precision rule are per token."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pocketformer.export.base import parity
from pocketformer.models import CausalLM, CausalLMConfig
from pocketformer.models.causal import DecoderLayerShape
from pocketformer.models.tasks import TASKS


def tiny_lm(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    layers = [DecoderLayerShape(heads=4, kv_heads=2, head_dim=16, ffn=128) for _ in range(2)]
    return CausalLM(CausalLMConfig(family="llama", hidden=64, vocab_size=100, layers=layers, max_positions=64))


def test_the_decoder_declares_the_tasks_output_last():
    model, task = tiny_lm(), TASKS["causal_lm"]
    assert model.task is task and model.io.output_names[-1] == task.output == model.output_name
    assert model.io.output_names[:2] == ["present.0.key", "present.0.value"]


def test_next_token_loss_and_distillation_train():
    model, task = tiny_lm().train(), TASKS["causal_lm"]
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):  # the loss is next-token cross-entropy: a few steps on one batch lower it
        loss = task.loss(model(ids), ids, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(p.grad is not None for p in model.layers[0].parameters())
    manual = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 100), ids[:, 1:].reshape(-1))
    assert task.loss(model(ids), ids, None).item() == pytest.approx(manual.item(), rel=1e-6)
    out = model(ids)
    assert task.distill(out, out.detach(), 2.0).abs() < 1e-5 and task.distill(out, -out.detach(), 2.0) > 0.1


def test_perplexity_agreement_and_precision_rule():
    task = TASKS["causal_lm"]
    ids = np.random.default_rng(0).integers(0, 50, size=(2, 9))
    sure = np.full((2, 9, 50), -20.0, dtype=np.float32)
    sure[np.arange(2)[:, None], np.arange(8)[None], ids[:, 1:]] = 20.0  # every next token predicted with certainty
    assert task.quality(sure, ids, None) == pytest.approx(1.0, abs=1e-6) and task.lower_is_better
    flat = np.zeros_like(sure)
    assert task.quality(flat, ids, None) == pytest.approx(50.0, rel=1e-5)
    masked = ids.copy()
    masked[1] = -100  # padding: not scored
    assert task.quality(flat, masked, None) == pytest.approx(50.0, rel=1e-5)
    assert task.agreement(sure, sure) == 1.0
    assert task.reduced_precision_ok(parity(sure, sure, per_position=True))
    shuffled = np.roll(sure, 1, axis=-1)
    assert not task.reduced_precision_ok(parity(sure, shuffled, per_position=True))
    assert parity(sure, sure, per_position=True)["examples"] == 18  # one row per token
