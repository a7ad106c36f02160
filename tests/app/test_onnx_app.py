"""The ONNX Runtime app folder, built from really exported files and checked in ONNX Runtime with
onnxruntime-extensions on real rotten_tomatoes texts and the adversarial ones."""

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pocketformer.app import APPS, build_app
from pocketformer.app.base import ADVERSARIAL_TEXTS
from pocketformer.app.onnx import client_session, run_texts, text_in_model
from pocketformer.data import Dataset, Encoder, load_dataset
from pocketformer.export.card import card_of
from pocketformer.models import load_any
from pocketformer.models.io import save
from pocketformer.targets import export_checked
from pocketformer.train import train_loop

ox = pytest.importorskip("onnxruntime_extensions")

MAX_LEN = 32
EXAMPLES = 48
ACCENTED = ADVERSARIAL_TEXTS[:2]


def build(model, folder, out, ds, name):
    """Export `model` (checkpoint `folder`) to ONNX fp32 + int8 with its card, then build the onnx app."""
    card = card_of(model, folder, name, "model", MAX_LEN, {"source": name})
    enc = Encoder(folder if card.modality == "text" else None, MAX_LEN)
    records = export_checked(model, out / "artifacts", "model", enc.encode(ds, np.arange(8)), "onnx", card=card,
                             int8=True, skip={"fp16", "int8-weight"})  # the app, not the precisions, is tested here
    return card, build_app(APPS["onnx"], model, card, records, out, ds.head(EXAMPLES), enc)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tokenized_bert):
    model, _ = load_any(tokenized_bert)
    ds = load_dataset("rotten_tomatoes", "test", 0).for_model("text", list(model.config.head.labels), "The model")
    out = tmp_path_factory.mktemp("onnx-app")
    card, record = build(model, tokenized_bert, out, ds, "tiny/model")
    return card, record, out


def test_text_in_files_agree_with_the_plain_files_on_real_texts(classifier):
    _, record, _ = classifier
    assert [f["file"] for f in record["files"]] == ["model.fp32.text.onnx", "model.int8.text.onnx"]
    for f in record["files"]:
        assert f["plain"] == f"model.{f['precision']}.onnx"
        assert f["vs_plain"]["examples"] == EXAMPLES and f["vs_plain"]["label_agreement"] == 1.0
        assert "onnxruntime-extensions" in f["client"]
    assert record["files"][0]["vs_plain"]["max_score_diff"] < 1e-5


def test_accented_empty_and_over_long_texts_agree_with_the_models_own_tokenizer(classifier):
    _, record, _ = classifier
    rows = {r["chars"]: r for r in record["files"][0]["adversarial"]}  # fp32: rows do not share int8 ranges
    for text in (*ACCENTED, "", "ok", ADVERSARIAL_TEXTS[-1]):
        assert rows[len(text)]["same_label"] and rows[len(text)]["max_score_diff"] < 1e-5, text[:40]


def test_folder_holds_files_tokenizer_readme_and_the_card(classifier):
    card, _, out = classifier
    folder = out / "app" / "onnx"
    names = {p.name for p in folder.iterdir()}
    assert {"model.fp32.onnx", "model.int8.onnx", "model.fp32.text.onnx", "model.int8.text.onnx", "README.md",
            "card.json", "tokenizer"} <= names
    assert (folder / "tokenizer" / "vocab.txt").read_bytes() == card.tokenizer.vocab_txt()
    readme = (folder / "README.md").read_text()
    assert "neg, pos" in readme and "custom_metadata_map" in readme and "register_custom_ops_library" in readme
    assert json.loads((folder / "card.json").read_text())["labels"] == ["neg", "pos"]


def test_text_in_file_returns_label_names_and_carries_the_card(classifier):
    _, _, out = classifier
    path = out / "app" / "onnx" / "model.int8.text.onnx"
    session = client_session(path, ox)
    meta = session.get_modelmeta().custom_metadata_map
    labels = json.loads(meta["pocketformer.labels"])
    assert labels == ["neg", "pos"] and meta["pocketformer.input"] == "text"
    label, index, probs = session.run(None, {"text": np.array(["a fine film", "", "dull"], dtype=object)})
    assert list(label) == [labels[i] for i in index] and probs.shape == (3, 2)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-6)


def test_without_strip_accents_the_app_tokenizer_parts_from_the_models(classifier, tmp_path):
    card, _, out = classifier
    plain = out / "artifacts" / "model.fp32.onnx"
    texts = list(ACCENTED) + ["plain words only"]
    off = dataclasses.replace(card, tokenizer=dataclasses.replace(card.tokenizer, strip_accents=False))
    scores = {}
    for name, c in (("on", card), ("off", off)):
        (tmp_path / f"{name}.onnx").write_bytes(text_in_model(plain, c).SerializeToString())
        scores[name] = run_texts(client_session(tmp_path / f"{name}.onnx", ox), texts, card, batch=1)
    diff = np.abs(scores["on"] - scores["off"]).max(1)
    assert diff[0] > 1e-6 and diff[1] > 1e-6 and diff[2] == 0  # other ids for accented texts only


def test_embedding_model_text_in_matches_the_plain_file(make_model, minilm_path, tmp_path):
    model = make_model("text", vocab_size=30522)  # mean-pooled embeddings over MiniLM's vocabulary
    folder = save(model, tmp_path / "emb", tokenizer_dir=minilm_path)
    ds = load_dataset("rotten_tomatoes", "test", 0)
    card, record = build(model, folder, tmp_path / "out", ds, "tiny/embedding")
    assert card.labels == () and [f["file"] for f in record["files"]] == ["model.fp32.text.onnx",
                                                                          "model.int8.text.onnx"]
    for f in record["files"]:
        assert f["vs_plain"]["min_cosine"] >= 0.9999
        accented = [r for r in f["adversarial"] if r["chars"] in map(len, ACCENTED)]
        assert all(r["cosine"] >= 0.9999 for r in accented)
    session = client_session(tmp_path / "out" / "app" / "onnx" / "model.fp32.text.onnx", ox)
    (vectors,) = session.run(None, {"text": np.array(ds.texts[:3], dtype=object)})
    assert vectors.shape == (3, card.output["dim"])


def trained(model, ds: Dataset):
    """`model` after three epochs on `ds` (train.train_loop): a random vision model's top two logits sit 0.002-0.03
    apart on digits, so any int8 file flips labels (int8 weights move them by ~0.02); a trained model's 0.4-4.6."""
    def loss(m, inputs, labels):
        return torch.nn.functional.cross_entropy(m(*inputs), labels)

    train_loop(model, ds, Encoder(None), loss, epochs=3, lr=3e-3, batch_size=32, seed=0, desc="training")
    return model.eval()


def test_vision_model_gets_plain_copies_checked_in_onnx_runtime(make_model, tmp_path):
    model = trained(make_model("vision", labels=[str(i) for i in range(10)]), load_dataset("digits", "train", 0))
    ds = load_dataset("digits", "test", 0)
    card, record = build(model, tmp_path, tmp_path / "out", ds, "tiny/vision")
    assert [f["file"] for f in record["files"]] == ["model.fp32.onnx", "model.int8.onnx"]
    assert all(f["vs_plain"]["label_agreement"] == 1.0 and "adversarial" not in f for f in record["files"])
    folder = tmp_path / "out" / "app" / "onnx"
    assert not (folder / "tokenizer").exists()
    meta = ort.InferenceSession(str(folder / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads(meta.get_modelmeta().custom_metadata_map["pocketformer.labels"]) == list(card.labels) and \
        card.labels == tuple(str(i) for i in range(10))


def test_text_in_file_runs_texts_one_at_a_time_as_in_a_batch(classifier):
    card, _, out = classifier
    session = client_session(out / "app" / "onnx" / "model.fp32.text.onnx", ox)
    texts = list(load_dataset("rotten_tomatoes", "test", 0).texts[:6]) + [""]
    np.testing.assert_allclose(run_texts(session, texts, card, batch=1), run_texts(session, texts, card), atol=1e-5)
    ds = Dataset("x", "test", np.zeros(len(texts), np.int64), list(card.labels), texts=texts)
    assert len(APPS["onnx"].client_outputs(out / "app" / "onnx", _built(card), card, ds)) == len(texts)


def _built(card):
    from pocketformer.app.base import Built

    return Built("model.fp32.text.onnx", "fp32", "model.fp32.onnx", {"input": "text"})
