"""Names read from recipes, manifests and segment manifests never make pocketformer read or write outside the run
folder: `..`, absolute paths and symlinks, one test each."""

import json
import os

import pytest

from pocketformer.errors import CheckpointError, RecipeError
from pocketformer.recipe import parse_recipe
from pocketformer.store import atomic_write_bytes, read_manifest


@pytest.mark.parametrize("name", ["../outside", "/tmp/abs", "a/b", "..", "a\\\\b", ""])
def test_a_recipe_name_that_is_a_path_is_refused(name):
    with pytest.raises(RecipeError, match="not a plain name"):
        parse_recipe({"model": "minilm", "name": name})


@pytest.mark.parametrize("file", ["../outside.onnx", "/etc/passwd", "sub/model.onnx", ".."])
def test_an_artifacts_manifest_naming_a_file_outside_its_folder_is_refused(tmp_path, file):
    (tmp_path / "artifacts.json").write_text(json.dumps([{"file": file, "format": "onnx"}]))
    with pytest.raises(CheckpointError, match="not a file in"):
        read_manifest(tmp_path)


def test_a_segments_manifest_naming_a_file_outside_its_folder_is_refused(tmp_path):
    from pocketformer.targets.early_exit import open_segments

    manifest = tmp_path / "model.exits.fp32.onnx.json"
    manifest.write_text(json.dumps({"format": "onnx", "segments": [{"file": "../../etc/passwd"}]}))
    with pytest.raises(CheckpointError, match="not a file in"):
        open_segments(manifest, "onnxruntime", 1)


def test_a_symlink_at_a_final_artifact_name_is_replaced_not_written_through(tmp_path, make_model, make_text_inputs):
    from conftest import export_onnx

    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"keep me")
    out = tmp_path / "artifacts"
    out.mkdir()
    os.symlink(outside, out / "tiny.fp32.onnx")
    export_onnx(make_model("text"), out, "tiny", make_text_inputs(), int8=False)
    assert outside.read_bytes() == b"keep me"
    assert not (out / "tiny.fp32.onnx").is_symlink()


def test_a_symlink_planted_at_the_temporary_name_is_not_followed(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"keep me")
    target = tmp_path / "run" / "report.json"
    target.parent.mkdir()
    os.symlink(outside, target.with_name(f".{target.name}.tmp-{os.getpid()}"))
    atomic_write_bytes(target, b"{}")
    assert outside.read_bytes() == b"keep me" and target.read_bytes() == b"{}"
