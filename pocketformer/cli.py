"""Command line: compress, export, validate, run, lint, targets, stages, inspect, extract.

User errors print one line (the problem and the fix) and exit 2; nothing the user typed produces a traceback.
`pocketformer --debug VERB ...` prints the error's full traceback instead, for bug reports.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer

from .errors import AccessError, PocketformerError, TargetError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make a trained transformer smaller and faster, export it, and measure it on your target.")


TRUST_PICKLE_HELP = ("read a checkpoint stored only as a pickle (pytorch_model.bin) with "
                     "torch.load(weights_only=True); only for a source you trust")
DEBUG = {"on": False}  # set by --debug before any command runs; read by main() when a command fails


def _echo(msg: str) -> None:
    typer.echo(msg)


@app.callback()
def _global_options(debug: bool = typer.Option(False, "--debug", help="on an error, print its full traceback "
                                                                       "(for a bug report) instead of one line")):
    DEBUG["on"] = debug


@app.command()
def compress(checkpoint: str = typer.Argument(..., help="Hugging Face folder, pocketformer checkpoint, or minilm"),
             recipe: Path = typer.Option(..., "--recipe", "-r", help="recipe YAML"),
             out: Path = typer.Option(..., "--out", "-o", help="output folder"),
             trust_pickle: bool = typer.Option(False, "--trust-pickle", help=TRUST_PICKLE_HELP),
             target: Optional[str] = typer.Option(None, "--target", "-t", help="what prune's speedup / latency_ms "
                                                                            "aim at (default: the recipe's first "
                                                                            "target)")):
    """Run the recipe's stages on CHECKPOINT; write OUT/model, OUT/baseline and OUT/compress.json."""
    from .pipeline import compress as do_compress
    from .recipe import load_recipe, resolve_checkpoint

    summary = do_compress(load_recipe(recipe), resolve_checkpoint(checkpoint), out, trust_pickle=trust_pickle,
                          target=target)
    b, m = summary["baseline"], summary["model"]
    _echo(f"compressed: params {b['params']:,} -> {m['params']:,} ({b['params'] / m['params']:.2f}x), "
          f"MACs {b['macs'] / 1e6:,.0f}M -> {m['macs'] / 1e6:,.0f}M ({b['macs'] / m['macs']:.2f}x); wrote {out}")


@app.command()
def export(out: Path = typer.Argument(..., help="folder written by `compress`"),
           to: str = typer.Option("onnx", "--to", help="comma-separated formats"),
           int8: bool = typer.Option(True, "--int8/--no-int8", help="also write int8 artifacts"),
           int4: bool = typer.Option(False, "--int4", help="also write int4 weight-only files where the format has "
                                                           "them (ONNX, TFLite)"),
           static: Optional[str] = typer.Option(None, "--static", help="fix shapes, as BATCHxSEQ (e.g. 1x128)"),
           legacy_check: bool = typer.Option(True, "--legacy-check/--no-legacy-check",
                                             help="also run each .tflite in tflite-runtime 2.14 (own environment)"),
           sparse: bool = typer.Option(True, "--sparse/--dense",
                                       help="store dense-sparse weights sparsely where the format allows it"),
           app: bool = typer.Option(False, "--app", help="also write OUT/app/<client>/: files MediaPipe (Android), "
                                                         "Core ML (iOS) and ONNX Runtime apps load as they are, each "
                                                         "checked in that client on the test split")):
    """Export the compressed model and its baseline; each artifact is checked against PyTorch and carries the
    model's labels, tokenizer, inputs and provenance."""
    from .errors import ExportError
    from .export import FORMATS
    from .pipeline import export as do_export

    formats = [f.strip() for f in to.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ExportError(f"Unknown format {bad[0]!r}.", f"use one of: {', '.join(FORMATS)}.")
    shape = None
    if static:
        try:
            b, s = (int(x) for x in static.lower().split("x"))
            shape = (b, s)
        except ValueError:
            raise ExportError(f"--static {static!r} is not BATCHxSEQ.", "write it like 1x128.") from None
        if b < 1 or s < 1:
            raise ExportError(f"--static {static!r} has an empty axis.", "give a batch and a sequence of at least "
                                                                          "1, like 1x128.")
    records = do_export(out, formats, int8=int8, static_shape=shape, legacy_check=legacy_check, sparse=sparse,
                        int4=int4)
    _echo(f"wrote {len(records)} artifacts to {out / 'artifacts'}")
    if app:
        from .pipeline import build_apps

        entries = build_apps(out)
        built = [e for e in entries if "files" in e]
        _echo(f"wrote {len(built)} app folders to {out / 'app'}: "
              + "; ".join(f"{e['app']} ({len(e['files'])} files)" if "files" in e else
                          f"{e['app']} not built ({e['refused']})" for e in entries))


@app.command()
def validate(out: Path = typer.Argument(..., help="folder written by `compress` and `export`"),
             target: str = typer.Option("host-ort", "--target", "-t", help="profile name or .yaml path"),
             data: Optional[str] = typer.Option(None, "--data", "-d", help="dataset (default: the recipe's)"),
             limit: int = typer.Option(0, "--limit", min=0,
                                       help="validate on the first N test examples (0 = all)"),
             confidence: Optional[float] = typer.Option(None, "--confidence",
                                                        help="of each budget verdict (default: the profile's, "
                                                             "0.95)")):
    """Accuracy, agreement, latency, memory and size of each artifact on TARGET's runtime, each budget a verdict:
    PASS (its whole interval within budget), FAIL (wholly over) or INCONCLUSIVE (too few examples or runs)."""
    from .pipeline import validate as do_validate
    from .report import latency_target_line, write_report

    rows = do_validate(out, target, data, limit, confidence=confidence)
    for t in write_report(out)["latency_targets"]:
        _echo(latency_target_line(t))
    by = {v: [r["variant"] for r in rows if r["verdict"] == v] for v in ("PASS", "INCONCLUSIVE", "FAIL")}
    _echo(f"{rows[0]['target']}'s budgets at {rows[0]['confidence']:.0%} confidence: "
          + "; ".join(f"{v} {len(names)}" + (f" ({', '.join(names)})" if names and v != "PASS" else "")
                      for v, names in by.items())
          + f"; report: {out / 'report.md'}")


@app.command()
def run(recipe: Path = typer.Argument(..., help="recipe YAML"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: the recipe's)")):
    """compress, export and validate as the recipe says, then write report.json, report.md and pareto.png."""
    from .pipeline import run as do_run
    from .recipe import load_recipe

    r = load_recipe(recipe)
    report = do_run(r, out)
    out_dir = out or Path(r.output or f"runs/{r.name}")
    from .report import latency_target_line, summary_table

    _echo(summary_table(report))
    for t in report["latency_targets"]:
        _echo(latency_target_line(t))
    _echo(f"report: {out_dir / 'report.md'}, {out_dir / 'report.json'}, {out_dir / 'pareto.png'}")


@app.command()
def search(source: Path = typer.Argument(..., help="a recipe YAML (its `search:` section, model, data and prepare "
                                                   "stages), or a checkpoint folder"),
           target: Optional[str] = typer.Option(None, "--target", "-t", help="profile name or .yaml path"),
           max_drop: Optional[float] = typer.Option(None, "--max-drop", min=0, help="accuracy points the chosen "
                                                    "model may lose (default 1.0)"),
           max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", min=0),
           max_size_mb: Optional[float] = typer.Option(None, "--max-size-mb", min=0),
           trials: Optional[int] = typer.Option(None, "--trials", min=1, help="trials in all (default 20); a "
                                                "resumed search runs the rest"),
           minutes: Optional[float] = typer.Option(None, "--minutes", min=0, help="start no new trial after this"),
           parallel: Optional[int] = typer.Option(None, "--parallel", min=1, help="trials run together"),
           ray: Optional[str] = typer.Option(None, "--ray", help="run trials on a Ray cluster: its ADDRESS, or "
                                             "`local` (pip install 'pocketformer[ray]')"),
           data: Optional[str] = typer.Option(None, "--data", help="with a checkpoint: the data (default "
                                              "rotten_tomatoes)"),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="search folder (default runs/NAME-search); "
                                              "the same folder again resumes the search")):
    """The fastest model within an accuracy budget on a target: an Optuna study over compositions of the stages
    (resumable: run the same command again), with the chosen model's recipe in OUT/chosen.yaml."""
    from .recipe import load_recipe, parse_recipe
    from .search import search as do_search

    if source.suffix in (".yaml", ".yml") or source.is_file():
        r = load_recipe(source)
    else:
        r = parse_recipe({"name": source.name or "model", "model": str(source),
                          **({"data": data} if data else {})}, "<command line>")
    do_search(r, out, ray=ray, target=target, max_drop=max_drop, max_latency_ms=max_latency_ms,
              max_size_mb=max_size_mb, trials=trials, minutes=minutes, parallel=parallel)


@app.command()
def lint(artifact: Path = typer.Argument(..., help=".onnx, .tflite or .mlpackage"),
         target: str = typer.Option(..., "--target", "-t", help="profile name or .yaml path")):
    """What will hurt when ARTIFACT ships to TARGET, each finding with a fix. Exit 1 if any error."""
    from .targets import get_profile
    from .targets.lint import lint as do_lint

    findings = do_lint(artifact, get_profile(target))
    for f in findings:
        _echo(f.line())
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    _echo(f"{artifact.name} on {target}: {errors} errors, {warnings} warnings")
    if errors:
        raise typer.Exit(1)


@app.command()
def targets():
    """List the device profiles; for those whose latency is this host's, this host's CPU and int8's measured speed."""
    from .store import fingerprint
    from .targets import list_profiles
    from .targets.int8_speed import cached

    for p in list_profiles():
        b = p.budgets
        budgets = ", ".join(x for x in (f"p50 <= {b.latency_ms:g} ms" if b.latency_ms else "",
                                        f"size <= {b.size_mb:g} MB" if b.size_mb else "",
                                        f"drop <= {b.accuracy_drop:g} pts" if b.accuracy_drop is not None else "",
                                        f"cosine >= {b.min_cosine:g}" if b.min_cosine is not None else "")
                            if x)
        _echo(f"{p.name:15} {p.format:7} {p.runtime:21} {p.threads} threads, {p.batch}x{p.seq_len}, "
              f"{'/'.join(p.precisions)}; budgets: {budgets} at {b.confidence:.0%}\n{'':16}{p.description}")
        if p.this_host:
            line = f"this host's CPU: {fingerprint()}"
            if "int8" in p.precisions:
                speed = cached(p)
                line += f"; int8 ran at {speed['speedup']:.2f}x fp32 speed (measured {speed['measured']['date']})" \
                    if speed else "; int8's speed is measured when an int8 file is linted"
            _echo(f"{'':16}{line}")


@app.command()
def profile(target: str = typer.Option(..., "--target", "-t", help="a built-in target or a profile .yaml"),
            model: str = typer.Option("minilm", "--model", "-m", help="checkpoint, run folder (its baseline) or "
                                                                      "built-in whose family the table is for"),
            precision: Optional[str] = typer.Option(None, "--precision", help="artifact precision (default: the "
                                                                               "target's first)"),
            check: bool = typer.Option(False, "--check", help="measure random pruned shapes and report how well "
                                                              "the table predicts them"),
            models: int = typer.Option(30, "--models", min=1, help="random pruned shapes --check measures"),
            table: Optional[Path] = typer.Option(None, "--table", help="a table measured elsewhere (JSON) to show "
                                                                       "or check instead of measuring one"),
            rebuild: bool = typer.Option(False, "--rebuild", help="measure again even if a table is cached"),
            json_out: Optional[Path] = typer.Option(None, "--json", help="also write the table (and the check) "
                                                                         "as JSON to this file")):
    """Build (once; cached) and show TARGET's latency table: the embeddings and head, an empty layer, attention by
    heads and FFN by width, each measured in the target's runtime at its threads and shape, and a calibration on
    whole models. `prune: {speedup: X}` and `{latency_ms: Y}` prune by it.

    A table measured on a device pocketformer cannot reach is a JSON file: {"schema":
    "pocketformer-latency-table/1", "target", "runtime", "runtime_version", "threads", "batch", "seq_len",
    "precision", "cpu": {...}, "family": {"modality", "hidden", "head_dim", "act", "norm", "vocab_size",
    "max_positions"}, "base_ms" (embeddings + head), "layer_ms" (a layer with no heads and no FFN),
    "attention": {"points": [heads], "ms": [ms added per layer]}, "ffn": {"points": [neurons], "ms": [...]},
    "calibration": {"scale", "offset_ms", "models"}}; predicted = scale * (base_ms + sum over layers of (layer_ms +
    attention(heads) + ffn(neurons))) + offset_ms, curves piecewise linear (README: "Latency tables")."""
    import json as _json

    from .latency import write_table
    from .models import load_any
    from .recipe import resolve_checkpoint
    from .targets import get_profile
    from .targets.latency import check_table, table_for, table_lines

    prof = get_profile(target)
    path = resolve_checkpoint(model)
    if (path / "baseline").is_dir():
        path = path / "baseline"
    loaded, _ = load_any(path)
    if loaded.kind == "causal_lm":
        _profile_lm(prof, loaded, model, precision, check, models, table, rebuild, json_out)
        return
    precision = precision or prof.precisions[0]
    tab = table_for(prof, loaded.config, precision, table, rebuild=rebuild)
    for line in table_lines(tab):
        _echo(line)
    if prof.this_host and "int8" in prof.precisions and table is None:  # what lint's int8 rule reads
        from .targets.int8_speed import describe, int8_speed

        _echo(f"  int8: {describe(int8_speed(prof))}")
    result = None
    if check:
        result = check_table(tab, prof, loaded.config, n=models)
        worst = max(result["shapes"], key=lambda r: abs(r["error"]))
        _echo(f"check on {result['models']} random pruned shapes of {model} ({prof.name}, measured here): "
              f"{result['within_10pct']:.0%} predicted within +-10% of measured ({result['within_5pct']:.0%} within "
              f"+-5%), mean |error| {result['mean_abs_error']:.1%}, worst {result['worst_error']:+.1%} (predicted "
              f"{worst['predicted_ms']:.2f} ms, measured {worst['measured_ms']:.2f} ms, {worst['layers']} layers)")
    if json_out is not None:
        write_table(tab, json_out) if result is None else json_out.write_text(
            _json.dumps({"table": tab.to_json(), "check": result}, indent=1) + "\n")
        _echo(f"wrote {json_out}")


def _profile_lm(prof, loaded, model: str, precision: Optional[str], check: bool, models: int,
                table: Optional[Path], rebuild: bool, json_out: Optional[Path]) -> None:
    """`pocketformer profile` for a language model: its decode and prefill tables (targets/lm_latency.py)."""
    import json as _json

    from .targets.latency import table_lines
    from .targets.lm_latency import check_lm_tables, lm_tables_for

    if prof.language_models is None:
        raise TargetError(f"Target {prof.name} validates no language models (its profile has no "
                          "`language_models:`).", "choose a target that does (`pocketformer targets`).")
    if table is not None:
        raise TargetError("--table is for encoder tables; a language model's decode and prefill tables are measured "
                          "here.", "leave out --table.")
    precision = precision or prof.language_models.precisions[0]
    tables = lm_tables_for(prof, loaded.config, precision, rebuild=rebuild)
    for tab in tables.values():
        for line in table_lines(tab):
            _echo(line)
    result = None
    if check:
        result = check_lm_tables(tables, prof, loaded.config, n=models)
        for measure in tables:
            r = result[measure]
            _echo(f"check of {measure} on {r['models']} random pruned LMs of {model} ({prof.name}, measured here): "
                  f"{r['within_10pct']:.0%} predicted within +-10% ({r['within_5pct']:.0%} within +-5%), mean "
                  f"|error| {r['mean_abs_error']:.1%}, worst {r['worst_error']:+.1%}")
    if json_out is not None:
        json_out.write_text(_json.dumps({"tables": {m: t.to_json() for m, t in tables.items()}, "check": result},
                                        indent=1) + "\n")
        _echo(f"wrote {json_out}")


@app.command()
def stages():
    """List the compression stages, the models each runs on and needs, and their settings (what a recipe may
    say)."""
    from .compress import REGISTRY
    from .compress.base import KIND_NAMES, facts_text

    def ranges(space: dict, field: str) -> str:
        out = []
        for path, rng in space.items():
            if path == field or path.startswith(f"{field}."):
                what = f"{rng['choices']}" if "choices" in rng else \
                    f"{rng['low']:g}..{rng['high']:g}" + (" (log)" if rng.get("log") else "")
                inner = path[len(field) + 1:]
                out.append(f"; search {inner + ' ' if inner else ''}{what}")
        return "".join(out)

    for name, stage in REGISTRY.items():
        _echo(f"{name}: {stage.summary}")
        _echo(f"    # runs on: {', '.join(KIND_NAMES.get(k, k) for k in sorted(stage.kinds, reverse=True))}")
        order = [f"{label}: {facts_text(names)}" for label, names in
                 (("needs", stage.requires), ("refuses a model with", stage.excludes), ("adds", stage.provides),
                  ("ends", stage.invalidates)) if names]
        if order:
            _echo(f"    # {'; '.join(order)}")
        space = stage.search_space()
        for field, info in stage.Config.model_fields.items():
            default = info.get_default(call_default_factory=True)
            if hasattr(default, "model_dump"):
                default = default.model_dump()
            elif isinstance(default, list):
                default = [d.model_dump() if hasattr(d, "model_dump") else d for d in default]
            _echo(f"    {field} = {default!r}"
                  + (f"  # {info.description}{ranges(space, field)}" if info.description else ""))


@app.command()
def generate(path: Path = typer.Argument(..., help="a language model's exported file (.onnx, .tflite, .mlpackage)"),
             prompt: str = typer.Option(..., "--prompt", "-p", help="the text to continue"),
             max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
             threads: int = typer.Option(2, "--threads", min=1),
             tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="folder with tokenizer.json (default: "
                                                      "the one the file's card names, beside it)")):
    """Run an exported language model on its own runtime and stream its greedy continuation of a prompt: try what
    you ship. Prints the text as it comes, then the prompt's prefill and the decode speed."""
    from .export import FORMATS
    from .targets.lint import artifact_format
    from .targets.lm import open_lm
    from .targets.runtime import runtime_for_format

    fmt = artifact_format(path)  # refuses a missing or unknown file with one line
    card = FORMATS[fmt].read_card(path) or {}
    tok = _lm_tokenizer(path, card, tokenizer)
    runtime = runtime_for_format(fmt)
    driver = open_lm(runtime, path, threads)
    tokens = card.get("tokenizer") or {}
    ids = tok.encode(prompt, add_special_tokens=False).ids
    bos = tok.token_to_id(tokens["cls"]) if tokens.get("cls") else None
    if bos is not None and ids[:1] != [bos]:
        ids = [bos] + ids
    eos = [i for i in (tok.token_to_id(tokens["sep"]) if tokens.get("sep") else None,) if i is not None]
    shown: list[int] = []
    printed = ""

    def stream(token: int) -> None:
        nonlocal printed
        shown.append(token)
        text = tok.decode(shown)
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text

    sys.stdout.write(prompt)
    out, timings = driver.generate(ids, max_new_tokens, eos=eos, timings=True, stream=stream)
    sys.stdout.write("\n")
    speed = (f"decode {timings.decode_tokens_per_s:.1f} tok/s" if timings.decode_ms else "one token")
    typer.echo(f"{path.name} on {runtime.name} ({runtime.execution()}), {threads} threads: {len(out)} tokens; "
               f"prefill of {timings.prompt_tokens} tokens {timings.prefill_ms:.0f} ms; {speed}", err=True)


def _lm_tokenizer(path: Path, card: dict, folder: Optional[Path]):
    """The tokenizer of a language model's file: `folder`'s tokenizer.json, else the one its card names beside it."""
    from tokenizers import Tokenizer

    from .errors import TargetError

    candidates = [folder] if folder is not None else \
        [path.parent / card["tokenizer_dir"]] if card.get("tokenizer_dir") else []
    for c in candidates:
        if (c / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(c / "tokenizer.json"))
    raise TargetError(f"No tokenizer.json for {path.name}" + (f" in {candidates[0]}." if candidates else
                                                              " (its card names no tokenizer folder)."),
                      "pass --tokenizer FOLDER (the model's checkpoint folder has it).")


@app.command()
def inspect(path: Path = typer.Argument(..., help="checkpoint folder, run folder, or .onnx file"),
            seq_len: int = typer.Option(128, "--seq-len", min=1, help="sequence length for MACs"),
            trust_pickle: bool = typer.Option(False, "--trust-pickle", help=TRUST_PICKLE_HELP)):
    """Shapes, parameters and MACs of a checkpoint, or inputs, ops and size of an artifact."""
    from .export import FORMATS
    from .export.base import artifact_size, format_of
    from .targets.lint import artifact_format
    from .targets.lint import describe as describe_artifact

    if format_of(path):
        fmt = artifact_format(path)  # refuses a missing file with one line
        d = describe_artifact(path, fmt)
        opset = f", opset {d['opset']}" if d.get("opset") else ""
        _echo(f"{path}: {fmt}, {artifact_size(path) / 1e6:.1f} MB{opset}, {d.get('weights', 0):,} weights")
        _echo(f"  inputs:  {d['inputs']}")
        _echo(f"  outputs: {d['outputs']}")
        _echo("  ops:     " + ", ".join(f"{k} x{v}" for k, v in d["ops"].items()))
        if d.get("op_precision"):
            _echo(f"  compute precision: {d['op_precision']}")
        for line in card_lines(FORMATS[fmt].read_card(path)):
            _echo("  " + line)
        _echo("  " + _artifact_provenance(path, fmt))
        return
    folders = [path / "baseline", path / "model"] if (path / "compress.json").is_file() else [path]
    from .models import count_params, encoder_macs, load_any

    for folder in folders:
        model, prov = load_any(folder, trust_pickle=trust_pickle)
        cfg = model.config
        made = {k: prov[k] for k in ("role", "recipe_sha256", "source", "source_weights_sha256") if k in prov}
        if "input" in prov:
            made["input"] = prov["input"].get("path")
        if made:
            _echo(f"{folder}: made by " + ", ".join(f"{k} {str(v)[:64]}" for k, v in made.items()))
        _echo(f"{folder}: {cfg.modality} encoder, task {cfg.task}, hidden {cfg.hidden}, {len(cfg.layers)} layers, "
              f"{count_params(model):,} params, {encoder_macs(cfg, seq_len) / 1e6:,.1f}M MACs at {seq_len} tokens")
        for i, s in enumerate(cfg.layers):
            _echo(f"  layer {i}: heads {s.heads} x {s.head_dim}, ffn {s.ffn}")


@app.command()
def extract(source: Path = typer.Argument(..., help="nested checkpoint (matformer stage), or run folder (its model/)"),
            out: Path = typer.Option(..., "--out", "-o", help="output checkpoint folder"),
            widths: Optional[str] = typer.Option(None, "--widths", "-w",
                                                 help='FFN width per layer: "0.5" for all, or "1,0.5,0.25,..." '
                                                      "(fractions, or whole neuron counts)"),
            target: Optional[str] = typer.Option(None, "--target", "-t",
                                                 help="search the nested widths for this profile's budget"),
            latency_ms: Optional[float] = typer.Option(None, "--latency-ms", help="p50 budget on the target's runtime "
                                                                                 "(default: the profile's)"),
            size_mb: Optional[float] = typer.Option(None, "--size-mb", help="artifact size budget (default: the "
                                                                           "profile's)"),
            data: Optional[str] = typer.Option(None, "--data", "-d", help="score by validation quality on this data "
                                                                         "(default: the run's; none: FFN kept)"),
            precision: Optional[str] = typer.Option(None, "--precision", help="artifact precision the budget is "
                                                                              "for (default: the profile's first)"),
            max_drop: Optional[float] = typer.Option(None, "--max-drop", help="accuracy points the sub-model may "
                                                                             "lose, checked on the test split and "
                                                                             "reported, not enforced (default: the "
                                                                             "target's budget)"),
            confidence: Optional[float] = typer.Option(None, "--confidence", help="of the test-split verdict "
                                                                                 "(default: the target's, 0.95)"),
            trust_pickle: bool = typer.Option(False, "--trust-pickle", help=TRUST_PICKLE_HELP)):
    """Cut a sub-model (an FFN width per layer) out of a nested checkpoint as a plain dense checkpoint, and confirm
    it on the test split (never seen by the search): its accuracy drop, with its interval, and a verdict."""
    from .extract import run_extract

    p = run_extract(source, out, widths=widths, target=target, latency_ms=latency_ms, size_mb=size_mb, data=data,
                    precision=precision, max_drop=max_drop, confidence=confidence, trust_pickle=trust_pickle)
    c = p["confirmation"]  # the held-out figure leads: the validation one is what the widths were chosen on
    if "drop" in c:
        quality = (f", test drop {c['drop']:+.2f} pts ({c['confidence']:.0%} interval {c['interval'][0]:+.2f}.."
                   f"{c['interval'][1]:+.2f})" + (f": {c['verdict']} against {c['budget']:g}" if c["verdict"] else ""))
    elif "cosine" in c:
        quality = f", test cosine with the reference {c['cosine']:.4f}"
    else:
        quality = next((f", {k} {p[k]:.2f}" for k in ("validation_accuracy", "validation_cosine_pct") if k in p), "")
    _echo(f"extracted FFN widths {p['widths']} of {p['source_ffn_widths']}: params {p['source_params']:,} -> "
          f"{p['params']:,}{quality}; wrote {out}")


def card_lines(card: Optional[dict]) -> list[str]:
    """What a file says about its model to an app (export/card.py), as `inspect` shows it."""
    if not card:
        return ["card: none (exported before pocketformer wrote one; export again)"]
    lines = [f"card: {card.get('name')}, {card.get('modality')} {card.get('task')}"]
    if card.get("labels"):
        lines.append(f"  labels: {', '.join(card['labels'])}")
    for t in card.get("inputs", []):
        lines.append(f"  input {t['name']} ({t['dtype']}, {t['axes']}): {t['meaning']}")
    out = card.get("output") or {}
    if out:
        lines.append(f"  output {out.get('name')}: {out.get('meaning')}, {out.get('dim')} values"
                     + (", L2-normalised" if out.get("normalized") else ""))
    tok = card.get("tokenizer")
    if tok:
        lines.append(f"  tokenizer: {tok['kind']}, lowercase {tok['lowercase']}, strip accents "
                     f"{tok['lowercase'] if tok['strip_accents'] is None else tok['strip_accents']}, max length "
                     f"{card.get('max_len')}; {card.get('tokenizer_location', 'beside: ' + str(card.get('tokenizer_dir')))}")
    img = card.get("image")
    if img:
        lines.append(f"  image: {img['height']}x{img['width']}, {img['channels']} channel(s), (pixel - {img['mean']})"
                     f" / {img['std']} on 0..255")
    if card.get("classifier"):  # a Core ML classifier's own spec
        c = card["classifier"]
        lines.append(f"  classifier: labels {c.get('labels')}, outputs {c.get('outputs')}")
    prov = card.get("provenance") or {}
    lines.append("  made by: " + ", ".join(f"{k} {str(v)[:64]}" for k, v in prov.items()))
    return lines


def _artifact_provenance(path: Path, fmt: str) -> str:
    """What made an artifact, from the artifacts.json beside it, and whether the file is still the one recorded."""
    from .export import FORMATS
    from .store import read_manifest

    record = next((r for r in read_manifest(path.parent) if r["file"] == path.name), None)
    if record is None:
        return "record: no artifacts.json entry beside the file (the card above says what made it, where it has one)"
    same = FORMATS[fmt].content_sha256(path) == record.get("sha256")
    versions = record.get("versions", {})
    return (f"provenance: recipe sha256 {str(record.get('recipe_sha256'))[:16]}, source weights sha256 "
            f"{str(record.get('source_weights_sha256'))[:16]}, options {record.get('options')}, pocketformer "
            f"{versions.get('pocketformer')}, torch {versions.get('torch')}; content "
            + ("matches its record" if same else "DIFFERS from its record: the file changed after export"))


def _quiet_third_party_logs() -> None:
    """torchao (pulled in by litert-torch) logs a warning per missing CUDA kernel and torch one per deprecated
    pytree registration on every import: noise that buries our one-line messages."""
    import logging

    for name in ("torchao", "torch.utils._pytree", "coremltools"):
        logging.getLogger(name).setLevel(logging.ERROR)


INTERRUPTED = "interrupted: finished stages are cached; run the same command again to resume."


def _exit_interrupted() -> None:
    """Say how to resume and end with 130, the shell's code for Ctrl-C. Not through `sys.exit`: CPython remembers a
    KeyboardInterrupt that once crossed C code run by `PyRun_String` (pybind11's `py::eval` does), and then ends the
    process with SIGINT (exit -2) whatever code it was asked to exit with. Exit handlers still run."""
    import atexit
    import os

    typer.echo(INTERRUPTED, err=True)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def _click_classes():
    """(usage errors, other click errors, aborts, exits) of both clicks: typer 0.29 raises its vendored copy's
    exceptions, which the real click's classes do not catch."""
    import click
    import typer._click.exceptions as vendored

    return ((click.exceptions.UsageError, vendored.UsageError),
            (click.exceptions.ClickException, vendored.ClickException),
            (click.exceptions.Abort, typer.Abort), (click.exceptions.Exit, typer.Exit))


def usage_line(e) -> str:
    """A usage error as one line: what is wrong with the command line, and where the usage is."""
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "pocketformer"
    message = e.format_message().strip()
    return f"error: {message}{'' if message.endswith(('.', '!', '?')) else '.'} Fix: see `{where} --help`."


def _fail(e: PocketformerError) -> NoReturn:
    """A user's error: one line and exit 2; with --debug, the full traceback instead."""
    if DEBUG["on"]:  # the whole story, including the exception the one line was raised `from None` over
        import traceback

        e.__suppress_context__ = False
        traceback.print_exception(e)
    else:
        typer.echo(f"error: {e.line()}", err=True)
    sys.exit(2)


def main() -> None:
    usage_errors, click_errors, aborts, exits = _click_classes()
    _quiet_third_party_logs()
    try:
        rc = app(prog_name="pocketformer", standalone_mode=False)
        if rc == 130:  # typer turns Ctrl-C into exit code 130 and returns it
            _exit_interrupted()
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except PocketformerError as e:
        _fail(e)
    except PermissionError as e:  # a path the user named, or a folder above it, is closed to this user: not a bug
        denied = AccessError(f"Permission denied: {e.filename or e}.",
                             "check the permissions of that path and of the folders above it (read access for "
                             "inputs, write access for the output folder and the cache).")
        denied.__context__ = e
        _fail(denied)
    except (*aborts, KeyboardInterrupt):
        _exit_interrupted()
    except usage_errors as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `pocketformer` alone: the help is the answer
            e.show()
        else:
            typer.echo(usage_line(e), err=True)
        sys.exit(2)
    except click_errors as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except exits as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
