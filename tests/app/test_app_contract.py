"""The app driver (pocketformer/app/base.py): a folder is checked file by file in its client against the plain
artifact, and only a folder whose every file agrees replaces the old one. The client here is ONNX Runtime itself on a
copy of the plain file; a second client reverses the labels' order, as a wrongly ordered labels file would."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pocketformer.app.base import APPS, App, Built, as_app_sees, build_app, plain_outputs, softmax
from pocketformer.data import Encoder, load_dataset
from pocketformer.errors import ExportError
from pocketformer.export.card import card_of
from pocketformer.targets import export_checked


class CopyApp(App):
    name, format, client = "copy-test", "onnx", "ONNX Runtime (a copy of the plain file)"
    swap = False

    def build(self, model, card, plain, art_dir, folder):
        r = next(r for r in plain if r["precision"] == "fp32")
        shutil.copy2(art_dir / r["file"], folder / "app.onnx")
        return [Built("app.onnx", "fp32", r["file"], {})]

    def client_outputs(self, folder, built, card, ds):
        from pocketformer.targets.runtime import get_runtime

        session = get_runtime("onnxruntime").open(folder / built.file, 1)
        probs = softmax(session.output({"pixel_values": ds.images}).astype(np.float64))
        return probs[:, ::-1] if self.swap else probs

    def client_name(self):
        return "onnxruntime (test client)"

    def readme(self, card, built):
        return "# test\n"


@pytest.fixture
def plain(make_model, tmp_path):
    model = make_model("vision", labels=[str(i) for i in range(10)])
    card = card_of(model, tmp_path, "t/model", "model", 128, {"recipe_sha256": "r"})
    ds = load_dataset("digits", "test", 0).head(40)
    enc = Encoder(None)
    records = export_checked(model, tmp_path / "artifacts", "model", enc.encode(ds, np.arange(16)), "onnx",
                             int8=False, card=card)
    return model, card, records, ds, enc, tmp_path


@pytest.fixture(autouse=True)
def unregister():
    yield
    APPS.pop("copy-test", None)


def test_a_folder_whose_files_agree_is_put_in_place_with_its_readme_and_card(plain):
    model, card, records, ds, enc, out = plain
    entry = build_app(CopyApp(), model, card, records, out, ds, enc)
    folder = out / "app" / "copy-test"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "app.onnx", "card.json"]
    (f,) = entry["files"]
    assert f["vs_plain"]["label_agreement"] == 1.0 and f["vs_plain"]["examples"] == 40
    assert f["vs_plain"]["max_score_diff"] < 1e-6 and "client_accuracy" in f["vs_plain"]
    assert "adversarial" not in f  # images: no tokenizer to differ


def test_a_client_that_disagrees_fails_and_the_old_folder_stays(plain):
    model, card, records, ds, enc, out = plain
    build_app(CopyApp(), model, card, records, out, ds, enc)
    before = (out / "app" / "copy-test" / "app.onnx").read_bytes()
    swapped = CopyApp()
    swapped.swap = True
    with pytest.raises(ExportError, match="disagrees with model.fp32.onnx"):
        build_app(swapped, model, card, records, out, ds, enc)
    assert (out / "app" / "copy-test" / "app.onnx").read_bytes() == before
    assert not [p for p in (out / "app").iterdir() if p.name.startswith(".")]  # no staging left behind


def test_apps_see_8_bit_pixels_and_so_does_the_plain_file(plain):
    model, card, records, ds, enc, out = plain
    seen = as_app_sees(ds)
    assert np.allclose(seen.images * 255, np.round(seen.images * 255), atol=1e-4)
    probs = plain_outputs(out / "artifacts" / "model.fp32.onnx", "onnx", card, seen, enc)
    assert probs.shape == (40, 10) and np.allclose(probs.sum(1), 1)
