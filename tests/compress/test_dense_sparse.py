"""Dense-sparse factorization (DSFormer): the initial factors, the stage's replacements and decisions, and that the
result trains, saves, reloads and composes with pruning."""

import copy

import pytest
import torch
from pydantic import ValidationError

from pocketformer.compress import REGISTRY, Context
from pocketformer.compress.dense_sparse import (DenseSparse, DenseSparseConfig, basis_size, dense_sparse_factors,
                                                nnz_per_column, relative_error)
from pocketformer.errors import RecipeError
from pocketformer.models.canonical import count_params
from pocketformer.models.factorized import DenseSparseLinear, LinearShape, LowRankLinear, top_per_column
from pocketformer.models.io import load, save

LINEARS = ("q", "k", "v", "o", "fc1", "fc2")


def no_data_context() -> Context:
    """The stage reads only the model: teacher and data are never touched."""
    return Context(teacher=None, train=None, validation=None, encoder=None)


def factorize_result(model, **settings):
    return DenseSparse(DenseSparseConfig(**settings)).apply(model, no_data_context())


def factorize(model, **settings):
    return factorize_result(model, **settings).model


def linear(model, layer: int, name: str):
    parent = model.layers[layer].attn if name in ("q", "k", "v", "o") else model.layers[layer].ffn
    return getattr(parent, name)


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def structured_weight(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Noise plus a strong rank-8 part, like trained transformer weights."""
    g = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g) / 4
    return torch.randn(m, n, generator=g) / n ** 0.5 + low_rank


# -- config and sizes ------------------------------------------------------------------------------------------------

def test_stage_is_registered_under_its_recipe_name():
    assert REGISTRY["dense_sparse"] is DenseSparse


@pytest.mark.parametrize("field,value", [("rank", True), ("rank", 0), ("rank", 1.5), ("nnz", -2), ("nnz", 0.0),
                                         ("refinements", -1), ("linears", ["fc3"])])
def test_config_rejects_values_that_mean_nothing(field, value):
    with pytest.raises(ValidationError):
        DenseSparseConfig(**{field: value})


@pytest.mark.parametrize("rank,m,n,round_to,expected", [(0.5, 64, 128, 8, 32), (0.3, 64, 64, 8, 24),
                                                        (20, 64, 64, 8, 24), (500, 64, 32, 8, 32),
                                                        (0.01, 64, 64, 8, 8), (5, 64, 64, 1, 5)])
def test_basis_size_is_a_fraction_of_the_smaller_side_or_a_count_rounded_up(rank, m, n, round_to, expected):
    assert basis_size(rank, m, n, round_to) == expected


@pytest.mark.parametrize("nnz,k,expected", [(0.125, 32, 4), (6, 32, 6), (100, 32, 32), (0.001, 32, 1)])
def test_nnz_is_a_fraction_of_the_basis_or_a_count_within_one_and_the_basis(nnz, k, expected):
    assert nnz_per_column(nnz, k) == expected


# -- initial factors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,n", [(64, 64), (128, 64), (48, 96)])
def test_factors_have_the_basis_shapes_and_at_most_nnz_nonzeros_per_column(m, n):
    sparse, basis = dense_sparse_factors(structured_weight(m, n), 16, 3)
    assert sparse.shape == (16, n) and basis.shape == (m, 16)
    assert int((sparse != 0).sum(dim=0).max()) <= 3


def test_basis_columns_have_unit_norm_so_top_s_compares_like_with_like():
    _, basis = dense_sparse_factors(structured_weight(64, 96), 32, 4)
    assert torch.allclose(basis.norm(dim=0), torch.ones(32), atol=1e-5)


@pytest.mark.parametrize("weight", [structured_weight(64, 96), torch.randn(64, 96) / 8], ids=["structured", "noise"])
def test_initial_error_is_below_keeping_the_top_s_of_each_column_of_the_dense_matrix(weight):
    sparse, basis = dense_sparse_factors(weight, 32, 4)
    plain = weight * top_per_column(weight, 4)
    assert relative_error(weight, sparse, basis) < relative_error(weight, plain, torch.eye(64))


def test_least_squares_refinements_never_raise_the_error():
    weight = torch.randn(64, 96) / 8
    errors = [relative_error(weight, *dense_sparse_factors(weight, 32, 4, refinements=r)) for r in range(5)]
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 0.9 * errors[0]


def test_factorization_is_deterministic():
    weight = structured_weight(64, 96)
    first, second = dense_sparse_factors(weight, 32, 4), dense_sparse_factors(weight, 32, 4)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_every_basis_vector_stays_alive_for_recovery_training():
    """A basis vector no column picks would be zero in D and in S: no gradient could ever revive it."""
    _, basis = dense_sparse_factors(torch.randn(64, 64) / 8, 32, 2)
    assert (basis.norm(dim=0) > 0.5).all()


# -- the stage -------------------------------------------------------------------------------------------------------

def test_stage_replaces_every_linear_and_the_config_reports_the_new_shapes(make_model):
    model = factorize(make_model("text"))
    for layer in model.config.layers:
        assert layer.linears == {name: LinearShape(kind="dense_sparse", rank=32, nnz=4) for name in LINEARS}


def test_stage_factorizes_only_the_chosen_linears(make_model):
    model = factorize(make_model("text"), linears=["fc1", "fc2"])
    assert all(set(layer.linears) == {"fc1", "fc2"} for layer in model.config.layers)


def test_a_model_whose_weights_the_factors_can_represent_is_reproduced(make_model, make_text_inputs):
    """Rank-8 weights: the SVD basis spans them and 8 non-zeros per column hold their coefficients exactly."""
    model = make_model("text")
    with torch.no_grad():
        for layer in range(2):
            for name in LINEARS:
                weight = linear(model, layer, name).weight
                weight.copy_(weight[:, :8] @ weight[:8] / 2)
    inputs = make_text_inputs()
    want = run(model, inputs)
    got = run(factorize(copy.deepcopy(model), rank=32, nnz=8), inputs)
    assert torch.allclose(got, want, atol=1e-4)


def test_stored_parameters_fall_by_what_the_details_report(make_model):
    model = make_model("text")
    before = count_params(model)
    notes = factorize_result(model).details
    # 12 linears; q/k/v/o 64x64 -> 64*32 + 4*64, fc1 128x64 -> 128*32 + 4*64, fc2 64x128 -> 64*32 + 4*128
    assert notes["stored_params"] == {"before": 2 * (4 * 4096 + 2 * 8192),
                                      "after": 2 * (4 * 2304 + 4352 + 2560)}
    assert before - count_params(model) == notes["stored_params"]["before"] - notes["stored_params"]["after"]


def test_stored_size_of_int8_dense_sparse_weights_counts_only_the_kept_entries(make_model):
    """A dense-sparse model quantized after: S's int8 storage is its kept entries, as its float storage is (the
    bookkeeping once subtracted S's dense size from its sparse one and went negative)."""
    from pocketformer.compress.base import stored_bytes

    model = factorize(make_model("text"))
    float_bytes = stored_bytes(model)
    model.spec.quantization = {"bits": 8, "group_size": -1}
    int8_bytes = stored_bytes(model)
    assert 0 < int8_bytes < float_bytes
    linear_float = 4 * sum(min(m.nnz, m.rank) * m.in_features + m.second.weight.numel()
                           for m in model.modules() if isinstance(m, DenseSparseLinear))
    assert float_bytes - int8_bytes < linear_float  # only linear weights shrink, by at most 4x


def test_details_summarise_the_relative_error_of_every_linear(make_model):
    notes = factorize_result(make_model("text")).details
    errors = [d["relative_error"] for d in notes["linears"]]
    assert len(errors) == 12 and all(0 < e < 1 for e in errors)
    assert notes["relative_error"]["max"] == max(errors)
    assert notes["relative_error"]["mean"] == pytest.approx(sum(errors) / 12, abs=1e-5)


def test_linears_where_the_factors_would_store_no_fewer_weights_stay_dense(make_model):
    """Basis 56, 16 per column: only fc2 (64 x 128) gets smaller (64*56 + 16*128 < 64*128)."""
    result = factorize_result(make_model("text"), rank=56, nnz=16)
    assert all(set(layer.linears) == {"fc2"} for layer in result.model.config.layers)
    kept_dense = [d for d in result.details["linears"] if d["rank"] is None]
    assert len(kept_dense) == 10 and all(d["why"].startswith("dense:") for d in kept_dense)


def test_nothing_to_factorize_is_a_recipe_error_with_a_fix(make_model):
    with pytest.raises(RecipeError, match="lower `rank` or `nnz`"):
        factorize(make_model("text"), rank=1.0, nnz=1.0)


def test_already_factorized_linears_are_skipped_not_factorized_again(make_model):
    model = factorize(make_model("text"), linears=["fc1"])
    details = factorize_result(model, linears=["fc1", "fc2"]).details
    skipped = [d for d in details["linears"] if d["linear"] == "fc1"]
    assert all(d["rank"] is None and "already factorized" in d["why"] for d in skipped)
    assert model.config.layers[0].linears["fc1"] == LinearShape(kind="dense_sparse", rank=32, nnz=4)


def test_a_second_dense_sparse_stage_on_the_same_linears_is_refused(make_model):
    model = factorize(make_model("text"))
    with pytest.raises(RecipeError):
        factorize(model)


def test_low_rank_linears_are_left_as_they_are(make_model):
    model = make_model("text")
    model.layers[0].ffn.fc1 = LowRankLinear(64, 128, 16)
    factorize(model)
    assert isinstance(model.layers[0].ffn.fc1, LowRankLinear) and not isinstance(model.layers[0].ffn.fc1,
                                                                                  DenseSparseLinear)


def test_replacements_keep_the_models_eval_mode(make_model):
    model = factorize(make_model("text").eval())
    assert not any(m.training for m in model.modules())


# -- training, saving, composing ------------------------------------------------------------------------------------

def test_straight_through_gradient_reaches_every_entry_of_s(make_model, make_text_inputs):
    model = factorize(make_model("text")).train()
    model(*make_text_inputs()).pow(2).sum().backward()
    s = linear(model, 0, "q").first.weight
    zeros = s.detach() == 0
    assert zeros.float().mean() == pytest.approx(0.875)
    assert (s.grad[zeros] != 0).float().mean() > 0.9  # pruned entries learn too, so they can re-enter the top s


def test_eval_settles_training_updates_to_at_most_nnz_per_column(make_model, make_text_inputs):
    model = factorize(make_model("text")).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(*make_text_inputs()).pow(2).sum().backward()
        optimizer.step()
    assert int((linear(model, 0, "fc2").first.weight != 0).sum(dim=0).max()) > 4  # training filled S in
    model.eval()
    for layer in range(2):
        for name in LINEARS:
            assert int((linear(model, layer, name).first.weight != 0).sum(dim=0).max()) <= 4


def test_save_and_load_round_trip_keeps_shapes_and_outputs(make_model, make_text_inputs, tmp_path):
    model = factorize(make_model("text"))
    inputs = make_text_inputs()
    loaded, _ = load(save(model, tmp_path / "ds"))
    assert loaded.config == model.config
    assert isinstance(linear(loaded, 1, "fc2"), DenseSparseLinear)
    assert torch.equal(run(loaded, inputs), run(model, inputs))


def test_composes_after_pruning_with_different_shapes_per_layer(make_model, make_text_inputs):
    model = make_model("text")
    model.keep_heads(0, [0, 2])
    model.keep_neurons(1, list(range(40)))
    model = factorize(model, nnz=2)
    shapes = model.config.layers
    assert (shapes[0].heads, shapes[1].heads, shapes[0].ffn, shapes[1].ffn) == (2, 4, 128, 40)
    # basis half the smaller side, rounded up to 8: q of layer 0 is 32 x 64 -> 16; layer 1's FFN 40 wide -> 24
    assert (linear(model, 0, "q").rank, linear(model, 0, "q").out_features) == (16, 32)
    assert (linear(model, 1, "fc1").rank, linear(model, 1, "fc2").in_features) == (24, 40)
    assert run(model, make_text_inputs()).shape == (3, 64)


def test_layers_whose_heads_were_all_pruned_are_skipped(make_model):
    model = make_model("text")
    model.keep_heads(0, [])
    details = factorize_result(model).details
    empty = [d for d in details["linears"] if d["layer"] == 0 and d["linear"] in "qkvo"]
    assert all("no weights" in d["why"] for d in empty)


def test_eval_balances_the_factors_without_changing_the_function():
    from pocketformer.models.factorized import DenseSparseLinear

    layer = DenseSparseLinear(32, 48, rank=16, nnz=4)
    with torch.no_grad():
        layer.second.weight.mul_(torch.logspace(-3, 3, 16)[None, :])  # wildly unbalanced basis vectors
    layer.eval()  # settles the projection first
    x = torch.randn(5, 32)
    before = layer(x)
    layer.balance()
    assert torch.allclose(layer(x), before, rtol=1e-4, atol=1e-5)
    d, s = layer.second.weight.norm(dim=0), layer.first.weight.norm(dim=1)
    assert torch.allclose(d, s, rtol=1e-3)
    weights = [t.clone() for t in (layer.first.weight, layer.second.weight)]
    layer.train().eval()  # settling again leaves a balanced layer's bits alone
    assert all(torch.equal(a, b) for a, b in zip(weights, (layer.first.weight, layer.second.weight)))
