"""Retraining-free pruning to a latency budget (Kwon et al. 2022): mask gradients, the search, rearrangement,
least-squares tuning, empty layers, and the whole method on tiny models."""

import copy
import itertools
import json
from functools import lru_cache

import pytest
import torch

from pocketformer.compress import Context
from pocketformer.compress.importance import calibration_batches, same_weights
from pocketformer.compress.retraining_free import (NormalEquations, by_length, ffn_widths, fit_block, mask_grads,
                                                   most_important, prune_to_latency, pruned_fisher, rearrange,
                                                   retained_importance, search, tune_layers)
from pocketformer.data import Encoder, load_dataset
from pocketformer.errors import RecipeError
from pocketformer.latency import Curve, LatencyTable
from pocketformer.models.canonical import attention_bias

DIGITS = [str(i) for i in range(10)]


@lru_cache(maxsize=None)
def digits_batches(n: int = 160, batch_size: int = 16):
    ctx = Context(teacher=None, train=load_dataset("digits", "train"), validation=load_dataset("digits", "validation"),
                  encoder=Encoder(None), batch_size=batch_size)
    return calibration_batches(ctx, n)


def text_batches(make_text_inputs, n: int = 6, labels: int = 2):
    g = torch.Generator().manual_seed(0)
    return [(make_text_inputs(batch=8, seq=12, seed=i), torch.randint(0, labels, (8,), generator=g))
            for i in range(n)]


def table(base=1.0, layer=0.2, attention=((0, 0.0), (1, 0.5), (4, 1.1)), ffn=((0, 0.0), (128, 1.5)), scale=1.0,
          offset=0.0) -> LatencyTable:
    """A made-up table: `attention` and `ffn` as (units, ms) points."""
    return LatencyTable(target="made-up", runtime="none", threads=1, seq_len=16, family={}, base_ms=base,
                        layer_ms=layer, attention=Curve(points=[p for p, _ in attention], ms=[m for _, m in attention]),
                        ffn=Curve(points=[p for p, _ in ffn], ms=[m for _, m in ffn]),
                        calibration={"scale": scale, "offset_ms": offset, "models": 0})


def shapes(model):
    return [(layer.attn.heads, layer.ffn.width) for layer in model.layers]


@pytest.fixture
def vision(make_model):
    return make_model("vision", labels=DIGITS)


@pytest.fixture(scope="module")
def fisher(make_model):
    """(head, neuron) diagonal Fisher of the tiny digits classifier."""
    return mask_grads(make_model("vision", labels=DIGITS), None, digits_batches()).fisher()


# -- mask gradients -------------------------------------------------------------------------------------------------

def test_mask_gradients_are_one_row_per_batch_and_no_weight_gets_a_gradient(vision):
    vision.layers[0].ln1.weight.requires_grad_(False)  # a flag the context must restore as it was
    flags = {n: p.requires_grad for n, p in vision.named_parameters()}
    grads = mask_grads(vision, None, digits_batches())
    assert [tuple(g.shape) for g in grads.heads] == [(10, 4), (10, 4)]
    assert [tuple(g.shape) for g in grads.neurons] == [(10, 128), (10, 128)]
    assert all(g.abs().sum() > 0 for g in grads.heads + grads.neurons)
    heads, neurons = grads.fisher()
    assert torch.allclose(heads[1], grads.heads[1].double().pow(2).sum(0))
    assert {n: p.requires_grad for n, p in vision.named_parameters()} == flags
    assert all(p.grad is None for p in vision.parameters())


# -- the search -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("round_to", [8, 16])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_the_search_meets_the_budget_with_widths_multiples_of_round_to(fisher, round_to, fraction):
    heads, neurons = fisher
    t = table(scale=1.2, offset=0.3)
    budget = fraction * t.predict([(4, 128)] * 2)
    plan = search(heads, neurons, t, budget, round_to=round_to)
    assert plan.predicted_ms <= budget
    assert t.predict(plan.shapes()) == plan.predicted_ms
    assert all(w % round_to == 0 for w in plan.neurons)


def test_the_search_keeps_more_importance_than_uniform_choices_of_equal_latency(fisher):
    heads, neurons = fisher
    t = table()
    wins = 0
    for h, w in itertools.product(range(1, 4), (32, 64, 96)):
        budget = t.predict([(h, w)] * 2)
        uniform = retained_importance(heads, neurons, [h, h], [w, w])
        plan = search(heads, neurons, t, budget)
        assert plan.predicted_ms <= budget
        assert plan.importance >= uniform
        wins += plan.importance > uniform * 1.001
    assert wins >= 7


def test_the_search_finds_the_best_choice_on_a_problem_small_enough_to_enumerate():
    # costs on a 0.25 ms grid and budgets whose grid (budget - base, in 4096 bins) holds them exactly: the search
    # must equal the enumeration
    g = torch.Generator().manual_seed(3)
    heads = [torch.rand(3, generator=g) for _ in range(2)]
    neurons = [torch.rand(16, generator=g) * 0.3 for _ in range(2)]
    t = table(base=1.0, layer=0.5, attention=((0, 0), (1, 0.75), (3, 1.25)), ffn=((0, 0), (8, 0.5), (16, 1.5)))
    for budget in (1.0, 1.5, 2.0, 3.0, 5.0):
        best = 0.0
        for h0, h1, w0, w1 in itertools.product(range(4), range(4), (0, 8, 16), (0, 8, 16)):
            kept = [(h, w) for h, w in ((h0, w0), (h1, w1)) if h or w]  # an emptied layer is removed
            if t.predict(kept) <= budget:
                best = max(best, retained_importance(heads, neurons, [h0, h1], [w0, w1]))
        assert search(heads, neurons, t, budget).importance == pytest.approx(best, abs=1e-9)


def test_the_search_is_fast_at_minilm_size():
    import time

    g = torch.Generator().manual_seed(0)
    t = table(attention=((0, 0), (1, 0.8), (12, 3.0)), ffn=((0, 0), (64, 0.4), (1536, 4.0)))
    start = time.perf_counter()
    plan = search([torch.rand(12, generator=g) for _ in range(6)], [torch.rand(1536, generator=g) for _ in range(6)],
                  t, 0.5 * t.predict([(12, 1536)] * 6))
    assert time.perf_counter() - start < 1.0
    assert all(w % 8 == 0 for w in plan.neurons)


def test_an_impossible_budget_is_refused_with_the_least_latency_the_model_can_have(fisher):
    heads, neurons = fisher
    with pytest.raises(RecipeError, match=r"embeddings and head alone take 1\.50 ms.*at least 1\.50 ms"):
        search(heads, neurons, table(base=1.0, offset=0.5), 1.2)
    # with early exits, layers stay: their fixed cost joins the floor
    with pytest.raises(RecipeError, match=r"early exits.*1\.40 ms"):
        search(heads, neurons, table(base=1.0, layer=0.2), 1.3, removable=False)


def test_ffn_widths_are_multiples_of_round_to_or_the_whole_layer():
    assert ffn_widths(20, 8) == [0, 8, 16, 20]
    assert ffn_widths(16, 8) == [0, 8, 16]


# -- rearrangement --------------------------------------------------------------------------------------------------

def test_rearrangement_never_raises_the_pruned_fisher():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        mixing = torch.randn(6, 6, generator=g)
        grads = torch.randn(12, 6, generator=g) @ mixing * torch.rand(6, generator=g)  # correlated units
        grads = grads.repeat(1, 5)[:, :24 + trial % 6].double()
        for n_keep in range(grads.shape[1] + 1):
            keep, swaps = rearrange(grads, n_keep)
            start = most_important(grads.pow(2).sum(0), n_keep)
            assert len(keep) == n_keep
            assert pruned_fisher(grads, keep) <= pruned_fisher(grads, start) + 1e-9
            assert swaps == len(set(keep) - set(start))


def test_rearrangement_prunes_units_whose_gradients_cancel_together():
    # units 0 and 1 have the largest diagonal Fisher but cancel; pruning both costs nothing
    grads = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, 0.5]])
    keep, swaps = rearrange(grads, 1)
    assert most_important(grads.pow(2).sum(0), 1) in ([0], [1])
    assert keep == [2] and swaps == 1
    assert pruned_fisher(grads, keep) == 0.0


# -- least-squares tuning -------------------------------------------------------------------------------------------

def pruned_copy(model, heads=(1, 2), widths=(40, 64)):
    student = copy.deepcopy(model)
    for li, (h, w) in enumerate(zip(heads, widths)):
        student.keep_heads(li, list(range(h)))
        student.keep_neurons(li, list(range(w)))
    return student


def first_attention_error(student, reference, batch) -> float:
    """Held-out error of layer 0's attention block: x + attn(x) (pre-LN: x + attn(ln1 x)) against the reference's,
    on the real tokens; layer 0's inputs are the same in both."""
    inputs, _ = batch
    with torch.no_grad():
        x = reference.embed(*inputs)
        mask = reference.attention_mask(inputs)
        bias = attention_bias(mask, x.dtype) if mask is not None else None
        outs = []
        for m in (student, reference):
            layer = m.layers[0]
            outs.append(x + layer.attn(layer.ln1(x) if layer.pre_norm else x, bias))
        real = mask.bool() if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool)
        return float((outs[0] - outs[1])[real].pow(2).mean())


@pytest.mark.parametrize("modality", ["vision", "text"])
def test_tuning_lowers_the_held_out_error_of_the_blocks(make_model, make_text_inputs, modality):
    model = make_model(modality, labels=DIGITS if modality == "vision" else ("neg", "pos"))
    batches = digits_batches() if modality == "vision" else text_batches(make_text_inputs)
    student = pruned_copy(model)
    held_out = batches[4]  # every 5th batch is held out
    before = first_attention_error(student, model, held_out)
    records = tune_layers(student, model, batches)
    assert [(r["layer"], r["block"]) for r in records] == [(0, "attention"), (0, "ffn"), (1, "attention"), (1, "ffn")]
    for r in records:
        assert r["errors"][r["choice"]] <= min(r["errors"].values()) * (1 + 1e-5)
    assert sum(r["errors"][r["choice"]] < 0.9 * r["errors"]["none"] for r in records) >= 2
    assert records[0]["choice"] != "none"
    assert first_attention_error(student, model, held_out) < before


def test_mask_tuning_scales_each_kept_heads_output_columns_and_keeps_the_bias(vision):
    student = pruned_copy(vision, heads=(2, 3))
    o_before = student.layers[0].attn.o.weight.detach().clone()
    bias_before = student.layers[0].attn.o.bias.detach().clone()
    records = tune_layers(student, vision, digits_batches(), mode="mask")
    assert records[0]["choice"] == "scalar"
    ratio = student.layers[0].attn.o.weight.detach() / o_before
    per_head = ratio.reshape(ratio.shape[0], 2, 16)
    assert torch.allclose(per_head, per_head[:1, :, :1].expand_as(per_head), rtol=1e-4)  # one scalar per head
    assert not torch.allclose(ratio, torch.ones_like(ratio))
    assert torch.equal(student.layers[0].attn.o.bias, bias_before)


def test_no_tuning_leaves_the_weights_as_they_were(vision):
    student = pruned_copy(vision)
    before = copy.deepcopy(student)
    records = tune_layers(student, vision, digits_batches(), mode="none")
    assert same_weights(student, before)
    assert all(r["choice"] == "none" for r in records)


# -- the whole method -----------------------------------------------------------------------------------------------

def test_calibration_examples_are_regrouped_by_length_with_less_padding(make_model):
    model = make_model("text", labels=("neg", "pos"))
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(4):
        lengths = torch.randint(2, 13, (8,), generator=g)
        mask = (torch.arange(12)[None] < lengths[:, None]).long()
        ids = torch.randint(3, 100, (8, 12), generator=g) * mask
        batches.append(((ids, mask), torch.arange(8) + 8 * b))
    regrouped = by_length(model, batches)
    assert [len(labels) for _, labels in regrouped] == [8] * 4
    assert sum(i.numel() for (i, _), _ in regrouped) < sum(i.numel() for (i, _), _ in batches)

    def examples(bs):  # label -> the real tokens of its example
        return {int(y): ids[k][mask[k] > 0].tolist() for (ids, mask), ys in bs for k, y in enumerate(ys)}

    assert examples(regrouped) == examples(batches)


def test_the_pruned_model_has_the_chosen_shapes_meets_the_budget_and_runs(vision, make_vision_inputs):
    original = copy.deepcopy(vision)
    t = table()
    budget = 0.5 * t.predict(shapes(vision))
    pruned, details = prune_to_latency(vision, original, digits_batches(), t, budget)
    json.dumps(details)
    assert same_weights(vision, original)  # the model given is the reference, left as it was
    removed = {r["layer"] for r in details["layers_removed"] if r["removed"]}
    assert {i for i, d in enumerate(details["layers"]) if d["removed_by_search"]} <= removed
    assert shapes(pruned) == [(d["heads"], d["ffn"]) for i, d in enumerate(details["layers"]) if i not in removed]
    assert details["latency_after_ms"] == t.predict(shapes(pruned)) <= budget < details["latency_before_ms"]
    assert details["importance"] == "fisher"
    assert len(details["tuning"]) == 4 and set(details["seconds"]) >= {"importance", "search", "tune", "total"}
    with torch.no_grad():
        out = pruned(*make_vision_inputs())
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_an_unlabelled_model_that_equals_its_teacher_is_ranked_by_weight_magnitudes(make_model, make_text_inputs):
    model = make_model("text")  # an embedding model: its loss is measured against the teacher
    t = table()
    budget = 0.6 * t.predict(shapes(model))
    pruned, details = prune_to_latency(model, copy.deepcopy(model), text_batches(make_text_inputs), t, budget)
    assert details["importance"] == "magnitude" and "still equals" in details["importance_note"]
    assert all(e["heads"]["swaps"] == 0 and e["ffn"]["swaps"] == 0 for e in details["rearrangement"])
    assert t.predict(shapes(pruned)) <= budget


def test_a_layer_the_budget_empties_is_removed(vision, make_vision_inputs):
    # an expensive layer: the budget leaves room for one, so the other is emptied and goes
    t = table(base=1.0, layer=5.0)
    budget = 1.0 + 5.0 + 2.6 + 0.5
    pruned, details = prune_to_latency(vision, None, digits_batches(), t, budget)
    assert len(pruned.layers) == 1 and sum(d["removed_by_search"] for d in details["layers"]) == 1
    assert [r["removed"] for r in details["layers_removed"]] == [True]
    # the layer after it was fitted with it in place, and is fitted again without it
    assert [(r["layer"], r["block"]) for r in details["retuning"]] == [(1, "attention"), (1, "ffn")]
    assert t.predict(shapes(pruned)) <= budget
    with torch.no_grad():
        assert torch.isfinite(pruned(*make_vision_inputs())).all()


def test_layers_are_never_removed_from_a_model_with_early_exits(vision):
    vision.set_exits([0])
    t = table(base=1.0, layer=5.0)
    with pytest.raises(RecipeError, match="early exits"):
        prune_to_latency(vision, None, digits_batches(), t, 1.0 + 5.0 + 2.6 + 0.5)
    pruned, details = prune_to_latency(vision, None, digits_batches(), t, 1.0 + 10.0 + 0.6)
    assert len(pruned.layers) == 2 and not any(d["removed_by_search"] for d in details["layers"])
    assert all(not r["removed"] for r in details["layers_removed"])


def test_an_unpruned_layer_keeps_its_weights_when_no_tuning_fits_better(vision):
    student = copy.deepcopy(vision)
    records = tune_layers(student, vision, digits_batches())
    assert all(r["choice"] == "none" for r in records)
    assert same_weights(student, vision)


@pytest.mark.parametrize("mode", ["mask", "weights"])
def test_a_block_is_fitted_exactly_when_its_target_is_reachable(mode):
    # Y made by the tuning's own family: scalars per group of 2 columns (mask), or any weights and bias (weights)
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(6, 5)
    x = torch.randn(400, 6, generator=g)
    with torch.no_grad():
        if mode == "mask":
            scales = torch.tensor([0.5, 2.0, -1.0]).repeat_interleave(2)
            wanted_w, wanted_b = linear.weight * scales, linear.bias.clone()
        else:
            wanted_w, wanted_b = torch.randn(5, 6, generator=g), torch.randn(5, generator=g)
        y = x @ wanted_w.T + wanted_b
    fit, held = NormalEquations.empty(6, 5), NormalEquations.empty(6, 5)
    fit.add(x[:300], y[:300])
    held.add(x[300:], y[300:])
    record = fit_block(linear, fit, held, group=2, mode=mode, ridges=(1e-9,))
    assert record["choice"] == {"mask": "scalar", "weights": "full"}[mode]
    assert record["errors"][record["choice"]] < 1e-5 * record["errors"]["none"]
    assert torch.allclose(linear.weight, wanted_w, atol=1e-4) and torch.allclose(linear.bias, wanted_b, atol=1e-4)
