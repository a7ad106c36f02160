"""EcoFormer attention through every exporter: each artifact runs in its real runtime (ONNX Runtime, LiteRT, the
CoreML MIL reference) and matches PyTorch, and the exported graph holds no sequence x sequence tensor."""

import numpy as np
import onnx
import pytest
import torch

from pocketformer.export import onnx as onnx_export
from pocketformer.models import LayerShape
from conftest import export_coreml, export_onnx, export_tflite, open_file, pad_to, run_file

ODD_SEQ = 37  # a length equal to no other dimension of the tiny model, so a t x t tensor is recognisable
TOL = 1e-4


def eco_layers(n=2):
    return [LayerShape(heads=4, head_dim=16, ffn=128, attention="ecoformer", hash_bits=8, anchors=6)
            for _ in range(n)]


@pytest.fixture(scope="module")
def eco_model(make_model):
    """A tiny EcoFormer classifier with non-trivial hash parameters and logits far from zero."""
    model = make_model("text", labels=("a", "b"), layers=eco_layers())
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.kernel_width.uniform_(0.5, 2.0)
            layer.attn.key_projection.normal_()
        model.classifier.out.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def onnx_float(eco_model, make_text_inputs, tmp_path_factory):
    """The EcoFormer classifier exported once to fp32 ONNX with dynamic batch and sequence axes."""
    out = tmp_path_factory.mktemp("eco-onnx")
    export_onnx(eco_model, out, "eco", make_text_inputs(batch=4, seq=12), int8=False)
    return out / "eco.fp32.onnx"


def torch_out(model, inputs):
    with torch.no_grad():
        return model(*inputs).numpy()


def feeds(model, inputs):
    return {n: t.numpy() for n, t in zip(model.input_names, inputs)}


def test_onnx_runs_in_onnx_runtime_at_other_lengths_and_matches_pytorch(eco_model, onnx_float, make_text_inputs):
    session = open_file("onnxruntime", onnx_float)
    for seq in (9, 30):  # dynamic sequence axis: lengths it was not traced at
        inputs = make_text_inputs(batch=3, seq=seq, seed=seq)
        np.testing.assert_allclose(session.output(feeds(eco_model, inputs)), torch_out(eco_model, inputs),
                                   atol=TOL, rtol=0)


def test_onnx_int8_quantizes_the_linears_and_leaves_the_hash_functions_float(eco_model, onnx_float,
                                                                              make_text_inputs, tmp_path):
    """ORT's per-channel int8 rejects per-head (3-D) weights at run time; the hash constants must stay float."""
    inputs = make_text_inputs(batch=4, seq=12)
    onnx_export.quantize_int8(onnx_float, tmp_path / "eco.int8.onnx")
    graph = onnx.load(str(tmp_path / "eco.int8.onnx")).graph
    linears = sum(isinstance(m, torch.nn.Linear) for m in eco_model.modules())
    assert sum(n.op_type == "MatMulInteger" for n in graph.node) == linears
    out = run_file("onnxruntime", tmp_path / "eco.int8.onnx", feeds(eco_model, inputs))
    assert out.shape == (4, 2) and np.isfinite(out).all()


def test_tflite_runs_in_litert_and_matches_pytorch(eco_model, make_text_inputs, tmp_path):
    inputs = make_text_inputs(batch=2, seq=12)
    records = export_tflite(eco_model, tmp_path, "eco", inputs, int8=False, static_shape=(2, 16))
    assert [r["precision"] for r in records] == ["fp32", "fp16"]
    padded = pad_to(inputs, 16, eco_model)
    got = run_file("litert", tmp_path / "eco.fp32.tflite", feeds(eco_model, padded))
    np.testing.assert_allclose(got, torch_out(eco_model, padded), atol=TOL, rtol=0)


def test_coreml_program_matches_pytorch_in_the_mil_reference(eco_model, make_text_inputs, tmp_path):
    inputs = make_text_inputs(batch=2, seq=12)
    export_coreml(eco_model, tmp_path, "eco", inputs, int8=False, static_shape=(1, 16), compute_precision="fp32")
    session = open_file("coreml-mil-reference", tmp_path / "eco.fp32.mlpackage")
    padded = pad_to(inputs, 16, eco_model)
    got = np.concatenate([session.output(feeds(eco_model, tuple(t[i:i + 1] for t in padded)))
                          for i in range(2)])
    np.testing.assert_allclose(got, torch_out(eco_model, padded), atol=TOL, rtol=0)


def square_sequence_tensors(path) -> list[str]:
    """Values of an ONNX graph (after shape inference) with two or more axes of length ODD_SEQ."""
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    found = []
    for value in list(graph.value_info) + list(graph.output):
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if dims.count(ODD_SEQ) >= 2:
            found.append(f"{value.name} {dims}")
    return found


def test_exported_graph_holds_no_sequence_by_sequence_tensor(make_model, eco_model, make_text_inputs, tmp_path):
    inputs = make_text_inputs(batch=1, seq=ODD_SEQ)
    softmax_model = make_model("text", labels=("a", "b"))
    for stem, model in (("softmax", softmax_model), ("eco", eco_model)):
        onnx_export.export_float(model, tmp_path / f"{stem}.onnx", inputs, static_shape=True)
    assert square_sequence_tensors(tmp_path / "softmax.onnx")  # the check does see softmax's scores
    assert square_sequence_tensors(tmp_path / "eco.onnx") == []
    assert "Sign" in {n.op_type for n in onnx.load(str(tmp_path / "eco.onnx")).graph.node}
