"""Fine-tuning: turns an embedding model into a classifier over the dataset's labels."""

import pytest
import torch

from pocketformer.compress import Context
from pocketformer.compress.finetune import Finetune, FinetuneConfig
from pocketformer.data import Encoder, load_dataset
from pocketformer.errors import RecipeError
from pocketformer.train import evaluate


@pytest.fixture(scope="module")
def digits():
    return {split: load_dataset("digits", split) for split in ("train", "validation")}


def context(model, digits) -> Context:
    return Context(teacher=model, train=digits["train"], validation=digits["validation"], encoder=Encoder(None),
                   batch_size=32)


def test_finetuning_an_embedding_model_adds_a_classifier_over_the_dataset_labels(make_model, digits):
    model = make_model("vision")
    model = Finetune(FinetuneConfig(epochs=1, lr=1e-3, max_examples=64)).apply(model, context(model, digits)).model
    assert model.config.head.labels == [str(i) for i in range(10)]
    (pixels,) = Encoder(None).encode(digits["validation"], list(range(3)))
    with torch.no_grad():
        assert model(pixels).shape == (3, 10)


def test_finetuning_beats_chance_on_digits(make_model, digits):
    model = make_model("vision")
    model = Finetune(FinetuneConfig(epochs=3, lr=3e-3)).apply(model, context(model, digits)).model
    assert evaluate(model, digits["validation"], Encoder(None))["accuracy"] > 50.0  # chance is 10%


def test_a_classifier_with_other_labels_is_refused(make_model, digits):
    model = make_model("vision", labels=["cat", "dog"])
    with pytest.raises(RecipeError, match="2 labels"):
        Finetune(FinetuneConfig(max_examples=8)).apply(model, context(model, digits))
