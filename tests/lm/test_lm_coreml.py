"""A causal LM in CoreML: one stateful ML program (iOS 18) whose KV cache is Core ML states and whose token axis is
flexible (prefill up to T tokens, decode one), written and checked by the one export loop. Off macOS it runs in the
MIL reference execution (coreml_ref), which executes read_state / coreml_update_state on real state buffers, so
greedy decoding and perplexity are compared with PyTorch's; no latency is measured here."""

from __future__ import annotations

import math

import pytest
import torch

from pocketformer.export.coreml import load_program
from pocketformer.models import import_hf
from pocketformer.models.lm_importers import tokenizer_of
from pocketformer.models.tasks import perplexity as torch_perplexity
from pocketformer.targets import export_checked, get_runtime
from pocketformer.targets.coreml_ref import LABEL
from pocketformer.targets.lm import FixedCacheDriver, open_lm, perplexity, token_match

from .tiny_lms import TEXT, save_tiny_lm

PREFILL = 32


@pytest.fixture(scope="module", params=["llama", "gemma3", "qwen2"])
def exported(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"lm-coreml-{family}")
    hf = save_tiny_lm(family, root / "hf")
    model, _ = import_hf(hf)
    tok = tokenizer_of(hf)
    ids = torch.tensor([tok.encode(TEXT[:400]).ids[:24]] * 2)
    records = export_checked(model, root / "art", "model", model.graph_inputs(ids, 16), "coreml",
                             static_shape=(1, PREFILL), int8=family == "llama")
    return family, model, tok, records, root / "art"


def test_one_stateful_package_for_prefill_and_decode(exported):
    family, model, _, records, art = exported
    assert [r["precision"] for r in records] == (["fp32", "fp16", "int8"] if family == "llama" else ["fp32", "fp16"])
    n = len(model.layers)
    for r in records:
        assert r["coreml"]["deployment_target"] == "iOS18" and r["min_ios"] == "iOS18"  # states need iOS 18
        assert r["states"] == [f"kv_cache_{kv}_{i}" for i in range(n) for kv in ("k", "v")]
        assert r["inputs"]["tokens"] == [1, "flexible"] and r["inputs"]["input_pos"] == ["flexible"]
        assert list(r["outputs"]) == ["logits"]  # the cache never leaves the package
        assert {g["signature"] for g in r["graphs"].values()} == {"prefill", "decode"}
        assert r["parity_vs_pytorch"]["execution"] == LABEL
    ops = {op.op_type for op in load_program(art / records[0]["file"]).functions["main"].operations}
    assert {"read_state", "slice_update", "coreml_update_state"} <= ops
    assert records[0]["parity_vs_pytorch"]["cosine"] > 0.9999


def test_greedy_decoding_matches_pytorch(exported):
    family, model, tok, records, art = exported
    prompt = tok.encode("During my grammar school days, I was").ids
    want = model.generate(torch.tensor([prompt]), 64).tolist()
    for r in records:
        driver = open_lm(get_runtime("coreml-mil-reference"), art / r["file"], 1)
        assert isinstance(driver, FixedCacheDriver) and driver.chunk == PREFILL
        match = token_match(driver.generate(prompt, 64), want)
        if r["precision"] == "fp32":  # fp16 states: the same tokens
            assert match == {"tokens": 64, "match": 1.0, "first_divergence": 64}, (family, match)
        else:
            assert match["first_divergence"] >= 8, (family, r["precision"], match)


def test_perplexity_matches_pytorch(exported):
    family, model, tok, records, art = exported
    ids = tok.encode(TEXT).ids
    windows = [ids[i:i + 40] for i in range(0, 120, 40)]  # a full chunk, then a shorter one, per window
    with torch.no_grad():
        want = math.exp(sum(math.log(torch_perplexity(model(torch.tensor([w])), torch.tensor([w]))) * (len(w) - 1)
                            for w in windows) / sum(len(w) - 1 for w in windows))
    got = perplexity(open_lm(get_runtime("coreml-mil-reference"), art / records[0]["file"], 1), windows)
    assert got == pytest.approx(want, rel=1e-3)  # fp16 states


def test_fp16_program_survives_a_huge_residual_channel(tmp_path):
    """Real LMs' residual streams carry a few huge channels (SmolLM2-135M's reaches 25,000); squared for RMSNorm in
    fp16 they are inf (its fp16 program had cosine -0.008). The fp16 program divides each row by its largest value
    before squaring. A tiny Qwen2 (untied head) with one embedding channel at 1,000 (1,000^2 > fp16's 65,504)."""
    hf = save_tiny_lm("qwen2", tmp_path / "hf")
    model, _ = import_hf(hf)
    with torch.no_grad():
        model.embed.weight[:, 7] = 1000.0
    tok = tokenizer_of(hf)
    ids = torch.tensor([tok.encode(TEXT[:400]).ids[:24]] * 2)
    records = export_checked(model, tmp_path / "art", "model", model.graph_inputs(ids, 16), "coreml",
                             static_shape=(1, PREFILL), int8=False)
    fp16 = next(r for r in records if r["precision"] == "fp16")
    assert fp16["parity_vs_pytorch"]["cosine"] > 0.999
    prompt = tok.encode("During my grammar school days, I was").ids
    want = model.generate(torch.tensor([prompt]), 16).tolist()
    got = open_lm(get_runtime("coreml-mil-reference"), tmp_path / "art" / fp16["file"], 1).generate(prompt, 16)
    assert token_match(got, want)["first_divergence"] >= 8
