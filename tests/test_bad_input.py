"""Bad input, every verb: each kind of mistake a user makes, given to the real command line (a fresh
`python -m pocketformer.cli` process), is one line on stderr starting with "error:" that names the problem and the
fix, exit code 2, no traceback. Usage errors (options and arguments the command line itself refuses) are in
test_cli.py (USAGE_ERRORS); these are inputs that parse but are wrong: paths, checkpoints, pickles, configs, recipes,
targets, profiles, data, artifacts, run folders, widths and option values.

Every case fails at parse or load time, before any training, so most of a case's time would be the CLI's start
(importing torch): each command runs in a process forked from one that has already imported torch and the CLI
(forked_cli.py: its own argv, environment, user and output files, the entry point `python -m pocketformer.cli`
runs), one per core (the `outcomes` fixture). test_cli.py runs each verb as a real `python -m` process."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from conftest import (assert_one_line_error, cli_command, save_hf, tiny_model, write_profile, write_recipe,
                      write_sentiment_csv)
from safetensors.torch import load_file

from pocketformer.models import save

DIGITS = [str(i) for i in range(10)]
NOBODY = 65534


# -- inputs ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A real run folder: a tiny ViT on digits through `compress` (no stages) and an ONNX fp32 export. Cases copy it
    and damage the copy."""
    from pocketformer.pipeline import compress, export
    from pocketformer.recipe import parse_recipe

    work = tmp_path_factory.mktemp("base-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POCKETFORMER_CACHE", str(work / "cache"))
        save(tiny_model("vision", DIGITS), work / "ckpt")
        recipe = parse_recipe({"name": "bad-input", "model": "ckpt", "data": "digits"}, str(work / "recipe.yaml"))
        compress(recipe, work / "ckpt", work / "run")
        export(work / "run", ["onnx"], int8=False, legacy_check=False)
    return work / "run"


class Kit:
    """Builds one case's inputs in its own folder, from the shared fixtures' tiny models and files."""

    def __init__(self, tmp: Path, base_run: Path, fast_profile: Path):
        self.tmp, self.base_run, self.fast_profile = tmp, base_run, fast_profile

    def path(self, name: str) -> Path:
        return self.tmp / name

    def write(self, name: str, content: Any) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    def garbage(self, name: str) -> Path:
        """Random bytes under a model's name."""
        return self.write(name, np.random.default_rng(0).bytes(4096))

    def folder(self, name: str) -> Path:
        (self.tmp / name).mkdir(parents=True, exist_ok=True)
        return self.tmp / name

    def ckpt(self, name: str = "ckpt", modality: str = "text", labels=()) -> Path:
        """A canonical (pocketformer) checkpoint of a tiny model."""
        return save(tiny_model(modality, labels), self.tmp / name)

    def hf(self, name: str = "hf", kind: str = "bert", **config) -> Path:
        """A tiny Hugging Face folder (save_pretrained); `config` changes its config.json (None removes a key)."""
        folder = save_hf(kind, self.tmp / name)
        return self.edit_json(folder / "config.json", config).parent if config else folder

    def hf_config(self, name: str = "hf", **config) -> Path:
        """A folder holding only a tiny BERT's config.json, changed by `config`: enough for anything refused before
        the weights are read."""
        cfg = dict(model_type="bert", architectures=["BertModel"], vocab_size=100, hidden_size=64,
                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
        cfg.update(config)
        return self.write(f"{name}/config.json", {k: v for k, v in cfg.items() if v is not None}).parent

    def pickle_only(self, name: str = "pickled", state: Optional[dict] = None) -> Path:
        """A Hugging Face folder whose weights are only a pickle (pytorch_model.bin)."""
        folder = self.hf(name)
        weights = folder / "model.safetensors"
        torch.save(state if state is not None else load_file(str(weights)), folder / "pytorch_model.bin")
        weights.unlink()
        return folder

    def edit_json(self, path: Path, changes: Any) -> Path:
        """Replace a JSON file's content (not a dict), or update its keys (None removes one)."""
        data = json.loads(path.read_text())
        if isinstance(changes, dict) and isinstance(data, dict):
            data.update(changes)
            data = {k: v for k, v in data.items() if v is not None}
        else:
            data = changes
        path.write_text(json.dumps(data))
        return path

    def recipe(self, name: str = "recipe", folder: Optional[Path] = None, **fields) -> Path:
        """A recipe (in `folder`, default the case's), of the case's checkpoint on digits unless `fields` say."""
        return write_recipe((folder or self.tmp) / f"{name}.yaml", **{"model": str(self.tmp / "ckpt"),
                                                                      "data": "digits", **fields})

    def csv(self, name: str = "reviews.csv") -> Path:
        return write_sentiment_csv(self.tmp / name)

    def profile(self, name: str = "bad", **overrides) -> Path:
        return write_profile(self.tmp / f"{name}.yaml", name=name, **overrides)

    def run(self, name: str = "run") -> Path:
        """A copy of the real run folder."""
        return Path(shutil.copytree(self.base_run, self.tmp / name))

    def text_run(self, name: str = "text-run") -> Path:
        """A run folder whose models are tiny text classifiers (labels neg, pos)."""
        out = self.run(name)
        for stem in ("baseline", "model"):
            save(tiny_model("text", ["neg", "pos"]), out / stem)
        return out

    def unreadable(self, path: Path) -> Path:
        """chmod 000 `path`; its folders open to all (a checkpoint folder is made private, 0700, by save)."""
        for folder in list(path.relative_to(self.tmp).parents)[:-1]:  # not the case's folder itself
            (self.tmp / folder).chmod(0o755)
        path.chmod(0)
        return path


@dataclass(frozen=True)
class Case:
    kind: str
    name: str
    make: Callable[[Kit], tuple[list, list[str]]]  # -> (the command's arguments, words its error line must contain)


def cases(kind: str, table: list[tuple[str, Callable[[Kit], tuple[list, list[str]]]]]) -> list[Case]:
    return [Case(kind, name, make) for name, make in table]


def compress_with(k: Kit, recipe: Optional[Path] = None, ckpt: Optional[Path] = None, **fields) -> list:
    return ["compress", ckpt or k.ckpt(), "--recipe", recipe or k.recipe(**fields), "--out", k.path("out")]


# -- inputs that take more than one step -------------------------------------------------------------------------------

def _weights(k: Kit, content: bytes) -> Path:
    """A canonical checkpoint whose model.safetensors holds `content`."""
    folder = k.ckpt()
    (folder / "model.safetensors").write_bytes(content)
    return folder


def _in_closed_folder(k: Kit) -> Path:
    """A recipe in a folder then closed (chmod 000): even whether the recipe exists cannot be known."""
    recipe = k.recipe(folder=k.folder("closed"))
    k.unreadable(recipe.parent)
    return recipe


def _truncate(path: Path) -> Path:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return path


def _sharded(k: Kit, index: Any) -> Path:
    """A Hugging Face folder whose single weights file is renamed to the first shard of a sharded index."""
    folder = k.hf("sharded")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    k.write("sharded/model.safetensors.index.json", index)
    return folder


def _lying_canonical(k: Kit) -> Path:
    """A pocketformer checkpoint whose pocketformer.json says vocabulary 50; its weights hold 100 rows."""
    folder = k.ckpt()
    meta = json.loads((folder / "pocketformer.json").read_text())
    meta["config"]["vocab_size"] = 50
    (folder / "pocketformer.json").write_text(json.dumps(meta))
    return folder


def _split_column_without_train(k: Kit) -> Path:
    rows = [{"text": f"the film was {w}", "label": lab, "split": "test"} for w, lab in (("great", "pos"),
                                                                                        ("dull", "neg"))]
    return k.write("reviews.jsonl", "\n".join(json.dumps(r) for r in rows))


def _three_labels(k: Kit) -> Path:
    rows = ["text,label"] + [f"review {i},{('neg', 'neutral', 'pos')[i % 3]}" for i in range(30)]
    return k.write("three.csv", "\n".join(rows) + "\n")


def _garbage_in_run(k: Kit) -> Path:
    run = k.run()
    k.garbage("run/artifacts/baseline.fp32.onnx")
    return run


def _compress_json(k: Kit, text: str) -> Path:
    run = k.run()
    (run / "compress.json").write_text(text)
    return run


def _recipe_without(k: Kit, key: str) -> Path:
    run = k.run()
    meta = json.loads((run / "compress.json").read_text())
    del meta["recipe"][key]
    k.edit_json(run / "compress.json", meta)
    return run


def _old_artifacts_json(k: Kit) -> Path:
    """A run whose artifacts.json records lack the format (as a manifest of an older pocketformer might)."""
    run = k.run()
    manifest = run / "artifacts" / "artifacts.json"
    k.edit_json(manifest, [{k_: v for k_, v in r.items() if k_ != "format"} for r in json.loads(manifest.read_text())])
    return run


def _without(run: Path, name: str) -> Path:
    shutil.rmtree(run / name)
    return run


def _extract(k: Kit, *options, source: Optional[Path] = None) -> list:
    return ["extract", source or k.ckpt(), "-o", k.path("sub"), *options]


# -- the cases, by kind --------------------------------------------------------------------------------------------------

MISSING = cases("missing path", [
    ("compress checkpoint", lambda k: (
        ["compress", k.path("no-such-ckpt"), "--recipe", k.recipe(), "--out", k.path("out")],
        ["no-such-ckpt", "does not exist"])),
    ("compress: the recipe's data file", lambda k: (compress_with(k, data="missing.csv"),
                                                    ["missing.csv", "does not exist"])),
    ("run recipe", lambda k: (["run", k.path("nope.yaml")], ["nope.yaml", "does not exist"])),
    ("export run folder", lambda k: (["export", k.path("no-run")], ["no-run", "does not exist"])),
    ("lint artifact", lambda k: (["lint", k.path("absent.onnx"), "-t", "host-ort"], ["absent.onnx", "does not exist"])),
    ("inspect artifact", lambda k: (["inspect", k.path("absent.tflite")], ["absent.tflite", "does not exist"])),
    ("extract source", lambda k: (_extract(k, "-w", "0.5", source=k.path("absent")), ["absent", "does not exist"])),
])

# chmod 000; as root (which reads anything) the CLI runs as an unprivileged user (the `unprivileged` fixture).
UNREADABLE = cases("unreadable path", [
    ("run recipe", lambda k: (["run", k.unreadable(k.recipe())], ["recipe.yaml", "not readable"])),
    ("inspect: config.json", lambda k: (["inspect", k.unreadable(k.hf_config() / "config.json").parent],
                                        ["config.json", "cannot be read", "Permission denied"])),
    ("inspect: model.safetensors", lambda k: (["inspect", k.unreadable(k.ckpt() / "model.safetensors").parent],
                                              ["model.safetensors", "cannot be read", "Permission denied"])),
    ("lint: profile", lambda k: (["lint", k.garbage("a.onnx"), "-t", k.unreadable(k.profile())],
                                 ["bad.yaml", "cannot be read", "Permission denied"])),
    ("run: a recipe in a closed folder", lambda k: (["run", _in_closed_folder(k)],
                                                    ["Permission denied", "closed/recipe.yaml"])),
])

EMPTY = cases("empty path", [
    ("inspect folder", lambda k: (["inspect", k.folder("empty")], ["no config.json"])),
    ("run recipe file", lambda k: (["run", k.write("recipe.yaml", "")], ["recipe.yaml", "is empty"])),
    ("lint .onnx file", lambda k: (["lint", k.write("empty.onnx", b""), "-t", "host-ort"],
                                   ["empty.onnx", "not a readable onnx file"])),
    ("validate profile file", lambda k: (["validate", k.run(), "-t", k.write("empty.yaml", "")],
                                         ["empty.yaml", "is empty"])),
    ("compress data file (header only)", lambda k: (
        compress_with(k, data=str(k.write("header.csv", "text,label\n"))), ["header.csv", "no examples"])),
    ("inspect model.safetensors", lambda k: (["inspect", _weights(k, b"")],
                                             ["model.safetensors", "truncated or corrupt"])),
])

FILE_OR_FOLDER = cases("file for folder, folder for file", [
    ("compress checkpoint is a file", lambda k: (compress_with(k, ckpt=k.recipe("a-file")), ["is a file"])),
    ("compress --out is a file", lambda k: (
        ["compress", k.ckpt(), "--recipe", k.recipe(), "--out", k.write("out", "x")], ["out", "is a file"])),
    ("extract --out is a file (it was replaced)", lambda k: (
        ["extract", k.ckpt(), "--out", k.write("sub", "x"), "-w", "0.5"], ["sub", "is a file"])),
    ("run recipe is a folder", lambda k: (["run", k.folder("recipe.yaml")], ["recipe.yaml", "is a folder"])),
    ("lint .onnx is a folder", lambda k: (["lint", k.folder("model.onnx"), "-t", "host-ort"],
                                          ["model.onnx", "not a readable onnx file"])),
    ("compress data .csv is a folder", lambda k: (compress_with(k, data=str(k.folder("data.csv"))),
                                                  ["data.csv", "is a folder"])),
    ("validate profile .yaml is a folder", lambda k: (["validate", k.run(), "-t", k.folder("prof.yaml")],
                                                      ["prof.yaml", "is a folder"])),
])

CORRUPT = cases("truncated or corrupt weights", [
    ("inspect HF model.safetensors truncated", lambda k: (
        ["inspect", _truncate(k.hf() / "model.safetensors").parent], ["truncated or corrupt"])),
    ("compress canonical model.safetensors garbage", lambda k: (
        compress_with(k, ckpt=_weights(k, k.garbage("junk").read_bytes())),
        ["model.safetensors", "truncated or corrupt"])),
    ("inspect sharded index not JSON", lambda k: (["inspect", _sharded(k, "{not json")],
                                                  ["model.safetensors.index.json", "not valid JSON"])),
    ("inspect sharded index names a missing shard", lambda k: (
        ["inspect", _sharded(k, {"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}})],
        ["model-00002-of-00002.safetensors", "missing"])),
])

PICKLES = cases("pickle-only checkpoint", [
    ("inspect", lambda k: (["inspect", k.pickle_only()], ["pytorch_model.bin", "--trust-pickle"])),
    ("compress", lambda k: (compress_with(k, ckpt=k.pickle_only()), ["pytorch_model.bin", "--trust-pickle"])),
    ("extract", lambda k: (_extract(k, "-w", "1", source=k.pickle_only()), ["pytorch_model.bin", "--trust-pickle"])),
    ("run", lambda k: (["run", k.recipe(model=str(k.pickle_only()))], ["pytorch_model.bin", "trust_pickle: true"])),
])

CONFIG_LIES = cases("config that lies about shapes", [
    ("config.json hidden_size 128, weights 64", lambda k: (["inspect", k.hf(hidden_size=128)],
                                                           ["has shape", "config.json"])),
    ("config.json without hidden_size", lambda k: (["inspect", k.hf_config(hidden_size=None)],
                                                   ["config.json", "'hidden_size'"])),
    ("config.json heads do not divide hidden", lambda k: (["inspect", k.hf_config(num_attention_heads=5)],
                                                          ["config.json", "num_attention_heads"])),
    ("config.json a list", lambda k: (["inspect", k.write("hf/config.json", [1, 2]).parent],
                                      ["config.json", "not a JSON object"])),
    ("pocketformer.json vocab 50, weights 100", lambda k: (["inspect", _lying_canonical(k)],
                                                           ["model.safetensors", "does not match"])),
])

ARCHITECTURE = cases("unknown architecture", [
    ("model_type gpt2", lambda k: (["inspect", k.hf_config(model_type="gpt2", architectures=["GPT2Model"])],
                                   ["'gpt2'", "not supported", "bert"])),
    ("no model_type (compress)", lambda k: (compress_with(k, ckpt=k.hf_config(model_type=None)), ["model_type"])),
    ("activation silu", lambda k: (["inspect", k.hf_config(hidden_act="silu")], ["'silu'", "not supported"])),
])

RECIPES = cases("recipe", [
    ("unknown top-level key", lambda k: (["run", k.recipe(colour="red")], ["colour"])),
    ("unknown stage setting", lambda k: (["run", k.recipe(stages=[{"prune": {"heads": 2, "speed": "max"}}])],
                                         ["speed"])),
    ("unknown stage", lambda k: (["run", k.recipe(stages=[{"shrink": {}}])], ["shrink", "prune"])),
    ("wrong type: max_len a word", lambda k: (["run", k.recipe(max_len="long")], ["max_len"])),
    ("wrong type: heads 1.5", lambda k: (["run", k.recipe(stages=[{"prune": {"heads": 1.5}}])], ["heads"])),
    ("out of range: epochs -1", lambda k: (["run", k.recipe(stages=[{"distill": {"epochs": -1}}])], ["epochs"])),
    ("impossible order: lowrank before matformer", lambda k: (
        ["run", k.recipe(stages=[{"lowrank": {}}, {"matformer": {}}])], ["matformer", "lowrank"])),
    ("not YAML", lambda k: (["run", k.write("recipe.yaml", "stages: [prune: {heads: 2}\n")], ["not valid YAML"])),
    ("unknown export format (compress)", lambda k: (compress_with(k, export={"formats": ["webgpu"]}), ["webgpu"])),
])

TARGETS = cases("unknown target", [
    ("validate", lambda k: (["validate", k.run(), "-t", "no-such-target"], ["no-such-target", "host-ort"])),
    ("extract --target", lambda k: (_extract(k, "-t", "no-such-target"), ["no-such-target"])),
    ("run: in the recipe, refused before compressing", lambda k: (["run", k.recipe(targets=["no-such-target"])],
                                                                  ["no-such-target"])),
    ("lint: profile path that does not exist", lambda k: (["lint", k.garbage("a.onnx"), "-t", k.path("gone.yaml")],
                                                          ["gone.yaml", "does not exist"])),
])

PROFILES = cases("profile file", [
    ("unknown field", lambda k: (["validate", k.run(), "-t", k.profile(colour="red")],
                                 ["bad.yaml", "unknown field 'colour'"])),
    ("runtime that does not run the format", lambda k: (
        ["lint", k.garbage("a.tflite"), "-t", k.profile(format="tflite")], ["onnxruntime", "tflite"])),
    ("unknown runtime", lambda k: (["lint", k.garbage("a.onnx"), "-t", k.profile(runtime="tensorrt")],
                                   ["tensorrt", "onnxruntime"])),
    ("out of range: threads 0", lambda k: (["validate", k.run(), "-t", k.profile(threads=0)], ["threads"])),
])

DATA = cases("data file", [
    ("wrong columns", lambda k: (compress_with(k, data=str(k.write("d.csv", "sentence,sentiment\nok,pos\n"))),
                                 ["d.csv", "text", "label"])),
    ("JSONL line not JSON", lambda k: (compress_with(k, data=str(k.write("d.jsonl", '{"text": "a", "label": 1}\n{'))),
                                       ["d.jsonl"])),
    ("no train examples (split column)", lambda k: (compress_with(k, data=str(_split_column_without_train(k))),
                                                    ["reviews.jsonl", "no train examples"])),
    ("not UTF-8", lambda k: (compress_with(k, data=str(k.write("d.csv", b"text,label\n\xff\xfe caf\xe9,pos\n"))),
                             ["d.csv", "UTF-8"])),
    ("unknown dataset", lambda k: (compress_with(k, data="imdb"), ["imdb", "rotten_tomatoes"])),
    ("text data, vision model (compress)", lambda k: (compress_with(k, ckpt=k.ckpt("vit", "vision", DIGITS),
                                                                    data=str(k.csv())), ["takes vision", "is text"])),
    ("3-label classifier, 2-label data (compress)", lambda k: (
        compress_with(k, ckpt=k.ckpt(labels=["neg", "neutral", "pos"]), data=str(k.csv()),
                      stages=[{"prune": {"heads": 2}}]), ["3 labels", "has 2"])),
    ("2-label classifier, 3-label data (validate --data)", lambda k: (
        ["validate", k.text_run(), "-t", k.fast_profile, "--data", _three_labels(k)], ["2 labels", "has 3"])),
])

ARTIFACTS = cases("artifact", [
    ("lint: an .onnx for a tflite target", lambda k: (
        ["lint", k.run() / "artifacts" / "model.fp32.onnx", "-t", "android-litert"], ["is onnx", "--to tflite"])),
    ("validate: a run with no file of the target's format", lambda k: (
        ["validate", k.run(), "-t", "android-litert"], ["no tflite artifact", "--to tflite"])),
    ("inspect: garbage .onnx", lambda k: (["inspect", k.garbage("m.onnx")], ["m.onnx", "not a readable onnx"])),
    ("lint: garbage .tflite", lambda k: (["lint", k.garbage("m.tflite"), "-t", "android-litert"],
                                         ["m.tflite", "not a readable tflite"])),
    ("validate: garbage under a run's artifact name", lambda k: (
        ["validate", _garbage_in_run(k), "-t", k.fast_profile, "--limit", "4"], ["baseline.fp32.onnx"])),
])

OLD_RUN = cases("run folder from an older pocketformer", [
    ("export: compress.json without recipe", lambda k: (
        ["export", k.edit_json(k.run() / "compress.json", {"recipe": None}).parent],
        ["compress.json", "has no recipe", "older pocketformer"])),
    ("validate: compress.json recipe without max_len", lambda k: (
        ["validate", _recipe_without(k, "max_len"), "-t", k.fast_profile], ["compress.json", "recipe.max_len"])),
    ("validate: compress.json cut short", lambda k: (
        ["validate", _compress_json(k, "{cut short"), "-t", k.fast_profile], ["compress.json", "not valid JSON"])),
    ("inspect: pocketformer.json format_version 0", lambda k: (
        ["inspect", k.edit_json(k.run() / "baseline" / "pocketformer.json", {"format_version": 0}).parents[1]],
        ["format_version"])),
    ("validate: artifacts.json records without format", lambda k: (
        ["validate", _old_artifacts_json(k), "-t", k.fast_profile], ["artifacts.json", "has no format"])),
])

NO_ARTIFACTS = cases("validate without artifacts", [
    ("run folder without artifacts/", lambda k: (["validate", _without(k.run(), "artifacts"), "-t", k.fast_profile],
                                                 ["no onnx artifact", "pocketformer export"])),
    ("folder without compress.json", lambda k: (["validate", k.folder("empty"), "-t", k.fast_profile],
                                                ["compress.json", "pocketformer compress"])),
])

WIDTHS = cases("extract widths", [
    ("not a number", lambda k: (_extract(k, "-w", "abc"), ["'abc'", "not a number"])),
    ("more widths than layers", lambda k: (_extract(k, "-w", "0.5,0.5,0.5"), ["3 widths", "2 layers"])),
    ("fraction above 1", lambda k: (_extract(k, "-w", "1.5"), ["1.5", "(0, 1]"])),
    ("a search on a checkpoint never nested", lambda k: (_extract(k, "-t", "host-ort"), ["not nested", "matformer"])),
])

OPTIONS = cases("option value", [
    ("export --static 0x128", lambda k: (["export", k.run(), "--static", "0x128"], ["0x128", "1x128"])),
    ("export --to unknown format", lambda k: (["export", k.run(), "--to", "nonsense-format"],
                                              ["nonsense-format", "onnx"])),
    ("validate --limit -1", lambda k: (["validate", k.run(), "--limit", "-1"], ["--limit"])),
    ("inspect --seq-len 0", lambda k: (["inspect", k.ckpt(), "--seq-len", "0"], ["--seq-len"])),
    ("extract --max-drop -1", lambda k: (_extract(k, "-w", "0.5", "--max-drop", "-1"), ["--max-drop", "0 or more"])),
    ("extract --confidence 1", lambda k: (_extract(k, "-w", "0.5", "--confidence", "1"), ["--confidence", "[0.5, 1)"])),
    ("extract --max-drop without data", lambda k: (_extract(k, "-w", "0.5", "--max-drop", "1"), ["--max-drop", "--data"])),
])

ALL = (MISSING + UNREADABLE + EMPTY + FILE_OR_FOLDER + CORRUPT + PICKLES + CONFIG_LIES + ARCHITECTURE + RECIPES
       + TARGETS + PROFILES + DATA + ARTIFACTS + OLD_RUN + NO_ARTIFACTS + WIDTHS + OPTIONS)


# -- the rule ---------------------------------------------------------------------------------------------------------

AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")


def run_forked(jobs: list[dict], folder: Path) -> list[int]:
    """Each job's exit code, its command run by forked_cli.py: a process per command, forked from one that has
    already imported torch and the CLI, as many at a time as there are cores."""
    (folder / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run([sys.executable, str(Path(__file__).parent / "forked_cli.py"), folder / "jobs.json",
                    folder / "codes.json", str(os.cpu_count() or 1)], check=True, timeout=900,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return json.loads((folder / "codes.json").read_text())


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, base_run, fast_profile) -> dict[Case, Any]:
    """case -> (its finished CLI process, the words its error line must contain), for every case this session
    selected. Inputs are built one case after another in this process; the commands then run in processes forked
    from one that has imported torch and the CLI (run_forked), as many at a time as there are cores.
    Unreadable-path cases, as root (which reads anything), are built in a world-writable folder and run as nobody."""
    chosen = [item.callspec.params["case"] for item in request.session.items
              if isinstance(getattr(getattr(item, "callspec", None), "params", {}).get("case"), Case)]
    public = Path(tempfile.mkdtemp(prefix="pocketformer-unreadable-")) if os.geteuid() == 0 else None
    if public is not None:
        public.chmod(0o755)
    as_nobody = None  # why the unreadable-path cases cannot run as nobody here, or None when they can
    if public is not None and not shutil.which("setpriv"):
        as_nobody = "running as root, and no setpriv to run the CLI as another user"
    elif public is not None and subprocess.run([*AS_NOBODY, sys.executable, "-c", "import pocketformer"],
                                               capture_output=True).returncode:
        as_nobody = ("running as root in a checkout another user cannot enter (`mktemp -d` makes a 0700 folder), so "
                     "the CLI cannot run as nobody: clone into a folder others can read to run these cases")
    results: dict[Case, Any] = {}
    jobs: dict[Case, tuple[dict, list[str]]] = {}
    for i, case in enumerate(chosen):
        folder, user = tmp_path_factory.mktemp("case"), {}
        if case.kind == "unreadable path" and public is not None:
            if as_nobody:
                results[case] = as_nobody
                continue
            folder, user = public / str(i), {"uid": NOBODY, "gid": NOBODY}
            folder.mkdir(mode=0o777)
            folder.chmod(0o777)
        try:
            args, mentions = case.make(Kit(folder, base_run, fast_profile))
        except Exception as e:  # reported by the case's own test
            results[case] = e
            continue
        env = {**os.environ, "POCKETFORMER_CACHE": str(folder / "cache"), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1"}
        out = tmp_path_factory.mktemp("out")
        jobs[case] = ({"args": [*map(str, args)], "env": env, "cwd": os.getcwd(),
                       "stdout": str(out / "stdout"), "stderr": str(out / "stderr"), **user}, mentions)
    codes = run_forked([job for job, _ in jobs.values()], tmp_path_factory.mktemp("forked"))
    for (case, (job, mentions)), code in zip(jobs.items(), codes):
        proc = subprocess.CompletedProcess(cli_command(*job["args"]), code, Path(job["stdout"]).read_text(),
                                           Path(job["stderr"]).read_text())
        results[case] = (proc, mentions)
    yield results
    if public is not None:
        for path in public.rglob("*"):
            path.chmod(path.stat().st_mode | stat.S_IRWXU)
        shutil.rmtree(public)


@pytest.mark.parametrize("case", ALL, ids=[f"{c.kind}: {c.name}" for c in ALL])
def test_bad_input_is_one_line_naming_the_problem_and_the_fix(case, outcomes):
    outcome = outcomes[case]
    if isinstance(outcome, str):
        pytest.skip(outcome)
    if isinstance(outcome, Exception):
        raise outcome
    proc, mentions = outcome
    assert_one_line_error(proc, *mentions)
    assert "Fix:" in proc.stderr or "--help" in proc.stderr


# -- --debug and the pickle trust flag ---------------------------------------------------------------------------------

def test_debug_shows_the_traceback_of_a_user_error(run_cli, tmp_path):
    proc = run_cli("--debug", "inspect", tmp_path / "absent")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "CheckpointError" in proc.stderr and "does not exist" in proc.stderr


def test_debug_shows_what_the_one_line_hid(run_cli, tmp_path):
    """A CheckpointError raised `from None` over a KeyError: --debug shows the KeyError too."""
    folder = Kit(tmp_path, None, None).hf_config(hidden_size=None)
    quiet, debug = run_cli("inspect", folder), run_cli("--debug", "inspect", folder)
    assert_one_line_error(quiet, "hidden_size")
    assert debug.returncode == 2 and "KeyError" in debug.stderr


def test_trusted_pickle_loads_through_weights_only(run_cli, tmp_path):
    folder = Kit(tmp_path, None, None).pickle_only()
    proc = run_cli("inspect", "--trust-pickle", folder)
    assert proc.returncode == 0, proc.stderr
    assert "text encoder" in proc.stdout and "2 layers" in proc.stdout


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_pickle_that_runs_code_is_refused_without_running_it_even_when_trusted(run_cli, tmp_path):
    marker = tmp_path / "pwned"
    folder = Kit(tmp_path, None, None).pickle_only(state={"w": RunsCode(marker)})
    assert_one_line_error(run_cli("inspect", "--trust-pickle", folder), "not a plain tensor pickle")
    assert not marker.exists()


def test_recipe_trust_pickle_lets_compress_read_a_pickle(run_cli, tmp_path):
    kit = Kit(tmp_path, None, None)
    folder = kit.pickle_only()
    recipe = kit.recipe(model=str(folder), data=str(kit.csv()), trust_pickle=True)
    proc = run_cli("compress", folder, "--recipe", recipe, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    prov = json.loads((tmp_path / "out" / "model" / "pocketformer.json").read_text())["provenance"]
    assert list(prov["input"]["source_files_sha256"]) == ["pytorch_model.bin"]
