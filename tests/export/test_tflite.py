"""TFLite export: every precision converts, runs in the real LiteRT runtime and matches PyTorch; files carry static
shapes, our input names and honest records."""

import numpy as np
import pytest
import torch

from pocketformer.export import tflite
from pocketformer.models.io import file_sha256
from conftest import export_tflite, open_file, pad_to

PRECISION_FILES = {"fp32": "tiny.fp32.tflite", "fp16": "tiny.fp16.tflite", "int8-weight": "tiny.int8w.tflite",
                   "int8": "tiny.int8.tflite"}


def classifier(make_model):
    """A 2-label text classifier whose logits are far from zero (scaled head), so cosine measures something."""
    model = make_model("text", labels=("a", "b"), vocab_size=1000, max_positions=256)
    with torch.no_grad():
        model.classifier.out.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def exported(make_model, make_text_inputs, tmp_path_factory):
    """The tiny classifier exported once at the default static shape: (model, inputs, out_dir, records by precision)."""
    model = classifier(make_model)
    inputs = make_text_inputs(batch=3, seq=12, vocab_size=1000)
    out = tmp_path_factory.mktemp("tflite")
    records = export_tflite(model, out, "tiny", inputs)
    return model, inputs, out, {r["precision"]: r for r in records}


def run_in_litert(path, model, inputs):
    session = open_file("litert", path)
    return session.output({n: t.numpy() for n, t in zip(model.input_names, inputs)})


def cosine(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def test_every_precision_is_written_under_its_file_name(exported):
    _, _, out, records = exported
    assert {p: r["file"] for p, r in records.items()} == PRECISION_FILES
    assert all((out / name).is_file() for name in PRECISION_FILES.values())


@pytest.mark.parametrize("precision,min_cosine", [("fp32", 0.999), ("fp16", 0.99), ("int8-weight", 0.99),
                                                  ("int8", 0.99)])
def test_file_run_in_litert_matches_pytorch(exported, precision, min_cosine):
    model, inputs, out, records = exported
    padded = pad_to(inputs, 128, model)
    got = run_in_litert(out / records[precision]["file"], model, padded)
    with torch.no_grad():
        want = model(*padded).numpy()
    assert cosine(want, got) >= min_cosine
    assert (got.argmax(1) == want.argmax(1)).all()


def test_recorded_parity_is_the_measured_one(exported):
    model, inputs, out, records = exported
    padded = pad_to(inputs, 128, model)
    got = run_in_litert(out / records["fp32"]["file"], model, padded)
    with torch.no_grad():
        want = model(*padded).numpy()
    assert records["fp32"]["parity_vs_pytorch"]["max_abs_diff"] == pytest.approx(float(np.abs(want - got).max()),
                                                                                 abs=1e-6)
    assert records["fp32"]["parity_vs_pytorch"]["examples"] == 3


def test_default_shape_is_batch_one_by_128_tokens_with_our_input_names(exported):
    _, _, _, records = exported
    assert records["fp32"]["inputs"] == {"input_ids": [1, 128], "attention_mask": [1, 128]}


def test_token_inputs_are_int32_in_the_file_and_int64_feeds_still_run(exported):
    model, inputs, out, records = exported
    assert set(records["fp32"]["input_dtypes"].values()) == {"INT32"}
    ids, mask = pad_to(inputs, 128, model)
    assert ids.dtype == torch.int64
    assert run_in_litert(out / records["fp32"]["file"], model, (ids, mask)).shape == (3, 2)


def test_records_describe_the_files_on_disk(exported):
    _, _, out, records = exported
    for precision, r in records.items():
        path = out / r["file"]
        assert (r["format"], r["variant"], r["size_bytes"], r["sha256"]) == \
            ("tflite", "tiny", path.stat().st_size, file_sha256(path))
        assert r["ops"]["FULLY_CONNECTED"] > 0 and r["op_versions"]["FULLY_CONNECTED"] >= 1


def test_quantized_files_are_smaller_than_fp32(exported):
    _, _, _, records = exported
    sizes = {p: r["size_bytes"] for p, r in records.items()}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    assert sizes["int8-weight"] < sizes["fp16"]


def test_no_temporary_files_are_left_behind(exported):
    _, _, out, _ = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(PRECISION_FILES.values())


def test_static_shape_truncates_long_inputs_and_runs_a_larger_batch(make_model, make_text_inputs, tmp_path):
    model = classifier(make_model)
    inputs = make_text_inputs(batch=3, seq=24, vocab_size=1000)
    records = export_tflite(model, tmp_path, "short", inputs, int8=False, static_shape=(2, 16))
    assert [r["precision"] for r in records] == ["fp32", "fp16"]
    assert records[0]["inputs"]["input_ids"] == [2, 16]
    assert records[0]["parity_vs_pytorch"]["examples"] == 3  # 3 rows through a batch-2 file: padded chunk dropped
    assert records[0]["parity_vs_pytorch"]["cosine"] >= 0.999


def test_vision_model_exports_at_batch_one(make_model, make_vision_inputs, tmp_path):
    model = make_model("vision", labels=[str(i) for i in range(10)])
    records = export_tflite(model, tmp_path, "vit", make_vision_inputs(batch=2), int8=False)
    assert records[0]["inputs"] == {"pixel_values": [1, 1, 8, 8]}
    assert records[0]["parity_vs_pytorch"]["cosine"] >= 0.999


def test_runtime_maps_our_names_onto_positional_inputs(exported, tmp_path):
    """Files converted with positional sample args name their inputs args_0, args_1: feeds by our names still work."""
    import litert_torch

    from pocketformer.models.signature import named_forward

    model, inputs, _, _ = exported
    padded = pad_to(inputs, 128, model)
    with tflite._quiet():
        content = litert_torch.convert(named_forward(model, model.input_names),
                                       tuple(t[:1] for t in padded)).model_content()
    path = tmp_path / "positional.tflite"
    path.write_bytes(bytes(content))
    session = open_file("litert", path)
    assert session.input_names == ["args_0", "args_1"]
    with torch.no_grad():
        want = model(*padded).numpy()
    assert cosine(want, session.output(dict(zip(model.input_names, (t.numpy() for t in padded))))) >= 0.999


def test_file_of_other_weights_fails_the_fp32_check(exported, make_model):
    from pocketformer.export.loop import check_graph

    model, inputs, out, records = exported
    other = classifier(lambda *a, **kw: make_model(*a, seed=1, **kw))  # same shapes, other weights
    padded = pad_to(inputs, 128, other)
    with torch.no_grad():
        want = {"logits": other(*padded)}
    results, ok = check_graph(open_file("litert", out / records["fp32"]["file"]),
                              dict(zip(other.input_names, padded)), want, tflite.Tflite().tolerance("fp32"), other)
    assert not ok and results["logits"]["cosine"] < 0.999
