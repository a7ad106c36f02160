"""The android app (app/mediapipe.py): files MediaPipe Tasks loads as they are, checked in MediaPipe against the
plain .tflite in LiteRT: a text classifier (TextClassifier), a text embedding model (TextEmbedder) and an image
classifier (ImageClassifier)."""

from __future__ import annotations


import numpy as np
import pytest

from pocketformer.app import APPS, build_app
from pocketformer.data import Dataset, Encoder, load_dataset
from pocketformer.export import FORMATS
from pocketformer.export import tflite_metadata as tm
from pocketformer.export.card import card_of
from pocketformer.models import load_any
from pocketformer.models.io import save
from pocketformer.targets import export_checked

pytest.importorskip("mediapipe")
SEQ = 32
ANDROID = APPS["android"]


def text_app(hf_folder, out, n=24):
    """A text checkpoint with MiniLM's tokenizer exported to TFLite (fp32 and int8) and built for Android."""
    model, _ = load_any(hf_folder)
    save(model, out / "model", tokenizer_dir=hf_folder)
    card = card_of(model, out / "model", "tiny/model", "model", SEQ, {"recipe_sha256": "abc"})
    ds = load_dataset("rotten_tomatoes", "test", 0).head(n)
    if card.labels:
        ds = ds.for_model("text", list(card.labels), "tiny")
    else:
        ds = Dataset(ds.name, ds.split, ds.labels, ds.label_names, ds.texts)
    enc = Encoder(out / "model", SEQ)
    records = export_checked(model, out / "artifacts", "model", enc.encode(ds, np.arange(8)), "tflite", card=card,
                             int8=True, static_shape=(1, SEQ))
    return model, card, records, ds, enc, build_app(ANDROID, model, card, records, out, ds, enc)


@pytest.fixture(scope="module")
def classifier(tokenized_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("android-text")
    return (out, *text_app(tokenized_bert, out))


def test_the_folder_holds_a_file_per_precision_its_readme_and_card(classifier):
    out, *_, entry = classifier
    folder = out / "app" / "android"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "card.json", "model.fp32.tflite",
                                                        "model.int8.tflite"]
    assert [(f["file"], f["precision"], f["plain"]) for f in entry["files"]] == [
        ("model.fp32.tflite", "fp32", "model.fp32.tflite"), ("model.int8.tflite", "int8", "model.int8.tflite")]


def test_mediapipe_agrees_with_litert_on_the_plain_file(classifier):
    *_, entry = classifier
    for f in entry["files"]:
        v = f["vs_plain"]
        assert v["examples"] == 24 and v["label_agreement"] == 1.0 and v["max_score_diff"] < 1e-4
        assert v["client_accuracy"] == v["plain_accuracy"]
        assert len(f["adversarial"]) == 10 and f["client"].startswith("MediaPipe")


def test_mediapipe_names_every_label_from_the_file_alone(classifier):
    from mediapipe.tasks.python import text
    from mediapipe.tasks.python.core.base_options import BaseOptions

    out, *_ = classifier
    path = out / "app" / "android" / "model.int8.tflite"
    options = text.TextClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=-1)
    with text.TextClassifier.create_from_options(options) as clf:
        categories = clf.classify("a charming, funny film").classifications[0].categories
    assert sorted(c.category_name for c in categories) == ["neg", "pos"]
    assert sum(c.score for c in categories) == pytest.approx(1.0, abs=1e-5)


def test_the_plain_file_is_not_one_mediapipe_takes(classifier):
    """Why the app folder exists: MediaPipe's BERT classifier wants three inputs and a tokenizer unit."""
    from mediapipe.tasks.python import text
    from mediapipe.tasks.python.core.base_options import BaseOptions

    out, *_ = classifier
    options = text.TextClassifierOptions(base_options=BaseOptions(
        model_asset_path=str(out / "artifacts" / "model.fp32.tflite")))
    with pytest.raises(Exception, match="input tensors"):
        text.TextClassifier.create_from_options(options)


def test_the_app_files_carry_the_card_labels_and_vocabulary(classifier):
    out, _, card, *_ = classifier
    path = out / "app" / "android" / "model.int8.tflite"
    back = FORMATS["tflite"].read_card(path)
    assert back["labels"] == ["neg", "pos"] and back["tokenizer_location"] == "embedded"
    assert back["provenance"]["recipe_sha256"] == "abc"
    files = tm.embedded_files(path.read_bytes())
    assert files["labels.txt"] == b"neg\npos\n" and files["vocab.txt"] == card.tokenizer.vocab_txt()
    (sub,) = tm.read_metadata(path.read_bytes()).subgraphMetadata
    assert [t.name.decode() for t in sub.inputTensorMetadata] == ["ids", "mask", "segment_ids"]


def test_the_int8_app_file_is_a_quarter_of_the_fp32_one(classifier):
    out, *_, entry = classifier
    sizes = {f["precision"]: f["size_bytes"] for f in entry["files"]}
    vocab = (out / "model" / "vocab.txt").stat().st_size
    assert sizes["int8"] - vocab < (sizes["fp32"] - vocab) / 2.5


def test_the_readme_names_the_files_labels_and_the_kotlin_that_loads_them(classifier):
    out, *_ = classifier
    readme = (out / "app" / "android" / "README.md").read_text()
    for needle in ("model.fp32.tflite", "model.int8.tflite", "neg, pos", "vocab.txt", "TextClassifier.createFromFile",
                   "max_results=-1", "```kotlin", "```python"):
        assert needle in readme


def test_a_text_embedding_model_runs_in_mediapipe_text_embedder(tmp_path, minilm_path):
    from conftest import save_tokenized_bert

    hf = save_tokenized_bert(tmp_path / "hf", minilm_path, initializer_range=0.2)
    *_, entry = text_app(hf, tmp_path, n=12)
    for f in entry["files"]:
        assert f["vs_plain"]["min_cosine"] > 0.999 and f["task"] == "TextEmbedder"


def test_an_image_classifier_runs_in_mediapipe_image_classifier(make_model, tmp_path):
    model = make_model("vision", labels=[str(i) for i in range(10)])
    card = card_of(model, tmp_path, "t/model", "model", 128, {})
    ds = load_dataset("digits", "test", 0).head(24)
    enc = Encoder(None)
    records = export_checked(model, tmp_path / "artifacts", "model", enc.encode(ds, np.arange(8)), "tflite",
                             card=card, int8=True)
    entry = build_app(ANDROID, model, card, records, tmp_path, ds, enc)
    assert [f["precision"] for f in entry["files"]] == ["fp32", "int8"]
    for f in entry["files"]:
        assert f["vs_plain"]["label_agreement"] == 1.0 and f["vs_plain"]["max_score_diff"] < 1e-4
    (sub,) = tm.read_metadata((tmp_path / "app" / "android" / "model.fp32.tflite").read_bytes()).subgraphMetadata
    (image,) = sub.inputTensorMetadata
    assert list(image.processUnits[0].options.mean) == [0.0] * 3 and list(image.processUnits[0].options.std) == [255.0] * 3


def test_a_text_model_without_a_wordpiece_tokenizer_is_refused_in_one_line(make_model, tmp_path):
    model = make_model("text", labels=("a", "b"))
    reason = ANDROID.refuses(card_of(model, tmp_path, "t/model", "model", 16, {}))
    assert reason and "WordPiece" in reason and "\n" not in reason
