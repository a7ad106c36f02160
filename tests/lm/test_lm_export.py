"""A causal LM exported with its KV cache through the one export loop (checked in ONNX Runtime against PyTorch),
then driven in ONNX Runtime: greedy decoding matches PyTorch's token for token over 64 tokens, perplexity matches,
and the cached graph's layout is the one ONNX Runtime GenAI / Optimum feed."""

from __future__ import annotations

import math

import pytest
import torch

from pocketformer.models import import_hf
from pocketformer.models.lm_importers import tokenizer_of
from pocketformer.models.tasks import perplexity as torch_perplexity
from pocketformer.targets import export_checked, get_runtime
from pocketformer.targets.lm import Decoder, perplexity, token_match

from .tiny_lms import TEXT, save_tiny_lm


@pytest.fixture(scope="module", params=["llama", "gemma3", "qwen2"])
def exported(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"lm-export-{family}")
    hf = save_tiny_lm(family, root / "hf")
    model, _ = import_hf(hf)
    tok = tokenizer_of(hf)
    ids = torch.tensor([tok.encode(TEXT[:400]).ids[:24]] * 2)
    # int8 judged by top-1 agreement: a tiny random Gemma's logits are too flat for int8 to keep it (measured 0.75)
    records = export_checked(model, root / "art", "model", model.graph_inputs(ids, 16), "onnx",
                             int8=family != "gemma3", int4=family == "llama")
    return family, model, tok, records, root / "art"


def test_layout_is_ort_genai(exported):
    family, model, _, records, _ = exported
    assert [r["precision"] for r in records] == {"llama": ["fp32", "fp16", "int8-weight", "int8", "int4"],
                                                 "gemma3": ["fp32", "fp16"],
                                                 "qwen2": ["fp32", "fp16", "int8-weight", "int8"]}[family]
    if family == "llama":  # int4: ORT's MatMulNBits kernels, blocks of 32
        assert next(r for r in records if r["precision"] == "int4")["ops"].get("MatMulNBits", 0) >= 7 * 2
    fp32 = next(r for r in records if r["precision"] == "fp32")
    n = len(model.layers)
    assert list(fp32["inputs"])[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [k for k in fp32["inputs"] if k.startswith("past_")] == \
        [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    assert fp32["inputs"]["past_key_values.0.key"] == ["batch", model.layers[0].attn.kv_heads, "past",
                                                       model.layers[0].attn.head_dim]
    assert list(fp32["outputs"])[-1] == "logits" and "present.0.key" in fp32["outputs"]
    assert fp32["parity_vs_pytorch"]["max_abs_diff"] < 1e-4


def test_greedy_decoding_matches_pytorch(exported):
    family, model, tok, records, art = exported
    prompt = tok.encode("During my grammar school days, I was").ids
    want = model.generate(torch.tensor([prompt]), 64).tolist()
    for r in records:
        decoder = Decoder(get_runtime("onnxruntime").open(art / r["file"], 1))
        got, timings = decoder.generate(prompt, 64, timings=True)
        match = token_match(got, want)
        if r["precision"] == "fp32":
            assert match["tokens"] == 64 and match["match"] == 1.0, (family, match)
        else:
            assert match["first_divergence"] >= 8, (family, r["precision"], match)
        assert timings.prompt_tokens == len(prompt) and len(timings.decode_ms) == 63
        assert timings.decode_tokens_per_s > 0 and timings.prefill_ms > 0


def test_perplexity_matches_pytorch(exported):
    family, model, tok, records, art = exported
    ids = tok.encode(TEXT).ids
    windows = [ids[i:i + 40] for i in range(0, 160, 40)]
    with torch.no_grad():
        want = math.exp(sum(math.log(torch_perplexity(model(torch.tensor([w])), torch.tensor([w]))) * (len(w) - 1)
                            for w in windows) / sum(len(w) - 1 for w in windows))
    fp32 = next(r for r in records if r["precision"] == "fp32")
    got = perplexity(Decoder(get_runtime("onnxruntime").open(art / fp32["file"], 1)), windows)
    assert got == pytest.approx(want, rel=1e-4)


def test_fp16_and_int8_weight_files_store_their_weights_so(exported):
    """fp16: every large float weight stored fp16 and cast back (half the fp32 file); int8-weight: every MatMul
    weight int8 behind DequantizeLinear (which ORT fuses into its 8-bit MatMulNBits), the embedding table int8 with
    a scale per row, and a tied output embedding stored once (the table read transposed)."""
    import onnx
    import onnxruntime as ort

    family, model, _, records, art = exported
    by = {r["precision"]: r for r in records}
    fp32_bytes = (art / by["fp32"]["file"]).stat().st_size
    fp16 = onnx.load(str(art / by["fp16"]["file"]))
    big = [t for t in fp16.graph.initializer if len(t.dims) == 2]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert (art / by["fp16"]["file"]).stat().st_size < 0.6 * fp32_bytes
    if "int8-weight" not in by:
        return
    q = onnx.load(str(art / by["int8-weight"]["file"]))
    ops = by["int8-weight"]["ops"]
    tied = model.spec.tie_embeddings
    assert tied == (family != "qwen2")  # tiny_lms: llama and gemma3 tie, qwen2 does not
    n_linear = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear)) + tied  # + the tied head
    assert ops.get("DequantizeLinear") == n_linear
    assert not [t.name for t in q.graph.initializer  # no float matrix left (row scales are [V, 1])
                if len(t.dims) == 2 and min(t.dims) > 1 and t.data_type == onnx.TensorProto.FLOAT]
    transposes = [n for n in q.graph.node if n.op_type == "Transpose" and n.name.endswith("_tied")]
    assert len(transposes) == tied
    assert (art / by["int8-weight"]["file"]).stat().st_size < 0.35 * fp32_bytes  # a tiny graph: its nodes weigh too
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(art / "optimized.onnx")
    ort.InferenceSession(str(art / by["int8-weight"]["file"]), so, providers=["CPUExecutionProvider"])
    fused = onnx.load(so.optimized_model_filepath, load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in fused.graph.node) == n_linear  # every weight runs 8-bit
