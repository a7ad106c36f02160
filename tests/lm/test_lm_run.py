"""`pocketformer run` on a tiny random causal LM: import, export to ONNX, TFLite and CoreML, validate on each
runtime (perplexity paired with PyTorch's, greedy token match, prefill/decode tokens/s, memory, size) against
language-model budgets, and a report; a recipe that cannot run on a language model is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .tiny_lms import save_tiny_lm

PROFILES = {"ort": ("onnx", "onnxruntime", ["fp32"]), "litert": ("tflite", "litert", ["fp32", "fp16"]),
            "coreml": ("coreml", "coreml-mil-reference", ["fp32"])}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pocketformer.cli", *args], cwd=cwd, capture_output=True, text=True)


def run_recipe(folder: Path, recipe: dict) -> Path:
    """`pocketformer run` of `recipe` (written to folder/recipe.yaml) from `folder`, which must succeed; its run
    folder."""
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = cli("run", "recipe.yaml", cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "runs" / recipe["name"]


def write_profiles(folder: Path) -> list[str]:
    for name, (fmt, runtime, precisions) in PROFILES.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({
            "name": f"tiny-{name}", "format": fmt, "runtime": runtime, "threads": 1, "this_host": True,
            "language_models": {"precisions": precisions, "prompt_tokens": 24, "new_tokens": 16, "windows": 6,
                                "prefills": 6, "budgets": {"decode_ms": 40, "ttft_ms": 1000,
                                                           "perplexity_increase_pct": 10, "size_mb": 5}}}))
    return [f"{name}.yaml" for name in PROFILES]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-run")
    save_tiny_lm("llama", root / "tiny-llama")
    recipe = {"name": "tiny-lm", "model": "tiny-llama", "data": "botchan", "max_len": 32,
              "export": {"formats": ["onnx", "tflite", "coreml"], "baseline_formats": [], "int8": False},
              "targets": write_profiles(root)}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = cli("run", "recipe.yaml", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, root / "runs" / "tiny-lm", proc


def test_every_format_validated_on_its_runtime(run):
    root, out, _ = run
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "causal_lm"
    files = {(r["file"], r["target"]) for r in report["validation"]}
    assert files == {("model.fp32.onnx", "tiny-ort"), ("model.fp32.tflite", "tiny-litert"),
                     ("model.fp16.tflite", "tiny-litert"), ("model.fp32.mlpackage", "tiny-coreml")}
    for r in report["validation"]:
        assert r["reference_perplexity"] > 1 and r["windows"] == 6 and r["prompts"] == 2
        if r["precision"] in ("fp32", "fp16"):  # the same function: the same perplexity and greedy tokens
            assert r["perplexity_increase_pct"] == pytest.approx(0, abs=0.05), r
            assert r["token_match"] == 1.0 and r["first_divergence"] == 16
        if r["runtime"] == "coreml-mil-reference":  # no latency off macOS: those budgets cannot pass
            assert r["decode_tokens_per_s"] is None and r["budgets"]["decode_ms"]["verdict"] == "INCONCLUSIVE"
        else:
            assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
            assert r["decode_steps"] == 3 * 15 and r["prefills"] == 3 + 6
            assert set(r["budgets"]) == {"decode_ms", "ttft_ms", "perplexity_increase_pct", "size_mb"}


def test_the_report_has_the_language_model_table(run):
    _, out, proc = run
    md = (out / "report.md").read_text()
    assert "| file | target | runtime | threads | perplexity |" in md and "decode tok/s" in md
    assert "model.fp32.mlpackage" in md and (out / "pareto.png").is_file()
    assert "perplexity" in proc.stdout and "model.fp16.tflite" in proc.stdout
    assert (out / "artifacts" / "model.tokenizer" / "tokenizer.json").is_file()


def test_the_files_carry_the_card(run):
    _, out, _ = run
    from pocketformer.export import FORMATS

    for name, fmt in (("model.fp32.onnx", "onnx"), ("model.fp32.tflite", "tflite"), ("model.fp32.mlpackage", "coreml")):
        card = FORMATS[fmt].read_card(out / "artifacts" / name)
        assert card["task"] == "causal_lm" and card["tokenizer"]["kind"] == "bpe", (name, card)


@pytest.mark.parametrize("change,says", [
    ({"stages": [{"early_exit": {}}]}, "stage 'early_exit' does not run on decoder-only language models yet"),
    ({"stages": [{"prune": {"max_drop": 1.0, "importance": "accuracy"}}]},
     "prune's max_drop does not apply to a decoder-only language model"),
    ({"prepare": [{"finetune": {}}]}, "`prepare:` stages do not run on a decoder-only language model"),
    ({"data": "rotten_tomatoes"}, "is not text a language model is scored on"),
])
def test_a_recipe_that_cannot_run_on_a_language_model_is_one_line(run, change, says):
    root, _, _ = run
    recipe = {"name": "bad", "model": "tiny-llama", "data": "botchan", "max_len": 32, "export": {"formats": ["onnx"]},
              "targets": ["ort.yaml"], **change}
    (root / "bad.yaml").write_text(yaml.safe_dump(recipe))
    proc = cli("run", "bad.yaml", cwd=root)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["model.fp32.onnx", "model.fp32.tflite"])
def test_generate_streams_what_the_file_decodes(run, name):
    """`pocketformer generate` runs the shipped file with its own runtime and tokenizer: the continuation it
    prints is the greedy one PyTorch decodes for the same prompt."""
    import torch
    from tokenizers import Tokenizer

    from pocketformer.models import load

    root, out, _ = run
    prompt = "During my grammar school days, I was"
    proc = cli("generate", str(out / "artifacts" / name), "--prompt", prompt, "-n", "12", "--threads", "1", cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tok = Tokenizer.from_file(str(out / "artifacts" / "model.tokenizer" / "tokenizer.json"))
    model, _ = load(out / "model")
    ids = tok.encode(prompt, add_special_tokens=False).ids
    if model.spec.add_bos:
        ids = [model.spec.bos_token_id] + ids
    want = model.generate(torch.tensor([ids]), 12, eos=model.spec.eos_token_ids).tolist()
    assert proc.stdout == prompt + tok.decode(want) + "\n"
    assert f"{len(want)} tokens" in proc.stderr and "prefill of" in proc.stderr


def test_lint_says_what_a_language_model_file_bakes_in(run):
    root, out, _ = run
    art = out / "artifacts"
    proc = cli("lint", str(art / "model.fp32.tflite"), "-t", "android-litert", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kv-cache: 2 layers' caches of 128 slots each" in proc.stdout and "prefill takes 64 tokens" in proc.stdout
    assert "DYNAMIC_UPDATE_SLICE" in proc.stdout.split("delegate-ops:")[1].splitlines()[0]  # outside XNNPACK's list
    proc = cli("lint", str(art / "model.fp32.onnx"), "-t", "host-ort", cwd=root)
    assert proc.returncode == 0 and "ONNX Runtime GenAI / Optimum layout" in proc.stdout
    # Core ML states need iOS 18: an iOS 17 target is an error, an iOS 18 one is not
    proc = cli("lint", str(art / "model.fp32.mlpackage"), "-t", "iphone-coreml", cwd=root)
    assert proc.returncode == 1 and "coreml-states" in proc.stdout and "needs iOS18" in proc.stdout
    ios18 = yaml.safe_load((root / "coreml.yaml").read_text()) | {"deployment_target": "iOS18"}
    (root / "coreml18.yaml").write_text(yaml.safe_dump(ios18))
    proc = cli("lint", str(art / "model.fp32.mlpackage"), "-t", "coreml18.yaml", cwd=root)
    assert proc.returncode == 0 and "coreml-states" not in proc.stdout and "Core ML states" in proc.stdout
