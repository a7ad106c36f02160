"""Structural edits of a causal LM (the pruning stages' only way to change it): removing query heads within their
key-value groups, whole key-value groups with their query heads, gated-FFN neurons (gate, up and down together) and
whole layers. Each edit computes exactly what the unedited model computes with the removed units' output weights
zeroed, the config follows the weights, and an edited model (layers of different shapes) exports with its KV cache
to ONNX and TFLite, matching PyTorch in each runtime."""

from __future__ import annotations

import copy

import pytest
import torch

from pocketformer.models import import_hf
from pocketformer.models.lm_importers import tokenizer_of
from pocketformer.targets import export_checked, get_runtime
from pocketformer.targets.lm import open_lm, token_match

from .tiny_lms import TEXT, save_tiny_lm


@pytest.fixture(scope="module", params=["llama", "gemma3", "qwen2"])
def tiny(request, tmp_path_factory):
    hf = save_tiny_lm(request.param, tmp_path_factory.mktemp(f"surgery-{request.param}") / "hf")
    model, _ = import_hf(hf)
    return request.param, model, tokenizer_of(hf)


def ids_of(tok, n: int = 20) -> torch.Tensor:
    return torch.tensor([tok.encode(TEXT[:400]).ids[:n]])


def zero_heads(model, layer: int, heads: list[int]):
    """The model with these query heads' contribution (their output-projection columns) zeroed."""
    out = copy.deepcopy(model)
    attn = out.layers[layer].attn
    with torch.no_grad():
        for h in heads:
            attn.o.weight[:, h * attn.head_dim:(h + 1) * attn.head_dim] = 0
    return out


def zero_neurons(model, layer: int, neurons: list[int]):
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.layers[layer].ffn.down.weight[:, neurons] = 0
    return out


def zero_layer(model, layer: int):
    """A layer whose attention and FFN add nothing to the residual stream is the identity."""
    out = copy.deepcopy(model)
    la = out.layers[layer]
    with torch.no_grad():
        for lin in (la.attn.o, la.ffn.down):
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()
    return out


def same_logits(a, b, ids):
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), atol=2e-5, rtol=1e-5)


def test_removing_query_heads_within_groups_equals_zeroing_them(tiny):
    _, model, tok = tiny
    attn = model.layers[0].attn
    g = attn.heads // attn.kv_heads
    assert g >= 2, "the tiny models have 4 query heads over 2 key-value heads"
    drop = [grp * g + g - 1 for grp in range(attn.kv_heads)]  # the last head of every group
    edited = copy.deepcopy(model)
    edited.keep_heads(0, [h for h in range(attn.heads) if h not in drop])
    same_logits(edited, zero_heads(model, 0, drop), ids_of(tok))
    shape = edited.config.layers[0]
    assert (shape.heads, shape.kv_heads) == (attn.heads - attn.kv_heads, attn.kv_heads)
    assert edited.config.layers[1] == model.config.layers[1]


def test_removing_a_key_value_group_takes_its_query_heads(tiny):
    _, model, tok = tiny
    attn = model.layers[1].attn
    g = attn.heads // attn.kv_heads
    edited = copy.deepcopy(model)
    edited.keep_groups(1, [1])
    same_logits(edited, zero_heads(model, 1, list(range(g))), ids_of(tok))
    assert (edited.layers[1].attn.heads, edited.layers[1].attn.kv_heads) == (g, 1)
    assert edited.layers[1].attn.k.out_features == attn.head_dim  # the cache shrinks with the group
    assert edited.empty_past()[1][0].shape[1] == 1


def test_groups_keeping_different_head_counts_are_refused(tiny):
    _, model, _ = tiny
    edited = copy.deepcopy(model)
    with pytest.raises(ValueError, match="same count"):
        edited.keep_heads(0, [0, 1, 2])  # group 0 keeps 2, group 1 keeps 1
    with pytest.raises(ValueError, match="remove the layer"):
        edited.keep_heads(0, [])


def test_removing_ffn_neurons_equals_zeroing_their_down_columns(tiny):
    _, model, tok = tiny
    width = model.layers[0].ffn.width
    drop = list(range(0, width, 3))
    edited = copy.deepcopy(model)
    edited.keep_neurons(0, [n for n in range(width) if n not in drop])
    same_logits(edited, zero_neurons(model, 0, drop), ids_of(tok))
    assert edited.config.layers[0].ffn == width - len(drop)
    assert edited.layers[0].ffn.down.in_features == width - len(drop)


def test_removing_a_layer_equals_making_it_the_identity(tiny):
    family, model, tok = tiny
    edited = copy.deepcopy(model)
    edited.keep_layers([1])
    same_logits(edited, zero_layer(model, 0), ids_of(tok))
    assert len(edited.config.layers) == 1 and edited.config.layers[0] == model.config.layers[1]
    if family == "gemma3":  # the sliding layer went, and its rotary table with it
        assert len(edited.ropes) == 1


def test_cached_generation_of_an_edited_model_equals_its_uncached_argmax(tiny):
    """The KV cache follows the per-layer key-value heads: greedy decoding with the cache equals re-running the
    whole sequence each step."""
    _, model, tok = tiny
    edited = copy.deepcopy(model)
    edited.keep_groups(0, [0])
    edited.keep_neurons(1, list(range(0, edited.layers[1].ffn.width, 2)))
    ids = ids_of(tok, 8)
    got = edited.generate(ids, 12).tolist()
    seq = ids
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, edited(seq)[:, -1:].argmax(-1)], dim=1)
    assert got == seq[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_an_edited_model_exports_with_its_cache_and_decodes_as_pytorch(tiny, fmt, tmp_path):
    family, model, tok = tiny
    edited = copy.deepcopy(model)
    edited.keep_groups(0, [1])
    edited.keep_neurons(1, list(range(0, edited.layers[1].ffn.width, 2)))
    ids = ids_of(tok, 24)
    inputs = edited.graph_inputs(torch.cat([ids, ids]), 16)
    records = export_checked(edited, tmp_path, "model", inputs, fmt, int8=False)
    fp32 = next(r for r in records if r["precision"] == "fp32")
    prompt = tok.encode("During my grammar school days, I was").ids
    want = edited.generate(torch.tensor([prompt]), 32).tolist()
    runtime = get_runtime("onnxruntime" if fmt == "onnx" else "litert")
    got = open_lm(runtime, tmp_path / fp32["file"], 1).generate(prompt, 32)
    assert token_match(got, want)["match"] == 1.0, (family, fmt)
