"""The card: what every artifact says about its model to an app (labels, tokenizer, inputs, output, provenance)."""

from __future__ import annotations

import json

from pocketformer.export.card import PREFIX, card_of, from_metadata
from pocketformer.models import load_any


def test_a_text_classifier_card_names_labels_tokenizer_inputs_and_provenance(tokenized_bert):
    model, _ = load_any(tokenized_bert)
    card = card_of(model, tokenized_bert, "run/model", "model", 48, {"recipe_sha256": "abc", "weights_sha256": "w"})
    back = from_metadata(card.metadata())
    assert back["labels"] == ["neg", "pos"] and back["task"] == "classification" and back["name"] == "run/model"
    assert [t["name"] for t in back["inputs"]] == ["input_ids", "attention_mask"]
    assert all(t["meaning"] for t in back["inputs"])
    assert back["max_len"] == 48 and back["tokenizer"]["kind"] == "wordpiece"
    assert back["tokenizer"]["lowercase"] is True and card.tokenizer.strips_accents  # BERT uncased: None -> lowercase
    assert back["tokenizer_dir"] == "model.tokenizer"
    assert back["provenance"]["recipe_sha256"] == "abc" and back["provenance"]["pocketformer"]
    assert "files" in back["tokenizer"] and not any("/" in f for f in back["tokenizer"]["files"])  # names, no paths
    assert all(k.startswith(PREFIX) and isinstance(v, str) for k, v in card.metadata().items())


def test_the_vocabulary_is_the_tokenizer_files_in_id_order(tokenized_bert):
    model, _ = load_any(tokenized_bert)
    card = card_of(model, tokenized_bert, "run/model", "model", 48, {})
    vocab = card.tokenizer.vocab()
    ids = json.loads((tokenized_bert / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == len(ids) and all(ids[t] == i for i, t in enumerate(vocab[:2000]))
    assert card.tokenizer_dir and card.tokenizer.vocab_txt().decode().splitlines() == vocab


def test_an_image_classifier_card_says_how_pixels_are_normalised(make_model, tmp_path):
    model = make_model("vision", labels=[str(i) for i in range(10)])
    card = card_of(model, tmp_path, "run/model", "model", 128, {})
    assert card.tokenizer is None and card.tokenizer_dir is None and card.max_len is None
    assert (card.image.height, card.image.width, card.image.channels) == (8, 8, 1)
    assert card.image.mean == (0.0,) and card.image.std == (255.0,)  # 0..255 pixels / 255: the data's 0..1
    assert "vision classifier (0, 1" in card.description()


def test_an_embedding_card_documents_the_vector(make_model, tmp_path):
    model = make_model("text")
    card = card_of(model, tmp_path, "run/model", "model", 32, {})
    assert card.labels == () and card.task == "embedding"
    assert card.output["name"] == "embedding" and card.output["dim"] == model.config.hidden
    assert "embedding model (64 dims" in card.description()


def test_metadata_of_another_tool_is_no_card():
    assert from_metadata({"onnx.sim": "1"}) is None
