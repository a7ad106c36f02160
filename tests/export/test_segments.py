"""Early-exit segments: run one after another by the driver in ONNX Runtime, LiteRT and the CoreML MIL reference,
they exit where PyTorch's predict_with_exits does and give its logits there; the manifest says what a driver needs."""

import json

import numpy as np
import pytest
import torch

from pocketformer.models.exits import Gate, entropy, head_logits, predict_with_exits
from pocketformer.errors import ExportError
from pocketformer.export import segments
from pocketformer.models import LayerShape, count_params
from pocketformer.targets.early_exit import open_segments, run_example
from conftest import export_segments, pad_to

RUNTIME = {"onnx": "onnxruntime", "tflite": "litert", "coreml": "coreml-mil-reference"}
EXAMPLES = {"onnx": 6, "tflite": 6, "coreml": 4}  # the MIL reference takes a while per example


def four_layers():
    return [LayerShape(heads=4, head_dim=16, ffn=128) for _ in range(4)]


def splitting_gate(model, inputs) -> Gate:
    """An entropy threshold in the widest gap between the exit heads' entropies on `inputs`: some examples exit
    early, some do not, and no entropy sits near the threshold, where runtimes may round either way."""
    values = np.sort(entropy(head_logits(model, inputs)[:, :-1]).ravel())
    gaps = values[2:-1] - values[1:-2]
    k = int(np.argmax(gaps)) + 1
    return Gate(kind="entropy", threshold=float((values[k] + values[k + 1]) / 2))


@pytest.fixture(scope="module")
def classifier(make_model, make_text_inputs):
    """A 4-layer, 3-label text classifier with exits after layers 0 and 2, heads scaled so logits are far from zero,
    and a gate that splits its check inputs between the heads."""
    model = make_model("text", labels=("a", "b", "c"), vocab_size=1000, max_positions=256, layers=four_layers())
    model.set_exits([0, 2])
    with torch.no_grad():
        for head in [*model.exit_heads, model.classifier]:
            head.out.weight.mul_(20.0)
    inputs = make_text_inputs(batch=6, seq=12, vocab_size=1000)
    model.spec.exit_gate = splitting_gate(model, pad_to(inputs, 128, model)).model_dump()
    return model.eval(), inputs


@pytest.fixture(scope="module")
def exported(classifier, tmp_path_factory):
    """Each format's fp32 segments, exported once: {format: (out_dir, fp32 record)}."""
    model, inputs = classifier
    out = {}

    def get(fmt):
        if fmt not in out:
            folder = tmp_path_factory.mktemp(f"segments-{fmt}")
            records = export_segments(model, folder, "model", inputs, fmt, int8=False)
            out[fmt] = folder, {r["precision"]: r for r in records}
        return out[fmt]

    return get


def manifest_of(exported, fmt, precision="fp32"):
    folder, records = exported(fmt)
    return folder / records[precision]["file"], json.loads((folder / records[precision]["file"]).read_text())


def run_driver(path, fmt, model, inputs):
    driver = open_segments(path, RUNTIME[fmt], threads=1)
    seq = driver.manifest["shapes"]["seq"]
    feeds = pad_to(inputs, seq, model) if seq else inputs
    return [run_example(driver, {n: t[i:i + 1].numpy() for n, t in zip(model.input_names, feeds)}, driver.gate)
            for i in range(len(inputs[0]))]


@pytest.mark.parametrize("fmt", ["onnx", "tflite", "coreml"])
def test_the_driver_exits_where_pytorch_does(exported, classifier, fmt):
    model, inputs = classifier
    inputs = tuple(t[:EXAMPLES[fmt]] for t in inputs)
    path, _ = manifest_of(exported, fmt)
    got = run_driver(path, fmt, model, inputs)
    want = predict_with_exits(model, pad_to(inputs, 128, model))
    assert len(set(want.exits.tolist())) > 1, "the gate should split the examples between heads"
    assert [r.exit for r in got] == want.exits.tolist()
    assert [r.label for r in got] == want.labels.tolist()


@pytest.mark.parametrize("fmt", ["onnx", "tflite", "coreml"])
def test_the_driver_gives_pytorchs_logits_at_the_exit(exported, classifier, fmt):
    model, inputs = classifier
    inputs = tuple(t[:EXAMPLES[fmt]] for t in inputs)
    path, _ = manifest_of(exported, fmt)
    got = np.stack([r.logits for r in run_driver(path, fmt, model, inputs)])
    want = predict_with_exits(model, pad_to(inputs, 128, model)).logits
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("fmt", ["onnx", "tflite", "coreml"])
def test_manifest_has_one_segment_per_exit_then_the_final_head(exported, fmt):
    _, manifest = manifest_of(exported, fmt)
    assert [s["layers"] for s in manifest["segments"]] == [[0, 1], [1, 3], [3, 4]]
    assert [s["head"] for s in manifest["segments"]] == ["exit 0", "exit 1", "final"]
    assert [s["logits_output"] for s in manifest["segments"]] == ["exit_logits", "exit_logits", "logits"]
    assert list(manifest["segments"][0]["inputs"]) == ["input_ids", "attention_mask"]
    assert list(manifest["segments"][1]["inputs"]) == ["hidden_in", "attention_mask"]
    assert list(manifest["segments"][1]["outputs"]) == ["hidden", "exit_logits"]


def test_manifest_carries_the_exit_layers_and_the_models_gate(exported, classifier):
    model, _ = classifier
    _, manifest = manifest_of(exported, "onnx")
    assert manifest["exits"] == [0, 2] and manifest["layers"] == 4
    assert manifest["gate"] == model.spec.exit_gate
    assert manifest["labels"] == ["a", "b", "c"]


def test_tflite_segments_are_signatures_of_one_file(exported):
    _, manifest = manifest_of(exported, "tflite")
    assert {s["file"] for s in manifest["segments"]} == {"model.exits.fp32.tflite"}
    assert [s["signature"] for s in manifest["segments"]] == ["segment_0", "segment_1", "segment_2"]


def test_static_segments_are_batch_one_at_the_formats_length(exported):
    _, manifest = manifest_of(exported, "coreml")
    assert manifest["shapes"] == {"batch": 1, "seq": 128, "hidden": 64}
    assert manifest["segments"][1]["inputs"]["hidden_in"] == [1, 128, 64]


def test_onnx_segments_keep_batch_and_sequence_dynamic(exported, classifier):
    model, inputs = classifier
    path, manifest = manifest_of(exported, "onnx")
    assert manifest["segments"][1]["inputs"]["hidden_in"] == ["batch", "seq", 64]
    got = run_driver(path, "onnx", model, inputs)  # 12 tokens, unpadded
    assert [r.exit for r in got] == predict_with_exits(model, inputs).exits.tolist()


def test_every_segment_carries_only_its_own_weights(exported, classifier):
    model, _ = classifier
    _, records = exported("onnx")
    assert records["fp32"]["weights"] <= count_params(model) * 1.01


@pytest.mark.parametrize("fmt", ["onnx", "tflite", "coreml"])
def test_record_names_its_manifest_and_measures_each_segment(exported, fmt):
    folder, records = exported(fmt)
    record = records["fp32"]
    _, manifest = manifest_of(exported, fmt)
    assert record["kind"] == "segments" and record["file"] == f"model.exits.fp32.{fmt}.json"
    assert record["parity_vs_pytorch"]["cosine"] > 0.999
    assert record["exit_agreement_vs_pytorch"]["exits"] == 1.0
    assert all(s["parity_vs_pytorch"]["hidden"]["cosine"] > 0.999 for s in manifest["segments"][:-1])
    files = {folder / s["file"] for s in manifest["segments"]}
    assert record["size_bytes"] == sum(segments.artifact_size(f) for f in files)


def test_tflite_writes_the_plain_exporters_precisions(exported):
    _, records = exported("tflite")
    assert set(records) == {"fp32", "fp16"}


def test_vision_segments_exit_where_pytorch_does(make_model, make_vision_inputs, tmp_path):
    """A pre-LN model: every exit head normalises with the final norm, in the segments as in PyTorch."""
    model = make_model("vision", labels=[str(i) for i in range(10)], layers=four_layers())
    model.set_exits([1, 2])
    with torch.no_grad():
        for head in [*model.exit_heads, model.classifier]:
            head.out.weight.mul_(20.0)
    inputs = make_vision_inputs(batch=6)
    model.spec.exit_gate = splitting_gate(model, inputs).model_dump()
    record, _fp16 = export_segments(model, tmp_path, "vit", inputs, "onnx", int8=False)
    got = run_driver(tmp_path / record["file"], "onnx", model, inputs)
    want = predict_with_exits(model, inputs)
    assert [r.exit for r in got] == want.exits.tolist()
    assert np.abs(np.stack([r.logits for r in got]) - want.logits).max() < 1e-3 * np.abs(want.logits).max()


def test_a_model_without_exits_is_refused(make_model, make_text_inputs, tmp_path):
    model = make_model("text", labels=("a", "b"))
    with pytest.raises(ExportError, match="no exit heads"):
        export_segments(model, tmp_path, "model", make_text_inputs(), "onnx")


def test_an_embedding_model_is_refused(make_model, make_text_inputs, tmp_path):
    model = make_model("text")
    with pytest.raises(ExportError, match="classifier"):
        export_segments(model, tmp_path, "model", make_text_inputs(), "onnx")
