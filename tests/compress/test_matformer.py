"""MatFormer nested FFNs: neurons sorted by importance, every nested width equal to the extracted dense model, the
nesting recorded and kept through save/load, and nested training that improves the narrow sub-models."""

import copy
from functools import lru_cache

import pytest
import torch
from pydantic import ValidationError

from pocketformer.compress import Context
from pocketformer.compress.distill import distill_loss
from pocketformer.compress.matformer import (Matformer, MatformerConfig, active_widths, nested_width, sort_neurons,
                                             widths_at)
from pocketformer.compress.prune import magnitude_scores
from pocketformer.data import Encoder, load_dataset
from pocketformer.errors import RecipeError
from pocketformer.extract import extract
from pocketformer.models import LayerShape, load, save
from pocketformer.models.factorized import LinearShape

DIGITS = [str(i) for i in range(10)]
FRACTIONS = [1.0, 0.5, 0.25, 0.125]


@lru_cache(maxsize=None)
def digits(split: str):
    return load_dataset("digits", split)


def digits_context(model, train_examples=64) -> Context:
    return Context(teacher=copy.deepcopy(model).eval(), train=digits("train").head(train_examples),
                   validation=digits("validation").head(32), encoder=Encoder(None), batch_size=16)


def nest(model, train_examples=64, **settings):
    settings = {"epochs": 1, "lr": 1e-3, "calibration_examples": 16, **settings}
    result = Matformer(MatformerConfig(**settings)).apply(model, digits_context(model, train_examples))
    return result.model, result.details


@pytest.fixture(scope="module")
def nested(make_model):
    return nest(make_model("vision", labels=DIGITS))


def outputs(model, inputs):
    with torch.no_grad():
        return model(*inputs)


# -- widths ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width,fraction,expected", [(128, 0.5, 64), (1536, 0.125, 192), (40, 0.25, 8), (40, 0.125, 8),
                                                     (130, 1.0, 130), (100, 0.3, 32), (6, 0.5, 3), (0, 0.5, 0)])
def test_nested_width_rounds_to_multiples_of_eight_where_the_layer_allows(width, fraction, expected):
    assert nested_width(width, fraction) == expected


def test_config_sorts_and_deduplicates_the_fractions():
    assert MatformerConfig(widths=[0.25, 1, 0.5, 0.25]).widths == [1.0, 0.5, 0.25]


@pytest.mark.parametrize("widths", [[], [0.5, 0], [1.5], [-0.25]])
def test_config_rejects_fractions_outside_zero_to_one(widths):
    with pytest.raises(ValidationError, match="widths"):
        MatformerConfig(widths=widths)


# -- sorting --------------------------------------------------------------------------------------------------------

def test_sorting_neurons_leaves_the_model_function_unchanged(make_model, make_vision_inputs):
    model = make_model("vision", labels=DIGITS)
    before = outputs(model, make_vision_inputs())
    sort_neurons(model, magnitude_scores(model)[1])
    assert torch.allclose(outputs(model, make_vision_inputs()), before, atol=1e-6)


def test_stage_puts_each_layers_neurons_in_descending_importance_order(make_model):
    # A vanishing learning rate: the order the stage sets is still visible in the trained weights.
    model, _ = nest(make_model("vision", labels=DIGITS), importance="magnitude", lr=1e-12)
    for scores in magnitude_scores(model)[1]:
        assert torch.all(scores[:-1] >= scores[1:])


def test_order_neurons_refuses_what_is_not_a_permutation(make_model):
    with pytest.raises(ValueError, match="permutation"):
        make_model("vision").order_neurons(0, [0, 0] + list(range(2, 128)))


# -- nesting --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", FRACTIONS)
def test_each_nested_width_computes_exactly_the_extracted_dense_model(nested, make_vision_inputs, fraction):
    model, _ = nested
    widths = widths_at(model, fraction)
    with active_widths(model, widths):
        prefix = outputs(model, make_vision_inputs())
    sub = extract(model, widths)
    assert [layer.ffn.width for layer in sub.layers] == widths
    assert torch.allclose(outputs(sub, make_vision_inputs()), prefix, atol=1e-6)


def test_active_widths_are_reset_after_training(nested):
    model, _ = nested
    assert all(layer.ffn.active_width is None for layer in model.layers)


def test_stage_records_the_nested_fractions(nested):
    model, _ = nested
    assert model.config.nested_ffn == FRACTIONS


def test_stage_reports_validation_accuracy_per_width(nested):
    _, details = nested
    accuracy = details["validation_accuracy"]
    assert list(accuracy) == ["1", "0.5", "0.25", "0.125"]
    assert all(0 <= a <= 100 for a in accuracy.values())
    assert details["widths"]["0.125"] == [16, 16]


def test_save_and_load_keep_the_nesting_and_its_prefixes(nested, tmp_path, make_vision_inputs):
    model, _ = nested
    save(model, tmp_path / "nested")
    loaded, _ = load(tmp_path / "nested")
    assert loaded.spec.nested_ffn == FRACTIONS
    widths = widths_at(model, 0.25)
    with active_widths(model, widths), active_widths(loaded, widths):
        assert torch.equal(outputs(loaded, make_vision_inputs()), outputs(model, make_vision_inputs()))


def test_nested_training_lowers_the_narrowest_widths_distillation_loss(make_model):
    teacher = make_model("vision", labels=DIGITS)
    sorted_only = copy.deepcopy(teacher)
    sort_neurons(sorted_only, magnitude_scores(sorted_only)[1])
    trained, _ = nest(copy.deepcopy(teacher), train_examples=256, importance="magnitude", epochs=2)
    held_out = digits("validation").head(64)
    batch = ((torch.from_numpy(held_out.images),), torch.from_numpy(held_out.labels))

    def narrow_loss(model):
        with torch.no_grad(), active_widths(model, widths_at(model, 0.125)):
            return float(distill_loss(model.eval(), teacher, *batch, MatformerConfig()))

    assert narrow_loss(trained) < narrow_loss(sorted_only)


def test_sampling_one_width_per_step_is_reproducible_with_the_seed(make_model):
    first, _ = nest(make_model("vision", labels=DIGITS), sampling="sample", importance="magnitude")
    second, _ = nest(make_model("vision", labels=DIGITS), sampling="sample", importance="magnitude")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


# -- what cannot be nested ------------------------------------------------------------------------------------------

def test_factorized_ffn_is_refused_with_the_stage_order_to_use(make_model, make_config):
    from pocketformer.models import CanonicalTransformer

    cfg = make_config("vision", labels=DIGITS)
    cfg.layers[1] = LayerShape(heads=4, head_dim=16, ffn=128, linears={"fc1": LinearShape(kind="lowrank", rank=8)})
    with pytest.raises(RecipeError, match="lowrank after matformer"):
        nest(CanonicalTransformer(cfg).eval())


def test_quantized_weights_are_refused_with_the_stage_order_to_use(make_model):
    model = make_model("vision", labels=DIGITS)
    model.spec.quantization = {"scheme": "weight_only_rtn", "bits": 8}
    with pytest.raises(RecipeError, match="quantize after matformer"):
        nest(model)
