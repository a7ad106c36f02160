"""SmolLM2-135M's compressed variants on ONNX Runtime and LiteRT, in one run on this host: quantized (int8, int4),
pruned to a decode latency on host-ort's decode table and distilled, (with --layers) 3 layers pruned and distilled,
MatFormer sub-models (uniform 1/2 and 1/4, and the Mix'n'Match widths `extract --target host-ort` chooses for two
decode budgets), each exported to ONNX (fp32, int8 weight-only, int4) and validated on host-ort, and exported to TFLite
(fp32, int8, int4) and validated on host-litert; then every file's decode and prefill again side by side.

    .venv/bin/python benchmarks/lm_variants.py [--threads 2] [--rounds 2] [--budgets 0.8,0.6] [--formats onnx,tflite]
                                               [--layers]
    (--rounds 0: no side by side; each row from its own run's validation)

Writes benchmarks/results/lm_variants.{json,md}. The runs (runs/bench-lm-variants/) reuse the stage cache: a re-run
after an interruption starts where it stopped.

1. `pocketformer run` of examples/smollm2/recipe.yaml (ONNX only, host-ort only): the baseline, whose PyTorch test
   perplexity every row's change is against (the GGUF's dequantized 4-bit weights), and its int8w / int4 files.
2. `pocketformer run examples/smollm2/latency.yaml`: prune to 1.5x predicted decode speed, then distillation; and
   with --layers, `examples/smollm2/layers.yaml`: the 3 least needed layers removed, then distillation from stored
   top-64 logits (left out by default: half an hour on 2 cores, and not one of the variants issue 18 asks for).
3. `pocketformer run examples/smollm2/matformer.yaml`: the nested model; then `pocketformer extract` of widths 0.5
   and 0.25 and of `--target host-ort --latency-ms B` for B each `--budgets` fraction of the way from the narrowest
   nested widths' predicted decode step to the full width's; each extracted checkpoint through `pocketformer run`
   (export ONNX, validate on host-ort).
4. LiteRT: each variant's compressed checkpoint (its run's model/) through `pocketformer run` exporting TFLite and
   validating on host-litert (RUN-tflite/). TFLite's fp16 and int8-weight files are left out: benchmarks/
   lm_smollm2.py measured them on the baseline (no faster than fp32 at decode; int8-weight peaks at 4.5 GB); its
   per-channel int4 is tried on the baseline only.
5. Side by side: every file's decode and prefill on its runtime (a fresh process each, `--rounds` rounds in turn, the
   best kept) on one 128-token test prompt, and its greedy continuation against the baseline PyTorch model's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from pocketformer import store  # noqa: E402
from pocketformer.export.loop import ExportFailures  # noqa: E402
from pocketformer.extract import extract, nested_choices, run_extract  # noqa: E402
from pocketformer.latency import lm_units  # noqa: E402
from pocketformer.models import load  # noqa: E402
from pocketformer.pipeline import run  # noqa: E402
from pocketformer.recipe import parse_recipe  # noqa: E402
from pocketformer.targets import get_profile  # noqa: E402
from pocketformer.targets.lm_latency import lm_tables_for  # noqa: E402

from lm_side_by_side import profile_of, side_by_side  # noqa: E402  (this folder: the script's own)
from lm_smollm2 import side_prompt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLES = ROOT / "examples" / "smollm2"
TARGET = "host-ort"  # the target the variants are pruned and extracted for
# each format's host target and export settings
RUNTIMES = {"onnx": ("host-ort", {"formats": ["onnx"], "baseline_formats": [], "int8": True, "int4": True,
                                  "skip": ["onnx.int8", "onnx.fp16"]}),
            "tflite": ("host-litert", {"formats": ["tflite"], "baseline_formats": [], "int8": True, "int4": True,
                                       "skip": ["tflite.fp16", "tflite.int8-weight"]})}
EXPORT = RUNTIMES["onnx"][1]


def say(line: str) -> None:
    """A step of the benchmark, with the clock time (how long each step took is read off the log)."""
    print(f"== {time.strftime('%H:%M:%S')} {line}", flush=True)


def as_onnx_on_host(path: Path, **changes) -> dict:
    """The example recipe, exported to ONNX only and validated on host-ort only (the variants' one runtime)."""
    recipe = yaml.safe_load(path.read_text())
    return {**recipe, "export": EXPORT, "targets": [TARGET], **changes}


def run_recipe(fields: dict, folder: Path, refused: dict[str, dict[str, str]]) -> dict:
    """`pocketformer run` of `fields` (one export format) into `folder`; a finished run there (its report.json) is
    taken as it is. A precision whose file the export's parity check refuses is left out (export.skip) and the run
    made again; the refusals (FORMAT.PRECISION -> why) are kept in `refused` for the report, and in
    folder/refused.json, so that an interrupted run's next attempt leaves those files out from the start."""
    name, (fmt,) = fields["name"], fields["export"]["formats"]
    if (folder / "refused.json").is_file():
        refused[name] = json.loads((folder / "refused.json").read_text())
    if (folder / "report.json").is_file():
        say(f"{name}: the finished run in {folder}")
        return json.loads((folder / "report.json").read_text())
    while True:
        skip = fields["export"]["skip"] + [s for s in refused.get(name, {}) if s not in fields["export"]["skip"]]
        fields = {**fields, "export": {**fields["export"], "skip": skip}}
        say(f"pocketformer run {name} -> {folder}")
        try:
            return run(parse_recipe(fields, str(folder / "recipe.yaml")), folder)
        except ExportFailures as e:
            new = {f"{fmt}.{p}": why for p, why in e.refused().items() if f"{fmt}.{p}" not in skip}
            if not new:
                raise  # not a refused file, or one left out already (the float file, which is always written)
            refused.setdefault(name, {}).update(new)
            say(f"refused, left out: {e.problem}")
            (folder / "refused.json").write_text(json.dumps(refused[name]))


def finish_formats(formats: list[str], reports: dict, folders: dict, refused: dict) -> None:
    """The other formats: each variant's compressed checkpoint (its ONNX run's model/) exported and validated there."""
    for fmt in formats[1:]:
        target, export = RUNTIMES[fmt]
        for name in [n for n, f in list(reports) if f == "onnx"]:
            onnx_folder = folders[name, "onnx"]
            # TFLite's int4 is per-channel (ONNX's is blockwise): tried on the baseline only; a refusal costs a
            # second export of the variant, and a compressed model's outputs survive 4 bits less well
            skip = ["tflite.int4"] if fmt == "tflite" and name != "baseline" else []
            fields = {"name": f"{reports[name, 'onnx']['recipe']['name']}-{fmt}", "model": str(onnx_folder / "model"),
                      "data": "wikipedia", "seed": 0, "max_len": 128, "batch_size": 8,
                      "export": {**export, "skip": export["skip"] + skip},
                      "targets": [target]}
            folder = onnx_folder.with_name(f"{onnx_folder.name}-{fmt}")
            reports[name, fmt], folders[name, fmt] = run_recipe(fields, folder, refused), folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budgets", default="0.8,0.6", help="decode budgets for extract --target, as fractions of the "
                                                         "way from the narrowest nested widths' predicted decode "
                                                         "step to the full width's (0: the narrowest, 1: the full)")
    ap.add_argument("--formats", default="onnx,tflite", help="formats each variant is exported to (onnx first: the "
                                                             "variants are made in the ONNX runs)")
    ap.add_argument("--layers", action="store_true", help="also examples/smollm2/layers.yaml (3 layers pruned)")
    ap.add_argument("--finished-only", action="store_true",
                    help="only the variants whose ONNX run has finished, through the other formats; no new ONNX run, "
                         "no side by side, no results: a second process beside a running benchmark, so that its "
                         "single-threaded exports overlap (the side by side is then measured alone)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-lm-variants")
    args = ap.parse_args()
    formats = args.formats.split(",")
    started = time.time()
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    reports: dict[tuple[str, str], dict] = {}  # (variant, format) -> its run's report
    folders: dict[tuple[str, str], Path] = {}  # (variant, format) -> its run's folder
    refused: dict[str, dict[str, str]] = {}  # run name -> FORMAT.PRECISION -> why its file was refused

    def variant(name: str, fields: dict, folder: Path) -> None:
        if args.finished_only and not (folder / "report.json").is_file():
            return
        reports[name, "onnx"], folders[name, "onnx"] = run_recipe(fields, folder, refused), folder

    variant("baseline", as_onnx_on_host(EXAMPLES / "recipe.yaml", name="smollm2-base"), work / "base")
    variant("latency-pruned 1.5x + distill", as_onnx_on_host(EXAMPLES / "latency.yaml"), work / "latency")
    if args.layers:
        variant("3 layers pruned + distill (top-64 logits)", as_onnx_on_host(EXAMPLES / "layers.yaml"), work / "layers")
    nested = work / "matformer"
    variant("matformer (nested, full width)", as_onnx_on_host(EXAMPLES / "matformer.yaml"), nested)

    if args.finished_only and not (nested / "report.json").is_file():
        return finish_formats(formats, reports, folders, refused)
    model, _ = load(nested / "model")
    decode = lm_tables_for(get_profile(TARGET), model.config, "fp32")["decode"]
    full_ms = decode.predict(lm_units(model.config))
    # the narrowest nested widths' step: a budget below it has no answer (FFN widths are a small part of a decode
    # step: SmolLM2's narrowest nested model is predicted at about 0.8 x the full one's)
    narrowest_ms = decode.predict(lm_units(extract(model, [c[-1] for c in nested_choices(model)]).config))
    # (name, extract's settings, folder slug): the two decode budgets before 1/4, so that an interrupted run has
    # the budgets' rows (issue 18 asks for them) first
    extracts = [("matformer 1/2", {"widths": "0.5"}, "widths-0.5")]
    for f in map(float, args.budgets.split(",")):
        budget = round(narrowest_ms + f * (full_ms - narrowest_ms), 3)
        extracts.append((f"matformer for decode <= {budget:.2f} ms ({budget / full_ms:.2f} x full width)",
                         {"target": TARGET, "latency_ms": budget}, f"decode-span-{f:g}"))
    extracts += [("matformer 1/4", {"widths": "0.25"}, "widths-0.25")]
    extracted: dict[str, dict] = {}
    for name, how, slug in extracts:
        ckpt = work / f"extract-{slug}"
        if not (ckpt / "model.safetensors").is_file():
            if args.finished_only:
                continue
            say(f"pocketformer extract {nested} {how}")
            extracted[name] = run_extract(nested, ckpt, **how)
        else:  # extracted by an earlier, interrupted run of this benchmark
            extracted[name] = json.loads((ckpt / "pocketformer.json").read_text())["provenance"]
        fields = {"name": f"smollm2-extract-{slug}", "model": str(ckpt), "data": "wikipedia", "seed": 0,
                  "max_len": 128, "batch_size": 8, "export": EXPORT, "targets": [TARGET]}
        variant(name, fields, work / f"extracted-{slug}")

    finish_formats(formats, reports, folders, refused)
    if args.finished_only:
        return

    # side by side: every file, a fresh process each, rounds in turn; greedy continuations against the baseline's
    base, _ = load(work / "base" / "baseline")
    base_recipe = reports["baseline", "onnx"]["recipe"]
    lm = get_profile(TARGET).language_models
    prompt, want = side_prompt(base, work / "base" / "baseline", base_recipe, lm)
    files = {(name, a["file"]): (folders[name, fmt] / "artifacts" / a["file"], a)
             for (name, fmt), report in reports.items()
             for a in report["artifacts"] if a["format"] == fmt and a.get("variant", "model") == "model"}
    say(f"side by side: {len(files)} files, {args.rounds} rounds")
    measured = side_by_side({path: profile_of(path, args.threads) for path, _ in files.values()}, prompt, want,
                            args.rounds)
    best = {key: {**measured[path], "precision": a["precision"], "size_mb": a["size_bytes"] / 1e6}
            for key, (path, a) in files.items() if path in measured}
    base_ppl = next(r["reference_perplexity"] for r in reports["baseline", "onnx"]["validation"]
                    if r.get("reference_perplexity") is not None)
    rows = []
    for (name, fmt), report in reports.items():
        for v in report["validation"]:
            if v.get("perplexity") is None:
                continue
            s = best.get((name, v["file"]), {})
            rows.append({"variant": name, "format": fmt, "runtime": v.get("runtime"), "file": v["file"],
                         "precision": v["precision"],
                         "perplexity": v["perplexity"], "change_pct": (v["perplexity"] / base_ppl - 1) * 100,
                         "token_match_own_pytorch": v.get("token_match"),
                         "token_match_baseline": s.get("match"),
                         # --rounds 0 (no side by side): each run's own validation figures
                         "decode_tokens_per_s": s.get("decode_tokens_per_s", v.get("decode_tokens_per_s")),
                         "prefill_tokens_per_s": s.get("prefill_tokens_per_s", v.get("prefill_tokens_per_s")),
                         "validation_decode_tokens_per_s": v.get("decode_tokens_per_s"),
                         "size_mb": s.get("size_mb", v.get("size_mb")),
                         "peak_rss_mb": s.get("peak_rss_mb", v.get("peak_rss_mb")),
                         "params": report["model"].get("params"),
                         "layers": [(la.get("heads"), la.get("kv_heads"), la.get("ffn"))
                                    for la in report["model"].get("layers", [])]})
    # speed-up and size against the baseline's fp32 file of the same format, on the same runtime
    fp32 = {r["format"]: r for r in rows if r["variant"] == "baseline" and r["precision"] == "fp32"}
    for r in rows:
        ref = fp32.get(r["format"], {})
        r["decode_speedup"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"] \
            if r["decode_tokens_per_s"] and ref.get("decode_tokens_per_s") else None
        r["smaller"] = ref["size_mb"] / r["size_mb"] if r["size_mb"] and ref.get("size_mb") else None
    result = {"env": {"cpu": store.fingerprint(), "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
                      "versions": store.package_versions("onnxruntime", "ai-edge-litert", "torch"),
                      "command": " ".join(["benchmarks/lm_variants.py"] + sys.argv[1:]),
                      "seconds": round(time.time() - started), "side_by_side_rounds": args.rounds},
              "baseline_perplexity": base_ppl, "full_width_decode_predicted_ms": full_ms,
              "narrowest_decode_predicted_ms": narrowest_ms,
              "extracted": {name: {k: p.get(k) for k in ("widths", "search", "confirmation")}
                            for name, p in extracted.items()},
              "rows": rows, "best_composition": best_composition(rows), "refused": refused,
              "prompt_tokens": len(prompt), "new_tokens": lm.new_tokens}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm_variants.json").write_text(json.dumps(result, indent=2, default=str))
    (RESULTS / "lm_variants.md").write_text(markdown(result))
    print((RESULTS / "lm_variants.md").read_text())


def best_composition(rows: list[dict]) -> dict | None:
    """The composed row nearest the aim: a compressed variant's quantized file, first by how many of the aim's three
    parts it meets, then by the smallest perplexity change."""
    def met(r: dict) -> int:
        return ((r["decode_speedup"] or 0) >= 2) + ((r["smaller"] or 0) >= 4) + (r["change_pct"] <= 10)

    composed = [r for r in rows if r["variant"] != "baseline" and r["precision"] != "fp32"]
    return max(composed, key=lambda r: (met(r), -r["change_pct"]), default=None)


def markdown(result: dict) -> str:
    env = result["env"]
    lines = ["# SmolLM2-135M variants on ONNX Runtime (host-ort) and LiteRT (host-litert)", "",
             f"Command: `.venv/bin/python {env['command']}` ({env['date']}, {env['seconds']} s). CPU: {env['cpu']}; "
             f"{env['threads']} threads; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".", "",
             f"Perplexity on Wikipedia test windows of 128 tokens (the run's validation on ONNX Runtime); change "
             f"against the baseline PyTorch model's {result['baseline_perplexity']:.2f} (the GGUF's dequantized "
             f"weights). Token match: the file's greedy continuation of one {result['prompt_tokens']}-token prompt "
             f"({result['new_tokens']} tokens) against the baseline PyTorch model's. Decode and prefill: "
             + ("side by side, a fresh process per file, best of the rounds" if env.get("side_by_side_rounds", 1)
                else "each run's own validation (files measured in different runs, minutes apart: no side by side, "
                     "no token match against the baseline)")
             + "; speed-up and size against the baseline's fp32 file of the same format (model.fp32.onnx on ONNX "
               "Runtime, model.fp32.tflite on LiteRT).", "",
             "| variant | file | perplexity | change | token match | decode tok/s | x fp32 | prefill tok/s | "
             "size MB | x smaller | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    def pct(x):
        return "" if x is None else f"{x * 100:.0f}%"

    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['file']} | {r['perplexity']:.2f} | {r['change_pct']:+.1f}% | "
                     f"{pct(r['token_match_baseline'])} | "
                     f"{f(r['decode_tokens_per_s'], '.1f')} | {f(r['decode_speedup'], '.2f')} | "
                     f"{f(r['prefill_tokens_per_s'], '.0f')} | {f(r['size_mb'], '.1f')} | {f(r['smaller'], '.1f')} | "
                     f"{f(r['peak_rss_mb'], '.0f')} |")
    aim = [r for r in result["rows"] if r["change_pct"] <= 10 and (r["decode_speedup"] or 0) >= 2
           and (r["smaller"] or 0) >= 4]
    lines += ["", "Aim (decode >= 2x the fp32 file, >= 4x smaller, perplexity <= +10%): " +
              (", ".join(f"{r['variant']} {r['file']}" for r in aim) if aim else "no variant meets all three"), ""]
    best = best_composition(result["rows"])
    if best is not None:
        lines += [f"Best composition (a compression stage, then weight quantization): {best['variant']} "
                  f"{best['file']} ({best['format']}): decode {f(best['decode_speedup'], '.2f')}x, "
                  f"{f(best['smaller'], '.1f')}x smaller, perplexity {best['change_pct']:+.1f}%", ""]
    for name, problems in result["refused"].items():
        lines += [f"- {name}: refused at export, left out: " + "; ".join(problems.values())]
    for name, e in result["extracted"].items():
        c = e.get("confirmation") or {}
        lines.append(f"- {name}: widths {e.get('widths')}; test perplexity {f(c.get('perplexity'), '.2f')} "
                     f"({f(c.get('perplexity_increase_pct'), '+.1f')}% against the run's baseline)")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
