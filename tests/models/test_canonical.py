"""The canonical transformer: forward shapes, masking, and the structural edits that physically shrink it."""

import copy

import pytest
import torch

from pocketformer.models import CanonicalTransformer, LayerShape, encoder_macs


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_text_classifier_outputs_one_logit_per_label(make_model, make_text_inputs):
    model = make_model("text", labels=["a", "b", "c"])
    assert run(model, make_text_inputs(batch=4, seq=9)).shape == (4, 3)


def test_embedding_model_outputs_a_hidden_sized_vector(make_model, make_text_inputs):
    model = make_model("text")
    assert model.output_name == "embedding"
    assert run(model, make_text_inputs(batch=2, seq=7)).shape == (2, 64)


def test_vision_classifier_outputs_one_logit_per_label(make_model, make_vision_inputs):
    model = make_model("vision", labels=[str(i) for i in range(10)])
    assert model.input_names == ["pixel_values"]
    assert run(model, make_vision_inputs(batch=5)).shape == (5, 10)


@pytest.mark.parametrize("labels", [(), ("neg", "pos")], ids=["embedding-mean-pool", "classifier-cls-pool"])
def test_padding_tokens_do_not_change_text_outputs(make_model, make_text_inputs, labels):
    model = make_model("text", labels=labels)
    ids, mask = make_text_inputs(batch=2, seq=10, pad_last=False)
    padded_ids = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    torch.testing.assert_close(run(model, (padded_ids, padded_mask)), run(model, (ids, mask)), atol=1e-5, rtol=1e-5)


def test_keep_heads_shrinks_qkv_rows_and_output_columns(make_model, make_text_inputs):
    model = make_model("text", labels=["a", "b"])
    model.keep_heads(0, [1, 3])
    attn = model.layers[0].attn
    for name in ("q", "k", "v"):
        assert getattr(attn, name).weight.shape == (2 * 16, 64)
    assert attn.o.weight.shape == (64, 2 * 16)
    assert model.layers[1].attn.q.weight.shape == (4 * 16, 64)
    assert run(model, make_text_inputs()).shape == (3, 2)


def test_keep_heads_keeps_the_chosen_heads_weights(make_model):
    model = make_model("text")
    q_before = model.layers[0].attn.q.weight.detach().clone()
    o_before = model.layers[0].attn.o.weight.detach().clone()
    model.keep_heads(0, [2])
    torch.testing.assert_close(model.layers[0].attn.q.weight, q_before[32:48])
    torch.testing.assert_close(model.layers[0].attn.o.weight, o_before[:, 32:48])


def test_keep_neurons_shrinks_fc1_rows_and_fc2_columns(make_model, make_vision_inputs):
    model = make_model("vision", labels=["x", "y"])
    model.keep_neurons(1, list(range(0, 128, 4)))
    ffn = model.layers[1].ffn
    assert ffn.fc1.weight.shape == (32, 64) and ffn.fc1.bias.shape == (32,)
    assert ffn.fc2.weight.shape == (64, 32)
    assert run(model, make_vision_inputs()).shape == (3, 2)


def test_keep_layers_drops_the_other_layers(make_model, make_text_inputs):
    model = make_model("text")
    kept = model.layers[1]
    model.keep_layers([1])
    assert len(model.layers) == 1 and model.layers[0] is kept
    assert run(model, make_text_inputs()).shape == (3, 64)


def test_config_reads_each_layers_shape_from_its_modules(make_model):
    model = make_model("text")
    model.keep_heads(0, [0, 1, 2])
    model.keep_neurons(1, list(range(40)))
    assert model.config.layers == [LayerShape(heads=3, head_dim=16, ffn=128), LayerShape(heads=4, head_dim=16, ffn=40)]


def test_a_model_built_from_a_pruned_config_has_the_pruned_shapes(make_model):
    model = make_model("text")
    model.keep_heads(1, [0])
    model.keep_neurons(0, list(range(24)))
    rebuilt = CanonicalTransformer(model.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_pruning_a_head_whose_output_columns_are_zero_leaves_outputs_unchanged(make_model, make_text_inputs):
    model = make_model("text", labels=["a", "b", "c"])
    with torch.no_grad():
        model.layers[0].attn.o.weight[:, 16:32] = 0  # head 1 of layer 0 now contributes nothing
    inputs = make_text_inputs(batch=4, seq=11)
    before = run(model, inputs)
    model.keep_heads(0, [0, 2, 3])
    torch.testing.assert_close(run(model, inputs), before, atol=1e-5, rtol=1e-5)


def test_pruning_neurons_whose_fc2_columns_are_zero_leaves_outputs_unchanged(make_model, make_vision_inputs):
    model = make_model("vision", labels=["a", "b"])
    dead = list(range(0, 128, 3))
    with torch.no_grad():
        model.layers[1].ffn.fc2.weight[:, dead] = 0
    inputs = make_vision_inputs(batch=4)
    before = run(model, inputs)
    model.keep_neurons(1, [i for i in range(128) if i not in dead])
    torch.testing.assert_close(run(model, inputs), before, atol=1e-5, rtol=1e-5)


def test_removing_every_head_of_a_layer_equals_zeroing_its_output_projection(make_model, make_text_inputs):
    model = make_model("text")
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.layers[0].attn.o.weight.zero_()
    model.keep_heads(0, [])
    assert model.config.layers[0].heads == 0
    inputs = make_text_inputs()
    torch.testing.assert_close(run(model, inputs), run(zeroed, inputs), atol=1e-5, rtol=1e-5)


def test_removing_every_neuron_of_a_layer_equals_zeroing_fc2(make_model, make_text_inputs):
    model = make_model("text")
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.layers[1].ffn.fc2.weight.zero_()
    model.keep_neurons(1, [])
    inputs = make_text_inputs()
    torch.testing.assert_close(run(model, inputs), run(zeroed, inputs), atol=1e-5, rtol=1e-5)


def test_set_labels_attaches_a_classifier_with_one_output_per_label(make_model, make_text_inputs):
    model = make_model("text")
    model.set_labels(["neg", "neu", "pos"])
    assert model.config.task == "classification" and model.output_name == "logits"
    assert run(model, make_text_inputs()).shape == (3, 3)


def test_encoder_macs_fall_when_heads_and_neurons_are_removed(make_model):
    model = make_model("text")
    full = encoder_macs(model.config, 32)
    model.keep_heads(0, [0, 1])
    fewer_heads = encoder_macs(model.config, 32)
    model.keep_neurons(1, list(range(64)))
    assert full > fewer_heads > encoder_macs(model.config, 32)


def test_encoder_macs_are_additive_over_identical_layers(make_config):
    two = make_config("text")
    four = two.model_copy(update={"layers": two.layers * 2})
    assert encoder_macs(four, 20) == 2 * encoder_macs(two, 20)
