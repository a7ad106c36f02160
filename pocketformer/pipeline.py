"""The data's way: checkpoint -> importer -> canonical model -> stages -> saved checkpoint -> exporters -> artifacts
-> target runtimes -> report. Each finished stage is cached by a hash of its input, config and versions, so a re-run
(or an interrupted run started again) resumes instead of starting over.

Output folder:
  baseline/            the reference (uncompressed) model: the input, after any `prepare` stages
  model/               the compressed model
  compress.json        recipe, versions, hashes and what each stage changed
  artifacts/           exported files + artifacts.json (parity, size, ops, hashes of each)
  validation/NAME.json one row per artifact on target NAME
  report.{json,md}, pareto.png
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from . import lm_pipeline, stage_cache
from .compress import Context
from .compress.base import ModelFacts, describe
from .data import Encoder, load_dataset
from .errors import TargetError
from .models import load, load_any, save
from .models.io import weights_sha256
from .progress import info
from .recipe import Recipe
from .stage_cache import data_source
from .store import (COMPRESS_FILE, RECORD_KEYS, code_sha256, digest, output_folder, read_compress, read_manifest,
                    versions, write_json, write_manifest)
from .train import evaluate, predict, seed_everything
from .verdict import check_line


def encoder_measures(recipe: Recipe, ctx: Context):
    """What a stage report measures of an encoder: its size and MACs at the recipe's length, and its validation
    accuracy where it has labels."""
    def measure(model) -> dict[str, Any]:
        return describe(model, recipe.max_len)

    def score(model) -> dict[str, Any]:
        return {"validation_accuracy": evaluate(model, ctx.validation, ctx.encoder)["accuracy"]
                if model.task.has_labels else None}
    return measure, score


def run_stages(model, stages, ctx: Context, input_key: str, recipe: Recipe, tokenizer_dir: Path,
               section: str, teacher_key: str) -> tuple[Any, list[dict], str]:
    """stage_cache.run_stages on an encoder: reports measure its size and MACs and its validation accuracy."""
    return stage_cache.run_stages(model, stages, ctx, input_key, recipe, tokenizer_dir, section, teacher_key,
                                  encoder_measures(recipe, ctx))


def latency_tables(recipe: Recipe, default: Optional[str]):
    """Context.latency_table for a run: (target, table) for a stage's target (else `default`), the user's table file
    (relative to the recipe) or the table measured on the target's runtime here (cached), at the stage's precision
    (else the target's first)."""

    def get(stage_target: Optional[str], table_file: Optional[str], precision: Optional[str], model):
        from .targets import get_profile
        from .targets.latency import table_for

        profile = get_profile(stage_target or default)
        precision = precision or profile.precisions[0]
        if precision not in profile.precisions:
            raise TargetError(f"Target {profile.name} runs {', '.join(profile.precisions)} files, not {precision}.",
                              f"set prune's precision to one of {', '.join(profile.precisions)}.")
        path = None
        if table_file:
            path = Path(table_file)
            if not path.is_absolute() and recipe.source_path:
                path = Path(recipe.source_path).parent / path
        return profile.name, table_for(profile, model.config, precision, path)

    return get


def compress(recipe: Recipe, checkpoint: Path, out_dir: Path, trust_pickle: bool = False,
             target: Optional[str] = None) -> dict[str, Any]:
    """Load the checkpoint, make the reference (prepare stages), compress it (stages), save both into out_dir. A
    checkpoint stored only as a pickle is read only with `trust_pickle` (or the recipe's). `target`: what
    latency-targeted stages aim at when they name none (default: the recipe's first target)."""
    checkpoint, out_dir = Path(checkpoint), output_folder(out_dir)
    seed_everything(recipe.seed)
    # Read the data and the checkpoint, and check they suit each other and the recipe, before printing anything: a
    # mistake in any is then one line on stderr.
    data = data_source(recipe)
    model, provenance = load_any(checkpoint, trust_pickle=trust_pickle or recipe.trust_pickle)
    if lm_pipeline.is_lm(model):  # a decoder-only language model: text data, its own steps
        return lm_pipeline.compress(recipe, checkpoint, out_dir, model, provenance, data)
    train = load_dataset(data, "train", recipe.seed)
    validation = load_dataset(data, "validation", recipe.seed)
    labels = model.spec.head.labels
    train, validation = (ds.for_model(model.spec.modality, labels, f"The model in {checkpoint}")
                         for ds in (train, validation))
    # Every stage's declared needs against this model, before any stage trains.
    recipe.check_plan(ModelFacts.of(model), model=str(checkpoint))
    recipe.check_model(model)
    info(f"loaded {checkpoint}: {model.spec.modality} {model.spec.task}, {len(model.layers)} layers")
    encoder = Encoder(checkpoint, recipe.max_len)
    target = target or next((t.name for t in recipe.target_refs()), None)
    ctx = Context(teacher=model, train=train, validation=validation, encoder=encoder, seed=recipe.seed,
                  batch_size=recipe.batch_size, target=target, latency_table=latency_tables(recipe, target))
    input_key = weights_sha256(model)
    baseline, prep_reports, key = run_stages(model, recipe.build("prepare"), ctx, input_key, recipe, checkpoint,
                                             "prepare", teacher_key=input_key)
    teacher = copy.deepcopy(baseline).eval()
    ctx.teacher = teacher
    compressed, reports, _ = run_stages(copy.deepcopy(baseline), recipe.build("stages"), ctx, key, recipe,
                                        checkpoint, "compress", teacher_key=key)
    ver = versions()
    common = {"recipe": recipe.model_dump(), "recipe_sha256": recipe.digest(), "versions": ver, "data": data,
              "input": {"path": str(checkpoint.resolve()), **provenance}}
    save(teacher, out_dir / "baseline", {**common, "role": "baseline"}, tokenizer_dir=checkpoint)
    save(compressed, out_dir / "model", {**common, "role": "compressed",
                                         "baseline_weights_sha256": weights_sha256(teacher)},
         tokenizer_dir=checkpoint)
    summary = {**common, "prepare": prep_reports, "stages": reports,
               "baseline": describe(teacher, recipe.max_len), "model": describe(compressed, recipe.max_len)}
    write_json(out_dir / COMPRESS_FILE, summary)
    return summary


def sample_inputs(data: str, seed: int, max_len: int, checkpoint: Path, n: int = 16):
    ds = load_dataset(data, "test", seed).head(n)
    return Encoder(checkpoint, max_len).encode(ds, list(range(len(ds))))


def _legacy_check(path: Path, model, inputs, record: dict[str, Any]) -> dict[str, Any]:
    """Does the .tflite load and agree with LiteRT in tflite-runtime 2.14, what many shipped apps embed?"""
    from .targets import tflite_legacy

    first = model.io.inputs[0]  # the file's fixed sequence, read from its own recorded input shape
    sizes = {a: record["inputs"][first.name][i] for i, a in enumerate(first.axes) if a == "sequence"}
    feeds = model.io.fit(inputs, sizes)
    result = tflite_legacy.check(path, {n: t.numpy() for n, t in zip(model.input_names, feeds)})
    if result.get("outputs_agree"):
        info(f"    {path.name} in {result['runtime']}: loads, agrees with LiteRT (cosine {result['cosine']:.6f})")
    else:
        info(f"    {path.name} in {result['runtime']}: WARNING {result['error']}")
    return result


def _stamp(record: dict[str, Any], source_hash: str, options: dict[str, Any], meta: dict[str, Any]) -> dict:
    """What made an artifact, in its record: the weights, export options, recipe and versions."""
    record.update({"source_weights_sha256": source_hash, "options": options, "recipe_sha256": meta["recipe_sha256"],
                   "versions": versions(), "export_code_sha256": export_code()})
    return record


def export_code() -> str:
    """The code an artifact depends on beyond its weights and options: the exporters, the model they trace and the
    runtimes' checks."""
    return code_sha256("export", "models", "targets")


def card(out_dir: Path, stem: str, model, meta: dict[str, Any], weights_hash: str):
    """What every artifact of `stem` says about the model to the app that loads it (export/card.py)."""
    from .export.card import card_of

    recipe, source = meta["recipe"], meta.get("input", {})
    provenance = {"recipe": recipe.get("name"), "recipe_sha256": meta["recipe_sha256"],
                  "source": source.get("source") or source.get("path"),
                  "source_files_sha256": source.get("source_files_sha256"), "weights_sha256": weights_hash,
                  "variant": stem}
    return card_of(model, out_dir / stem, f"{recipe.get('name')}/{stem}", stem, recipe["max_len"],
                   {k: v for k, v in provenance.items() if v is not None})


def card_sha256(c) -> str:
    return digest(c.metadata())


def write_tokenizer(art_dir: Path, c) -> None:
    """The tokenizer files beside the artifacts (artifacts/<stem>.tokenizer/), for formats that cannot embed them
    and for apps' own tokenizers; replaced whole, only when complete."""
    from .models.io import atomic_dir

    if c.tokenizer is None:
        return
    with atomic_dir(art_dir / c.tokenizer_dir) as tmp:
        for name, path in c.tokenizer.files.items():
            (tmp / name).write_bytes(Path(path).read_bytes())
        if c.tokenizer.wordpiece and "vocab.txt" not in c.tokenizer.files:  # apps' WordPiece tokenizers read it
            (tmp / "vocab.txt").write_bytes(c.tokenizer.vocab_txt())


def export(out_dir: Path, formats: list[str], int8: bool = True, static_shape: Optional[tuple[int, int]] = None,
           data: Optional[str] = None, legacy_check: bool = True,
           baseline_formats: Optional[list[str]] = None, sparse: bool = True,
           int4: bool = False, skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Export the compressed model to `formats` and the baseline to `baseline_formats` (default: the same); every
    file is checked against PyTorch before it is kept, and carries the model's card (labels, tokenizer, inputs,
    provenance). Files that pass are recorded even when others fail."""
    from .export import FORMATS, ExportFailures
    from .targets import export_checked, tflite_legacy

    out_dir = Path(out_dir)
    meta = read_compress(out_dir)
    recipe = meta["recipe"]
    art_dir = out_dir / "artifacts"
    art_dir.mkdir(parents=True, exist_ok=True)
    existing = {r["file"]: r for r in read_manifest(art_dir)}
    records = []
    plan = {"baseline": formats if baseline_formats is None else baseline_formats, "model": formats}
    for stem, stem_formats in plan.items():
        if not stem_formats:
            continue
        model, _ = load(out_dir / stem)
        lm = lm_pipeline.is_lm(model)
        source = data or meta.get("data", recipe["data"])
        inputs = lm_pipeline.check_inputs(model, out_dir / stem, source, recipe["seed"]) if lm else \
            sample_inputs(source, recipe["seed"], recipe["max_len"], out_dir / stem)
        source_hash = weights_sha256(model)
        stem_card = card(out_dir, stem, model, meta, source_hash)
        write_tokenizer(art_dir, stem_card)
        for fmt in stem_formats:
            asks_int4 = int4 and "int4" in FORMATS[fmt].option_names  # only formats that write int4 files
            skipped = sorted(p for f, _, p in (item.partition(".") for item in skip) if f == fmt)
            options = {"int8": int8, "static_shape": static_shape, **({} if sparse else {"sparse": False}),
                       **({"int4": True} if asks_int4 else {}), **({"skip": skipped} if skipped else {})}
            reuse = [r for r in existing.values() if r.get("variant") == stem and r.get("format") == fmt
                     and r.get("source_weights_sha256") == source_hash and r.get("options") == options
                     and r.get("card_sha256") == card_sha256(stem_card) and r.get("versions") == versions()
                     and r.get("export_code_sha256") == export_code() and (art_dir / r["file"]).exists()]
            if any(r.get("export_failed") for r in reuse):  # an export that failed part-way is tried again
                reuse = []
            if reuse:
                info(f"export {stem} -> {fmt}: reused {', '.join(r['file'] for r in reuse)} (same weights, options)")
                records.extend(reuse)
                continue
            info(f"export {stem} -> {fmt}")
            failed = None
            try:
                exported = export_checked(model, art_dir, stem, inputs, fmt, int8=int8, static_shape=static_shape,
                                          sparse=sparse, card=stem_card, skip=set(skipped),
                                          **({"int4": True} if asks_int4 else {}))
            except ExportFailures as e:  # keep what passed, marked so a re-run tries again; then report it all
                exported, failed = e.records, e
            for r in exported:
                _stamp(r, source_hash, options, meta)
                r["card_sha256"] = card_sha256(stem_card)
                p = r["parity_vs_pytorch"]
                info(f"    {r['file']}: {r['size_bytes'] / 1e6:.1f} MB, max abs diff {p['max_abs_diff']:.2e}, "
                     f"cosine {p['cosine']:.6f} vs PyTorch on {p['examples']} test inputs")
                if fmt == tflite_legacy.FORMAT and legacy_check and r.get("kind") is None and not lm:
                    r["legacy_runtime"] = _legacy_check(art_dir / r["file"], model, inputs, r)
                if failed is not None:
                    r["export_failed"] = [f.problem for f in failed.failures]
                records.append(r)
            if failed is not None:
                write_manifest(art_dir, records)
                raise failed
    write_manifest(art_dir, records)
    return records


def build_apps(out_dir: Path, data: Optional[str] = None, stem: str = "model") -> list[dict[str, Any]]:
    """App folders (OUT/app/<client>/) for every client whose format `stem` was exported to, each file checked in
    the client against its plain artifact on the test split; a folder whose plain files, card and pocketformer
    are unchanged is reused. Writes OUT/app/app.json and returns its entries."""
    from .app import APP_DIR, APP_FILE, APPS, build_app
    from .errors import ExportError

    out_dir = Path(out_dir)
    meta = read_compress(out_dir)
    recipe = meta["recipe"]
    art_dir = out_dir / "artifacts"
    records = [r for r in read_manifest(art_dir) if r.get("variant") == stem and r.get("kind") is None
               and not r.get("export_failed") and (art_dir / r["file"]).exists()]
    formats = {r["format"] for r in records}
    apps = [a for a in APPS.values() if a.format in formats]
    if not apps:
        raise ExportError(f"{art_dir} has no {stem} artifact an app folder is made from.",
                          f"export first: `pocketformer export {out_dir} --to {','.join(a.format for a in APPS.values())}"
                          " --app`.")
    model, _ = load(out_dir / stem)
    c = card(out_dir, stem, model, meta, weights_sha256(model))
    app_file = out_dir / APP_DIR / APP_FILE
    previous = {e["app"]: e for e in (json.loads(app_file.read_text()) if app_file.is_file() else [])}
    ds = load_dataset(data or meta.get("data", recipe["data"]), "test", recipe["seed"])
    ds = ds.for_model(model.spec.modality, model.spec.head.labels, f"The model in {out_dir}")
    enc = Encoder(out_dir / stem, recipe["max_len"])
    entries = []
    for app in apps:
        plain = [r for r in records if r["format"] == app.format]
        key = {"plain_sha256": {r["file"]: r["sha256"] for r in plain}, "card_sha256": card_sha256(c),
               "pocketformer": versions()["pocketformer"], "data": ds.name}
        old = previous.get(app.name)
        if old and old.get("key") == key and (out_dir / old["folder"]).is_dir():
            info(f"app {app.name}: reused {old['folder']} (same plain files and card)")
            entries.append(old)
            continue
        reason = app.refuses(c)
        if reason:
            info(f"app {app.name}: not built: {reason}")
            entries.append({"app": app.name, "client": app.client, "format": app.format, "refused": reason})
            continue
        info(f"app {app.name}: {app.client}, from {', '.join(r['file'] for r in plain)}")
        entries.append({**build_app(app, model, c, plain, out_dir, ds, enc), "key": key})
        write_json(app_file, [*entries, *(e for n, e in previous.items() if n not in {x["app"] for x in entries})])
    write_json(app_file, entries)
    return entries


def validate(out_dir: Path, target: str, data: Optional[str] = None, limit: int = 0,
             variants: Optional[list[str]] = None, confidence: Optional[float] = None) -> list[dict[str, Any]]:
    """Every artifact of `out_dir` for the target's format on its runtime, each budget a verdict at the profile's
    confidence (or `confidence`): writes validation/TARGET.json and returns its rows."""
    from .targets import get_profile, with_confidence
    from .targets.lint import describe as describe_artifact
    from .targets.validate import validate_artifact

    out_dir = Path(out_dir)
    profile = with_confidence(get_profile(target), confidence)
    meta = read_compress(out_dir)
    recipe = meta["recipe"]
    art_dir = out_dir / "artifacts"
    lm = lm_pipeline.is_lm_run(meta)
    precisions = profile.language_models.precisions if lm and profile.language_models else profile.precisions
    records = [r for r in read_manifest(art_dir, RECORD_KEYS) if r["format"] == profile.format
               and r["precision"] in precisions and (art_dir / r["file"]).exists()
               and (not variants or r["variant"] in variants)]
    if not records:
        raise TargetError(f"{art_dir} has no {profile.format} artifact for target {profile.name}.",
                          f"run `pocketformer export {out_dir} --to {profile.format}` first.")
    for r in records:  # a damaged file is one line before any work, not a failure half-way through
        if r.get("kind") != "segments":
            describe_artifact(art_dir / r["file"], r["format"])
    if lm:  # a language model: perplexity, token match and tokens/s against its own budgets
        rows = lm_pipeline.validate(out_dir, profile, records, meta, data, limit)
        write_json(out_dir / "validation" / f"{profile.name}.json",
                   {"target": profile.model_dump(), "versions": versions(), "rows": rows})
        return rows
    reference, _ = load(out_dir / "baseline")

    def split(name: str):
        ds = load_dataset(data or meta.get("data", recipe["data"]), name, recipe["seed"])
        return ds.for_model(reference.spec.modality, reference.spec.head.labels, f"The model in {out_dir}")

    ds = split("test")
    if limit:
        ds = ds.head(limit)
    enc = Encoder(out_dir / "baseline", recipe["max_len"])
    info(f"validate on {profile.name}: {profile.description} ({len(ds)} test examples)")
    ref_out = predict(reference, ds, enc).numpy()
    exits = None  # what every segments file is calibrated with, loaded once on the first of them
    rows = []
    for r in records:
        if r.get("kind") == "segments":  # early exit: the driver runs them, gate calibrated on the validation split
            from .targets.early_exit import MIN_CALIBRATION_EXAMPLES, validate_segments

            if exits is None:
                calibration = split("validation")
                if limit:
                    calibration = calibration.head(max(limit, MIN_CALIBRATION_EXAMPLES))
                exits = {"model": load(out_dir / "model")[0], "calibration": calibration,
                         "calibration_reference_out": predict(reference, calibration, enc).numpy()}
            row = validate_segments(art_dir / r["file"], r, profile, ds, enc, reference_out=ref_out, **exits)
        else:
            row = validate_artifact(art_dir / r["file"], r, profile, ds, enc, reference, ref_out)
        row["data"] = ds.name
        rows.append(row)
        info(row_line(row))
    write_json(out_dir / "validation" / f"{profile.name}.json",
               {"target": profile.model_dump(), "versions": versions(), "rows": rows})
    return rows


def row_line(row: dict[str, Any]) -> str:
    """One validated artifact: what was measured, then each budget's verdict with its interval."""
    acc = f"accuracy {row['accuracy']:.2f}%, " if "accuracy" in row else \
        f"cosine with the uncompressed model's outputs {row['output_cosine_with_reference']:.4f}, "
    lat = (f"p50 {row['latency_p50_ms']:.1f} ms, p90 {row['latency_p90_ms']:.1f} ms"
           + (f", peak RSS {row['peak_rss_mb']:.0f} MB" if row["peak_rss_mb"] is not None else "")
           if row["latency_p50_ms"] is not None else f"no latency ({row['execution']})")
    checks = "".join(f"\n        {check_line(name, c)}" for name, c in row["budgets"].items())
    return f"    {row['file']}: {acc}{lat}, {row['size_mb']:.1f} MB -> {row['verdict']}{checks}"


def run(recipe: Recipe, out_dir: Optional[Path] = None) -> dict[str, Any]:
    """compress -> export -> validate on every target -> report."""
    from .report import write_report
    from .targets import get_profile

    if out_dir is None:  # relative to where the command runs, like every other path the user types
        out_dir = Path(recipe.output) if recipe.output else Path("runs") / recipe.name
    profiles = [get_profile(t.name) for t in recipe.target_refs()]  # an unknown target: refused before compressing
    compress(recipe, recipe.resolve_model(), out_dir)
    static = None
    if recipe.export.onnx.static_shape:
        static = (profiles[0].batch, profiles[0].seq_len)
    export(out_dir, recipe.export.formats, int8=recipe.export.int8, static_shape=static,
           legacy_check=recipe.export.tflite.legacy_check, baseline_formats=recipe.export.baseline_formats,
           sparse=recipe.export.sparse, int4=recipe.export.int4, skip=tuple(recipe.export.skip))
    if recipe.export.app:
        build_apps(out_dir)
    for target in recipe.target_refs():
        validate(out_dir, target.name, limit=target.limit, variants=target.variants, confidence=target.confidence)
    return write_report(out_dir)
