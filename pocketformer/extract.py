"""Extract sub-models from a nested (MatFormer) checkpoint: one trained checkpoint, a family of exported models.

- `extract(model, widths)`: the sub-model keeping the first `widths[i]` FFN neurons of layer i (Mix'n'Match), as a
  plain dense canonical model.
- `parse_widths(spec, layer_widths)`: "0.5" for every layer, or "1,0.5,0.25,..." one per layer; fractions (written
  with a decimal point, or 1) or neuron counts (other whole numbers). Fractions round as the nested training did.
- `search(model, profile, ...)`: the per-layer widths, from the nested set, that best meet a target's latency or size
  budget. Every candidate is exported to the profile's format and measured on its runtime (latency in a fresh
  process, size of the file). Bounded: uniform widths from the widest down until one fits, then, between the widest
  that fits and the next wider one, a greedy Mix'n'Match walk that narrows one layer at a time (the layer whose
  narrowing costs the least validation accuracy, or without data the fewest neurons) until the budget is met: at
  most (fractions + layers - 1) exports. `search_lm` does the same for a nested language model's decode budget on
  the target's decode table (predicted, not exported), with the walk's order scored once (perplexity costs seconds).
- `confirm(sub, reference, test, encoder, ...)`: what a choice is worth on data it never saw. The widths are chosen
  on validation examples, so the chosen model's validation quality is optimistic; its accuracy drop against the
  reference on the test split, paired, with its interval at a stated confidence, is the honest one, and a verdict
  against an accuracy budget (pocketformer.verdict). The drop on the examples the choice was made on is kept beside
  it, to compare.
- `run_extract(...)`: the `pocketformer extract` command's I/O: load, choose, extract, save with provenance.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .compress.matformer import nested_width
from .data import Dataset, Encoder, load_dataset
from .errors import PocketformerError, TargetError
from .models.canonical import CanonicalTransformer, count_params
from .progress import info
from .store import COMPRESS_FILE, output_folder, read_compress
from .train import evaluate, predict
from .verdict import DEFAULT_CONFIDENCE, PairedDrop, accuracy_check, paired_drop

# Validation examples each candidate is scored on during a search: enough to rank widths, few enough to score
# a dozen candidates in PyTorch quickly.
SEARCH_EXAMPLES = 512


class ExtractError(PocketformerError):
    """A sub-model cannot be extracted as asked: malformed or out-of-range widths, conflicting options, a search on
    a checkpoint that was never nested, or a budget no nested width meets."""


# -- widths ---------------------------------------------------------------------------------------------------------

def layer_widths(model: CanonicalTransformer) -> list[int]:
    return [layer.ffn.width for layer in model.layers]


def nested_choices(model: CanonicalTransformer) -> list[list[int]]:
    """Per layer, its width at each nested fraction (widest first), as the matformer stage trained them."""
    fractions = sorted(model.spec.nested_ffn, reverse=True)
    if not fractions:
        raise ExtractError("This checkpoint's FFNs are not nested (no nested_ffn in its pocketformer.json), so no "
                           "width search is meaningful.",
                           "compress it with a recipe that has the matformer stage first, or pass --widths to cut "
                           "plain prefixes.")
    return [[nested_width(w, f) for f in fractions] for w in layer_widths(model)]


def _parse_one(text: str, width: int, layer: int) -> int:
    try:
        value = float(text)
    except ValueError:
        raise ExtractError(f"Width {text!r} (layer {layer}) is not a number.",
                           "write a fraction such as 0.5 or a neuron count such as 384.") from None
    is_fraction = "." in text or value == 1
    if is_fraction:
        if not 0 < value <= 1:
            raise ExtractError(f"Width fraction {text} (layer {layer}) is outside (0, 1].",
                               "write a fraction such as 0.5, or a neuron count.")
        return nested_width(width, value)
    if value != int(value) or not 1 <= value <= width:
        raise ExtractError(f"Width {text} (layer {layer}) is outside layer {layer}'s 1..{width} neurons.",
                           f"give at most {width} neurons for that layer, or a fraction such as 0.5.")
    return int(value)


def parse_widths(spec: str, widths: list[int]) -> list[int]:
    """Neuron counts per layer from "F" (every layer) or "F1,F2,..." (one per layer), given each layer's width."""
    parts = [p.strip() for p in str(spec).split(",")]
    if len(parts) == 1:
        parts = parts * len(widths)
    if len(parts) != len(widths):
        raise ExtractError(f"--widths {spec!r} gives {len(parts)} widths but the model has {len(widths)} layers.",
                           f"give one width for every layer, or {len(widths)} comma-separated widths.")
    return [_parse_one(p, w, i) for i, (p, w) in enumerate(zip(parts, widths))]


# -- extraction -----------------------------------------------------------------------------------------------------

def extract(model: CanonicalTransformer, widths: list[int]) -> CanonicalTransformer:
    """A copy keeping the first widths[i] FFN neurons of layer i: exactly the prefix the nested model runs."""
    full = layer_widths(model)
    if len(widths) != len(full):
        raise ExtractError(f"{len(widths)} widths given for a model of {len(full)} layers.",
                           "give one width per layer.")
    for i, (w, f) in enumerate(zip(widths, full)):
        if not 1 <= w <= f:
            raise ExtractError(f"Width {w} for layer {i} is outside its 1..{f} neurons.",
                               f"give at most {f} neurons for layer {i}.")
    sub = copy.deepcopy(model).eval()
    for i, w in enumerate(widths):
        sub.layers[i].ffn.active_width = None
        if w < full[i]:
            sub.keep_neurons(i, list(range(w)))
    # The fractions described the source's widths; the extracted model's provenance keeps them.
    sub.spec.nested_ffn = []
    return sub


# -- scoring and measuring candidates -------------------------------------------------------------------------------

def quality_scorer(model: CanonicalTransformer, validation: Optional[Dataset],
                   encoder: Optional[Encoder]) -> tuple[str, Callable[[list[int]], float]]:
    """(name, score(widths)), higher is better: the task's validation quality (accuracy % of a classifier, mean
    cosine x100 with the full model's embeddings for an embedding model), or without data the share of FFN neurons
    kept (%)."""
    total = sum(layer_widths(model))
    if validation is None:
        return "ffn_kept_pct", lambda widths: 100.0 * sum(widths) / max(1, total)
    key = model.task.quality_key
    reference = predict(model, validation, encoder).numpy()
    return f"validation_{key}", lambda widths: evaluate(extract(model, widths), validation, encoder, reference)[key]


def example_inputs(model: CanonicalTransformer, validation: Optional[Dataset], encoder: Optional[Encoder],
                   seq_len: int, n: int = 8) -> tuple[torch.Tensor, ...]:
    """Inputs to export and check candidates with: validation examples, or deterministic random ones."""
    if validation is not None:
        return encoder.encode(validation, np.arange(min(n, len(validation))))
    from .models.importers import parity_inputs

    return parity_inputs(model.spec, batch=n, seq=seq_len)


def artifact_measurer(profile, inputs: tuple[torch.Tensor, ...], precision: str, latency: bool):
    """measure(model) -> {size_mb[, latency_p50_ms, latency_p90_ms]}: export to the profile's format in a temporary
    folder and measure the `precision` file (latency on the profile's runtime, threads and shapes)."""
    from .export import export
    from .export.base import artifact_size, repeat_rows
    from .targets import runtime_of, static_shape
    from .targets.validate import measure_latency

    runtime = runtime_of(profile)
    if latency and not runtime.measures_latency:
        raise TargetError(f"{profile.runtime} cannot measure latency on this machine, so target {profile.name} "
                          "cannot be searched by latency.", "search by --size-mb, or use a target whose runtime "
                          "runs here.")
    static = static_shape(profile)

    def measure(model: CanonicalTransformer) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            records = export(model, Path(tmp), "candidate", inputs, profile.format, runtime,
                             int8=precision.startswith("int8"), static_shape=static, kinds={None})
            record = next((r for r in records if r["precision"] == precision), None)
            if record is None:
                raise TargetError(f"The {profile.format} exporter writes no {precision} file.",
                                  f"choose one of {', '.join(r['precision'] for r in records)}.")
            path = Path(tmp) / record["file"]
            row: dict[str, Any] = {"size_mb": artifact_size(path) / 1e6}
            if latency:
                sizes = {"batch": profile.batch, "sequence": profile.seq_len}
                feeds = tuple(repeat_rows(t, profile.batch) for t in model.io.fit(inputs, sizes))
                timing = measure_latency(path, profile, {n: t.numpy() for n, t in zip(model.input_names, feeds)})
                row.update({k: timing[k] for k in ("latency_p50_ms", "latency_p90_ms")})
            return row

    return measure


# -- the search -----------------------------------------------------------------------------------------------------

def choose_widths(choices: list[list[int]], labels: list[str], measure: Callable[[list[int]], dict[str, Any]],
                  fits: Callable[[dict[str, Any]], bool], score: Callable[[list[int]], float],
                  rescore: bool = True) -> tuple[Optional[list[int]], list[dict[str, Any]]]:
    """The bounded search over per-layer widths. `choices[i]`: layer i's widths, widest first, one per fraction
    (`labels`); measure(widths) -> costs; fits(costs) -> within budget; score(widths) -> quality (higher better).
    The Mix'n'Match walk narrows, at each step, the layer whose narrowing costs the least quality: with `rescore`,
    scored again from the current mix at every step (up to L^2/2 scores for L layers, which lets layers' narrowings
    interact); without, ranked once from the wider uniform (L scores), for a score that costs seconds (a language
    model's perplexity: SmolLM2's 30 layers are 30 scores instead of up to 435).
    Returns (the best-scoring widths that fit, or None; every candidate measured, in order)."""
    log: list[dict[str, Any]] = []
    scores: dict[tuple[int, ...], float] = {}

    def score_of(widths: list[int]) -> float:
        key = tuple(widths)
        if key not in scores:
            scores[key] = score(list(widths))
        return scores[key]

    def try_candidate(widths: list[int], kind: str) -> bool:
        costs = measure(list(widths))
        row = {"kind": kind, "widths": list(widths), **costs, "score": score_of(widths), "fits": fits(costs)}
        log.append(row)
        info(f"extract search: {kind} {row['widths']}: "
             + ", ".join(f"{k} {v:.4g}" for k, v in costs.items() if isinstance(v, float))
             + f", score {row['score']:.4g} -> {'fits' if row['fits'] else 'over budget'}")
        return row["fits"]

    levels = max(len(c) for c in choices)
    uniform = [[c[min(k, len(c) - 1)] for c in choices] for k in range(levels)]
    first_fit = None
    for k, widths in enumerate(uniform):
        if k and widths == uniform[k - 1]:
            continue  # fractions that round to the same widths in every layer
        if try_candidate(widths, f"uniform {labels[k]}"):
            first_fit = k
            break
    if first_fit is None:
        return None, log
    if first_fit > 0:
        # Mix'n'Match between the next wider uniform (over budget) and the widest uniform that fits: narrow one layer
        # at a time, the one costing the least quality, until the budget is met.
        wider = next(w for w in reversed(uniform[:first_fit]) if w != uniform[first_fit])
        narrow = uniform[first_fit]
        current = list(wider)

        def cheapest(layers: list[int]) -> list[int]:
            """`layers` by what narrowing each alone (from the current mix) costs, least first; ties go to the layer
            nearest the output: an arbitrary but fixed order."""
            return sorted(layers, key=lambda i: (score_of(current[:i] + [narrow[i]] + current[i + 1:]), i),
                          reverse=True)

        order = cheapest([i for i in range(len(current)) if current[i] != narrow[i]])
        while len(order) > 1:  # narrowing the last one gives the uniform candidate already measured
            current[order[0]] = narrow[order[0]]
            if try_candidate(current, "mix'n'match"):
                break
            order = cheapest(order[1:]) if rescore else order[1:]
    fitting = [r for r in log if r["fits"]]
    best_row = max(fitting, key=lambda r: (r["score"], sum(r["widths"])))
    return list(best_row["widths"]), log


def search(model: CanonicalTransformer, profile, *, latency_ms: Optional[float] = None,
           size_mb: Optional[float] = None, validation: Optional[Dataset] = None, encoder: Optional[Encoder] = None,
           precision: Optional[str] = None) -> dict[str, Any]:
    """Per-layer widths of a nested model that meet `profile`'s latency (ms, p50) and/or size (MB) budget, scored by
    validation quality (see quality_scorer). Budgets default to the profile's. Returns the chosen widths (None if
    no candidate fits), the budget, and every candidate measured."""
    choices = nested_choices(model)
    if latency_ms is None and size_mb is None:
        latency_ms, size_mb = profile.budgets.latency_ms, profile.budgets.size_mb
    if latency_ms is None and size_mb is None:
        raise ExtractError(f"Target {profile.name} has no latency or size budget to search for.",
                           "pass --latency-ms or --size-mb.")
    precision = precision or profile.precisions[0]
    if validation is not None:
        validation = validation.head(SEARCH_EXAMPLES)
    score_name, score = quality_scorer(model, validation, encoder)
    inputs = example_inputs(model, validation, encoder, profile.seq_len)
    measure_artifact = artifact_measurer(profile, inputs, precision, latency=latency_ms is not None)

    def fits(costs: dict[str, Any]) -> bool:
        return ((latency_ms is None or costs["latency_p50_ms"] <= latency_ms)
                and (size_mb is None or costs["size_mb"] <= size_mb))

    budget = {k: v for k, v in (("latency_ms", latency_ms), ("size_mb", size_mb)) if v is not None}
    info(f"extract search on {profile.name} ({profile.format} {precision}, {profile.runtime}, {profile.threads} "
         f"threads, {profile.batch}x{profile.seq_len}): budget "
         + ", ".join(f"{k} <= {v:g}" for k, v in budget.items()) + f"; score {score_name}")
    fractions = sorted(model.spec.nested_ffn, reverse=True)
    chosen, log = choose_widths(choices, [f"{f:g}" for f in fractions],
                                lambda widths: measure_artifact(extract(model, widths)), fits, score)
    return {"target": profile.name, "format": profile.format, "runtime": profile.runtime, "precision": precision,
            "threads": profile.threads, "shape": [profile.batch, profile.seq_len], "budget": budget,
            "score": score_name, "widths": chosen, "candidates": log}


# -- confirmation on held-out data ---------------------------------------------------------------------------------

def held_out_quality(sub: CanonicalTransformer, reference: CanonicalTransformer, ds: Dataset, encoder: Encoder,
                     confidence: float) -> dict[str, Any]:
    """The sub-model against the reference on `ds`: a classifier's paired accuracy drop (points) with its interval
    at `confidence`, or an embedding model's mean cosine with the reference's embeddings."""
    task = sub.task
    ref_out, out = predict(reference, ds, encoder).numpy(), predict(sub, ds, encoder).numpy()
    row: dict[str, Any] = {"split": ds.split, "examples": len(ds)}
    if not task.has_labels:
        return {**row, "cosine": task.agreement(out, ref_out)}
    ref_ok, ok = task.correct(ref_out, ds.labels), task.correct(out, ds.labels)
    drop = paired_drop(ref_ok, ok, confidence)
    return {**row, "accuracy": float(ok.mean() * 100), "reference_accuracy": float(ref_ok.mean() * 100),
            "drop": drop.drop, "interval": list(drop.interval), "lost": drop.lost, "gained": drop.gained}


def confirm(sub: CanonicalTransformer, reference: CanonicalTransformer, test: Dataset, encoder: Encoder, *,
            budget: Optional[float] = None, confidence: float = DEFAULT_CONFIDENCE,
            search_split: Optional[Dataset] = None) -> dict[str, Any]:
    """The chosen sub-model on `test`, data its choice never saw (held_out_quality), with a PASS / FAIL /
    INCONCLUSIVE verdict when it is a classifier and there is an accuracy `budget` (points of drop); and the same
    measure on `search_split`, the examples it was chosen on."""
    record = held_out_quality(sub, reference, test, encoder, confidence)
    labelled = "drop" in record
    record.update({"confidence": confidence if labelled else None, "budget": budget if labelled else None,
                   "verdict": None})
    if labelled and budget is not None:
        check = accuracy_check(PairedDrop(record["examples"], record["lost"], record["gained"], confidence),
                               budget)
        record["verdict"] = check.verdict
        record.update({k: check.detail[k] for k in ("examples_needed", "reason") if k in check.detail})
    record["search_split"] = None if search_split is None else \
        held_out_quality(sub, reference, search_split, encoder, confidence)
    return record


def confirmation_line(c: dict[str, Any]) -> str:
    """A confirmation (confirm, plus its reference) as one line: the held-out measure and verdict, then the same
    measure on the examples the widths were chosen on."""
    if "skipped" in c:
        return f"extract: not confirmed on held-out data: {c['skipped']}"
    if "drop" in c:
        low, high = c["interval"]
        what = f"drop {c['drop']:+.2f} pts ({c['confidence']:.0%} interval {low:+.2f}..{high:+.2f})"
        what += " (no accuracy budget)" if c["budget"] is None else \
            f" vs budget {c['budget']:g} -> {c['verdict']}" + (f" ({c['reason']})" if c.get("reason") else "")
    else:
        what = f"mean cosine with the reference's embeddings {c['cosine']:.4f} (no labels, so no accuracy verdict)"
    s = c["search_split"]
    tail = "" if s is None else f"; on the {s['examples']} {s['split']} examples it was chosen on: " \
        + (f"{s['drop']:+.2f}" if "drop" in s else f"{s['cosine']:.4f}")
    return f"extract: confirmed on {c['examples']} {c['split']} examples against the {c['reference']}: {what}{tail}"


# -- the command ----------------------------------------------------------------------------------------------------

def _source_record(model, folder: Path, source_provenance: dict[str, Any]) -> dict[str, Any]:
    """What an extracted model records of the checkpoint it was cut from."""
    from .models.io import weights_sha256

    return {"role": "extracted", "source": str(folder.resolve()), "source_weights_sha256": weights_sha256(model),
            "source_nested_ffn": list(model.spec.nested_ffn), "source_role": source_provenance.get("role"),
            "source_ffn_widths": layer_widths(model)}


def _given_widths(model, widths: str, folder: Path) -> list[int]:
    """`--widths` as neuron counts per layer, with a word when the source was never trained nested."""
    chosen = parse_widths(widths, layer_widths(model))
    if not model.spec.nested_ffn:
        info(f"extract: {folder} was not trained nested (no matformer stage): its FFN prefixes are the first "
             "neurons by position, not the best ones")
    return chosen


def _reference(source: Path, folder: Path, model, run_summary: dict[str, Any], trust_pickle: bool):
    """What an extracted model is confirmed against, as `pocketformer validate` budgets: the run's uncompressed
    model (its baseline/), else the source itself at full width. (model, folder, name)."""
    from .models import load_any

    reference_dir = Path(source) / "baseline"
    if run_summary and reference_dir.is_dir():
        return load_any(reference_dir, trust_pickle=trust_pickle)[0], reference_dir, "baseline"
    return model, folder, "source at full width"


def _run_extract_lm(model, source: Path, folder: Path, out: Path, source_provenance: dict[str, Any],
                    run_summary: dict[str, Any], widths: Optional[str], profile, data: Optional[str],
                    latency_ms: Optional[float], size_mb: Optional[float]) -> dict[str, Any]:
    """`extract` on a nested language model: the widths given, or searched for `profile`'s decode budget on its
    measured decode table (Mix'n'Match, scored by validation perplexity); the sub-model cut out, its perplexity on
    the test text against the run's baseline (else the source at full width), paired window by window."""
    from . import lm_pipeline
    from .models.causal import window_nll
    from .models.io import save
    from .targets.lm_validate import LMReference, perplexity_check

    search_record = None
    if profile is not None:
        search_record = search_lm(model, profile, folder, run_summary, data, latency_ms, size_mb)
        if search_record["widths"] is None:
            raise ExtractError(f"No nested width meets {profile.name}'s decode budget ({search_record['budget']}); "
                               f"the narrowest is predicted at {search_record['candidates'][-1]['decode_ms']:.2f} ms "
                               "a token.", "raise --latency-ms, or train narrower widths (matformer's widths).")
        chosen = search_record["widths"]
    else:
        chosen = _given_widths(model, widths, folder)
    sub = extract(model, chosen)
    provenance = {**_source_record(model, folder, source_provenance), "widths_spec": widths, "widths": chosen,
                  "params": count_params(sub), "source_params": count_params(model), "kind": lm_pipeline.KIND}
    if search_record is not None:
        provenance["search"] = search_record
    if data:
        recipe = run_summary.get("recipe", {})
        reference, reference_dir, name = _reference(source, folder, model, run_summary, False)
        wins = lm_pipeline.windows(sub, folder, data, "test", recipe.get("seed", 0), recipe.get("max_len", 128), 24)
        nll, counts = window_nll(sub.eval(), wins)
        ref = LMReference(wins, window_nll(reference.eval(), wins)[0], counts, [], [])
        ppl = math.exp(nll.sum() / counts.sum())
        check = perplexity_check(ref, nll, math.inf, DEFAULT_CONFIDENCE)  # no budget: measured, not judged
        provenance["confirmation"] = {
            "reference": name, "reference_path": str(Path(reference_dir).resolve()), "split": "test",
            "windows": len(wins), "tokens": int(counts.sum()), "perplexity": ppl,
            "reference_perplexity": ref.perplexity, "perplexity_increase_pct": check.value,
            "interval_pct": [check.low, check.high], "confidence": DEFAULT_CONFIDENCE}
        interval = "no interval from one window" if check.low is None else \
            f"{DEFAULT_CONFIDENCE:.0%} interval {check.low:+.2f}..{check.high:+.2f}"
        info(f"extract: test perplexity {ppl:.2f} against the {name}'s {ref.perplexity:.2f}: {check.value:+.2f}% "
             f"({interval}) on {int(counts.sum()):,} tokens of {data}")
    else:
        provenance["confirmation"] = {"skipped": "no data (pass --data, or extract from a run folder)"}
        info(confirmation_line(provenance["confirmation"]))
    save(sub, out, provenance, tokenizer_dir=folder)
    return provenance


def search_lm(model, profile, folder: Path, run_summary: dict[str, Any], data: Optional[str],
              latency_ms: Optional[float], size_mb: Optional[float]) -> dict[str, Any]:
    """Per-layer FFN widths of a nested language model whose decode step `profile`'s decode table predicts within
    `latency_ms` (default: the profile's decode_ms budget), the best by validation perplexity (Mix'n'Match between
    uniform widths, as choose_widths does for encoders)."""
    from . import lm_pipeline
    from .models.causal import window_nll
    from .latency import lm_units
    from .targets.lm_latency import lm_tables_for

    lm = profile.language_models
    if lm is None:
        raise ExtractError(f"Target {profile.name} validates no language models (its profile has no "
                           "`language_models:`).", "choose a target that does (`pocketformer targets`).")
    if size_mb is not None:
        raise ExtractError("A language model's widths are searched for a decode budget.", "pass --latency-ms.")
    latency_ms = latency_ms if latency_ms is not None else lm.budgets.decode_ms
    if latency_ms is None:
        raise ExtractError(f"Target {profile.name} has no decode budget to search for.", "pass --latency-ms.")
    if not data:
        raise ExtractError(f"Widths are scored by validation perplexity, and there is no text for {folder}.",
                           "pass --data, or extract from a run folder (its recipe names the data).")
    choices = nested_choices(model)
    precision = lm.precisions[0]
    tables = lm_tables_for(profile, model.config, precision)
    recipe = run_summary.get("recipe", {})
    windows = lm_pipeline.windows(model, folder, data, "validation", recipe.get("seed", 0),
                                  recipe.get("max_len", 128), 16)

    def measure(widths: list[int]) -> dict[str, Any]:
        spec = model.config.model_copy(update={"layers": [s.model_copy(update={"ffn": w}) for s, w in
                                                        zip(model.config.layers, widths)]})
        return {f"{m}_ms": tables[m].predict(lm_units(spec)) for m in ("decode", "prefill")}

    def score(widths: list[int]) -> float:
        with torch.no_grad():
            nll, counts = window_nll(extract(model, widths), windows)
        return -float(nll.sum() / counts.sum())  # higher is better: minus the mean NLL per token

    narrowest = measure([c[-1] for c in choices])["decode_ms"]  # a prediction: known before anything is scored
    if narrowest > latency_ms:
        raise ExtractError(f"No nested width meets {profile.name}'s decode budget of {latency_ms:g} ms: the "
                           f"narrowest is predicted at {narrowest:.2f} ms a token.",
                           "raise --latency-ms, or train narrower widths (matformer's widths).")
    info(f"extract search on {profile.name} ({profile.format} {precision}, {profile.runtime}, {profile.threads} "
         f"threads, decode after {lm.prompt_tokens} tokens, predicted by its decode table): budget decode_ms <= "
         f"{latency_ms:g}; score minus validation NLL per token")
    fractions = sorted(model.spec.nested_ffn, reverse=True)
    chosen, log = choose_widths(choices, [f"{f:g}" for f in fractions], measure,
                                lambda costs: costs["decode_ms"] <= latency_ms, score, rescore=False)
    return {"target": profile.name, "format": profile.format, "runtime": profile.runtime, "precision": precision,
            "threads": profile.threads, "prompt_tokens": lm.prompt_tokens, "budget": {"decode_ms": latency_ms},
            "predicted_by": {m: t.digest for m, t in tables.items()}, "score": "-validation NLL per token",
            "widths": chosen, "candidates": log}


def resolve_source(path: Path) -> tuple[Path, dict[str, Any]]:
    """A run folder means its model/ (and its compress.json: data, max_len); anything else is the checkpoint."""
    path = Path(path)
    if (path / COMPRESS_FILE).is_file():
        return path / "model", read_compress(path)
    return path, {}


def run_extract(source: Path, out: Path, *, widths: Optional[str] = None, target: Optional[str] = None,
                latency_ms: Optional[float] = None, size_mb: Optional[float] = None, data: Optional[str] = None,
                precision: Optional[str] = None, max_drop: Optional[float] = None,
                confidence: Optional[float] = None, trust_pickle: bool = False) -> dict[str, Any]:
    """Load a (nested) checkpoint or run folder, choose widths (given, or searched on a target), confirm the choice
    on the test split (confirm) against the run's baseline/ (else the source at full width), save the plain dense
    sub-model to `out` with provenance; return that provenance. The accuracy budget is `max_drop`, else the target's;
    the confidence `confidence`, else the target's, else DEFAULT_CONFIDENCE."""
    from .models import load_any
    from .models.io import save
    from .targets import get_profile

    if (widths is None) == (target is None):
        raise ExtractError("Say which sub-model to extract: either --widths, or --target (with an optional "
                           "--latency-ms or --size-mb budget), not both or neither.",
                           'e.g. --widths 0.5, or --target host-ort --latency-ms 20.')
    if target is None and (latency_ms is not None or size_mb is not None):
        raise ExtractError("--latency-ms and --size-mb are budgets on a target.", "add --target NAME.")
    if latency_ms is not None and size_mb is not None:
        raise ExtractError("Search for one budget at a time.", "pass either --latency-ms or --size-mb.")
    if max_drop is not None and not max_drop >= 0:
        raise ExtractError(f"--max-drop {max_drop:g} is not a drop: it is the accuracy points the sub-model may "
                           "lose.", "give 0 or more, e.g. --max-drop 1.5.")
    if confidence is not None and not 0.5 <= confidence < 1:
        raise ExtractError(f"--confidence {confidence:g} is outside [0.5, 1).", "give e.g. 0.95 for 95%.")
    output_folder(out, "Output checkpoint")
    folder, run_summary = resolve_source(source)
    data = data or run_summary.get("data")
    if max_drop is not None and not data:
        raise ExtractError(f"--max-drop is checked on the test split, and there is no data for {folder}.",
                           "pass --data, or extract from a run folder (its recipe names the data).")
    profile = get_profile(target) if target is not None else None
    budget = max_drop if max_drop is not None else profile.budgets.accuracy_drop if profile else None
    if confidence is None:
        confidence = profile.budgets.confidence if profile else DEFAULT_CONFIDENCE
    model, source_provenance = load_any(folder, trust_pickle=trust_pickle)
    if model.kind == "causal_lm":
        return _run_extract_lm(model, source, folder, out, source_provenance, run_summary, widths, profile, data,
                               latency_ms, size_mb)
    if max_drop is not None and not model.task.has_labels:
        raise ExtractError(f"The model in {folder} is a {model.task.name} model: it has no accuracy to drop.",
                           "leave out --max-drop: its test-split cosine with the reference is reported instead.")
    recipe = run_summary.get("recipe", {})
    max_len = recipe.get("max_len", 128)
    seed = recipe.get("seed", 0)

    def split(name: str) -> Dataset:
        return load_dataset(data, name, seed).for_model(model.spec.modality, model.spec.head.labels,
                                                        f"The model in {folder}")

    validation = split("validation") if data else None
    encoder = Encoder(folder, max_len) if data else None
    provenance = _source_record(model, folder, source_provenance)
    if widths is not None:
        chosen = _given_widths(model, widths, folder)
        provenance["widths_spec"] = widths
    else:
        result = search(model, profile, latency_ms=latency_ms, size_mb=size_mb, validation=validation,
                        encoder=encoder, precision=precision)
        provenance["search"] = result
        if result["widths"] is None:
            narrowest = result["candidates"][-1]
            costs = ", ".join(f"{k} {narrowest[k]:.3g}" for k in ("latency_p50_ms", "size_mb") if k in narrowest)
            raise ExtractError(f"No nested width meets {target}'s budget ({result['budget']}); the narrowest "
                               f"measured {narrowest['widths']} has {costs}.",
                               "relax the budget, or compress further (prune heads or layers, quantize) and "
                               "extract again.")
        chosen = result["widths"]
    sub = extract(model, chosen)
    provenance.update({"widths": chosen, "params": count_params(sub), "source_params": count_params(model)})
    if validation is not None:
        score_name, score = quality_scorer(model, validation, encoder)
        provenance[score_name] = score(chosen)
        reference, reference_dir, name = _reference(source, folder, model, run_summary, trust_pickle)
        provenance["confirmation"] = {
            "reference": name, "reference_path": str(reference_dir.resolve()),
            **confirm(sub, reference, split("test"), encoder, budget=budget, confidence=confidence,
                      search_split=validation.head(SEARCH_EXAMPLES) if widths is None else None)}
    else:
        provenance["confirmation"] = {"skipped": "no data (pass --data, or extract from a run folder)"}
    info(confirmation_line(provenance["confirmation"]))
    save(sub, out, provenance, tokenizer_dir=folder)
    return provenance
