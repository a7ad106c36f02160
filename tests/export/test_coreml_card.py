"""The card in Core ML packages (export/coreml.py): written into the spec in place by the export loop, read back by
`inspect`; and Core ML classifiers (ct.ClassifierConfig) in the MIL reference execution's classify kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocketformer.app.base import softmax
from pocketformer.export import FORMATS, coreml
from pocketformer.export.card import card_of
from pocketformer.targets.runtime import get_runtime
from conftest import export_coreml

LABELS = ["neg", "pos"]


def scaled(model):
    with torch.no_grad():  # logits of a random tiny model sit near zero: make its labels clear
        model.classifier.out.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, make_model, make_text_inputs):
    """A tiny text classifier exported to Core ML twice (fp32, fp16, int8) with its card."""
    model = scaled(make_model("text", labels=LABELS))
    card = card_of(model, tmp_path_factory.mktemp("ckpt"), "t/model", "model", 16, {"recipe_sha256": "r"})
    inputs = make_text_inputs(batch=2, seq=16)
    outs = [tmp_path_factory.mktemp("coreml-card") for _ in range(2)]
    runs = [{r["precision"]: r for r in export_coreml(model, out, "model", inputs, card=card, static_shape=(1, 16))}
            for out in outs]
    return model, card, inputs, outs, runs


def test_every_package_carries_the_card_and_says_where_its_tokenizer_would_be(annotated):
    _, card, _, (out, _), (records, _) = annotated
    for r in records.values():
        back = FORMATS["coreml"].read_card(out / r["file"])
        assert back == card.to_json()  # no tokenizer in this checkpoint: nothing beside it, no classifier spec
        spec = coreml.read_spec(out / r["file"])
        assert spec.description.metadata.author == "pocketformer"
        assert spec.description.metadata.shortDescription == card.description()
        assert "com.github.apple.coremltools.conversion_date" not in spec.description.metadata.userDefined


def test_the_card_round_trips_with_the_tokenizer_folder_beside(tmp_path, tokenized_bert):
    from pocketformer.models import load_any

    model, _ = load_any(tokenized_bert)
    card = card_of(model, tokenized_bert, "t/model", "model", 16, {"recipe_sha256": "r"})
    package = tmp_path / "m.mlpackage"
    coreml.convert_module(model, (torch.ones(1, 16, dtype=torch.long),) * 2, model.input_names, ["logits"],
                          "fp16").save(str(package))
    assert coreml.read_card(package) is None  # before annotate: no card
    coreml.write_card(package, card)
    back = coreml.read_card(package)
    assert back["tokenizer_dir"] == "model.tokenizer" and back["tokenizer_location"] == "beside: model.tokenizer/"
    assert back["tokenizer"]["kind"] == "wordpiece" and back["max_len"] == 16 and back["labels"] == LABELS
    d = coreml.read_spec(package).description
    assert {f.name: f.shortDescription for f in d.output}["logits"].endswith("neg, pos")


def test_annotated_packages_hash_the_same_when_exported_again(annotated):
    *_, (a, b) = annotated
    for precision in ("fp32", "fp16", "int8"):
        assert a[precision]["sha256"] == b[precision]["sha256"], precision


def test_annotating_again_changes_nothing_and_keeps_int8_weights(annotated):
    _, card, _, (out, _), (records, _) = annotated
    package = out / records["int8"]["file"]
    before = FORMATS["coreml"].content_sha256(package)
    FORMATS["coreml"].annotate(package, card, "int8")
    assert FORMATS["coreml"].content_sha256(package) == before
    assert coreml.describe(package)["weight_bytes_by_dtype"].get("int8", 0) > 0


def test_classify_kernel_gives_the_label_and_the_softmax_of_the_plain_packages_logits(annotated, tmp_path):
    model, _, inputs, (out, _), (records, _) = annotated

    class Probabilities(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids, mask):
            return torch.softmax(self.model(ids, mask), -1)

    example = tuple(t[:1] for t in inputs)
    package = tmp_path / "classifier.mlpackage"
    coreml.convert_module(Probabilities(), example, model.input_names, ["probabilities"], "fp32",
                          classes=LABELS).save(str(package))
    runtime = get_runtime("coreml-mil-reference")
    classifier, plain = runtime.open(package, 1), runtime.open(out / records["fp32"]["file"], 1)
    assert classifier.outputs == ["classLabel", "classLabel_probs"]
    for i in range(2):
        feeds = {n: t[i:i + 1].numpy() for n, t in zip(model.input_names, inputs)}
        got = classifier.run(feeds)
        want = softmax(plain.output(feeds).astype(np.float64))[0]
        assert got["classLabel"] == LABELS[int(want.argmax())]
        assert sorted(got["classLabel_probs"]) == LABELS
        assert np.allclose([got["classLabel_probs"][x] for x in LABELS], want, atol=1e-5)
    assert coreml.class_labels(coreml.read_spec(package)) == LABELS
