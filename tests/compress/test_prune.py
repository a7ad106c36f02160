"""Structured pruning: importance scorers, how much is removed, and what the pruned model still computes."""

import copy
import json
from functools import lru_cache

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch.nn import functional as F

from pocketformer.compress import Context
from pocketformer.compress.early_exit import EarlyExit, EarlyExitConfig
from pocketformer.compress.matformer import Matformer, MatformerConfig
from pocketformer.compress.importance import calibration_batches, same_weights
from pocketformer.compress.prune import (Prune, PruneConfig, accuracy_walk, resolve, select_heads,
                                         select_neurons)
from pocketformer.compress.walk import replay
from pocketformer.data import Encoder, load_dataset
from pocketformer.errors import RecipeError
from pocketformer.train import evaluate, predict
from pocketformer.verdict import drop_interval

DIGITS = [str(i) for i in range(10)]
CALIBRATION, BATCH = 16, 8


@lru_cache(maxsize=None)
def digits(split: str):
    return load_dataset("digits", split)


def digits_context(model) -> Context:
    return Context(teacher=copy.deepcopy(model).eval(), train=digits("train"), validation=digits("validation"),
                   encoder=Encoder(None), batch_size=BATCH)


def prune(model, **settings):
    settings.setdefault("calibration_examples", CALIBRATION)
    return Prune(PruneConfig(**settings)).apply(model, digits_context(model)).model


def heads(model) -> list[int]:
    return [layer.attn.heads for layer in model.layers]


def widths(model) -> list[int]:
    return [layer.ffn.width for layer in model.layers]


def calibration_loss(model) -> float:
    """Mean cross-entropy over the calibration batches the accuracy-driven walk evaluates."""
    ds = digits("train").head(CALIBRATION)
    with torch.no_grad():
        return float(np.mean([float(F.cross_entropy(model(*x), torch.from_numpy(ds.labels[i])))
                              for i, x in Encoder(None).batches(ds, BATCH)]))


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


# -- amounts --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("amount,total,expected", [(0.25, 8, 2), (3, 8, 3), (0.5, 3, 2), (20, 8, 8), (0, 8, 0)])
def test_resolve_turns_fractions_and_counts_into_units_to_remove(amount, total, expected):
    assert resolve(amount, total) == expected


@pytest.mark.parametrize("field,value", [("heads", 1.5), ("heads", 1.0), ("ffn", -1), ("layers", True)])
def test_amounts_outside_fraction_or_count_are_rejected(field, value):
    with pytest.raises(ValidationError, match=field):
        PruneConfig(**{field: value})


# -- selection ------------------------------------------------------------------------------------------------------

def test_select_heads_removes_the_globally_lowest_scores():
    keep = select_heads([torch.tensor([0.9, 0.1, 0.8, 0.7]), torch.tensor([0.5, 0.6, 0.05, 0.4])], n_remove=2)
    assert keep == [[0, 2, 3], [0, 1, 3]]


def test_select_neurons_with_tied_scores_removes_exactly_the_requested_count():
    # All-zero scores happen, e.g. taylor importance of an embedding model that still equals its teacher.
    keep = select_neurons([torch.zeros(32), torch.zeros(32)], n_remove=16, round_to=1)
    assert sum(map(len, keep)) == 48


def test_select_neurons_rounds_each_kept_width_to_a_multiple():
    scores = [torch.linspace(0.1, 1, 64), torch.linspace(0.2, 2, 64)]
    assert all(len(k) % 16 == 0 for k in select_neurons(scores, n_remove=37, round_to=16))


# -- magnitude and taylor -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
@pytest.mark.parametrize("amount,removed", [(3, 3), (0.25, 2)], ids=["count", "fraction"])
def test_requested_number_of_heads_is_removed(make_model, importance, amount, removed):
    model = prune(make_model("vision", labels=DIGITS), heads=amount, importance=importance)
    assert sum(heads(model)) == 8 - removed


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
@pytest.mark.parametrize("labels", [DIGITS, ()], ids=["classifier", "embedding"])
@pytest.mark.parametrize("amount,removed", [(40, 40), (0.25, 64)], ids=["count", "fraction"])
def test_requested_number_of_neurons_is_removed(make_model, importance, labels, amount, removed):
    model = prune(make_model("vision", labels=labels), ffn=amount, importance=importance, round_to=1)
    assert sum(widths(model)) == 256 - removed


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
@pytest.mark.parametrize("amount", [1, 0.5], ids=["count", "fraction"])
def test_requested_number_of_layers_is_removed(make_model, importance, amount):
    model = prune(make_model("vision", labels=DIGITS), layers=amount, importance=importance)
    assert len(model.layers) == 1


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_neuron_widths_stay_multiples_of_round_to(make_model, importance):
    model = prune(make_model("vision", labels=DIGITS), ffn=0.4, importance=importance, round_to=16)
    assert all(w % 16 == 0 for w in widths(model))
    assert abs((256 - sum(widths(model))) - resolve(0.4, 256)) <= len(model.layers) * 16 // 2


def test_every_layer_keeps_at_least_one_head(make_model):
    model = prune(make_model("vision", labels=DIGITS), heads=8, importance="magnitude")
    assert heads(model) == [1, 1]


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_pruned_model_still_runs(make_model, make_vision_inputs, importance):
    model = prune(make_model("vision", labels=DIGITS), layers=1, heads=2, ffn=0.5, importance=importance)
    assert run(model, make_vision_inputs(batch=2)).shape == (2, 10)


def test_magnitude_removes_the_head_with_the_smallest_weights(make_model):
    model = make_model("vision", labels=DIGITS)
    attn = model.layers[1].attn
    with torch.no_grad():
        for name in "qkv":
            getattr(attn, name).weight[32:48] *= 0.01
        attn.o.weight[:, 32:48] *= 0.01
    q_before = attn.q.weight.detach().clone()
    model = prune(model, heads=1, importance="magnitude")
    assert heads(model) == [4, 3]
    torch.testing.assert_close(model.layers[1].attn.q.weight, torch.cat([q_before[:32], q_before[48:]]))


def test_magnitude_removes_the_neurons_with_the_smallest_weights(make_model):
    model = make_model("vision", labels=DIGITS)
    weak = list(range(0, 128, 4))
    with torch.no_grad():
        model.layers[0].ffn.fc1.weight[weak] *= 0.01
    fc1_before = model.layers[0].ffn.fc1.weight.detach().clone()
    model = prune(model, ffn=len(weak), importance="magnitude", round_to=1)
    assert widths(model) == [96, 128]
    strong = [i for i in range(128) if i not in weak]
    torch.testing.assert_close(model.layers[0].ffn.fc1.weight, fc1_before[strong])


def test_taylor_removes_a_head_that_contributes_nothing_and_outputs_stay_the_same(make_model, make_vision_inputs):
    model = make_model("vision", labels=DIGITS)
    with torch.no_grad():
        model.layers[0].attn.o.weight[:, 16:32] = 0  # head 1 of layer 0: zero gradient on its gate
    inputs = make_vision_inputs(batch=4)
    before = run(model, inputs)
    model = prune(model, heads=1, importance="taylor")
    assert heads(model) == [3, 4]
    torch.testing.assert_close(run(model, inputs), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_a_layer_that_changes_nothing_is_removed_first_and_outputs_stay_the_same(make_model, make_vision_inputs,
                                                                                 importance):
    model = make_model("vision", labels=DIGITS)  # pre-norm: zero out-projections make layer 0 the identity
    with torch.no_grad():
        for lin in (model.layers[0].attn.o, model.layers[0].ffn.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
    second = model.layers[1]
    inputs = make_vision_inputs(batch=4)
    before = run(model, inputs)
    model = prune(model, layers=1, importance=importance)
    assert len(model.layers) == 1 and model.layers[0] is second
    torch.testing.assert_close(run(model, inputs), before, atol=1e-5, rtol=1e-5)


# -- accuracy-driven (AxFormer) ----------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [dict(layers=1, heads=3, ffn=64), dict(layers=0.5, heads=0.375, ffn=0.25)],
                         ids=["counts", "fractions"])
def test_accuracy_driven_pruning_stops_at_the_requested_amounts(make_model, settings):
    # An unlimited tolerance accepts every deletion, so only the targets stop the walk.
    model = prune(make_model("vision", labels=DIGITS), importance="accuracy", tolerance=1e9, round_to=16, **settings)
    assert len(model.layers) == 1
    assert heads(model) == [1]
    assert widths(model) == [64]


def test_accuracy_driven_pruning_never_raises_the_calibration_loss_at_zero_tolerance(make_model):
    model = make_model("vision", labels=DIGITS, seed=0)
    params_before, loss_before = sum(p.numel() for p in model.parameters()), calibration_loss(model)
    model = prune(model, importance="accuracy", tolerance=0.0, round_to=16)
    assert sum(p.numel() for p in model.parameters()) < params_before  # it did delete something
    assert calibration_loss(model) <= loss_before + 1e-6


def test_accuracy_driven_neuron_groups_keep_widths_multiples_of_round_to(make_model):
    model = prune(make_model("vision", labels=DIGITS), importance="accuracy", tolerance=1e9, layers=1, ffn=0.25,
                  round_to=16)
    assert all(w % 16 == 0 for w in widths(model))


# -- after stages that leave invariants: early exits, nested FFNs ---------------------------------------------------

def with_exit_after_layer_0(model):
    return EarlyExit(EarlyExitConfig(exits=[0], max_examples=32)).apply(model, digits_context(model)).model


def nested_ffn(model):
    cfg = MatformerConfig(importance="magnitude", epochs=1, max_examples=32, calibration_examples=CALIBRATION)
    return Matformer(cfg).apply(model, digits_context(model)).model


def test_accuracy_driven_pruning_after_early_exit_keeps_every_layer_and_says_why(make_model, make_vision_inputs,
                                                                                capsys):
    model = with_exit_after_layer_0(make_model("vision", labels=DIGITS))
    capsys.readouterr()
    # An unlimited tolerance would take a layer first; with exits placed by layer index, none may go.
    model = prune(model, importance="accuracy", tolerance=1e9, round_to=16)
    assert "keeping every layer" in capsys.readouterr().err
    assert len(model.layers) == 2 and model.spec.exits == [0] and len(model.exit_heads) == 1
    assert heads(model) == [1, 1]  # the walk still pruned inside the layers
    logits = [z.shape for z in model.exit_logits(*make_vision_inputs(batch=2))]
    assert logits == [(2, 10), (2, 10)]


@pytest.mark.parametrize("importance", ["magnitude", "accuracy"])
def test_removing_layers_after_early_exit_is_refused_with_a_fix(make_model, importance):
    model = with_exit_after_layer_0(make_model("vision", labels=DIGITS))
    with pytest.raises(RecipeError, match="early exits") as refused:
        prune(model, layers=1, importance=importance)
    assert "before early_exit" in refused.value.fix
    assert len(model.layers) == 2 and model.spec.exits == [0]


def test_accuracy_driven_pruning_after_matformer_clears_the_nesting_it_breaks(make_model):
    model = nested_ffn(make_model("vision", labels=DIGITS))
    assert model.spec.nested_ffn
    model = prune(model, importance="accuracy", tolerance=1e9, round_to=16, layers=1, heads=1, ffn=32)
    assert widths(model) == [128 - 32]  # layer 1 went whole, then two groups of 16 neurons of layer 0
    assert model.spec.nested_ffn == []


def test_accuracy_driven_pruning_that_removes_no_neurons_keeps_the_nesting(make_model):
    model = nested_ffn(make_model("vision", labels=DIGITS))
    fractions = list(model.spec.nested_ffn)
    # A neuron budget below one group (16) removes no neurons; a whole layer and heads keep every prefix intact.
    model = prune(model, importance="accuracy", tolerance=1e9, round_to=16, layers=1, heads=2, ffn=8)
    assert sum(heads(model)) == 2 and widths(model) == [128]
    assert model.spec.nested_ffn == fractions


# -- confirmation on the validation split ---------------------------------------------------------------------------

def pruned_and_confirmed(model, **settings):
    """The pruned model and the confirmation record of an accuracy-driven prune (calibration_examples 16)."""
    cfg = PruneConfig(importance="accuracy", calibration_examples=CALIBRATION, round_to=16, **settings)
    result = Prune(cfg).apply(model, digits_context(model))
    json.dumps(result.details)
    return result.model, result.details["confirmation"]


def same_model(a, b) -> bool:
    return a.config == b.config and same_weights(a, b)


def accuracy(model) -> float:
    return evaluate(model, digits("validation"), Encoder(None))["accuracy"]


def with_identity_last_layer(model):
    """Pre-norm with zero out-projections: layer 1 is the identity, so deleting it (the walk's first deletion)
    changes no prediction."""
    with torch.no_grad():
        for lin in (model.layers[1].attn.o, model.layers[1].ffn.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
    return model


def the_walk_stopped_after(model, k: int):
    """The model the walk (every deletion kept, round_to 16) has after its first k deletions, made by a walk whose
    targets stop it there: layer 1 goes first, then heads 3, 2, 1 of layer 0, then groups of 16 of its neurons."""
    if k == 0:
        return copy.deepcopy(model)
    if k == 1:
        model = copy.deepcopy(model)
        model.keep_layers([0])
        return model
    # A neuron target below one group (16) removes no neurons; a head target of 0 would mean "no target".
    targets = dict(heads=k - 1, ffn=8) if k <= 4 else dict(heads=3, ffn=16 * (k - 4))
    return prune(copy.deepcopy(model), importance="accuracy", tolerance=1e9, round_to=16, layers=1, **targets)


def assert_verdict_follows_the_interval(record, budget):
    low, high = record["interval"]
    assert low <= record["drop"] <= high
    if budget is None:
        assert record["verdict"] is None
    else:
        assert record["verdict"] == ("PASS" if high <= budget else "FAIL" if low > budget else "INCONCLUSIVE")


@pytest.mark.parametrize("tolerance,max_drop", [(0.0, None), (1e9, None), (1e9, 100), (1e9, 0)],
                         ids=["tolerance-0", "every-deletion", "every-deletion-max-drop-100", "max-drop-0"])
def test_the_walk_is_confirmed_on_validation_with_a_verdict_its_interval_supports(make_model, tolerance, max_drop):
    model = make_model("vision", labels=DIGITS)
    before = copy.deepcopy(model)
    pruned, confirmation = pruned_and_confirmed(model, tolerance=tolerance, max_drop=max_drop)
    assert confirmation["split"] == "validation" and confirmation["examples"] == len(digits("validation"))
    assert confirmation["confidence"] == 0.95 and confirmation["budget"] == max_drop
    assert confirmation["walk"]["deletions"] > 0
    assert confirmation["drop"] == pytest.approx(accuracy(before) - accuracy(pruned))
    for record in [confirmation, confirmation["walk"], *confirmation["tested"]]:
        assert_verdict_follows_the_interval(record, max_drop)
    kept, undone = confirmation["deletions_kept"], confirmation["deletions_undone"]
    assert kept + undone == confirmation["walk"]["deletions"]
    if max_drop is None:
        assert undone == 0 and confirmation["tested"] == []


def test_deletions_validation_does_not_confirm_are_undone_until_what_is_left_passes(make_model):
    model = make_model("vision", labels=DIGITS)
    before = copy.deepcopy(model)
    # Every deletion passes the calibration loss; no drop can be shown to be at most 0 points.
    pruned, confirmation = pruned_and_confirmed(model, tolerance=1e9, max_drop=0)
    assert confirmation["walk"]["verdict"] != "PASS"
    assert confirmation["deletions_undone"] > 0
    assert confirmation["verdict"] == "PASS" or confirmation["deletions_kept"] == 0
    if confirmation["deletions_kept"] == 0:
        assert same_model(pruned, before) and confirmation["interval"] == [0.0, 0.0]


def test_undoing_stops_at_the_first_deletion_validation_does_not_pass_and_replays_the_ones_before(make_model):
    model = with_identity_last_layer(make_model("vision", labels=DIGITS))
    before = copy.deepcopy(model)
    # The budget a drop with no changed prediction passes at: the first deletion (the identity layer) passes.
    max_drop = 100 * drop_interval(0, 0, len(digits("validation")))[1] + 1e-9
    pruned, confirmation = pruned_and_confirmed(model, tolerance=1e9, max_drop=max_drop)
    assert confirmation["walk"]["verdict"] != "PASS"  # so the fixed sequence stops before the walk's end
    kept, tested = confirmation["deletions_kept"], confirmation["tested"]
    assert 1 <= kept < confirmation["walk"]["deletions"] and confirmation["deletions_undone"] >= 1
    assert [t["deletions"] for t in tested] == list(range(1, kept + 2))  # in the walk's order, from its first
    assert all(t["verdict"] == "PASS" for t in tested[:-1]) and tested[-1]["verdict"] != "PASS"
    assert confirmation["verdict"] == "PASS"
    assert same_model(pruned, the_walk_stopped_after(before, kept))
    assert confirmation["drop"] == pytest.approx(accuracy(before) - accuracy(pruned))


def test_replaying_the_first_k_deletions_rebuilds_the_model_the_walk_had_after_them(make_model):
    model = make_model("vision", labels=DIGITS)
    before = copy.deepcopy(model)
    ctx = digits_context(model)
    cfg = PruneConfig(importance="accuracy", tolerance=1e9, round_to=16, calibration_examples=CALIBRATION)
    deletions = accuracy_walk(model, ctx, cfg, calibration_batches(ctx, CALIBRATION))
    n = len(deletions)
    assert [d.kind for d in deletions] == ["layer"] + ["head"] * 3 + ["neurons"] * (n - 4)
    assert same_model(replay(before, deletions), model)
    for k in range(n + 1):
        assert same_model(replay(before, deletions[:k]), the_walk_stopped_after(before, k)), k
    assert same_model(before, the_walk_stopped_after(before, 0))  # replay left the model before the walk alone


def test_an_embedding_model_records_its_validation_cosine_with_the_model_before_the_walk(make_model):
    model = make_model("vision")
    before = copy.deepcopy(model)
    pruned, confirmation = pruned_and_confirmed(model, tolerance=1e9)
    ds = digits("validation")
    cosine = F.cosine_similarity(predict(pruned, ds, Encoder(None)), predict(before, ds, Encoder(None)), dim=-1)
    assert confirmation["cosine"] == pytest.approx(float(cosine.mean()), abs=1e-6)
    assert confirmation["verdict"] is None and "drop" not in confirmation
    assert confirmation["examples"] == len(ds) and confirmation["deletions_undone"] == 0


def test_an_accuracy_budget_on_an_embedding_model_is_refused_with_a_fix(make_model):
    with pytest.raises(RecipeError, match="no labels") as refused:
        pruned_and_confirmed(make_model("vision"), tolerance=1e9, max_drop=1)
    assert "remove max_drop" in refused.value.fix


@pytest.mark.parametrize("settings", [dict(max_drop=1), dict(importance="magnitude", max_drop=1),
                                      dict(importance="accuracy", confidence=1.0),
                                      dict(importance="accuracy", confidence=0.4),
                                      dict(importance="accuracy", max_drop=-1)],
                         ids=["taylor", "magnitude", "confidence-1", "confidence-0.4", "negative"])
def test_accuracy_budget_settings_outside_accuracy_mode_or_their_range_are_refused(settings):
    with pytest.raises(ValidationError, match="max_drop" if "max_drop" in settings else "confidence"):
        PruneConfig(**settings)


def test_the_accuracy_budget_is_not_a_search_setting():
    assert not {"max_drop", "confidence"} & set(Prune.search_space())
