"""Early exit: the gate functions (entropy, patience), the PyTorch reference, and the stage that adds and trains the
exit heads (DeeBERT with a frozen backbone, PABEE with the backbone)."""

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pocketformer.compress import Context
from pocketformer.compress.finetune import Finetune, FinetuneConfig
from pocketformer.compress.early_exit import EarlyExit, EarlyExitConfig, deebert_loss, pabee_loss
from pocketformer.models.exits import Gate, entropy, exit_indices, predict_with_exits, should_stop
from pocketformer.data import Encoder, load_dataset
from pocketformer.errors import RecipeError
from pocketformer.models import HeadSpec, LayerShape, load, save

DIGITS = [str(i) for i in range(10)]


def four_layers():
    return [LayerShape(heads=4, head_dim=16, ffn=128) for _ in range(4)]


@pytest.fixture(scope="module")
def digits():
    return {split: load_dataset("digits", split) for split in ("train", "validation")}


@pytest.fixture(scope="module")
def trained(digits, make_model):
    """A 4-layer mean-pooling digits classifier fine-tuned for one epoch: a random backbone's features are too
    uniform for frozen-backbone heads to learn from, a fine-tuned one's are not."""
    model = make_model("vision", labels=DIGITS, layers=four_layers(), head=HeadSpec(pooling="mean", labels=DIGITS))
    return Finetune(FinetuneConfig(lr=3e-3, epochs=1)).apply(model, context(model, digits)).model


def context(model, digits):
    return Context(teacher=copy.deepcopy(model).eval(), train=digits["train"],
                   validation=digits["validation"].head(64), encoder=Encoder(None), batch_size=32)


def held_out(digits, n=64):
    ds = digits["validation"]
    return (torch.from_numpy(ds.images[:n]),), torch.from_numpy(ds.labels[:n])


def logits_for(*rows):
    """(1, heads, labels) logits of one example from per-head label-probability rows."""
    return np.log(np.asarray([rows], dtype=np.float64))


# -- the gate --------------------------------------------------------------------------------------------------------

def test_entropy_is_zero_when_certain_and_one_when_uniform():
    assert entropy(np.array([50.0, 0.0, 0.0])) == pytest.approx(0.0, abs=1e-12)
    assert entropy(np.zeros(7)) == pytest.approx(1.0)


def test_entropy_is_normalised_whatever_the_label_count():
    two = entropy(np.log([0.9, 0.1]))
    ten = entropy(np.log([0.9] + [0.1 / 9] * 9))
    assert 0 < two < 1 and 0 < ten < 1


def test_entropy_gate_stops_at_the_first_head_below_the_threshold():
    heads = logits_for([0.5, 0.5], [0.97, 0.03], [0.99, 0.01], [0.6, 0.4])
    assert exit_indices(Gate(kind="entropy", threshold=0.3), heads).tolist() == [1]


def test_final_head_stops_when_no_exit_head_is_confident():
    heads = logits_for([0.5, 0.5], [0.6, 0.4], [0.55, 0.45])
    assert exit_indices(Gate(kind="entropy", threshold=0.1), heads).tolist() == [2]


def test_patience_gate_stops_once_that_many_further_heads_agree():
    heads = logits_for([0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.1, 0.9])
    assert exit_indices(Gate(kind="patience", patience=1), heads).tolist() == [2]
    assert exit_indices(Gate(kind="patience", patience=2), heads).tolist() == [3]


@pytest.mark.parametrize("gate", [Gate(kind="entropy", threshold=0.8), Gate(kind="patience", patience=2)],
                         ids=["entropy", "patience"])
def test_the_incremental_decision_agrees_with_the_batch_one(gate):
    rng = np.random.default_rng(0)
    heads = rng.normal(size=(50, 5, 3)) * 3
    incremental = []
    for rows in heads:
        stop = next((h for h in range(4) if should_stop(gate, list(rows[:h + 1]))), 4)
        incremental.append(stop)
    assert exit_indices(gate, heads).tolist() == incremental


def test_a_threshold_above_one_is_refused():
    with pytest.raises(ValidationError):
        Gate(kind="entropy", threshold=1.5)


# -- the model's heads and the PyTorch reference ----------------------------------------------------------------------

def test_exit_logits_end_with_the_model_output(make_model, make_vision_inputs):
    model = make_model("vision", labels=DIGITS, layers=four_layers())
    model.set_exits([0, 2])
    inputs = make_vision_inputs(batch=4)
    with torch.no_grad():
        heads = model.exit_logits(*inputs)
        assert len(heads) == 3
        assert torch.allclose(heads[-1], model(*inputs), atol=1e-6)


def test_a_gate_that_never_stops_predicts_with_the_final_head(make_model, make_vision_inputs):
    model = make_model("vision", labels=DIGITS, layers=four_layers())
    model.set_exits([0, 1, 2])
    inputs = make_vision_inputs(batch=5)
    result = predict_with_exits(model, inputs, Gate(kind="entropy", threshold=0.0))
    with torch.no_grad():
        full = model(*inputs).numpy()
    assert result.exits.tolist() == [3] * 5
    assert np.allclose(result.logits, full, atol=1e-6) and (result.labels == full.argmax(1)).all()


def test_a_gate_that_always_stops_uses_the_first_exit_head(make_model, make_vision_inputs):
    model = make_model("vision", labels=DIGITS, layers=four_layers())
    model.set_exits([1, 2])
    inputs = make_vision_inputs(batch=5)
    result = predict_with_exits(model, inputs, Gate(kind="entropy", threshold=1.0))
    with torch.no_grad():
        first = model.exit_logits(*inputs)[0].numpy()
    assert result.exits.tolist() == [0] * 5
    assert np.allclose(result.logits, first, atol=1e-6)


def test_exits_and_gate_survive_save_and_load(make_model, tmp_path):
    model = make_model("vision", labels=DIGITS, layers=four_layers())
    model.set_exits([0, 2])
    model.spec.exit_gate = Gate(kind="patience", patience=2).model_dump()
    loaded, _ = load(save(model, tmp_path / "ckpt"))
    assert loaded.spec.exits == [0, 2] and loaded.spec.exit_gate == model.spec.exit_gate
    inputs = (torch.rand(2, 1, 8, 8),)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.exit_logits(*inputs), loaded.exit_logits(*inputs)))


# -- the stage -------------------------------------------------------------------------------------------------------

def test_exits_all_places_a_head_after_every_layer_but_the_last(make_model, digits):
    model = make_model("vision", labels=DIGITS, layers=four_layers())
    cfg = EarlyExitConfig(exits="all", max_examples=32, epochs=1)
    model = EarlyExit(cfg).apply(model, context(model, digits)).model
    assert model.spec.exits == [0, 1, 2] and len(model.exit_heads) == 3


def test_the_gate_is_stored_in_the_model(make_model, digits):
    model = make_model("vision", labels=DIGITS, layers=four_layers())
    cfg = EarlyExitConfig(exits=[1], gate={"kind": "patience", "patience": 2}, max_examples=32)
    model = EarlyExit(cfg).apply(model, context(model, digits)).model
    assert model.spec.exit_gate == {"kind": "patience", "threshold": 0.3, "patience": 2}


def test_deebert_training_lowers_the_exit_heads_loss(trained, digits):
    model = copy.deepcopy(trained)
    model.set_exits([0, 1, 2])
    cfg = EarlyExitConfig(exits=[0, 1, 2], mode="deebert", lr=3e-3, epochs=2, max_examples=256)
    inputs, labels = held_out(digits)
    with torch.no_grad():
        before = float(deebert_loss(model, inputs, labels, cfg))
    model = EarlyExit(cfg).apply(model, context(model, digits)).model
    with torch.no_grad():
        after = float(deebert_loss(model, inputs, labels, cfg))
    assert after < 0.9 * before


def test_deebert_leaves_the_backbone_and_the_final_head_unchanged(trained, digits):
    model = copy.deepcopy(trained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = EarlyExit(EarlyExitConfig(exits=[0, 2], max_examples=128)).apply(model, context(model, digits)).model
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(k.startswith("exit_heads.") for k in after)


def test_pabee_trains_the_backbone_and_lowers_the_all_layer_loss(trained, digits):
    model = copy.deepcopy(trained)
    model.set_exits([0, 1, 2])
    teacher = copy.deepcopy(trained).eval()
    cfg = EarlyExitConfig(exits=[0, 1, 2], mode="pabee", lr=3e-3, epochs=2, max_examples=256)
    inputs, labels = held_out(digits)
    with torch.no_grad():
        before = float(pabee_loss(model, teacher, inputs, labels, cfg))
    layer_weight = model.layers[1].ffn.fc1.weight.clone()
    model = EarlyExit(cfg).apply(model, context(teacher, digits)).model
    with torch.no_grad():
        after = float(pabee_loss(model, teacher, inputs, labels, cfg))
    assert after < 0.85 * before
    assert not torch.equal(layer_weight, model.layers[1].ffn.fc1.weight)


def test_the_stage_reports_each_heads_validation_accuracy_and_the_gates_depth(make_model, digits):
    model = make_model("vision", labels=DIGITS, layers=four_layers())
    ctx = context(model, digits)
    notes = EarlyExit(EarlyExitConfig(exits=[0, 2], max_examples=64)).apply(model, ctx).details
    assert len(notes["head_validation_accuracy"]) == 3
    assert 1.0 <= notes["gate_mean_layers"] <= 4.0 and 0 <= notes["gate_validation_accuracy"] <= 100


def test_the_learning_rate_default_depends_on_the_mode():
    assert EarlyExitConfig(mode="deebert").lr > EarlyExitConfig(mode="pabee").lr
    assert EarlyExitConfig(mode="pabee", lr=1e-4).lr == 1e-4


def test_an_exit_after_the_last_layer_is_a_recipe_error(make_model, digits):
    model = make_model("vision", labels=DIGITS, layers=four_layers())
    with pytest.raises(RecipeError, match="layer 3"):
        EarlyExit(EarlyExitConfig(exits=[1, 3])).apply(model, context(model, digits))


def test_an_embedding_model_is_refused(make_model, digits):
    model = make_model("vision", layers=four_layers())
    with pytest.raises(RecipeError, match="classifier"):
        EarlyExit(EarlyExitConfig()).apply(model, context(model, digits))


def test_an_empty_exit_list_is_refused():
    with pytest.raises(ValidationError):
        EarlyExitConfig(exits=[])
