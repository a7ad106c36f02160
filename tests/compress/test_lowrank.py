"""Low-rank factorization: SVD factors, rank choice, the factorized model's shapes, save/load, export parity."""

import copy

import pytest
import torch
from pydantic import ValidationError

from pocketformer.compress import Context
from pocketformer.compress.lowrank import (LowRank, LowRankConfig, break_even_rank, budget_ranks, energy_rank,
                                           svd_factors)
from pocketformer.compress.prune import Prune, PruneConfig
from pocketformer.data import Encoder, load_dataset
from pocketformer.errors import RecipeError
from conftest import EXPORTERS
from pocketformer.models.canonical import count_params, encoder_macs
from pocketformer.models.factorized import LowRankLinear
from pocketformer.models.io import load, save

DIGITS = [str(i) for i in range(10)]


def context(model) -> Context:
    return Context(teacher=copy.deepcopy(model).eval(), train=load_dataset("digits", "train"),
                   validation=load_dataset("digits", "validation"), encoder=Encoder(None), batch_size=16)


def lowrank(model, **settings):
    return LowRank(LowRankConfig(**settings)).apply(model, context(model)).model.eval()


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_svd_factors_are_the_best_rank_r_approximation():
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    v, u = svd_factors(w, 8)
    assert v.shape == (8, 32) and u.shape == (48, 8)
    uu, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (uu[:, :8] * s[:8]) @ vh[:8]
    assert torch.allclose((u @ v).double(), best, atol=1e-5)
    v_full, u_full = svd_factors(w, 32)
    assert torch.allclose(u_full @ v_full, w, atol=1e-5)


def test_energy_rank_keeps_the_asked_share_of_squared_singular_values():
    s = torch.tensor([3.0, 2.0, 1.0, 1.0])  # squares 9, 4, 1, 1 of 15
    assert energy_rank(s, 0.6) == 1
    assert energy_rank(s, 0.8) == 2
    assert energy_rank(s, 0.95) == 4


def test_budget_ranks_stay_within_the_parameter_budget_and_favour_fast_decaying_spectra():
    flat, steep = torch.ones(32), torch.tensor([10.0 ** -i for i in range(32)])
    ranks = budget_ranks([flat, steep], [(32, 32), (32, 32)], 0.25)
    assert sum(r * 64 for r in ranks) <= 0.25 * 2 * 32 * 32
    assert ranks[0] > ranks[1] >= 1  # the steep spectrum needs few ranks for nearly all its energy


def test_stage_factorizes_every_linear_with_the_given_rank_and_records_it(make_model):
    model = lowrank(make_model("vision", labels=DIGITS), method="ranks", ranks=8)
    for layer, shape in zip(model.layers, model.config.layers):
        assert isinstance(layer.attn.q, LowRankLinear) and isinstance(layer.ffn.fc1, LowRankLinear)
        assert layer.attn.q.first.weight.shape == (8, 64) and layer.attn.q.second.weight.shape == (64, 8)
        assert {name: s.rank for name, s in shape.linears.items()} == {n: 8 for n in ("q", "k", "v", "o", "fc1",
                                                                                     "fc2")}


def test_factorized_model_has_fewer_params_and_macs(make_model):
    dense = make_model("vision", labels=DIGITS)
    factorized = lowrank(copy.deepcopy(dense), method="ranks", ranks=8)
    assert count_params(factorized) < count_params(dense)
    assert encoder_macs(factorized.config, 64) < encoder_macs(dense.config, 64)


def test_linears_where_the_rank_saves_nothing_stay_dense(make_model):
    model = make_model("vision", labels=DIGITS)  # q: 64x64 (break-even 32), fc1: 128x64 (break-even 42.7)
    assert break_even_rank(64, 128) == pytest.approx(42.67, abs=0.01)
    model = lowrank(model, method="ranks", ranks={"q": 40, "fc1": 40}, linears=["q", "fc1"])
    assert not isinstance(model.layers[0].attn.q, LowRankLinear)
    assert isinstance(model.layers[0].ffn.fc1, LowRankLinear) and model.layers[0].ffn.fc1.rank == 40


def test_factorizing_nothing_is_refused_with_a_fix(make_model):
    with pytest.raises(RecipeError, match="factorized nothing"):
        lowrank(make_model("vision", labels=DIGITS), method="energy", energy=1.0)


def test_factorized_linears_are_skipped_and_nothing_left_is_refused(make_model):
    model = lowrank(make_model("vision", labels=DIGITS), method="ranks", ranks=8, linears=["fc1"])
    model = lowrank(model, method="ranks", ranks=8)  # fc1 is skipped, the rest factorized
    assert all(layer.ffn.fc1.rank == 8 and isinstance(layer.attn.q, LowRankLinear) for layer in model.layers)
    with pytest.raises(RecipeError, match="already factorized or would need"):
        lowrank(model, method="ranks", ranks=4)


def test_high_energy_factorization_keeps_outputs_close(make_model, make_vision_inputs):
    dense = make_model("vision", labels=DIGITS)
    inputs = make_vision_inputs(batch=4)
    near = lowrank(copy.deepcopy(dense), method="ranks", ranks=24, linears=["q", "k", "v", "o"])
    coarse = lowrank(copy.deepcopy(dense), method="ranks", ranks=8, linears=["q", "k", "v", "o"])
    err = [float((run(m, inputs) - run(dense, inputs)).norm()) for m in (near, coarse)]
    assert err[0] < err[1]


def test_ranks_config_needs_ranks_and_known_names():
    with pytest.raises(ValidationError, match="needs `ranks`"):
        LowRankConfig(method="ranks")
    with pytest.raises(ValidationError, match="unknown linear names"):
        LowRankConfig(method="ranks", ranks={"fc3": 8})


def test_save_load_round_trip_rebuilds_the_factorized_model(make_model, make_vision_inputs, tmp_path):
    model = lowrank(make_model("vision", labels=DIGITS), method="ranks", ranks=8)
    save(model, tmp_path / "ckpt")
    loaded, _ = load(tmp_path / "ckpt")
    assert loaded.config == model.config
    inputs = make_vision_inputs(batch=3)
    assert torch.equal(run(loaded, inputs), run(model, inputs))


def test_composes_with_pruning_in_either_order(make_model, make_vision_inputs):
    inputs = make_vision_inputs(batch=2)
    model = make_model("vision", labels=DIGITS)
    pruned_first = Prune(PruneConfig(heads=1, ffn=0.25, importance="magnitude")).apply(copy.deepcopy(model),
                                                                                      context(model)).model
    a = lowrank(pruned_first, method="ranks", ranks=8)
    b = lowrank(copy.deepcopy(model), method="ranks", ranks=8)
    b = Prune(PruneConfig(heads=1, ffn=0.25, importance="magnitude")).apply(b, context(b)).model.eval()
    for m in (a, b):
        assert sum(layer.attn.heads for layer in m.layers) == 7
        assert all(isinstance(layer.ffn.fc2, LowRankLinear) for layer in m.layers)
        assert run(m, inputs).shape == (2, 10)


@pytest.mark.parametrize("fmt", ["onnx", "tflite", "coreml"])
def test_factorized_text_model_exports_and_matches_pytorch(fmt, make_model, make_text_inputs, tmp_path):
    model = lowrank(make_model("text", labels=["neg", "pos"], max_positions=128), method="ranks", ranks=8)
    with torch.no_grad():
        model.classifier.out.weight.mul_(30.0)  # large logits, so cosine says something
    records = EXPORTERS[fmt](model, tmp_path, "lr", make_text_inputs(batch=2, seq=12), int8=False)
    (fp32,) = [r for r in records if r["precision"] == "fp32"]
    assert fp32["parity_vs_pytorch"]["cosine"] > 0.9999
    assert fp32["parity_vs_pytorch"]["max_abs_diff"] < 1e-3
    assert (tmp_path / fp32["file"]).exists()
