"""The pipeline's steps for a decoder-only language model (pipeline.py hands over to these when the model, or the
run's compress.json, is one): compress (import, the stages that run on language models, save), the export
check's inputs (real test text through the cached graph), validation on a target (targets/lm_validate.py) and the
report. The data is a text corpus (pocketformer.text: wikipedia, botchan or a .txt file), split by document.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import DataError, RecipeError
from .models.causal import window_nll, window_perplexity
from .progress import info

KIND = "causal_lm"
CHECK_PAST = 16  # the export check: this many tokens already in the cache, the rest of a window new
CHECK_TOKENS = 64
TRAIN_WINDOWS = 512  # train text the stages may use (the most calibration windows a stage takes by default)


def is_lm(model) -> bool:
    return model.kind == KIND


def is_lm_run(meta: dict[str, Any]) -> bool:
    return meta.get("kind") == KIND


def corpus(data: str, split: str, seed: int):
    from .text import CORPORA, load_corpus

    if data not in CORPORA and not data.endswith(".txt"):
        raise DataError(f"Data {data!r} is not text a language model is scored on.",
                        f"use one of {', '.join(CORPORA)} (shipped offline) or a UTF-8 .txt file.")
    return load_corpus(data, split, seed)


def windows(model, folder: Path, data: str, split: str, seed: int, length: int, limit: int) -> list[list[int]]:
    """Token windows of `length` over the split's documents (each starting with BOS where the model adds one)."""
    from .models.lm_importers import tokenizer_of
    from .text import token_windows

    tok = tokenizer_of(folder)
    if tok is None:
        raise DataError(f"{folder} has no tokenizer.json to turn the text into token ids.",
                        "import the model from a folder or GGUF file that carries its tokenizer.")
    cfg = model.config
    bos = cfg.bos_token_id if cfg.add_bos else None
    out = token_windows(corpus(data, split, seed), lambda s: tok.encode(s, add_special_tokens=False).ids, length,
                        bos, limit)
    if not out:
        raise DataError(f"The {split} split of {data!r} has no window of 16 tokens or more.", "use more text.")
    return out


def describe(model, validation_perplexity: Optional[float] = None) -> dict[str, Any]:
    from .models.causal import decoder_macs

    from .compress.base import stored_bytes

    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "size_bytes": stored_bytes(model),
            "macs_prefill_128": decoder_macs(cfg, 128), "macs_decode_at_128": decoder_macs(cfg, 1, 128),
            "layers": [{"heads": s.heads, "kv_heads": s.kv_heads, "ffn": s.ffn, "window": s.window}
                       for s in cfg.layers],
            "family": cfg.family, "vocab_size": cfg.vocab_size, "context": cfg.max_positions,
            "validation_perplexity": validation_perplexity}


def compress(recipe, checkpoint: Path, out_dir: Path, model, provenance: dict[str, Any], data: str
             ) -> dict[str, Any]:
    """A language model's run: imported (with its parity check) and scored on the validation text as the
    baseline; the recipe's stages (those that declare they run on language models) compress a copy, scored on
    the same text, cached as every stage is. No `prepare:` stages: the imported model is the reference."""
    from .compress import Context
    from .models import save, source_folder
    from .models.io import weights_sha256
    from .stage_cache import run_stages
    from .store import COMPRESS_FILE, versions, write_json

    if recipe.prepare:
        raise RecipeError(f"Recipe {recipe.source_path or '<recipe>'}: `prepare:` stages do not run on a decoder-only "
                          "language model (the imported model is the reference).",
                          "move its stages under `stages:`, or remove `prepare:`.")
    recipe.check_model(model)
    stages = recipe.build("stages")
    folder = source_folder(checkpoint)
    val = windows(model, folder, data, "validation", recipe.seed, recipe.max_len, 16)
    ppl = window_perplexity(model, val)
    info(f"loaded {checkpoint}: {model.config.family} causal LM, {len(model.layers)} layers; validation "
         f"perplexity {ppl:.2f} on {sum(len(w) - 1 for w in val)} tokens of {data}")
    common = {"recipe": recipe.model_dump(), "recipe_sha256": recipe.digest(), "versions": versions(), "data": data,
              "input": {"path": str(Path(checkpoint).resolve()), **provenance}, "kind": KIND}
    compressed, reports, baseline_hash = model, [], weights_sha256(model)
    if stages:  # the stages work on a copy: the imported model is the teacher and the baseline, unchanged
        train = windows(model, folder, data, "train", recipe.seed, recipe.max_len, TRAIN_WINDOWS)
        target = next((t.name for t in recipe.target_refs()), None)
        ctx = Context(teacher=model.eval(), train=None, validation=None, encoder=None, seed=recipe.seed,
                      batch_size=recipe.batch_size, text={"train": train, "validation": val}, target=target,
                      latency_table=lambda t, f, prec, m: decode_tables(t or target, f, prec, m))
        measures = (lambda m: measure(m, recipe.max_len),
                    lambda m: {"validation_perplexity": window_perplexity(m, val)})
        compressed, reports, _ = run_stages(copy.deepcopy(model), stages, ctx, baseline_hash, recipe, folder,
                                            "compress", teacher_key=baseline_hash, measures=measures)
    save(model, out_dir / "baseline", {**common, "role": "baseline"}, tokenizer_dir=folder)
    save(compressed, out_dir / "model", {**common, "role": "compressed", "baseline_weights_sha256": baseline_hash},
         tokenizer_dir=folder)
    after = reports[-1]["validation_perplexity"] if reports else ppl  # the last stage scored the model
    summary = {**common, "prepare": [], "stages": reports, "baseline": describe(model, ppl),
               "model": describe(compressed, after)}
    write_json(out_dir / COMPRESS_FILE, summary)
    return summary


def measure(model, length: int) -> dict[str, Any]:
    """What a stage report measures of a language model: parameters, bytes, prefill MACs at `length` tokens and
    the layers' shapes."""
    from .models.causal import decoder_macs

    d = describe(model)
    return {"params": d["params"], "size_bytes": d["size_bytes"], "macs": decoder_macs(model.config, length),
            "layers": d["layers"]}


def check_inputs(model, folder: Path, data: str, seed: int) -> tuple[torch.Tensor, ...]:
    """The export check's inputs: two test windows through the cached graph, CHECK_PAST tokens already cached."""
    wins = windows(model, folder, data, "test", seed, CHECK_TOKENS, 2)
    n = min(len(w) for w in wins)
    ids = torch.tensor([w[:n] for w in (wins * 2)[:2]])
    return model.graph_inputs(ids, min(CHECK_PAST, n // 2))


def reference(model, folder: Path, data: str, seed: int, length: int, lm, limit: int = 0):
    """The uncompressed model's perplexity windows and greedy continuations (targets/lm_validate.LMReference)."""
    from .targets.lm_validate import LMReference

    count = limit or lm.windows
    wins = windows(model, folder, data, "test", seed, length, max(count, lm.prompts))
    nll, counts = window_nll(model.eval(), wins[:count])
    prompts = [w[: max(8, min(len(w), lm.prompt_tokens) // 2)] for w in wins[:lm.prompts]]
    greedy = [model.generate(torch.tensor([p]), lm.new_tokens).tolist() for p in prompts]
    return LMReference(wins[:count], nll, counts, prompts, greedy)


def validate(out_dir: Path, profile, records: list[dict[str, Any]], meta: dict[str, Any], data: Optional[str],
             limit: int) -> list[dict[str, Any]]:
    from .errors import TargetError
    from .models import load
    from .targets.lm_validate import validate_lm

    lm = profile.language_models
    if lm is None:
        raise TargetError(f"Target {profile.name} has no language_models settings to validate a language model by.",
                          "validate on a target whose profile has them (see `pocketformer targets`), or add them.")
    recipe = meta["recipe"]
    reference_model, _ = load(out_dir / "baseline")
    ref = reference(reference_model, out_dir / "baseline", data or meta["data"], recipe["seed"], recipe["max_len"],
                    lm, limit)
    records = [r for r in records if r["precision"] in lm.precisions]
    info(f"validate on {profile.name}: {profile.description} ({len(ref.windows)} test windows of "
         f"{recipe['max_len']} tokens, {lm.prompts} greedy continuations of {lm.new_tokens} tokens)")
    rows = []
    for r in records:
        row = validate_lm(out_dir / "artifacts" / r["file"], r, profile, ref)
        row["data"] = data or meta["data"]
        rows.append(row)
        info(row_line(row))
    return rows


def row_line(row: dict[str, Any]) -> str:
    """One validated language-model file: what was measured, then each budget's verdict."""
    from .verdict import check_line

    speed = (f"prefill {row['prefill_tokens_per_s']:.0f} tok/s at {row['prompt_tokens']}, TTFT {row['ttft_ms']:.0f} "
             f"ms, decode {row['decode_tokens_per_s']:.1f} tok/s, peak RSS {row['peak_rss_mb']:.0f} MB"
             if row.get("decode_tokens_per_s") else f"no latency ({row['execution']})")
    checks = "".join(f"\n        {check_line(name, c)}" for name, c in row["budgets"].items())
    return (f"    {row['file']}: perplexity {row['perplexity']:.2f} ({row['perplexity_increase_pct']:+.2f}%), token "
            f"match {row['token_match'] * 100:.1f}%, {speed}, {row['size_mb']:.1f} MB -> {row['verdict']}{checks}")



def decode_tables(stage_target: Optional[str], table_file: Optional[str], precision: Optional[str], model):
    """Context.latency_table for a language model's run: (target, its decode table at the precision, else its
    language models' first), measured on the target's runtime here and cached (targets/lm_latency.py)."""
    from .errors import TargetError
    from .targets import get_profile
    from .targets.lm_latency import lm_tables_for

    profile = get_profile(stage_target)
    lm = profile.language_models
    if lm is None:
        raise TargetError(f"Target {profile.name} validates no language models (its profile has no "
                          "`language_models:`).", "prune to a target that does (`pocketformer targets`).")
    if table_file:
        raise RecipeError("prune's table is an encoder table file; a language model's decode table is measured on "
                          "the target here.", "leave out table.")
    precision = precision or lm.precisions[0]
    if precision not in lm.precisions:
        raise TargetError(f"Target {profile.name} runs {', '.join(lm.precisions)} language-model files, not "
                          f"{precision}.", f"set prune's precision to one of {', '.join(lm.precisions)}.")
    return profile.name, lm_tables_for(profile, model.config, precision)["decode"]
