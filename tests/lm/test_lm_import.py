"""Causal LM import: each family's tiny transformers model maps into the canonical decoder with its logits (text with a
left-padded row, a sliding window shorter than the text), its cached decoding, its save/load round trip; and what the
import refuses."""

from __future__ import annotations

import json

import pytest
import torch

from pocketformer.errors import ArchitectureError, ParityError
from pocketformer.models import CausalLM, import_hf, load, save
from pocketformer.models import lm_importers
from pocketformer.models.lm_importers import cache_consistency, parity_batch, tokenizer_of

from .tiny_lms import FAMILIES, save_tiny_lm


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-lms")
    return {f: save_tiny_lm(f, root / f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers(tiny_folders, family, tmp_path):
    model, prov = import_hf(tiny_folders[family])
    assert isinstance(model, CausalLM)
    parity = prov["import_parity"]
    assert parity["max_abs_logit_diff"] <= lm_importers.LM_PARITY_TOL
    assert parity["top1_agreement"] == 1.0
    assert parity["tokens"] > 60  # two rows of real text, one left-padded
    assert parity["cache_max_abs_diff"] <= 1e-4
    assert model.spec.family == {"gemma3": "gemma3"}.get(family, family)
    # what the family's quirks turned into
    spec = model.spec
    if family == "gemma3":
        assert [s.window for s in spec.layers] == [8, 0]
        assert [(s.rope_base, s.rope_factor) for s in spec.layers] == [(1e4, 1.0), (1e6, 2.0)]
        assert spec.norm_offset == 1.0 and spec.qk_norm and spec.sandwich_norm
        assert spec.query_scale == pytest.approx(24 ** -0.5) and spec.embed_scale == pytest.approx(8.0)
    if family == "qwen2":
        assert spec.qkv_bias and not spec.o_bias and not spec.tie_embeddings and model.lm_head is not None
    if family == "llama":
        assert spec.tie_embeddings and model.lm_head is None
    # save / load round trip: the same logits, no source code needed
    out = save(model, tmp_path / "canon", prov, tokenizer_dir=tiny_folders[family])
    again, meta = load(out)
    ids, mask = parity_batch(spec, tokenizer_of(out))
    with torch.no_grad():
        assert torch.equal(again(ids, mask), model(ids, mask))
    assert json.loads((out / "pocketformer.json").read_text())["config"]["kind"] == "causal_lm"


def test_sliding_window_is_exercised(tiny_folders):
    """The text is longer than Gemma's window of 8: without the window the logits move (so parity tests it)."""
    model, _ = import_hf(tiny_folders["gemma3"])
    ids, mask = parity_batch(model.spec, tokenizer_of(tiny_folders["gemma3"]))
    with torch.no_grad():
        want = model(ids, mask)
        model.layers[0].attn.window = 0
        assert (model(ids, mask) - want).abs().max() > 1e-3


def test_greedy_generation_matches_transformers(tiny_folders):
    from transformers import AutoModelForCausalLM

    model, _ = import_hf(tiny_folders["llama"])
    source = AutoModelForCausalLM.from_pretrained(str(tiny_folders["llama"]), dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer_of(tiny_folders["llama"]).encode("I was laid up for about").ids])
    ours = model.generate(ids, 24)
    with torch.no_grad():
        theirs = source.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    assert ours.tolist() == theirs.tolist()


def test_cache_consistency_any_split(tiny_folders):
    model, _ = import_hf(tiny_folders["qwen2"])
    ids = torch.randint(2, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for k in (1, 7, 19):
            assert cache_consistency(model, ids, prefill=k) < 1e-4


def test_refuses_a_variant_it_does_not_compute(tiny_folders, tmp_path, monkeypatch):
    """A source that computes something else (here: a model whose logits are changed) is refused, not imported."""
    from transformers import AutoModelForCausalLM

    real = lm_importers._hf_model

    def shifted(folder):
        m = real(folder)
        with torch.no_grad():
            m.model.norm.weight.mul_(1.01)
        return m

    monkeypatch.setattr(lm_importers, "_hf_model", shifted)
    with pytest.raises(ParityError, match="differ from transformers'"):
        import_hf(tiny_folders["llama"])
    assert AutoModelForCausalLM  # the real transformers model, only its weights nudged


def test_refuses_unsupported_rope_scaling(tmp_path):
    folder = save_tiny_lm("llama", tmp_path / "yarn", rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                         "rope_theta": 1e5,
                                                                         "original_max_position_embeddings": 64})
    with pytest.raises(ArchitectureError, match="rotary scaling 'yarn' is not supported"):
        import_hf(folder)
