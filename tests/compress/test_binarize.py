"""The binarize stage: similarity targets, hash fitting on calibration data, and the swap to EcoFormer attention."""

import copy
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from pocketformer.compress import REGISTRY, Context
from pocketformer.compress.binarize import Binarize, BinarizeConfig, code_agreement, similarity_targets
from pocketformer.data import Encoder, load_dataset
from pocketformer.errors import RecipeError
from pocketformer.models.ecoformer import EcoAttention
from pocketformer.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 30522  # MiniLM's tokenizer (its files only; no MiniLM weights are loaded)
FAST = dict(bits=8, anchors=8, top_k=3, calibration_examples=16, hash_steps=40)


@lru_cache(maxsize=None)
def digits(split: str):
    return load_dataset("digits", split)


@pytest.fixture(scope="module")
def reviews(tmp_path_factory, make_csv):
    path = make_csv(tmp_path_factory.mktemp("reviews") / "reviews.csv", rows=80)
    return load_dataset(str(path), "train"), load_dataset(str(path), "validation")


@pytest.fixture
def text_setup(make_model, reviews, minilm_path):
    """A tiny text classifier over MiniLM's vocabulary and a Context whose reviews batch with real padding."""
    model = make_model("text", labels=["neg", "pos"], vocab_size=VOCAB)
    train, validation = reviews
    ctx = Context(teacher=copy.deepcopy(model).eval(), train=train, validation=validation,
                  encoder=Encoder(minilm_path, max_len=32), batch_size=8)
    return model, ctx


def digits_context(model) -> Context:
    return Context(teacher=copy.deepcopy(model).eval(), train=digits("train"), validation=digits("validation"),
                   encoder=Encoder(None), batch_size=8)


def binarize_result(model, ctx, **settings):
    return Binarize(BinarizeConfig(**{**FAST, **settings})).apply(model, ctx)


def binarize(model, ctx, **settings):
    return binarize_result(model, ctx, **settings).model


# -- pure functions -------------------------------------------------------------------------------------------------

def test_targets_mark_top_and_bottom_k_valid_keys_per_valid_query():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3, 9.0]]).expand(6, 6)[None, None]  # every query alike
    valid = torch.tensor([[True] * 5 + [False]])
    targets = similarity_targets(scores, valid, top_k=2)[0, 0]
    assert targets[0].tolist() == [1.0, -1.0, 0.0, 1.0, -1.0, 0.0]  # the padded key (score 9) is never a target
    assert targets[5].abs().sum() == 0  # nor is a padded query


def test_targets_in_a_short_sequence_never_mark_a_key_both_ways():
    scores = torch.randn(1, 1, 3, 3)
    targets = similarity_targets(scores, torch.ones(1, 3, dtype=torch.bool), top_k=5)
    assert (targets == 1).sum(-1).tolist() == [[[1, 1, 1]]] and (targets == -1).sum(-1).tolist() == [[[1, 1, 1]]]


def test_code_agreement_is_one_for_codes_that_follow_the_targets():
    h = torch.tensor([[1.0, 1.0, -1.0], [1.0, 1.0, -1.0]])[None, None]  # 2 bits x 3 tokens
    targets = torch.tensor([[0.0, 1.0, -1.0], [1.0, 0.0, -1.0], [0.0, 0.0, 0.0]])[None, None]
    assert code_agreement(h, h, targets).tolist() == [1.0]


# -- the stage ------------------------------------------------------------------------------------------------------

def test_all_layers_become_ecoformer_with_the_configured_bits_and_anchors(text_setup):
    model, ctx = text_setup
    out = binarize(model, ctx)
    assert all(isinstance(layer.attn, EcoAttention) for layer in out.layers)
    assert {(s.attention, s.hash_bits, s.anchors) for s in out.config.layers} == {("ecoformer", 8, 8)}


def test_only_the_chosen_layers_are_binarized(text_setup):
    model, ctx = text_setup
    out = binarize(model, ctx, layers=[1])
    assert [s.attention for s in out.config.layers] == ["softmax", "ecoformer"]


def test_query_key_value_and_output_weights_are_carried_over(text_setup):
    model, ctx = text_setup
    before = {n: getattr(model.layers[0].attn, n).weight.detach().clone() for n in "qkvo"}
    out = binarize(model, ctx, layers=[0])
    assert all(torch.equal(getattr(out.layers[0].attn, n).weight, w) for n, w in before.items())


def test_learned_hash_agrees_with_the_targets_better_than_a_random_one(text_setup):
    model, ctx = text_setup
    for layer in binarize_result(model, ctx).details["layers"]:
        assert layer["code_agreement"] > layer["random_agreement"] + 0.1


def test_details_report_how_close_the_new_attention_and_model_outputs_stay(text_setup):
    model, ctx = text_setup
    notes = binarize_result(model, ctx).details
    assert [r["layer"] for r in notes["layers"]] == [0, 1]
    assert all(0.5 < r["attention_output_cosine"] <= 1.0 + 1e-6 for r in notes["layers"])
    assert 0.5 < notes["output_cosine"] <= 1.0 + 1e-6 and 0.0 <= notes["label_agreement"] <= 1.0


def test_binarize_is_deterministic_for_a_seed_on_images(make_model):
    runs = []
    for _ in range(2):
        model = make_model("vision", labels=[str(i) for i in range(10)])
        runs.append(binarize(model, digits_context(model)).state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_a_layer_index_beyond_the_model_is_a_recipe_error(make_model):
    model = make_model("vision", labels=[str(i) for i in range(10)])
    with pytest.raises(RecipeError, match="layers \\[5\\] do not exist"):
        binarize(model, digits_context(model), layers=[0, 5])


def test_binarizing_a_layer_twice_is_a_recipe_error(make_model):
    model = make_model("vision", labels=[str(i) for i in range(10)])
    ctx = digits_context(model)
    binarize(model, ctx, layers=[0], hash_steps=0)
    with pytest.raises(RecipeError, match="already has EcoFormer attention"):
        binarize(model, ctx, layers=[0])


@pytest.mark.parametrize("settings", [{"layers": []}, {"layers": [-1]}, {"bits": 0}, {"anchors": 0},
                                      {"hash_lr": 0}, {"unknown": 1}])
def test_invalid_settings_are_rejected(settings):
    with pytest.raises(ValidationError):
        BinarizeConfig(**settings)


def test_the_example_ecoformer_recipe_binarizes_every_layer_then_distills():
    recipe = load_recipe(ROOT / "examples" / "minilm-sentiment" / "ecoformer.yaml")
    assert [stage.name for stage in recipe.build("stages")] == ["binarize", "distill"]
    assert recipe.build("stages")[0].config.layers == "all" and "binarize" in REGISTRY
