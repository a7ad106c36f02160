"""lowrank and dense_sparse on a causal LM, by the encoders' rules: every linear the model has (q, k, v, o, gate,
up, down) unless `linears` names some, a linear left dense where its factors would hold no fewer weights; the
factorized LM decodes with its cache as its full forward does, and `pocketformer run` exports it (ONNX, TFLite, each
file checked against PyTorch) and validates it on the runtimes."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from pocketformer.compress import REGISTRY, Context
from pocketformer.errors import RecipeError
from pocketformer.models import import_hf

from .test_lm_run import run_recipe, write_profiles
from .tiny_lms import save_tiny_lm, text_windows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = save_tiny_lm("llama", tmp_path_factory.mktemp("lm-factorize") / "hf")
    model, _ = import_hf(hf)
    return model, text_windows(hf)


def apply(stage: str, model, **config):
    cls = REGISTRY[stage]
    ctx = Context(teacher=None, train=None, validation=None, encoder=None, text=None)
    return cls(cls.Config.model_validate(config)).apply(copy.deepcopy(model), ctx)


def decodes_as_full_forward(model, ids: list[int]) -> None:
    """Logits of a cached decode, token by token, equal the full forward's."""
    with torch.no_grad():
        full = model(torch.tensor([ids]))
        logits, past = model(torch.tensor([ids[:1]]), use_cache=True)
        steps = [logits[:, -1]]
        for t in range(1, len(ids)):
            logits, past = model(torch.tensor([[ids[t]]]), past=past, use_cache=True,
                                 attention_mask=torch.ones(1, t + 1, dtype=torch.long))
            steps.append(logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("stage,config", [("lowrank", {"method": "ranks", "ranks": 16}),
                                          ("dense_sparse", {"rank": 0.5, "nnz": 0.25})])
def test_every_linear_of_a_decoder_is_factorized_and_it_still_decodes(tiny, stage, config):
    model, windows = tiny
    result = apply(stage, model, **config)
    factorized = result.model
    done = {(d["layer"], d["linear"]) for d in result.details["linears"] if d["rank"]}
    assert {name for _, name in done} == {"q", "k", "v", "o", "gate", "up", "down"}
    shapes = factorized.config.layers[0].linears
    assert set(shapes) == {"q", "k", "v", "o", "gate", "up", "down"}
    decodes_as_full_forward(factorized, windows[0][:12])
    # the factors approximate the weights: the outputs move, but stay close to the dense model's
    with torch.no_grad():
        ids = torch.tensor([windows[0]])
        dense, approx = model(ids), factorized(ids)
    assert 0 < (dense - approx).abs().max() and torch.nn.functional.cosine_similarity(
        dense.flatten(), approx.flatten(), dim=0) > 0.5


def test_a_rank_that_would_not_pay_leaves_the_linear_dense(tiny):
    """k and v of the tiny Llama are 64 x 32: two factors of rank 24 hold 24 x 96 = 2,304 weights, more than the
    matrix's 2,048, so they stay dense (the rule the encoders follow); q (64 x 64) at rank 24 holds 3,072 < 4,096."""
    model, _ = tiny
    result = apply("lowrank", model, method="ranks", ranks=24, linears=["q", "k", "v"])
    why = {d["linear"]: d for d in result.details["linears"] if d["layer"] == 0}
    assert why["q"]["rank"] == 24
    assert why["k"]["rank"] is None and "saves nothing" in why["k"]["why"]
    assert set(result.model.config.layers[0].linears) == {"q"}


def test_an_encoders_linear_name_on_a_decoder_is_one_recipe_error(tiny):
    model, _ = tiny
    with pytest.raises(RecipeError, match="'fc1' is not a linear of this model .*q, k, v, o, gate, up, down"):
        apply("lowrank", model, linears=["fc1"])


def test_run_exports_and_validates_a_factorized_language_model(tmp_path):
    """`pocketformer run` with lowrank then a short distillation on a tiny Llama: the factorized model exports with
    its cache to ONNX and TFLite (each file checked against PyTorch), is validated on both runtimes, and its
    stage report says which linears it factorized."""
    from pocketformer.models import load

    save_tiny_lm("llama", tmp_path / "tiny-llama")
    recipe = {"name": "tiny-lm-lowrank", "model": "tiny-llama", "data": "botchan", "max_len": 32,
              "stages": [{"lowrank": {"method": "budget", "budget": 0.5, "linears": ["gate", "up", "down"]}},
                         {"distill": {"epochs": 1, "max_examples": 16}}],
              "export": {"formats": ["onnx", "tflite"], "baseline_formats": [], "int8": False},
              "targets": write_profiles(tmp_path)[:2]}
    out = run_recipe(tmp_path, recipe)
    summary = json.loads((out / "compress.json").read_text())
    lowrank = summary["stages"][0]
    assert lowrank["stage"] == "lowrank" and lowrank["params_after"] < lowrank["params_before"]
    assert {d["linear"] for d in lowrank["details"]["linears"] if d["rank"]} <= {"gate", "up", "down"}
    model, _ = load(out / "model")  # the saved model is factorized where the stage said
    assert [set(la.linears) for la in model.config.layers] == [{"gate", "up", "down"}] * 2
    report = json.loads((out / "report.json").read_text())
    files = {r["file"]: r for r in report["validation"]}
    assert {"model.fp32.onnx", "model.fp32.tflite"} <= set(files)
    for r in files.values():  # perplexity against the unfactorized baseline's
        assert r["perplexity"] > 1 and r["perplexity_increase_pct"] != 0 and r["decode_tokens_per_s"] > 0
