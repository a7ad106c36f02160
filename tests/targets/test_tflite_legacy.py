"""The tflite-runtime 2.14 check, in its own numpy<2 environment: files it cannot load, files it runs wrongly without
a word, and files it runs as LiteRT does. The environment comes from PyPI once per test session (about 20 s; not
marked slow, which this suite keeps for > 30 s)."""

import json

import pytest
import torch

from pocketformer.export import tflite
from pocketformer.targets import tflite_legacy
from conftest import export_tflite, pad_to, run_file


@pytest.fixture(scope="session")
def legacy_cache(tmp_path_factory):
    """One cache (and so one tflite-runtime environment) shared by every test in the session."""
    cache = tmp_path_factory.mktemp("legacy-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POCKETFORMER_CACHE", str(cache))
        tflite_legacy.ensure_env()
    return cache


@pytest.fixture(autouse=True)
def shared_env(isolated_cache, legacy_cache, monkeypatch):
    monkeypatch.setenv("POCKETFORMER_CACHE", str(legacy_cache))


@pytest.fixture(scope="module")
def artifacts(make_model, make_text_inputs, tmp_path_factory):
    """A tiny text classifier exported at (1, 32) in every precision: (out_dir, feeds)."""
    model = make_model("text", labels=("a", "b"), vocab_size=1000, max_positions=256)
    with torch.no_grad():
        model.classifier.out.weight.mul_(20.0)
    inputs = pad_to(make_text_inputs(batch=3, seq=20, vocab_size=1000), 32, model)
    out = tmp_path_factory.mktemp("legacy-artifacts")
    export_tflite(model, out, "tiny", inputs, static_shape=(1, 32))
    return out, {n: t.numpy() for n, t in zip(model.input_names, inputs)}


def test_environment_pins_tflite_runtime_2_14_with_numpy_1(legacy_cache):
    env = tflite_legacy.ensure_env()
    versions = json.loads((env / tflite_legacy.READY).read_text())
    assert env.parent.parent == legacy_cache
    assert versions["tflite_runtime"] == "2.14.0" and versions["numpy"].startswith("1.")


def test_fp32_file_loads_and_agrees_with_litert(artifacts):
    out, feeds = artifacts
    result = tflite_legacy.check(out / "tiny.fp32.tflite", feeds)
    assert (result["loads"], result["runs"], result["outputs_agree"], result["error"]) == (True, True, True, None)
    assert result["cosine"] >= 0.999


def test_dynamic_int8_file_is_reported_as_a_silent_wrong_answer(artifacts):
    """ai-edge-quantizer's per-channel dynamic int8 keeps FULLY_CONNECTED at version 5: 2.14 loads it, runs it, and
    returns different numbers than LiteRT."""
    out, feeds = artifacts
    result = tflite_legacy.check(out / "tiny.int8.tflite", feeds)
    assert (result["loads"], result["runs"], result["outputs_agree"]) == (True, True, False)
    assert "disagree" in result["error"]


def test_file_the_old_runtime_cannot_load_is_reported_with_the_failing_op(artifacts, tmp_path):
    """int4 weights (ai-edge-quantizer's weight-only int4) need a DEQUANTIZE kernel newer than 2.14's."""
    from ai_edge_quantizer import quantizer, recipe

    out, feeds = artifacts
    with tflite._quiet():
        q = quantizer.Quantizer(str(out / "tiny.fp32.tflite"), recipe.weight_only_wi4_afp32()).quantize(
            enable_progress_bar=False, enable_progress_report=False)
    path = tmp_path / "tiny.int4w.tflite"
    path.write_bytes(bytes(q.quantized_model))
    result = tflite_legacy.check(path, feeds)
    assert (result["loads"], result["outputs_agree"], result["op"]) == (False, None, "DEQUANTIZE")
    assert result["error"].startswith("tflite-runtime 2.14.0 cannot load the file's DEQUANTIZE op")


def test_outputs_are_compared_with_the_reference_the_caller_gives(artifacts):

    out, feeds = artifacts
    litert_out = run_file("litert", out / "tiny.fp32.tflite", feeds)
    result = tflite_legacy.check(out / "tiny.fp32.tflite", feeds, reference_outputs=-litert_out)
    assert result["runs"] and result["outputs_agree"] is False and result["cosine"] < -0.99
