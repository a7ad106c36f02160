"""Sparse weight storage of dense-sparse models in every format: the artifact is smaller than the same model stored
densely, runs in the real runtime (ONNX Runtime, LiteRT with XNNPACK, the CoreML MIL reference) and matches PyTorch,
and its record says what was stored sparse and what stayed dense, and why."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pocketformer.compress import Context
from pocketformer.compress.dense_sparse import DenseSparse, DenseSparseConfig
from pocketformer.export import coreml, sparse, tflite
from pocketformer.export import onnx as onnx_export
from pocketformer.export.base import artifact_size, parity
from pocketformer.models.signature import named_forward
from pocketformer.models import LayerShape
from conftest import export_coreml, export_onnx, export_tflite, open_file, pad_to, run_file

SHAPE = (1, 16)  # static (batch, seq) of the TFLite and CoreML files
DS_LINEARS = 12  # 2 layers x q, k, v, o, fc1, fc2


@pytest.fixture(scope="module")
def model(make_model):
    """A tiny text model (hidden 64, FFN 512) factorized with basis 32 and 4 non-zeros per column: every S is 7/8
    zeros. fc2's S (32 x 512) is encoded column-first in TFLite (one-byte indices), the others row-first."""
    ds = make_model("text", layers=[LayerShape(heads=4, head_dim=16, ffn=512) for _ in range(2)])
    DenseSparse(DenseSparseConfig(rank=32, nnz=4)).apply(ds, Context(teacher=None, train=None, validation=None,
                                                                     encoder=None))
    return ds.eval()


def torch_run(model, inputs):
    with torch.no_grad():
        return model(*inputs).numpy()


def by_precision(records):
    return {r["precision"]: r for r in records}


# -- ONNX -----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_files(model, make_text_inputs, tmp_path_factory):
    """(out, sparse records, dense records): the model exported with and without sparse storage, fp32 and int8."""
    out = tmp_path_factory.mktemp("sparse-onnx")
    inputs = make_text_inputs(batch=4, seq=12)
    stored = by_precision(export_onnx(model, out / "sparse", "ds", inputs))
    dense = by_precision(export_onnx(model, out / "dense", "ds", inputs, sparse=False))
    return out, stored, dense


def test_onnx_sparse_fp32_file_is_smaller_than_the_dense_one(onnx_files):
    out, stored, dense = onnx_files
    saved = stored["fp32"]["sparse_storage"]["dense_bytes"] - stored["fp32"]["sparse_storage"]["sparse_bytes"]
    # the file shrinks by what the record says the S matrices saved, less a little protobuf framing
    assert (out / "sparse" / "ds.fp32.onnx").stat().st_size < (out / "dense" / "ds.fp32.onnx").stat().st_size \
        - 0.95 * saved
    assert stored["fp32"]["size_bytes"] < 0.8 * dense["fp32"]["size_bytes"]


def test_onnx_record_counts_every_s_matrix_stored_sparse(onnx_files):
    _, stored, dense = onnx_files
    storage = stored["fp32"]["sparse_storage"]
    assert storage["tensors"] == DS_LINEARS and storage["sparse_bytes"] < 0.5 * storage["dense_bytes"]
    assert "sparse_storage" not in dense["fp32"]
    assert stored["fp32"]["weights"] == dense["fp32"]["weights"]  # the same weights, counted by their dense shape


@pytest.mark.parametrize("batch,seq", [(1, 5), (3, 30)])
def test_onnx_sparse_file_matches_pytorch_in_onnx_runtime(onnx_files, model, make_text_inputs, batch, seq):
    out, _, _ = onnx_files
    inputs = make_text_inputs(batch=batch, seq=seq, seed=seq)
    session = ort.InferenceSession(str(out / "sparse" / "ds.fp32.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: t.numpy() for n, t in zip(model.input_names, inputs)})[0]
    assert np.abs(got - torch_run(model, inputs)).max() < 1e-4


def test_onnx_sparse_file_holds_sparse_initializers_and_passes_the_checker(onnx_files):
    out, _, _ = onnx_files
    proto = onnx.load(str(out / "sparse" / "ds.fp32.onnx"))
    onnx.checker.check_model(proto)
    assert len(proto.graph.sparse_initializer) == DS_LINEARS
    assert all(s.indices.data_type == onnx.TensorProto.INT64 for s in proto.graph.sparse_initializer)


def test_onnx_int8_weights_stay_dense_because_int64_indices_cost_more_than_they_save(onnx_files):
    _, stored, _ = onnx_files
    storage = stored["int8"]["sparse_storage"]
    assert storage["tensors"] == 0 and storage["left_dense"] == DS_LINEARS and "8-byte indices" in storage["why_dense"]


def test_onnx_int8_made_from_a_sparse_fp32_file_matches_the_dense_route(onnx_files, model, make_text_inputs):
    out, _, _ = onnx_files
    inputs = make_text_inputs(batch=3, seq=10, seed=5)
    feeds = {n: t.numpy() for n, t in zip(model.input_names, inputs)}
    got = [ort.InferenceSession(str(out / route / "ds.int8.onnx"), providers=["CPUExecutionProvider"])
           .run(None, feeds)[0] for route in ("sparse", "dense")]
    assert np.abs(got[0] - got[1]).max() < 1e-6


def test_densified_onnx_restores_the_dense_initializers(onnx_files, tmp_path):
    out, _, _ = onnx_files
    dense_path = onnx_export.densified_onnx(out / "sparse" / "ds.fp32.onnx", tmp_path / "dense.onnx")
    restored = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(dense_path)).graph.initializer}
    original = {t.name: onnx.numpy_helper.to_array(t)
                for t in onnx.load(str(out / "dense" / "ds.fp32.onnx")).graph.initializer}
    assert restored.keys() == original.keys()
    assert all(np.array_equal(restored[k], original[k]) for k in original)


def test_only_models_with_dense_sparse_linears_get_sparse_storage(make_model, model):
    assert sparse.has_dense_sparse(model) and not sparse.has_dense_sparse(make_model("text"))


# -- TFLite ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tflite_files(model, make_text_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse-tflite")
    inputs = make_text_inputs(batch=3, seq=12)
    stored = by_precision(export_tflite(model, out / "sparse", "ds", inputs, static_shape=SHAPE))
    dense = by_precision(export_tflite(model, out / "dense", "ds", inputs, static_shape=SHAPE, sparse=False))
    return out, stored, dense


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-weight"])
def test_tflite_sparse_files_are_smaller_than_the_dense_ones(tflite_files, precision):
    out, stored, dense = tflite_files
    name = stored[precision]["file"]
    assert stored[precision]["sparse_storage"]["tensors"] == DS_LINEARS
    assert (out / "sparse" / name).stat().st_size < (out / "dense" / name).stat().st_size
    assert stored[precision]["ops"]["DENSIFY"] == DS_LINEARS and "DENSIFY" not in dense[precision]["ops"]


def test_tflite_fp32_saves_at_least_half_the_bytes_of_the_s_matrices(tflite_files):
    out, stored, dense = tflite_files
    storage = stored["fp32"]["sparse_storage"]
    assert storage["sparse_bytes"] < 0.25 * storage["dense_bytes"]  # 1/8 of the values, 1-byte column indices
    assert dense["fp32"]["size_bytes"] - stored["fp32"]["size_bytes"] > 0.5 * storage["dense_bytes"]


@pytest.mark.parametrize("precision,max_abs", [("fp32", 1e-4), ("fp16", 5e-3), ("int8-weight", 5e-2)])
def test_tflite_sparse_file_matches_pytorch_in_litert(tflite_files, model, make_text_inputs, precision, max_abs):
    out, stored, _ = tflite_files
    inputs = pad_to(make_text_inputs(batch=3, seq=9, seed=7), SHAPE[1], model)
    session = open_file("litert", out / "sparse" / stored[precision]["file"])
    got = session.output({n: t.numpy() for n, t in zip(model.input_names, inputs)})
    result = parity(torch_run(model, inputs), got)
    assert result["max_abs_diff"] < max_abs and result["min_cosine"] > 0.999


def test_tflite_sparse_and_dense_files_give_identical_outputs(tflite_files, model, make_text_inputs):
    """DENSIFY rebuilds exactly the dense weights: sparse storage changes the file, not one output bit."""
    out, stored, _ = tflite_files
    feeds = {n: t.numpy() for n, t in zip(model.input_names, pad_to(make_text_inputs(seed=3), SHAPE[1], model))}
    got = [run_file("litert", out / route / stored["fp16"]["file"], feeds) for route in
           ("sparse", "dense")]
    assert np.array_equal(got[0], got[1])


def test_tflite_dynamic_int8_weights_stay_dense_and_the_record_says_why(tflite_files):
    out, stored, dense = tflite_files
    storage = stored["int8"]["sparse_storage"]
    assert storage["tensors"] == 0 and storage["left_dense"] == DS_LINEARS and "XNNPACK" in storage["why_dense"]
    assert "DENSIFY" not in stored["int8"]["ops"]


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_csr_encoding_holds_exactly_the_non_zero_values(model, order):
    s = model.layers[0].ffn.fc2.first.weight.detach().numpy()
    params, values, size = tflite.csr_sparsity(s, order)
    dense_dim, csr_dim = params.dimMetadata
    segments, indices = csr_dim.arraySegments.values, csr_dim.arrayIndices.values
    rebuilt = np.zeros_like(s.transpose(order))
    for outer in range(dense_dim.denseSize):
        rebuilt[outer, indices[segments[outer]:segments[outer + 1]]] = values[segments[outer]:segments[outer + 1]]
    assert np.array_equal(rebuilt.transpose(order), s)
    assert list(params.traversalOrder) == list(order)
    assert size == values.nbytes + segments.nbytes + indices.nbytes


def test_column_first_encoding_of_a_wide_s_needs_one_byte_indices(model):
    s = model.layers[0].ffn.fc2.first.weight.detach().numpy()  # 32 x 512: 4 non-zeros in each column
    (_, _, by_rows), (params, _, by_columns) = tflite.csr_sparsity(s, (0, 1)), tflite.csr_sparsity(s, (1, 0))
    assert params.dimMetadata[1].arrayIndices.values.dtype == np.uint8
    assert by_columns < by_rows


# -- CoreML ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def coreml_packages(model, make_text_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse-coreml")
    inputs = make_text_inputs(batch=2, seq=12)
    stored = by_precision(export_coreml(model, out / "sparse", "ds", inputs, static_shape=SHAPE))
    dense = by_precision(export_coreml(model, out / "dense", "ds", inputs, static_shape=SHAPE, int8=False,
                                       sparse=False))
    return out, stored, dense


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_coreml_sparse_packages_are_smaller_than_the_dense_ones(coreml_packages, precision):
    out, stored, dense = coreml_packages
    name = stored[precision]["file"]
    assert stored[precision]["sparse_storage"]["tensors"] == DS_LINEARS
    assert artifact_size(out / "sparse" / name) < artifact_size(out / "dense" / name)
    assert stored[precision]["ops"]["constexpr_sparse_to_dense"] == DS_LINEARS


@pytest.mark.parametrize("precision,max_abs", [("fp32", 1e-4), ("fp16", 5e-3)])
def test_coreml_sparse_package_matches_pytorch_in_the_mil_reference(coreml_packages, model, make_text_inputs,
                                                                   precision, max_abs):
    out, stored, _ = coreml_packages
    inputs = pad_to(make_text_inputs(batch=1, seq=7, seed=9), SHAPE[1], model)
    session = open_file("coreml-mil-reference", out / "sparse" / stored[precision]["file"])
    got = session.output({n: t.numpy() for n, t in zip(model.input_names, inputs)})
    assert np.abs(got - torch_run(model, inputs)).max() < max_abs


def test_coreml_int8_on_ios17_stays_dense_and_the_record_says_why(coreml_packages):
    _, stored, _ = coreml_packages
    storage = stored["int8"]["sparse_storage"]
    assert storage["tensors"] == 0 and "iOS18" in storage["why_dense"]
    assert "constexpr_sparse_to_dense" not in stored["int8"]["ops"]


def test_coreml_int8_weights_are_stored_sparse_on_ios18(model, make_text_inputs, tmp_path):
    inputs = pad_to(make_text_inputs(batch=1, seq=12), SHAPE[1], model)
    names = model.input_names
    quantized = coreml.quantize_int8(coreml.convert_module(named_forward(model, names), inputs, names,
                                                           [model.output_name], "fp16", "iOS18"))
    packed, storage = coreml.coreml_sparse_weights(quantized, quantized=True)
    # int8 are only tensors above coreml.WEIGHT_THRESHOLD elements: of the S matrices, the two of fc2 (32 x 512)
    assert storage["tensors"] == 2 and storage["sparse_bytes"] == 2 * (4 * 512 + 32 * 512 // 8)
    with coreml.quiet():
        packed.save(str(tmp_path / "joint.mlpackage"))
    got = run_file("coreml-mil-reference", tmp_path / "joint.mlpackage",
                   {n: t.numpy() for n, t in zip(model.input_names, inputs)})
    assert parity(torch_run(model, inputs), got)["min_cosine"] > 0.999
