"""Canonical checkpoints: safetensors + pocketformer.json, reloaded exactly, without transformers or pickle."""

import json
import subprocess
import sys

import pytest
import torch

from pocketformer.errors import CheckpointError
from pocketformer.models import io, load, load_any, save
from pocketformer.models.io import META_FILE, WEIGHTS_FILE, file_sha256, weights_sha256


def outputs(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def pruned_text_model(make_model):
    """Different shapes in every layer: 3 heads + 40 neurons, then 1 head + 96 neurons."""
    model = make_model("text", labels=["neg", "pos"])
    model.keep_heads(0, [0, 2, 3])
    model.keep_neurons(0, list(range(0, 120, 3)))
    model.keep_heads(1, [1])
    model.keep_neurons(1, list(range(96)))
    return model


def test_round_trip_reproduces_outputs_exactly(tmp_path, make_model, make_text_inputs):
    model = make_model("text", labels=["a", "b", "c"])
    loaded, _ = load(save(model, tmp_path / "ckpt"))
    inputs = make_text_inputs(batch=4, seq=13)
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))


def test_round_trip_of_a_pruned_model_keeps_per_layer_shapes_and_outputs(tmp_path, make_model, make_text_inputs):
    model = pruned_text_model(make_model)
    loaded, _ = load(save(model, tmp_path / "pruned"))
    assert loaded.config == model.config
    inputs = make_text_inputs(batch=3, seq=9)
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))


def test_round_trip_of_a_vision_model_with_a_dropped_layer(tmp_path, make_model, make_vision_inputs):
    model = make_model("vision", labels=[str(i) for i in range(10)])
    model.keep_layers([0])
    model.keep_neurons(0, list(range(48)))
    loaded, _ = load(save(model, tmp_path / "vit"))
    assert len(loaded.layers) == 1
    inputs = make_vision_inputs(batch=2)
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))


def test_loading_a_checkpoint_does_not_import_transformers(tmp_path, make_model):
    save(pruned_text_model(make_model), tmp_path / "ckpt")
    code = ("import sys; from pocketformer.models import load; m, _ = load(sys.argv[1]); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'; print(len(m.layers))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2"


def test_metadata_records_provenance_and_the_weights_file_hash(tmp_path, make_model):
    folder = save(make_model("text"), tmp_path / "ckpt", provenance={"source": "unit test"})
    _, meta = load(folder)
    assert meta["provenance"] == {"source": "unit test"}
    assert meta["weights_sha256"] == file_sha256(folder / WEIGHTS_FILE)


def test_load_any_reads_a_canonical_folder_with_its_provenance(tmp_path, make_model):
    save(make_model("vision"), tmp_path / "ckpt", provenance={"role": "baseline"})
    model, provenance = load_any(tmp_path / "ckpt")
    assert model.spec.modality == "vision" and provenance == {"role": "baseline"}


def test_save_copies_the_tokenizer_files(tmp_path, make_model, tokenized_bert):
    folder = save(make_model("text"), tmp_path / "ckpt", tokenizer_dir=tokenized_bert)
    assert (folder / "tokenizer.json").read_bytes() == (tokenized_bert / "tokenizer.json").read_bytes()


def test_weights_hash_depends_on_values_not_on_the_object(make_model):
    a, b = make_model("text", seed=3), make_model("text", seed=3)
    assert weights_sha256(a) == weights_sha256(b)
    with torch.no_grad():
        b.layers[1].ffn.fc1.bias[0] += 1e-3
    assert weights_sha256(a) != weights_sha256(b)


# -- damaged checkpoints ------------------------------------------------------------------------------------------

def test_truncated_weights_file_is_a_checkpoint_error(tmp_path, make_model):
    folder = save(make_model("text"), tmp_path / "ckpt")
    weights = folder / WEIGHTS_FILE
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load(folder)


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nothing")


def test_folder_without_metadata_is_a_checkpoint_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=META_FILE):
        load(tmp_path / "empty")


def test_cut_short_metadata_is_a_checkpoint_error(tmp_path, make_model):
    folder = save(make_model("text"), tmp_path / "ckpt")
    text = (folder / META_FILE).read_text()
    (folder / META_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(folder)


def test_metadata_of_another_format_version_is_a_checkpoint_error(tmp_path, make_model):
    folder = save(make_model("text"), tmp_path / "ckpt")
    meta = json.loads((folder / META_FILE).read_text())
    meta["format_version"] = 99
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version"):
        load(folder)


def test_weights_that_do_not_match_the_described_shapes_are_a_checkpoint_error(tmp_path, make_model):
    folder = save(make_model("text"), tmp_path / "ckpt")
    meta = json.loads((folder / META_FILE).read_text())
    meta["config"]["layers"][0]["heads"] = 2
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match"):
        load(folder)


# -- atomic writes --------------------------------------------------------------------------------------------------

def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, make_model, make_text_inputs):
    old = make_model("text", seed=1)
    folder = save(old, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def fail_midway(state, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save(make_model("text", seed=2), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    loaded, _ = load(folder)
    inputs = make_text_inputs()
    assert torch.equal(outputs(loaded, inputs), outputs(old, inputs))


def test_a_failed_save_leaves_no_temporary_folders(tmp_path, monkeypatch, make_model):
    save(make_model("text"), tmp_path / "ckpt")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", fail)
    with pytest.raises(OSError):
        save(make_model("text", seed=2), tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "pocketformer-cache") == ["ckpt"]


def test_saving_over_a_checkpoint_replaces_it(tmp_path, make_model, make_text_inputs):
    save(make_model("text", seed=1), tmp_path / "ckpt")
    new = make_model("text", seed=2)
    save(new, tmp_path / "ckpt")
    loaded, _ = load(tmp_path / "ckpt")
    inputs = make_text_inputs()
    assert torch.equal(outputs(loaded, inputs), outputs(new, inputs))
