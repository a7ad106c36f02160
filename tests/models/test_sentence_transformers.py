"""Sentence-transformers folders import with exactly their head (pooling, Dense, Normalize), and what pocketformer
exports is what SentenceTransformer(folder).encode gives on the same text; heads it cannot reproduce are refused."""

import json

import numpy as np
import pytest
import torch

from pocketformer.data import Dataset, Encoder
from pocketformer.errors import ArchitectureError
from pocketformer.models import import_hf

st = pytest.importorskip("sentence_transformers")

TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés from start to finish,",
         "an ungainly, comedy-deficient, b-movie rush job", "it's a charming and often affecting journey."]


def sentence_folder(base, tmp_path, pooling="mean", dense=0, act="torch.nn.modules.activation.Tanh",
                    normalize=True):
    """A sentence-transformers model saved by sentence-transformers itself, on a tiny BERT with MiniLM's tokenizer."""
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(0)
    word = models.Transformer(str(base), max_seq_length=64)
    modules = [word, models.Pooling(word.get_word_embedding_dimension(), pooling_mode=pooling)]
    if dense:
        activation = {"torch.nn.modules.activation.Tanh": torch.nn.Tanh(),
                      "torch.nn.modules.activation.GELU": torch.nn.GELU()}[act]
        modules.append(models.Dense(word.get_word_embedding_dimension(), dense, activation_function=activation))
    if normalize:
        modules.append(models.Normalize())
    folder = tmp_path / f"st-{pooling}-{dense}-{normalize}"
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return folder


@pytest.fixture(scope="module")
def encoder_base(tmp_path_factory, minilm_path):
    """A tiny BertModel (an encoder, no classifier) with MiniLM's real tokenizer."""
    from conftest import save_tokenized_bert

    return save_tokenized_bert(tmp_path_factory.mktemp("tiny-encoder"), minilm_path, initializer_range=0.2)


def encode_like_pocketformer(folder, model):
    ds = Dataset("t", "test", np.zeros(len(TEXTS), dtype=np.int64), ["x"], texts=TEXTS)
    return Encoder(folder, 64).encode(ds, np.arange(len(TEXTS)))


def reference(folder, normalize):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(TEXTS, normalize_embeddings=normalize)


def cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("pooling,dense,normalize", [("mean", 0, True), ("cls", 0, False), ("max", 0, True),
                                                     ("mean", 32, True), ("max", 48, False)])
def test_imported_head_gives_sentence_transformers_embedding(encoder_base, tmp_path, pooling, dense, normalize):
    folder = sentence_folder(encoder_base, tmp_path, pooling, dense, normalize=normalize)
    model, provenance = import_hf(folder)  # checks the whole head against sentence-transformers on token ids
    head = model.spec.head
    assert (head.pooling, head.dense, head.normalize) == (pooling, dense, normalize)
    assert provenance["sentence_embedding_parity_max_abs_diff"] < 1e-4
    with torch.no_grad():
        got = model(*encode_like_pocketformer(folder, model)).numpy()
    want = reference(folder, normalize)
    assert got.shape == want.shape and cosines(got, want).min() >= 0.9999
    if normalize:
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_exported_onnx_embedding_equals_sentence_transformers(encoder_base, tmp_path):
    from conftest import export_onnx, run_file

    folder = sentence_folder(encoder_base, tmp_path, "mean", 32, normalize=True)
    model, _ = import_hf(folder)
    inputs = encode_like_pocketformer(folder, model)
    records = export_onnx(model, tmp_path / "out", "emb", inputs, int8=False)
    got = run_file("onnxruntime", tmp_path / "out" / records[0]["file"],
                   {n: t.numpy() for n, t in zip(model.input_names, inputs)})
    assert records[0]["outputs"] == {"embedding": ["batch", 32]}
    assert cosines(got, reference(folder, True)).min() >= 0.9999


@pytest.mark.parametrize("change,match", [
    ({"pooling": "lasttoken"}, "pooling lasttoken"),
    ({"pooling": "mean_sqrt_len_tokens"}, "pooling"),
    ({"extra": "sentence_transformers.models.LayerNorm"}, "LayerNorm"),
    ({"act": "torch.nn.modules.activation.GELU"}, "activation"),
])
def test_a_head_pocketformer_cannot_reproduce_is_refused(encoder_base, tmp_path, change, match):
    folder = sentence_folder(encoder_base, tmp_path, "mean", 16 if "act" in change else 0,
                             act=change.get("act", "torch.nn.modules.activation.Tanh"))
    if "pooling" in change:
        config = folder / "1_Pooling" / "config.json"
        data = json.loads(config.read_text())
        data = {k: False if k.startswith("pooling_mode_") else v for k, v in data.items() if k != "pooling_mode"}
        data[f"pooling_mode_{change['pooling']}"] = True
        config.write_text(json.dumps(data))
    if "extra" in change:
        modules = json.loads((folder / "modules.json").read_text())
        modules.append({"idx": len(modules), "name": "x", "path": "x", "type": change["extra"]})
        (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ArchitectureError, match=match):
        import_hf(folder)


@pytest.mark.slow
def test_real_minilm_imports_as_mean_pooled_normalized_and_matches_sentence_transformers(minilm_path, tmp_path):
    from conftest import export_onnx, run_file

    model, provenance = import_hf(minilm_path)
    assert (model.spec.head.pooling, model.spec.head.normalize) == ("mean", True)
    assert provenance["sentence_transformers"]["modules"] == ["Transformer", "Pooling", "Normalize"]
    inputs = encode_like_pocketformer(minilm_path, model)
    records = export_onnx(model, tmp_path, "minilm", inputs, int8=False)
    got = run_file("onnxruntime", tmp_path / records[0]["file"],
                   {n: t.numpy() for n, t in zip(model.input_names, inputs)})
    assert cosines(got, reference(minilm_path, True)).min() >= 0.9999


def test_the_head_survives_save_and_load(encoder_base, tmp_path):
    from pocketformer.models import load, save

    folder = sentence_folder(encoder_base, tmp_path, "max", 24, normalize=True)
    model, _ = import_hf(folder, check_parity=False)
    save(model, tmp_path / "saved")
    again, _ = load(tmp_path / "saved")
    inputs = encode_like_pocketformer(folder, model)
    with torch.no_grad():
        assert torch.equal(model(*inputs), again(*inputs))
    assert again.spec.head == model.spec.head


def test_finetuning_an_embedding_model_puts_the_classifier_on_the_pooled_state(encoder_base, tmp_path):
    folder = sentence_folder(encoder_base, tmp_path, "mean", 24, normalize=True)
    model, _ = import_hf(folder, check_parity=False)
    model.set_labels(["neg", "pos"])
    assert model.embedding_head is None and model.io.output_names == ["logits"]
    with torch.no_grad():
        assert model(*encode_like_pocketformer(folder, model)).shape == (len(TEXTS), 2)
