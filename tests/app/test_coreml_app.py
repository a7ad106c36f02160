"""The iOS app (pocketformer/app/coreml.py): Core ML classifier packages with the card inside and the tokenizer beside
them, checked in the MIL reference execution against the plain packages they are made from."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pocketformer.app.base import APPS, build_app, softmax
from pocketformer.data import Encoder, load_dataset
from pocketformer.export import coreml
from pocketformer.export.card import card_of
from pocketformer.models import load_any
from pocketformer.models.io import save
from pocketformer.targets import export_checked
from pocketformer.targets.runtime import get_runtime

SEQ = 32


@pytest.fixture(scope="module")
def ios(tmp_path_factory, tokenized_bert, sentiment_csv):
    """A tiny BERT with MiniLM's tokenizer exported to Core ML (fp32, fp16, int8), and its iOS app folder."""
    out = tmp_path_factory.mktemp("ios-run")
    model, _ = load_any(tokenized_bert)
    with torch.no_grad():  # a random tiny model's logits sit near zero: make its labels clear
        model.classifier.out.weight.mul_(30.0)
    save(model, out / "model", tokenizer_dir=tokenized_bert)
    card = card_of(model, out / "model", "t/model", "model", SEQ, {"recipe_sha256": "r", "license": "Apache-2.0"})
    ds = load_dataset(str(sentiment_csv), "test", 0).for_model("text", ["neg", "pos"], "The tiny model")
    enc = Encoder(out / "model", SEQ)
    records = export_checked(model, out / "artifacts", "model", enc.encode(ds, np.arange(4)), "coreml",
                             card=card, int8=True, static_shape=(1, SEQ))
    shutil.copytree(out / "model", out / "artifacts" / card.tokenizer_dir,
                    ignore=shutil.ignore_patterns("*.safetensors", "pocketformer.json"))  # as the pipeline does
    entry = build_app(APPS["ios"], model, card, records, out, ds, enc)
    return model, card, records, ds, enc, out, entry


def test_the_folder_holds_fp16_and_int8_classifiers_the_tokenizer_readme_and_card(ios):
    *_, out, entry = ios
    folder = out / "app" / "ios"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "card.json", "model.fp16.mlpackage",
                                                        "model.int8.mlpackage", "tokenizer"]
    assert (folder / "tokenizer" / "vocab.txt").is_file() and (folder / "tokenizer" / "tokenizer.json").is_file()
    assert [(f["file"], f["plain"]) for f in entry["files"]] == [("model.fp16.mlpackage", "model.fp16.mlpackage"),
                                                               ("model.int8.mlpackage", "model.int8.mlpackage")]


def test_each_classifier_agrees_with_its_plain_package_in_the_reference_execution(ios):
    ds, entry = ios[3], ios[6]
    for f in entry["files"]:
        v = f["vs_plain"]
        assert v["examples"] == min(len(ds), APPS["ios"].check_examples) and v["label_agreement"] == 1.0
        assert v["max_score_diff"] < 5e-3, f  # fp16 softmax inside the package vs float64 softmax of fp16 logits
        assert "reference execution" in f["client"] and "not the device" in f["client"]
        assert len(f["adversarial"]) == 10


def test_the_classifier_spec_names_its_labels_and_outputs(ios):
    card, out = ios[1], ios[5]
    for name in ("model.fp16.mlpackage", "model.int8.mlpackage"):
        back = coreml.read_card(out / "app" / "ios" / name)
        assert back["classifier"] == {"labels": ["neg", "pos"], "outputs": ["classLabel", "classLabel_probs"],
                                      "predicted_feature": "classLabel", "probabilities": "classLabel_probs"}
        assert back["labels"] == ["neg", "pos"] and back["max_len"] == SEQ and back["name"] == card.name
        assert back["tokenizer_dir"] == "tokenizer" and back["tokenizer_location"] == "beside: tokenizer/"


def test_the_package_metadata_says_who_made_it_and_what_each_feature_means(ios):
    out = ios[5]
    d = coreml.read_spec(out / "app" / "ios" / "model.fp16.mlpackage").description
    assert d.metadata.author == "pocketformer" and d.metadata.license == "Apache-2.0"
    assert "neg, pos" in d.metadata.shortDescription and d.metadata.versionString
    assert {f.name: bool(f.shortDescription) for f in d.input} == {"input_ids": True, "attention_mask": True}
    assert "neg, pos" in {f.name: f.shortDescription for f in d.output}["classLabel"]


def test_classify_returns_the_softmax_of_the_plain_packages_logits(ios):
    model, card, records, ds, enc, out, _ = ios
    runtime = get_runtime("coreml-mil-reference")
    for precision in ("fp16", "int8"):
        app = runtime.open(out / "app" / "ios" / f"model.{precision}.mlpackage", 1)
        plain = runtime.open(out / "artifacts" / f"model.{precision}.mlpackage", 1)
        for i in range(3):
            feeds = {n: t.numpy() for n, t in zip(model.input_names, enc.encode(ds, np.array([i]), pad_to=SEQ))}
            got = app.run(feeds)
            want = softmax(plain.output(feeds).astype(np.float64))[0]
            assert got["classLabel"] == card.labels[int(want.argmax())]
            assert np.allclose([got["classLabel_probs"][label] for label in card.labels], want, atol=5e-3)


def test_the_int8_classifier_keeps_int8_weights(ios):
    out = ios[5]
    int8 = coreml.describe(out / "app" / "ios" / "model.int8.mlpackage")
    fp16 = coreml.describe(out / "app" / "ios" / "model.fp16.mlpackage")
    assert int8["weight_bytes_by_dtype"].get("int8", 0) > 0 and "int8" not in fp16["weight_bytes_by_dtype"]
    assert int8["ops"]["classify"] == 1 and fp16["op_precision"].get("fp16", 0) > 0


def test_the_readme_names_the_files_labels_tokenizer_and_the_swift_that_loads_them(ios):
    text = (ios[5] / "app" / "ios" / "README.md").read_text()
    for needle in ("model.fp16.mlpackage", "model.int8.mlpackage", "`neg`, `pos`", "tokenizer/vocab.txt",
                   "MLModel(contentsOf:", "MLMultiArray", '"classLabel"', '"classLabel_probs"', "Neural Engine"):
        assert needle in text, needle


def test_an_embedding_model_gets_a_plain_package_whose_output_is_embedding(make_model, tmp_path):
    model = make_model("vision")
    card = card_of(model, tmp_path, "t/emb", "model", 128, {})
    ds = load_dataset("digits", "test", 0)
    enc = Encoder(None)
    records = export_checked(model, tmp_path / "artifacts", "model", enc.encode(ds, np.arange(4)), "coreml",
                             card=card, int8=False)
    entry = build_app(APPS["ios"], model, card, records, tmp_path, ds, enc)
    (f,) = entry["files"]  # fp16: no int8 was exported
    assert f["file"] == "model.fp16.mlpackage" and f["outputs"] == ["embedding"] and "classifier" not in f
    assert f["vs_plain"]["min_cosine"] >= 0.999
    back = coreml.read_card(tmp_path / "app" / "ios" / "model.fp16.mlpackage")
    assert "classifier" not in back and back["output"]["dim"] == 64 and "tokenizer_location" not in back


def test_a_text_model_without_a_tokenizer_is_refused(make_model, tmp_path):
    card = card_of(make_model("text", labels=["a", "b"]), tmp_path, "t/model", "model", 32, {})
    assert "tokenizer" in APPS["ios"].refuses(card)
