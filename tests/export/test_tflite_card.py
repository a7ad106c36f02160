"""Every .tflite carries the card as TFLite Model Metadata (export/tflite_metadata.py): labels on the output, the
vocabulary in a BertTokenizer unit, the card as pocketformer.json; annotated files still run in LiteRT, and the
quantized ones keep their int8 weights."""

from __future__ import annotations

import numpy as np
import pytest

from pocketformer.data import Encoder, load_dataset
from pocketformer.export import FORMATS
from pocketformer.export import tflite_metadata as tm
from pocketformer.export.card import card_of
from pocketformer.models import load_any
from pocketformer.models.io import save
from pocketformer.targets import export_checked
from conftest import open_file

SEQ = 32


@pytest.fixture(scope="module")
def exported(tokenized_bert, tmp_path_factory):
    """The tiny BERT (MiniLM's tokenizer, labels neg/pos) exported to every TFLite precision with its card."""
    out = tmp_path_factory.mktemp("tflite-card")
    model, _ = load_any(tokenized_bert)
    save(model, out / "model", tokenizer_dir=tokenized_bert)
    card = card_of(model, out / "model", "tiny/model", "model", SEQ, {"recipe_sha256": "abc", "weights_sha256": "w"})
    ds = load_dataset("rotten_tomatoes", "test", 0).for_model("text", list(card.labels), "tiny").head(8)
    inputs = Encoder(out / "model", SEQ).encode(ds, np.arange(8))
    records = export_checked(model, out / "artifacts", "model", inputs, "tflite", card=card, int8=True,
                             static_shape=(1, SEQ))
    return model, card, out / "artifacts", {r["precision"]: r for r in records}, inputs


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-weight", "int8"])
def test_every_precision_reads_back_its_card(exported, precision):
    _, card, art, records, _ = exported
    back = FORMATS["tflite"].read_card(art / records[precision]["file"])
    assert back["labels"] == ["neg", "pos"] and back["name"] == "tiny/model" and back["max_len"] == SEQ
    assert back["tokenizer"]["kind"] == "wordpiece" and back["tokenizer_location"] == "embedded"
    assert back["provenance"]["recipe_sha256"] == "abc" and back["provenance"]["pocketformer"]
    assert [t["name"] for t in back["inputs"]] == ["input_ids", "attention_mask"]


def test_the_metadata_is_tflite_model_metadata_with_labels_and_vocabulary(exported):
    _, card, art, records, _ = exported
    content = (art / records["fp32"]["file"]).read_bytes()
    md = tm.read_metadata(content)
    assert md.name.decode() == "tiny/model" and md.author.decode() == "pocketformer"
    assert md.description.decode() == card.description()
    (sub,) = md.subgraphMetadata
    assert [t.name.decode() for t in sub.inputTensorMetadata] == ["input_ids", "attention_mask"]
    assert all(t.description for t in sub.inputTensorMetadata)
    (out,) = sub.outputTensorMetadata
    assert [(f.name.decode(), f.type) for f in out.associatedFiles] == [("labels.txt", 2)]  # TENSOR_AXIS_LABELS
    (unit,) = sub.inputProcessUnits
    assert [f.name.decode() for f in unit.options.vocabFile] == ["vocab.txt"]  # a BertTokenizerOptions unit
    files = tm.embedded_files(content)
    assert files["labels.txt"] == b"neg\npos\n"
    assert files["vocab.txt"] == card.tokenizer.vocab_txt()
    assert sorted(files) == ["labels.txt", "pocketformer.json", "vocab.txt"]


def test_the_annotated_int8_file_keeps_its_int8_weights(exported):
    _, _, art, records, _ = exported
    from ai_edge_litert import schema_py_generated as schema

    content = (art / records["int8"]["file"]).read_bytes()
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    int8_bytes = sum(len(model.buffers[t.buffer].data) for g in model.subgraphs for t in g.tensors
                     if t.type == schema.TensorType.INT8 and model.buffers[t.buffer].data is not None)
    assert int8_bytes > 1_000_000  # the embedding table and the linears, inline
    assert records["int8"]["weights"] == records["fp32"]["weights"]
    extras = sum(len(b) for b in tm.embedded_files(content).values())
    assert records["int8"]["size_bytes"] < (records["fp32"]["size_bytes"] - extras) / 2.5 + extras


def test_the_annotated_files_run_in_litert_as_checked(exported):
    model, _, art, records, inputs = exported
    for precision in ("fp32", "int8"):
        session = open_file("litert", art / records[precision]["file"])
        got = np.concatenate([session.output({"input_ids": i[None].numpy(), "attention_mask": m[None].numpy()})
                              for i, m in zip(*model.io.fit(inputs, {"sequence": SEQ}))])
        assert got.shape == (8, 2) and np.isfinite(got).all()
        assert records[precision]["parity_vs_pytorch"]["argmax_agreement"] == 1.0


def test_annotating_again_gives_the_same_bytes(exported, tmp_path):
    _, card, art, records, _ = exported
    copy = tmp_path / "again.tflite"
    original = (art / records["int8"]["file"]).read_bytes()
    copy.write_bytes(original)
    FORMATS["tflite"].annotate(copy, card, "int8")
    assert copy.read_bytes() == original  # the old metadata and archive replaced, not stacked; fixed timestamps


def test_a_file_without_a_card_reads_none(make_model, make_text_inputs, tmp_path):
    from pocketformer.export.tflite import export_float

    model = make_model("text", labels=("a", "b"))
    export_float(model, tmp_path / "bare.tflite", make_text_inputs(batch=1, seq=8))
    assert FORMATS["tflite"].read_card(tmp_path / "bare.tflite") is None
    assert tm.read_metadata((tmp_path / "bare.tflite").read_bytes()) is None


def test_sparse_files_keep_their_sparse_weights_under_the_card(make_model, make_text_inputs, tmp_path):
    from pocketformer.compress.dense_sparse import DenseSparse, DenseSparseConfig
    from pocketformer.compress import Context
    from pocketformer.models import LayerShape

    model = make_model("text", labels=("a", "b"), layers=[LayerShape(heads=4, head_dim=16, ffn=512) for _ in range(2)])
    DenseSparse(DenseSparseConfig(rank=32, nnz=4)).apply(model, Context(teacher=None, train=None, validation=None,
                                                                        encoder=None))
    card = card_of(model.eval(), tmp_path, "ds/model", "model", 16, {})
    records = export_checked(model, tmp_path / "art", "ds", make_text_inputs(batch=3, seq=12), "tflite", card=card,
                             int8=False, static_shape=(1, 16))
    fp32 = next(r for r in records if r["precision"] == "fp32")
    assert fp32["sparse_storage"]["tensors"] and fp32["ops"].get("DENSIFY")
    assert FORMATS["tflite"].read_card(tmp_path / "art" / fp32["file"])["labels"] == ["a", "b"]
