"""EcoFormer attention: b-bit {-1,+1} codes, linear attention equal to its quadratic form, padding, the
straight-through estimator, head pruning and save/load."""

import pytest
import torch
from torch.nn import functional as F

from pocketformer.models import LayerShape, load, save
from pocketformer.models.canonical import MASK_NEG, encoder_macs
from pocketformer.models.ecoformer import (EcoAttention, binarize, hash_codes, keep_from_mask, linear_attention,
                                           quadratic_attention)

HEADS, HEAD_DIM, BITS, ANCHORS = 4, 16, 8, 6


def eco_shape(**overrides) -> LayerShape:
    fields = dict(heads=HEADS, head_dim=HEAD_DIM, ffn=128, attention="ecoformer", hash_bits=BITS, anchors=ANCHORS)
    return LayerShape(**{**fields, **overrides})


def eco_model(make_model, labels=("neg", "pos")):
    """The tiny text model with EcoFormer attention in both layers, hash parameters randomised per layer."""
    model = make_model("text", labels=labels, layers=[eco_shape(), eco_shape()])
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.kernel_width.uniform_(0.5, 2.0)
            layer.attn.feature_mean.uniform_(0.0, 0.3)
            layer.attn.key_projection.normal_()
    return model


def attention_inputs(batch=2, seq=10, hidden=64, padded_from=6):
    torch.manual_seed(0)
    x = torch.randn(batch, seq, hidden)
    mask = torch.ones(batch, seq)
    mask[-1, padded_from:] = 0
    return x, ((1.0 - mask) * MASK_NEG)[:, None, None, :]


def test_codes_are_plus_minus_one_with_the_configured_width():
    torch.manual_seed(0)
    x = torch.randn(2, HEADS, HEAD_DIM, 11)  # feature-major: (batch, heads, d, t)
    codes = hash_codes(x, anchors=F.normalize(torch.randn(HEADS, ANCHORS, HEAD_DIM), dim=-1),
                       width=torch.ones(HEADS, 1, 1), mean=torch.zeros(HEADS, ANCHORS, 1),
                       projection=torch.randn(HEADS, BITS, ANCHORS))
    assert codes.shape == (2, HEADS, BITS, 11)
    assert set(codes.unique().tolist()) == {-1.0, 1.0}


def test_module_codes_take_the_width_of_its_layer_shape():
    attn = EcoAttention(64, eco_shape(hash_bits=12)).eval()
    q = torch.randn(3, HEADS, HEAD_DIM, 7)
    codes = attn.codes(q, attn.query_projection)
    assert codes.shape == (3, HEADS, 12, 7) and set(codes.unique().tolist()) <= {-1.0, 1.0}


def test_linear_attention_equals_its_quadratic_form_with_padding():
    torch.manual_seed(0)
    hq, hk = (torch.randn(3, HEADS, BITS, 9).sign() for _ in range(2))
    v = torch.randn(3, HEADS, 9, HEAD_DIM)
    keep = torch.ones(3, 1, 1, 9)
    keep[1, ..., 4:] = 0
    keep[2, ..., 7:] = 0
    linear = linear_attention(hq, hk, v, keep, bias=BITS + 1)
    torch.testing.assert_close(linear, quadratic_attention(hq, hk, v, keep, bias=BITS + 1), rtol=1e-5, atol=1e-6)


def test_keep_from_mask_turns_the_additive_mask_into_zero_one_key_weights():
    _, mask_add = attention_inputs(batch=2, seq=8, padded_from=5)
    keep = keep_from_mask(mask_add)
    assert keep.shape == (2, 1, 1, 8)
    assert keep[0].flatten().tolist() == [1.0] * 8 and keep[1].flatten().tolist() == [1.0] * 5 + [0.0] * 3


def test_padded_keys_do_not_change_the_outputs_of_real_tokens():
    attn = EcoAttention(64, eco_shape()).eval()
    x, mask_add = attention_inputs(padded_from=6)
    changed = x.clone()
    changed[-1, 6:] = torch.randn(4, 64) * 10
    with torch.no_grad():
        a, b = attn(x, mask_add), attn(changed, mask_add)
    torch.testing.assert_close(a[-1, :6], b[-1, :6])


def test_straight_through_gradient_is_identity_inside_the_clip_range_and_zero_outside():
    logits = torch.tensor([-2.0, -0.5, 0.3, 0.9, 1.5], requires_grad=True)
    codes = binarize(logits, straight_through=True)
    codes.backward(torch.full_like(logits, 3.0))
    assert codes.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    assert logits.grad.tolist() == [0.0, 3.0, 3.0, 3.0, 0.0]


def test_training_mode_passes_gradient_to_the_query_and_key_weights():
    attn = EcoAttention(64, eco_shape()).train()
    x, mask_add = attention_inputs()
    attn(x, mask_add).pow(2).sum().backward()
    assert attn.q.weight.grad.abs().sum() > 0 and attn.k.weight.grad.abs().sum() > 0


def test_eval_mode_sign_has_no_gradient_to_the_query_weights():
    attn = EcoAttention(64, eco_shape()).eval()
    x, mask_add = attention_inputs()
    attn(x, mask_add).pow(2).sum().backward()
    assert attn.q.weight.grad is None or attn.q.weight.grad.abs().sum() == 0


def test_keep_heads_shrinks_the_hash_parameters_and_keeps_the_kept_heads_output():
    attn = EcoAttention(64, eco_shape()).eval()
    x, mask_add = attention_inputs()
    reference = EcoAttention(64, eco_shape()).eval()
    reference.load_state_dict(attn.state_dict())
    with torch.no_grad():  # heads 1 and 3 silenced in the out-projection: what keeping heads 0 and 2 computes
        for h in (1, 3):
            reference.o.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
        want = reference(x, mask_add)
    attn.keep_heads([0, 2])
    assert attn.anchors.shape == (2, ANCHORS, HEAD_DIM) and attn.query_projection.shape == (2, BITS, ANCHORS)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, mask_add), want)


def test_canonical_model_reports_ecoformer_in_its_layer_shapes(make_model):
    model = eco_model(make_model)
    assert [s.attention for s in model.config.layers] == ["ecoformer", "ecoformer"]
    assert model.config.layers[0].hash_bits == BITS and model.config.layers[0].anchors == ANCHORS


def test_save_load_round_trip_keeps_hash_parameters_and_outputs(tmp_path, make_model, make_text_inputs):
    model = eco_model(make_model)
    loaded, _ = load(save(model, tmp_path / "eco"))
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.layers[1].attn.key_projection, model.layers[1].attn.key_projection)
    inputs = make_text_inputs(batch=3, seq=12)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), model(*inputs))


@pytest.mark.parametrize("seq", [128, 2048])
def test_ecoformer_macs_grow_linearly_where_softmax_grows_quadratically(make_config, seq):
    eco = make_config("text", layers=[eco_shape(), eco_shape()])
    soft = make_config("text")
    assert encoder_macs(eco, 2 * seq) == 2 * encoder_macs(eco, seq)
    assert encoder_macs(soft, 2 * seq) > 2 * encoder_macs(soft, seq)
