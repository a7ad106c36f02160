"""ONNX export, checked in the real ONNX Runtime on the real exported files."""

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
import torch

from conftest import export_onnx
from pocketformer import store
from pocketformer.store import read_manifest, write_manifest

TOL = 1e-4


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ort_run(path, names, inputs):
    return session(path).run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]


def torch_run(model, inputs):
    with torch.no_grad():
        return model(*inputs).numpy()


@pytest.fixture(scope="module")
def text_export(tmp_path_factory, make_model, make_text_inputs):
    model = make_model("text")  # an embedding model: output `embedding`, mean-pooled over the attention mask
    out = tmp_path_factory.mktemp("onnx-text")
    records = export_onnx(model, out, "text", make_text_inputs(batch=4, seq=12), int8=True)
    return model, out, {r["precision"]: r for r in records}


@pytest.fixture(scope="module")
def vision_export(tmp_path_factory, make_model, make_vision_inputs):
    model = make_model("vision", labels=[str(i) for i in range(10)])
    out = tmp_path_factory.mktemp("onnx-vision")
    record, _fp16 = export_onnx(model, out, "vision", make_vision_inputs(batch=3), int8=False)
    return model, out / record["file"], record


@pytest.mark.parametrize("batch,seq", [(1, 5), (4, 17), (6, 40), (2, 64)])
def test_text_fp32_matches_pytorch_at_other_batch_sizes_and_lengths(text_export, make_text_inputs, batch, seq):
    model, out, records = text_export
    inputs = make_text_inputs(batch=batch, seq=seq, seed=batch * 100 + seq)
    got = ort_run(out / records["fp32"]["file"], model.input_names, inputs)
    assert got.shape == (batch, 64)
    assert np.abs(got - torch_run(model, inputs)).max() < TOL


@pytest.mark.parametrize("batch", [1, 4, 7])
def test_vision_fp32_matches_pytorch_at_other_batch_sizes(vision_export, make_vision_inputs, batch):
    model, path, _ = vision_export
    inputs = make_vision_inputs(batch=batch, seed=batch)
    got = ort_run(path, ["pixel_values"], inputs)
    assert got.shape == (batch, 10)
    assert np.abs(got - torch_run(model, inputs)).max() < TOL


def test_dynamic_export_declares_symbolic_batch_and_sequence_axes(text_export):
    _, _, records = text_export
    for dims in records["fp32"]["inputs"].values():
        assert all(isinstance(d, str) for d in dims)


def test_int8_file_is_smaller_than_fp32(text_export):
    _, out, records = text_export
    assert (out / records["int8"]["file"]).stat().st_size < (out / records["fp32"]["file"]).stat().st_size


def test_int8_weights_are_7_bit_exactly_where_this_hosts_u8s8_kernels_saturate(text_export):
    from onnx import numpy_helper

    _, out, records = text_export
    seven = store.u8s8_saturates(store.cpu())
    assert records["int8"].get("int8_weight_bits") == (7 if seven else None)
    proto = onnx.load(str(out / records["int8"]["file"]))
    weights = [numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and "int8_weight_bits" not in records["fp32"]
    widest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert (widest <= 64) if seven else (widest > 64)  # 7-bit: within [-64, 64]; 8-bit: up to 127


def test_int8_file_keeps_the_output_direction_in_ort(text_export, make_text_inputs):
    model, out, records = text_export
    inputs = make_text_inputs(batch=8, seq=20, seed=11)
    got, want = ort_run(out / records["int8"]["file"], model.input_names, inputs), torch_run(model, inputs)
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.mean() >= 0.99


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_records_carry_the_files_sha256_and_size(text_export, precision):
    _, out, records = text_export
    record, path = records[precision], out / records[precision]["file"]
    assert record["file"] == f"text.{precision}.onnx"
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["size_bytes"] == path.stat().st_size


def test_records_carry_the_parity_measured_at_export(text_export):
    _, _, records = text_export
    parity = records["fp32"]["parity_vs_pytorch"]
    assert parity["max_abs_diff"] < TOL and parity["examples"] == 4


def test_static_shape_export_has_fixed_input_dims(tmp_path, make_model, make_text_inputs):
    model = make_model("text", labels=["neg", "pos"])
    record, _fp16 = export_onnx(model, tmp_path, "static", make_text_inputs(batch=3, seq=10), int8=False,
                       static_shape=(1, 16))
    sess = session(tmp_path / record["file"])
    assert [i.shape for i in sess.get_inputs()] == [[1, 16], [1, 16]]
    inputs = make_text_inputs(batch=1, seq=16, seed=3)
    assert np.abs(ort_run(tmp_path / record["file"], model.input_names, inputs)
                  - torch_run(model, inputs)).max() < TOL
    with pytest.raises(InvalidArgument, match="invalid dimensions"):
        sess.run(None, {n: t.numpy() for n, t in zip(model.input_names, make_text_inputs(batch=2, seq=16))})


def test_static_shape_export_with_a_batch_above_one(tmp_path, make_model, make_text_inputs):
    model = make_model("text", labels=["neg", "pos"])
    record, _fp16 = export_onnx(model, tmp_path, "static", make_text_inputs(batch=5, seq=10), int8=False,
                       static_shape=(2, 16))
    assert [i.shape for i in session(tmp_path / record["file"]).get_inputs()] == [[2, 16], [2, 16]]
    assert record["parity_vs_pytorch"]["examples"] == 5


def test_static_vision_export_has_a_fixed_batch(tmp_path, make_model, make_vision_inputs):
    model = make_model("vision", labels=["a", "b"])
    record, _fp16 = export_onnx(model, tmp_path, "static", make_vision_inputs(batch=3), int8=False, static_shape=(1, 0))
    assert session(tmp_path / record["file"]).get_inputs()[0].shape == [1, 1, 8, 8]


def test_a_model_with_different_shapes_per_layer_exports_and_matches(tmp_path, make_model, make_text_inputs):
    model = make_model("text")
    model.keep_heads(0, [1])
    model.keep_neurons(0, list(range(24)))
    model.keep_heads(1, [0, 2, 3])
    record, _fp16 = export_onnx(model, tmp_path, "pruned", make_text_inputs(batch=2, seq=8), int8=False)
    inputs = make_text_inputs(batch=3, seq=19, seed=5)
    assert np.abs(ort_run(tmp_path / record["file"], model.input_names, inputs)
                  - torch_run(model, inputs)).max() < TOL


def test_manifest_merges_records_and_replaces_those_of_the_same_file(tmp_path):
    write_manifest(tmp_path, [{"file": "a.onnx", "v": 1}, {"file": "b.onnx", "v": 1}])
    write_manifest(tmp_path, [{"file": "a.onnx", "v": 2}])
    assert read_manifest(tmp_path) == [{"file": "a.onnx", "v": 2}, {"file": "b.onnx", "v": 1}]


@pytest.mark.slow
def test_pruned_minilm_exports_and_matches_pytorch_in_ort(tmp_path, minilm_path, sentiment_csv):
    from pocketformer.compress import Context
    from pocketformer.compress.prune import Prune, PruneConfig
    from pocketformer.data import Encoder, load_dataset
    from pocketformer.models import import_hf

    model, _ = import_hf(minilm_path, check_parity=False)  # parity on import: test_importers
    encoder = Encoder(minilm_path, max_len=64)
    ctx = Context(teacher=model, train=load_dataset(str(sentiment_csv), "train"),
                  validation=load_dataset(str(sentiment_csv), "validation"), encoder=encoder, batch_size=8)
    model = Prune(PruneConfig(heads=0.25, ffn=0.5, importance="magnitude",
                              calibration_examples=8)).apply(model, ctx).model
    assert sum(s.heads for s in model.config.layers) == 54
    test = load_dataset(str(sentiment_csv), "test")
    record, _fp16 = export_onnx(model, tmp_path, "minilm", encoder.encode(test, np.arange(4)), int8=False)
    longer = (torch.randint(1000, 30000, (3, 48)), torch.ones(3, 48, dtype=torch.long))
    longer[1][2, 30:] = 0
    got = ort_run(tmp_path / record["file"], model.input_names, longer)
    assert np.abs(got - torch_run(model, longer)).max() < TOL
