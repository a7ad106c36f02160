"""A causal LM in TFLite: one file with `prefill` and `decode` signatures over an external KV cache (LiteRT-LM's
names), written and checked by the one export loop, then driven in LiteRT: greedy decoding matches PyTorch's over
64 tokens, perplexity matches, a prompt longer than the prefill chunk is prefilled in chunks, and a prompt past the
cache is refused in one line."""

from __future__ import annotations

import math

import pytest
import torch

from pocketformer.errors import TargetError
from pocketformer.models import import_hf
from pocketformer.models.lm_importers import tokenizer_of
from pocketformer.models.tasks import perplexity as torch_perplexity
from pocketformer.targets import export_checked, get_runtime
from pocketformer.targets.lm import FixedCacheDriver, open_lm, perplexity, token_match

from .tiny_lms import TEXT, save_tiny_lm

PREFILL = 48  # a context of 128 takes two chunks, then single steps


@pytest.fixture(scope="module", params=["llama", "gemma3", "qwen2"])
def exported(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"lm-tflite-{family}")
    hf = save_tiny_lm(family, root / "hf")
    model, _ = import_hf(hf)
    tok = tokenizer_of(hf)
    ids = torch.tensor([tok.encode(TEXT[:400]).ids[:24]] * 2)
    # Every precision once across the families (each conversion costs seconds): fp16 and the int8s on llama,
    # int4 on qwen2; a tiny random Gemma's logits are too flat for reduced precision (see test_lm_export).
    int8, int4 = {"llama": (True, False), "gemma3": (False, False), "qwen2": (False, True)}[family]
    records = export_checked(model, root / "art", "model", model.graph_inputs(ids, 16), "tflite",
                             static_shape=(1, PREFILL), int8=int8, int4=int4)
    return family, model, tok, records, root / "art"


def drivers(records, art):
    return {r["precision"]: open_lm(get_runtime("litert"), art / r["file"], 1) for r in records}


def test_one_file_with_prefill_and_decode_signatures(exported):
    family, model, _, records, _ = exported
    assert [r["precision"] for r in records] == {"llama": ["fp32", "fp16", "int8-weight", "int8"],
                                                 "gemma3": ["fp32", "fp16"], "qwen2": ["fp32", "fp16", "int4"]}[family]
    fp32 = records[0]
    n, context = len(model.layers), min(model.spec.max_positions, 1024)
    assert fp32["kv_cache"] == {"context": context, "prefill_tokens": PREFILL,
                                "layout": "kv_cache_k_N / kv_cache_v_N in and out, (1, kv_heads, context, head_dim)"}
    assert set(fp32["graphs"]) == {"prefill", "decode"}
    assert [fp32["graphs"][g]["signature"] for g in ("prefill", "decode")] == ["prefill", "decode"]
    assert list(fp32["inputs"])[:2] == ["tokens", "input_pos"] and fp32["inputs"]["tokens"] == [1, PREFILL]
    assert fp32["inputs"]["kv_cache_k_0"] == [1, model.layers[0].attn.kv_heads, context, model.layers[0].attn.head_dim]
    assert [k for k in fp32["inputs"] if k.startswith("kv_cache_")] == \
        [f"kv_cache_{kv}_{i}" for i in range(n) for kv in ("k", "v")]
    # the cache is written in place by LiteRT's own op, not scattered
    assert fp32["ops"].get("DYNAMIC_UPDATE_SLICE") == 2 * 2 * n and "STABLEHLO_SCATTER" not in fp32["ops"]
    for graph in fp32["graphs"].values():
        assert graph["logits"]["max_abs_diff"] < 1e-4 and graph["cache_max_abs_diff"] < 1e-4
    if family == "qwen2":  # int4 weights: smaller than the fp16 file
        sizes = {r["precision"]: r["size_bytes"] for r in records}
        assert sizes["int4"] < sizes["fp16"] < sizes["fp32"]


def test_greedy_decoding_matches_pytorch(exported):
    family, model, tok, records, art = exported
    prompt = tok.encode("During my grammar school days, I was").ids
    want = model.generate(torch.tensor([prompt]), 64).tolist()
    for precision, driver in drivers(records, art).items():
        assert isinstance(driver, FixedCacheDriver)
        got, timings = driver.generate(prompt, 64, timings=True)
        match = token_match(got, want)
        if precision in ("fp32", "fp16"):
            assert match == {"tokens": 64, "match": 1.0, "first_divergence": 64}, (family, precision, match)
        else:
            assert match["first_divergence"] >= 8, (family, precision, match)
        assert timings.prompt_tokens == len(prompt) and len(timings.decode_ms) == 63


def test_a_prompt_longer_than_the_prefill_chunk(exported):
    """Chunks of PREFILL tokens while they fit the cache, then one decode step per token: the same tokens."""
    family, model, tok, records, art = exported
    driver = drivers(records[:1], art)["fp32"]
    context = driver.context
    prompt = (tok.encode(TEXT).ids * 4)[: context - 8]  # chunks up to the last full one, then single steps
    assert 2 * PREFILL < len(prompt) < 3 * PREFILL and 3 * PREFILL > context
    assert driver.generate(prompt, 8) == model.generate(torch.tensor([prompt]), 8).tolist()
    with pytest.raises(TargetError, match=f"holds {context} tokens of context"):
        driver.generate(prompt, 10)


def test_perplexity_matches_pytorch(exported):
    family, model, tok, records, art = exported
    ids = tok.encode(TEXT).ids
    windows = [ids[i:i + 40] for i in range(0, 160, 40)]  # 40 tokens: one chunk, padded
    with torch.no_grad():
        want = math.exp(sum(math.log(torch_perplexity(model(torch.tensor([w])), torch.tensor([w]))) * (len(w) - 1)
                            for w in windows) / sum(len(w) - 1 for w in windows))
    assert perplexity(drivers(records[:1], art)["fp32"], windows) == pytest.approx(want, rel=1e-4)
