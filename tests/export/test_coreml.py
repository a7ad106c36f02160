"""CoreML export: the canonical model converts to ML programs, and their MIL reference execution matches PyTorch."""

import platform

import numpy as np
import pytest
import torch

from pocketformer.errors import TargetError
from pocketformer.export.base import parity
from pocketformer.export import coreml
from pocketformer.targets import Profile, coreml_ref, runtime_of
from pocketformer.targets.runtime import get_runtime
from conftest import export_coreml, open_file, pad_to

off_macos = pytest.mark.skipif(platform.system() == "Darwin", reason="Core ML itself runs packages on macOS")
MIN_COSINE = {"fp32": 0.999, "fp16": 0.99, "int8": 0.99}


def scaled(model):
    """Logits of a random tiny model sit near zero, where cosine says nothing: make them large."""
    with torch.no_grad():
        model.classifier.out.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def text_export(tmp_path_factory, make_model, make_text_inputs):
    model = scaled(make_model("text", labels=["a", "b"]))
    inputs = make_text_inputs(batch=3, seq=12)
    out = tmp_path_factory.mktemp("coreml-text")
    records = export_coreml(model, out, "tiny", inputs, palettize_bits=6)
    return model, pad_to(inputs, 64, model), out, {r["precision"]: r for r in records}


@pytest.fixture(scope="module")
def vision_export(tmp_path_factory, make_model, make_vision_inputs):
    model = scaled(make_model("vision", labels=["a", "b"]))
    inputs = make_vision_inputs(batch=3)
    out = tmp_path_factory.mktemp("coreml-vision")
    records = export_coreml(model, out, "tiny", inputs)
    return model, inputs, out, {r["precision"]: r for r in records}


def reference_outputs(package, model, inputs):
    """Each example through the package's MIL reference execution (the packages take batch 1)."""
    session = open_file("coreml-mil-reference", package)
    return np.concatenate([session.output({n: t[i:i + 1].numpy() for n, t in zip(model.input_names, inputs)})
                           for i in range(len(inputs[0]))])


def pytorch_outputs(model, inputs):
    with torch.no_grad():
        return model(*inputs).numpy()


def test_canonical_model_converts_to_one_package_per_precision(text_export):
    _, _, out, records = text_export
    assert sorted(records) == ["fp16", "fp32", "int8", "pal6"]
    for precision, record in records.items():
        assert record["file"] == f"tiny.{precision}.mlpackage" and record["format"] == "coreml"
        assert (out / record["file"] / "Manifest.json").is_file()


def test_packages_take_fixed_int32_text_inputs(text_export):
    record = text_export[3]["fp16"]
    assert record["inputs"] == {"input_ids": [1, 64], "attention_mask": [1, 64]}
    assert record["input_dtypes"] == {"input_ids": "int32", "attention_mask": "int32"}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_text_reference_execution_matches_pytorch(text_export, precision):
    model, inputs, out, records = text_export
    got = reference_outputs(out / records[precision]["file"], model, inputs)
    assert parity(pytorch_outputs(model, inputs), got)["min_cosine"] >= MIN_COSINE[precision]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_vision_reference_execution_matches_pytorch(vision_export, precision):
    model, inputs, out, records = vision_export
    got = reference_outputs(out / records[precision]["file"], model, inputs)
    assert parity(pytorch_outputs(model, inputs), got)["min_cosine"] >= MIN_COSINE[precision]


def test_fp32_reference_execution_is_within_1e3_of_pytorch(text_export):
    model, inputs, out, records = text_export
    got = reference_outputs(out / records["fp32"]["file"], model, inputs)
    assert np.abs(pytorch_outputs(model, inputs) - got).max() < 1e-3


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "pal6"])
def test_no_package_outputs_nan(text_export, precision):
    model, inputs, out, records = text_export
    assert np.isfinite(reference_outputs(out / records[precision]["file"], model, inputs)).all()


def test_int8_package_is_smaller_than_fp16(text_export):
    records = text_export[3]
    assert records["int8"]["size_bytes"] < records["fp16"]["size_bytes"]


def test_palettized_package_is_smaller_than_fp16_and_close_to_pytorch(text_export):
    records = text_export[3]
    assert records["pal6"]["size_bytes"] < records["fp16"]["size_bytes"]
    assert records["pal6"]["parity_vs_pytorch"]["cosine"] >= 0.98


def test_int8_compresses_only_weights_of_linear_and_embedding_ops(text_export):
    _, _, out, records = text_export
    program = coreml.load_program(out / records["int8"]["file"])
    readers = {child.op_type for op in program.functions["main"].operations
               if op.op_type.startswith("constexpr_") for child in op.outputs[0].child_ops}
    assert readers == {"linear", "gather"}


def test_fp16_package_computes_in_fp16(text_export):
    precision = text_export[3]["fp16"]["op_precision"]
    assert precision.get("fp16", 0) > 0 and "fp32" not in precision


def test_fp32_package_computes_in_fp32(text_export):
    precision = text_export[3]["fp32"]["op_precision"]
    assert precision.get("fp32", 0) > 0 and "fp16" not in precision


@off_macos
def test_records_say_the_parity_came_from_the_mil_reference(text_export):
    record = text_export[3]["int8"]
    assert record["parity_execution"] == coreml_ref.LABEL == "MIL reference execution, not Apple runtime"
    assert record["parity_vs_pytorch"]["execution"] == coreml_ref.LABEL


@off_macos
def test_runtime_version_carries_the_label():
    assert coreml_ref.LABEL in get_runtime("coreml-mil-reference").version()


@off_macos
def test_latency_is_not_measured_off_macos(text_export):
    model, inputs, out, records = text_export
    session = open_file("coreml-mil-reference", out / records["fp32"]["file"])
    feeds = {n: t[:1].numpy() for n, t in zip(model.input_names, inputs)}
    with pytest.raises(TargetError, match="No latency is measured for CoreML off macOS"):
        get_runtime("coreml-mil-reference").benchmark(session, feeds, warmup=0, repeats=3)


def test_reexport_replaces_the_package_and_leaves_no_staging_folder(tmp_path, make_model, make_text_inputs):
    model = make_model("text")
    for _ in range(2):
        export_coreml(model, tmp_path, "tiny", make_text_inputs(batch=1, seq=8), int8=False, static_shape=(1, 16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.fp16.mlpackage", "tiny.fp32.mlpackage"]


def test_a_coreml_profile_selects_the_reference_runtime():
    profile = Profile(name="mac", format="coreml", runtime="coreml-mil-reference", threads=1)
    assert runtime_of(profile).name == "coreml-mil-reference" and runtime_of(profile).format == "coreml"


class HiddenStates(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def test_reference_runs_transformers_bert_converted_through_torch_export(make_hf_model, make_text_inputs, tmp_path):
    """BertModel itself converts through torch.export + decompositions (not through torch.jit.trace: `new_ones`);
    its graph gathers positions with gather_nd, an op coremltools' value inference lacks."""
    ct = coreml.coremltools()
    model = HiddenStates(make_hf_model("bert"))
    inputs = make_text_inputs(batch=1, seq=16)
    with coreml.quiet():
        program = torch.export.export(model, inputs).run_decompositions()
        ct.convert(program, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                   minimum_deployment_target=ct.target.iOS17, skip_model_load=True).save(str(tmp_path / "bert.mlpackage"))
    session = open_file("coreml-mil-reference", tmp_path / "bert.mlpackage")
    got = session.output({n: t.numpy() for n, t in zip(session.input_names, inputs)})
    with torch.no_grad():
        want = model(*inputs).numpy()
    assert np.abs(want - got).max() < 1e-4
