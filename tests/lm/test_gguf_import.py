"""GGUF import: a tiny model of each family written as llama.cpp's converter writes it (permuted Llama q/k, Gemma
norms as 1 + w, Q8_0 weights, the vocabulary in the metadata) imports with transformers' own GGUF loader's logits, its
tokenizer from the file, and converts once into a cached canonical folder; what it refuses."""

from __future__ import annotations

import pytest
import torch

from pocketformer.errors import ArchitectureError, CheckpointError
from pocketformer.models import CausalLM, load_any, source_folder
from pocketformer.models.gguf_import import gguf_state, import_gguf, read_gguf
from pocketformer.models.lm_importers import LM_PARITY_TOL, tokenizer_of

from .tiny_lms import TEXT, save_tiny_gguf, save_tiny_lm


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-gguf")
    out = {}
    # A GGUF stores neither Gemma 3's query scalar, nor its layer pattern, nor its local rotary base: readers take
    # transformers' defaults (which gemma-3-270m's values are), so the tiny Gemma uses them too.
    gemma_defaults = dict(query_pre_attn_scalar=256, layer_types=["sliding_attention"] * 2,
                          rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                           "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    for family in ("llama", "gemma3"):
        hf = save_tiny_lm(family, root / f"hf-{family}", **(gemma_defaults if family == "gemma3" else {}))
        out[family] = (hf, save_tiny_gguf(hf, root / f"{family}.gguf"))
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_gguf_import_matches_transformers_gguf_loader(tiny_ggufs, family, tmp_path):
    hf, path = tiny_ggufs[family]
    tok_dir = tmp_path / "tokenizer"
    model, prov = import_gguf(path, tok_dir)
    assert isinstance(model, CausalLM)
    assert prov["import_parity"]["max_abs_logit_diff"] <= LM_PARITY_TOL
    assert prov["import_parity"]["top1_agreement"] == 1.0
    assert prov["gguf_tensor_types"] == ["F32", "Q8_0"] and "dequantized" in prov["baseline_note"]
    # the file's own vocabulary tokenizes as the source tokenizer does
    text = TEXT[:300]
    assert tokenizer_of(tok_dir).encode(text).ids == tokenizer_of(hf).encode(text).ids
    # Q8_0 weights: close to, not equal to, the float model they came from
    from pocketformer.models import import_hf

    float_model, _ = import_hf(hf)
    ids = torch.tensor([tokenizer_of(hf).encode(text).ids[:40]])
    with torch.no_grad():
        d = (model(ids) - float_model(ids)).abs().max().item()
    assert 0 < d < 0.1


def test_llama_permutation_is_undone(tiny_ggufs):
    """Read without undoing llama.cpp's q/k permutation, the weights differ from the float model's rows."""
    hf, path = tiny_ggufs["llama"]
    reader, arch = read_gguf(path)
    state = gguf_state(reader, arch, 4, 2)
    from safetensors.torch import load_file

    source = load_file(str(hf / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (state[q] - source[q]).abs().max() < 0.02  # Q8_0 rounding only
    permuted = source[q].reshape(4, 2, 8, 64).transpose(1, 2).reshape(64, 64)
    assert (state[q] - permuted).abs().max() > 0.1


def test_converted_once_and_cached(tiny_ggufs):
    _, path = tiny_ggufs["llama"]
    folder = source_folder(path)
    assert (folder / "tokenizer.json").is_file() and (folder / "pocketformer.json").is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert source_folder(path) == folder and (folder / "model.safetensors").stat().st_mtime_ns == mtime
    model, prov = load_any(path)
    assert isinstance(model, CausalLM) and prov["source_architecture"] == "GGUF llama"


def test_refuses_truncated_and_foreign_files(tiny_ggufs, tmp_path):
    _, path = tiny_ggufs["llama"]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        import_gguf(cut, tmp_path / "tok")
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), arch="bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ArchitectureError, match="GGUF architecture 'bert' is not supported"):
        import_gguf(tmp_path / "bert.gguf", tmp_path / "tok")
