"""The card inside ONNX files: written by the export loop into metadata_props, read back by ONNX Runtime and by
Onnx.read_card, with the tokenizer itself embedded."""

import hashlib
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer

from onnx.external_data_helper import uses_external_data

from pocketformer.app.base import ADVERSARIAL_TEXTS
from pocketformer.data import Encoder, load_dataset
from pocketformer.export import FORMATS
from pocketformer.export.card import card_of
from pocketformer.export.onnx import TOKENIZER_KEY, annotate_onnx, embedded_tokenizer, export_float, onnx_file
from pocketformer.models import load_any
from pocketformer.targets import export_checked

MAX_LEN = 32


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def meta(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenized_bert):
    model, _ = load_any(tokenized_bert)
    card = card_of(model, tokenized_bert, "tiny/model", "model", MAX_LEN, {"source": "tiny-bert"})
    ds = load_dataset("rotten_tomatoes", "test", 0).for_model("text", card.labels, "The tiny BERT")
    inputs = Encoder(tokenized_bert, MAX_LEN).encode(ds, np.arange(8))
    art = tmp_path_factory.mktemp("onnx-card")
    records = export_checked(model, art, "model", inputs, "onnx", card=card, int8=True)
    return model, card, {r["precision"]: art / r["file"] for r in records}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_onnx_runtime_reads_the_labels_and_max_len_from_custom_metadata_map(exported, precision):
    _, _, files = exported
    m = meta(files[precision])
    assert json.loads(m.custom_metadata_map["pocketformer.labels"]) == ["neg", "pos"]
    assert json.loads(m.custom_metadata_map["pocketformer.max_len"]) == MAX_LEN
    assert m.custom_metadata_map["pocketformer.precision"] == precision
    assert m.producer_name == "pocketformer" and "neg, pos" in m.description


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_read_card_gives_the_card_back_and_says_the_tokenizer_is_embedded(exported, precision):
    _, card, files = exported
    got = FORMATS["onnx"].read_card(files[precision])
    assert got["labels"] == ["neg", "pos"] and got["task"] == card.task and got["max_len"] == MAX_LEN
    assert got["tokenizer"]["lowercase"] is True and got["tokenizer"]["strip_accents"] is None
    assert [t["name"] for t in got["inputs"]] == [t["name"] for t in card.inputs]
    assert got["tokenizer_location"] == "embedded" and "tokenizer.json" not in got


def test_embedded_tokenizer_encodes_like_the_checkpoints_own(exported, tokenized_bert):
    _, _, files = exported
    text = embedded_tokenizer(files["int8"])
    assert text == (tokenized_bert / "tokenizer.json").read_text(encoding="utf-8")
    inside, own = Tokenizer.from_str(text), Tokenizer.from_file(str(tokenized_bert / "tokenizer.json"))
    texts = list(ADVERSARIAL_TEXTS) + ["a fine, moving film"]
    assert [e.ids for e in inside.encode_batch(texts)] == [e.ids for e in own.encode_batch(texts)]


def test_annotating_again_replaces_the_card_keeps_other_metadata_and_gives_the_same_bytes(exported, tmp_path):
    model, card, files = exported
    path = shutil.copyfile(files["fp32"], tmp_path / "m.onnx")
    others = {p.key: p.value for p in onnx.load(str(path)).metadata_props if not p.key.startswith("pocketformer.")}
    assert others  # onnxsim's bookkeeping
    renamed = card_of(model, tmp_path, "other/name", "model", 16, {})  # no tokenizer: none embedded
    annotate_onnx(path, renamed, "fp32")
    annotate_onnx(path, card, "fp32")
    first = sha(path)
    annotate_onnx(path, card, "fp32")
    assert sha(path) == first == sha(files["fp32"])
    props = [(p.key, p.value) for p in onnx.load(str(path)).metadata_props]
    assert len(props) == len(dict(props))  # no key twice
    assert {k: v for k, v in props if not k.startswith("pocketformer.")} == others
    assert dict(props)["pocketformer.name"] == "tiny/model"


def test_a_card_without_tokenizer_leaves_none_embedded(exported, tmp_path):
    model, _, files = exported
    path = shutil.copyfile(files["fp32"], tmp_path / "m.onnx")
    annotate_onnx(path, card_of(model, tmp_path, "no-tokenizer/model", "model", MAX_LEN, {}), "fp32")
    got = FORMATS["onnx"].read_card(path)
    assert "tokenizer" not in got and "tokenizer_location" not in got and embedded_tokenizer(path) is None


def test_sparse_initializers_and_external_data_survive_annotation(make_model, make_text_inputs, tokenized_bert,
                                                                  tmp_path):
    model = make_model("text", labels=["neg", "pos"])
    with torch.no_grad():  # mostly-zero weights, so sparse storage takes them
        for p in model.parameters():
            if p.dim() == 2 and p.numel() >= 1024:
                p.mul_((torch.rand_like(p) < 0.1).float())
    inputs = make_text_inputs(batch=3, seq=10)
    card = card_of(model, tokenized_bert, "sparse/model", "model", MAX_LEN, {})
    feeds = {n: t.numpy() for n, t in zip(model.input_names, inputs)}

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    sparse = tmp_path / "sparse.onnx"
    export_float(model, sparse, inputs)
    assert onnx_file(sparse)["tensors"] > 0
    before, count = run(sparse), len(onnx.load(str(sparse)).graph.sparse_initializer)
    annotate_onnx(sparse, card, "fp32")
    assert len(onnx.load(str(sparse)).graph.sparse_initializer) == count
    np.testing.assert_array_equal(run(sparse), before)

    external = tmp_path / "ext" / "external.onnx"
    external.parent.mkdir()
    export_float(model, tmp_path / "dense.onnx", inputs)  # external data holds dense initializers only
    proto = onnx.load(str(tmp_path / "dense.onnx"))
    onnx.save(proto, str(external), save_as_external_data=True, location="weights.bin")
    weights, dense = sha(external.parent / "weights.bin"), run(tmp_path / "dense.onnx")
    annotate_onnx(external, card, "fp32")
    assert sha(external.parent / "weights.bin") == weights
    inits = onnx.load(str(external), load_external_data=False).graph.initializer
    assert sum(uses_external_data(t) for t in inits) > 0  # the weights stayed outside
    np.testing.assert_array_equal(run(external), dense)
    assert FORMATS["onnx"].read_card(external)["labels"] == ["neg", "pos"]
    assert TOKENIZER_KEY in meta(external).custom_metadata_map
