"""MatFormer on a causal LM: the gated-FFN neurons sorted by importance (a permutation: the function is unchanged),
every width prefix trained jointly against the original on its text, and a width cut out by `extract` as a plain
model that computes exactly what the nested model computes at that width, and exports with its cache."""

from __future__ import annotations

import copy

import pytest
import torch

from pocketformer.compress import REGISTRY, Context
from pocketformer.compress.matformer import active_widths, sort_neurons, widths_at
from pocketformer.compress.lm_prune import magnitude_scores
from pocketformer.extract import extract
from pocketformer.models import import_hf
from pocketformer.models.lm_importers import tokenizer_of
from pocketformer.targets import export_checked, get_runtime
from pocketformer.targets.lm import open_lm, token_match

from .tiny_lms import save_tiny_lm, text_windows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # weights drawn wide (0.2, not 0.02), so the FFNs matter: at 0.02 half of them change the output by a KL of 3e-6
    hf = save_tiny_lm("qwen2", tmp_path_factory.mktemp("lm-matformer") / "hf", initializer_range=0.2)
    model, _ = import_hf(hf)
    windows = text_windows(hf)
    return model, windows, tokenizer_of(hf)


def kl_to(student, teacher, windows) -> float:
    with torch.no_grad():
        ids = torch.tensor(windows)
        t, s = teacher(ids).log_softmax(-1), student(ids).log_softmax(-1)
        return float((t.exp() * (t - s)).sum(-1).mean())


@pytest.fixture(scope="module")
def nested(tiny):
    model, windows, _ = tiny
    stage = REGISTRY["matformer"](REGISTRY["matformer"].Config(widths=[1, 0.5], importance="magnitude", epochs=6,
                                                              lr=1e-3, temperature=1.0))
    ctx = Context(teacher=copy.deepcopy(model), train=None, validation=None, encoder=None, batch_size=4,
                  text={"train": windows, "validation": windows})
    return stage.apply(copy.deepcopy(model), ctx)


def test_sorting_neurons_keeps_the_function(tiny):
    model, windows, _ = tiny
    s = copy.deepcopy(model)
    sort_neurons(s, magnitude_scores(s)[1])
    with torch.no_grad():
        ids = torch.tensor(windows[:2])
        torch.testing.assert_close(s(ids), model(ids), atol=1e-5, rtol=1e-5)
    scores = magnitude_scores(s)[1][0]
    assert bool((scores[:-1] >= scores[1:]).all())  # the strongest first


def test_nested_training_brings_the_half_width_towards_the_original(tiny, nested):
    model, windows, _ = tiny
    untrained = copy.deepcopy(model)
    sort_neurons(untrained, magnitude_scores(untrained)[1])
    with active_widths(untrained, widths_at(untrained, 0.5)):
        before = kl_to(untrained, model, windows)
    trained = nested.model
    with active_widths(trained, widths_at(trained, 0.5)):
        after = kl_to(trained, model, windows)
    assert after < 0.75 * before, (before, after)  # measured here: 0.758 -> 0.378
    assert trained.spec.nested_ffn == [1.0, 0.5]
    assert set(nested.details["validation_perplexity"]) == {"1", "0.5"}
    assert nested.details["widths"]["0.5"] == [64, 64]


def test_an_extracted_width_is_a_plain_lm_that_exports_with_its_cache(tiny, nested, tmp_path):
    _, windows, tok = tiny
    trained = nested.model
    sub = extract(trained, widths_at(trained, 0.5))
    assert [la.ffn.width for la in sub.layers] == [64, 64] and sub.spec.nested_ffn == []
    ids = torch.tensor(windows[:2])
    with torch.no_grad(), active_widths(trained, widths_at(trained, 0.5)):
        torch.testing.assert_close(sub(ids), trained(ids), atol=1e-5, rtol=1e-5)
    records = export_checked(sub, tmp_path, "model", sub.graph_inputs(ids[:, :24], 16), "onnx", int8=False)
    prompt = tok.encode("During my grammar school days, I was").ids
    got = open_lm(get_runtime("onnxruntime"), tmp_path / records[0]["file"], 1).generate(prompt, 16)
    assert token_match(got, sub.generate(torch.tensor([prompt]), 16).tolist())["match"] == 1.0

