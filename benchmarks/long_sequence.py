"""Long-sequence benchmark: softmax against EcoFormer (binarized, linear) attention as the input grows, in ONNX
Runtime and LiteRT, so a user sees from which length on EcoFormer pays on a CPU.

    .venv/bin/python benchmarks/long_sequence.py                      # 128, 512, 1024, 2048 tokens
    .venv/bin/python benchmarks/long_sequence.py --lengths 256 4096 --repeats 30
    .venv/bin/python benchmarks/long_sequence.py --quick              # tiny model, two short lengths: a smoke run

The model is MiniLM-shaped (hidden 384, 6 layers, 12 heads, FFN 1536, 2,048 positions) with random weights: latency
depends on shapes, not on weight values. The EcoFormer variant has the same weights and 16-bit codes from 25 anchors
per head in every layer. Each variant is exported per length with static shapes (ONNX fp32 and TFLite fp32), checked
against PyTorch in its runtime, and timed at batch 1 in a fresh process (pocketformer.targets.validate.
measure_latency): p50 of `repeats` runs after `warmup` runs, at `threads` threads, inputs all real tokens.

Accuracy is not measured here (random weights): with --sentiment-run pointing at a finished run of
examples/minilm-sentiment/ecoformer.yaml, its validation on host-ort (test split) is added to the results.

Writes benchmarks/results/long_sequence.{json,md,png} (with --quick: under --work, leaving the real results alone)
and prints the crossover length and the ratio at the longest length.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pocketformer import store  # noqa: E402
from pocketformer.export import onnx as onnx_export, tflite as tflite_export  # noqa: E402
from pocketformer.export.base import parity  # noqa: E402
from pocketformer.models import CanonicalTransformer, HeadSpec, LayerShape, ModelConfig  # noqa: E402
from pocketformer.models.canonical import encoder_macs  # noqa: E402
from pocketformer.targets import Profile, get_profile  # noqa: E402
from pocketformer.targets.runtime import get_runtime  # noqa: E402
from pocketformer.targets.validate import measure_latency  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SENTIMENT_RUN = ROOT / "runs" / "bench" / "ecoformer"  # written by benchmarks/minilm_sentiment.py
MINILM = dict(hidden=384, layers=6, heads=12, head_dim=32, ffn=1536, max_positions=2048, bits=16, anchors=25)
TINY = dict(hidden=64, layers=2, heads=4, head_dim=16, ffn=128, max_positions=256, bits=8, anchors=8)
RUNTIMES = {"onnxruntime": ("onnx", get_runtime("onnxruntime")), "litert": ("tflite", get_runtime("litert"))}
ATTENTIONS = ("softmax", "ecoformer")


def build_model(shape: dict[str, int], attention: str, vocab_size: int) -> CanonicalTransformer:
    """The random MiniLM-shaped classifier; both attentions share every weight (same seed)."""
    layer = LayerShape(heads=shape["heads"], head_dim=shape["head_dim"], ffn=shape["ffn"], attention=attention,
                       hash_bits=shape["bits"] if attention == "ecoformer" else 0,
                       anchors=shape["anchors"] if attention == "ecoformer" else 0)
    cfg = ModelConfig(modality="text", hidden=shape["hidden"], layers=[layer] * shape["layers"],
                      vocab_size=vocab_size, max_positions=shape["max_positions"], type_vocab_size=2,
                      head=HeadSpec(pooling="mean", labels=["rotten", "fresh"]))
    torch.manual_seed(0)
    return CanonicalTransformer(cfg).eval()


def token_inputs(length: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 1, every position a real token (no padding): the cost of a document that long."""
    g = torch.Generator().manual_seed(length)
    return torch.randint(1000, vocab_size, (1, length), generator=g), torch.ones(1, length, dtype=torch.long)


def export_file(model: CanonicalTransformer, fmt: str, path: Path, inputs) -> None:
    if fmt == "onnx":
        onnx_export.export_float(model, path, inputs, static_shape=True)
    else:
        tflite_export.export_float(model, path, inputs)


def check_parity(model: CanonicalTransformer, runtime, path: Path, inputs) -> dict[str, float]:
    """The file against PyTorch in its runtime, recorded rather than enforced: the timing is what this measures."""
    got = runtime.open(path, 1).output({n: t.numpy() for n, t in zip(model.input_names, inputs)})
    with torch.no_grad():
        want = model(*inputs).numpy()
    return parity(want, got)


def crossover(lengths: list[int], softmax_ms: list[float], eco_ms: list[float]) -> dict[str, Any]:
    """The first measured length from which EcoFormer stays faster, and the length where the latency ratio crosses
    1 by log-log interpolation between the measured lengths around it (None when it never does)."""
    ratios = [s / e for s, e in zip(softmax_ms, eco_ms)]
    first = next((lengths[i] for i in range(len(lengths)) if all(r > 1 for r in ratios[i:])), None)
    estimate = None
    if first is not None:
        i = lengths.index(first)
        if i == 0:
            estimate = None  # faster at every measured length: the crossover lies below the shortest
        else:
            x0, x1 = math.log(lengths[i - 1]), math.log(lengths[i])
            y0, y1 = math.log(ratios[i - 1]), math.log(ratios[i])
            estimate = round(math.exp(x0 + (0 - y0) * (x1 - x0) / (y1 - y0)))
    return {"first_faster_length": first, "interpolated_length": estimate,
            "faster_at_every_length": first == lengths[0], "ratios": ratios}


def sentiment_accuracy(run: Optional[Path]) -> Optional[dict[str, Any]]:
    """Accuracy of a finished examples/minilm-sentiment/ecoformer.yaml run on host-ort, and the binarize stage's
    own report (before and after recovery distillation)."""
    if run is None or not (run / "validation" / "host-ort.json").is_file():
        return None
    rows = json.loads((run / "validation" / "host-ort.json").read_text())["rows"]
    compress = store.read_compress(run)
    stages = {s["stage"]: s for s in compress["stages"]}
    fp32 = next((r for r in rows if r["precision"] == "fp32" and r["variant"].startswith("model")), None)
    return {"run": str(run), "examples": fp32["examples"] if fp32 else None,
            "reference_accuracy": fp32["reference_accuracy"] if fp32 else None,
            "ecoformer_accuracy": fp32["accuracy"] if fp32 else None,
            "accuracy_drop": fp32["accuracy_drop"] if fp32 else None,
            "latency_p50_ms_at_128": fp32["latency_p50_ms"] if fp32 else None,
            "validation_accuracy_after_binarize": stages.get("binarize", {}).get("validation_accuracy"),
            "validation_accuracy_after_distill": stages.get("distill", {}).get("validation_accuracy"),
            # the stage's own details (runs before stage results were typed nested them under "binarize")
            "binarize_report": (lambda d: d.get("binarize", d) or None)(stages.get("binarize", {}).get("details", {})),
            "budget_accuracy_drop": get_profile("host-ort").budgets.accuracy_drop}


def plot(rows: list[dict], cross: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"onnxruntime": "tab:blue", "litert": "tab:orange"}
    for runtime, color in styles.items():
        for attention, line in (("softmax", "-"), ("ecoformer", "--")):
            pts = sorted((r["length"], r["latency_p50_ms"]) for r in rows
                         if r["runtime"] == runtime and r["attention"] == attention)
            if pts:
                ax.plot(*zip(*pts), line, marker="o", color=color, label=f"{runtime}, {attention}")
        at = cross.get(runtime, {}).get("interpolated_length")
        if at:
            ax.axvline(at, color=color, alpha=0.3, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lengths = sorted({r["length"] for r in rows})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("sequence length (tokens, batch 1)")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict[str, Any], command: str) -> str:
    env, rows, cross = result["env"], result["rows"], result["crossover"]
    longest = max(r["length"] for r in rows)
    lines = ["## Long sequences: softmax vs EcoFormer attention", "",
             f"Command: `{command}`. {env['model']} with random weights (latency depends on shapes only); "
             f"EcoFormer in every layer ({env['bits']}-bit codes, {env['anchors']} anchors per head), same weights "
             f"otherwise. Static-shape fp32 files per length; p50 of {env['repeats']} runs after {env['warmup']} "
             f"warm-up runs, batch 1, {env['threads']} threads, each file in a fresh process. ONNX Runtime "
             f"{env['onnxruntime']}, LiteRT {env['litert']} (XNNPACK). Machine: {env['machine']} "
             f"({store.cpu_text(env.get('cpu'), env['machine']) or 'CPU features not recorded'}), "
             f"{env['cpu_count']} cores.", "",
             "| tokens | runtime | softmax p50 ms | EcoFormer p50 ms | softmax / EcoFormer | softmax GMACs | "
             "EcoFormer GMACs |", "|---|---|---|---|---|---|---|"]
    by = {(r["length"], r["runtime"], r["attention"]): r for r in rows}
    for length in sorted({r["length"] for r in rows}):
        for runtime in RUNTIMES:
            s, e = by.get((length, runtime, "softmax")), by.get((length, runtime, "ecoformer"))
            if s and e:
                lines.append(f"| {length} | {runtime} | {s['latency_p50_ms']:.1f} | {e['latency_p50_ms']:.1f} | "
                             f"{s['latency_p50_ms'] / e['latency_p50_ms']:.2f}x | {s['macs'] / 1e9:.1f} | "
                             f"{e['macs'] / 1e9:.1f} |")
    lines.append("")
    for runtime, c in cross.items():
        if c["faster_at_every_length"]:
            where = f"EcoFormer is faster at every measured length (from {c['first_faster_length']} tokens)"
        elif c["first_faster_length"] is None:
            where = f"EcoFormer is not faster at any measured length up to {longest} tokens"
        else:
            where = (f"EcoFormer is faster from {c['first_faster_length']} tokens on (ratio 1 crossed near "
                     f"{c['interpolated_length']} tokens, log-log interpolation)")
        lines.append(f"- {runtime}: {where}; at {longest} tokens softmax / EcoFormer = {c['ratios'][-1]:.2f}x.")
    worst = min((r["parity_vs_pytorch"]["cosine"] for r in rows), default=1.0)
    lines += [f"- Every file was checked against PyTorch in its runtime: lowest output cosine {worst:.6f}.", ""]
    acc = result.get("sentiment")
    if acc and acc["accuracy_drop"] is not None:
        holds = acc["accuracy_drop"] <= acc["budget_accuracy_drop"]
        lines += [f"Accuracy on the MiniLM sentiment example (examples/minilm-sentiment/ecoformer.yaml: binarize "
                  f"all layers + distill; {acc['examples']} test reviews, host-ort fp32 ONNX): "
                  f"{acc['ecoformer_accuracy']:.2f}% against {acc['reference_accuracy']:.2f}% for the softmax "
                  f"model, a drop of {acc['accuracy_drop']:.2f} points (validation accuracy after hashing alone "
                  f"{_pct(acc['validation_accuracy_after_binarize'])}, after distillation "
                  f"{_pct(acc['validation_accuracy_after_distill'])}).",
                  "" if holds else f"EcoFormer does not hold accuracy on these short reviews: the drop exceeds "
                  f"the {acc['budget_accuracy_drop']} point budget of the host-ort target, while at their length "
                  f"(128 tokens or fewer) it is not faster either.", ""]
    else:
        lines += ["Accuracy on the MiniLM sentiment example: not measured in this run. Run "
                  "`pocketformer run examples/minilm-sentiment/ecoformer.yaml`, then pass "
                  "`--sentiment-run runs/minilm-sentiment-ecoformer`.", ""]
    lines += ["![latency vs sequence length](long_sequence.png)", ""]
    return "\n".join(lines)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtimes", nargs="+", choices=list(RUNTIMES), default=list(RUNTIMES))
    ap.add_argument("--quick", action="store_true", help="tiny model, lengths 32 64, 3 repeats: a smoke run")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "long_sequence", help="where the files go")
    ap.add_argument("--results", type=Path, default=None,
                    help=f"where results go (default {RESULTS.relative_to(ROOT)}; with --quick, WORK/results)")
    ap.add_argument("--sentiment-run", type=Path, default=SENTIMENT_RUN,
                    help="a finished run of examples/minilm-sentiment/ecoformer.yaml, for the accuracy figures")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.repeats, args.warmup = [32, 64], 3, 1
        args.work = args.work.with_name(args.work.name + "-quick")
    shape = TINY if args.quick else MINILM
    if max(args.lengths) > shape["max_positions"]:
        ap.error(f"--lengths above {shape['max_positions']} exceed the model's positions")
    results_dir = args.results or (args.work / "results" if args.quick else RESULTS)
    vocab_size = 30522
    t0 = time.monotonic()

    models = {a: build_model(shape, a, vocab_size) for a in ATTENTIONS}
    models["ecoformer"].load_state_dict(models["softmax"].state_dict(), strict=False)  # same weights, own hashes
    rows = []
    for length in args.lengths:
        inputs = token_inputs(length, vocab_size)
        feeds = {n: t.numpy() for n, t in zip(models["softmax"].input_names, inputs)}
        for runtime in args.runtimes:
            fmt, module = RUNTIMES[runtime]
            profile = Profile(name=f"long-{runtime}", format=fmt, runtime=runtime, threads=args.threads, batch=1,
                              seq_len=length, warmup=args.warmup, repeats=args.repeats, this_host=True)
            for attention, model in models.items():
                path = args.work / f"{attention}-{length}.fp32.{fmt}"
                print(f"== {attention} attention, {length} tokens, {runtime}: export", flush=True)
                export_file(model, fmt, path, inputs)
                check = check_parity(model, module, path, inputs)
                print(f"   parity cosine {check['cosine']:.6f}, max abs diff {check['max_abs_diff']:.2e}; timing",
                      flush=True)
                timing = measure_latency(path, profile, feeds)
                print(f"   p50 {timing['latency_p50_ms']:.1f} ms", flush=True)
                rows.append({"length": length, "runtime": runtime, "attention": attention, "file": path.name,
                             "size_mb": path.stat().st_size / 1e6, "macs": encoder_macs(model.config, length),
                             "parity_vs_pytorch": check, **timing})
    cross = {}
    for runtime in args.runtimes:
        lat = {a: [next(r["latency_p50_ms"] for r in rows if r["runtime"] == runtime and r["attention"] == a
                        and r["length"] == n) for n in args.lengths] for a in ATTENTIONS}
        cross[runtime] = crossover(args.lengths, lat["softmax"], lat["ecoformer"])
    env = {"model": ("MiniLM-shaped encoder (hidden 384, 6 layers, 12 heads x 32, FFN 1536)" if not args.quick
                     else "tiny encoder (hidden 64, 2 layers, 4 heads x 16, FFN 128; --quick)"),
           "bits": shape["bits"], "anchors": shape["anchors"], "threads": args.threads, "repeats": args.repeats,
           "warmup": args.warmup, "lengths": args.lengths, "machine": platform.machine(), "cpu": store.cpu(),
           "cpu_count": os.cpu_count(), **store.versions(), "litert": get_runtime("litert").version(), "wall_s": None}
    result = {"env": env, "rows": rows, "crossover": cross,
              "sentiment": sentiment_accuracy(args.sentiment_run) if not args.quick else None}
    env["wall_s"] = round(time.monotonic() - t0)
    command = "benchmarks/long_sequence.py " + " ".join(sys.argv[1:])
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "long_sequence.json").write_text(json.dumps(result, indent=2))
    (results_dir / "long_sequence.md").write_text(markdown(result, command.strip()))
    plot(rows, cross, results_dir / "long_sequence.png",
         f"softmax vs EcoFormer attention, {env['model'].split(' (')[0]}, {args.threads} threads")
    longest = max(args.lengths)
    for runtime, c in cross.items():
        at = c["interpolated_length"] or c["first_faster_length"]
        print(f"{runtime}: crossover {'none up to ' + str(longest) if at is None else f'~{at} tokens'}"
              f"{' (faster at every length)' if c['faster_at_every_length'] else ''}; at {longest} tokens "
              f"softmax / EcoFormer = {c['ratios'][-1]:.2f}x")
    print(f"wrote {results_dir / 'long_sequence.json'}, .md, .png")


if __name__ == "__main__":
    main()
