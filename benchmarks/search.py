"""`pocketformer search` on the MiniLM sentiment example against the hand-written recipes, all measured in one run here.

    .venv/bin/python benchmarks/search.py            # runs (or resumes) the search, then compares

Writes benchmarks/results/search.{json,md}.

1. The search: `pocketformer search examples/minilm-sentiment/search.yaml -o runs/bench-search` (host-ort, at most
   1.0 point on the validation split; its wall-clock time over all its runs and its trial count come from
   search.json). A finished search started again only re-measures and re-confirms.
2. The hand-written recipes within the budget in RESULTS.md (and latency_pruning.md), rebuilt from the stage cache
   where their run folders are gone, each exported to ONNX at fp32 and int8 (ORT dynamic, per channel).
3. One measurement for all: every file (the search's chosen one, the reference's fp32 file, each hand-written file)
   timed on host-ort (2 threads, batch 1 x 128 tokens) in fresh processes, files taken in turn, `--rounds` rounds,
   the lowest p50 kept; accuracy of each on the 2,000 test reviews, paired with the fine-tuned model in PyTorch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pocketformer import pipeline, store  # noqa: E402
from pocketformer.data import Encoder, load_dataset  # noqa: E402
from pocketformer.export import ExportFailures  # noqa: E402
from pocketformer.models import load  # noqa: E402
from pocketformer.recipe import load_recipe  # noqa: E402
from pocketformer.search import measure_files  # noqa: E402
from pocketformer.targets import get_profile  # noqa: E402
from pocketformer.targets.validate import accuracy_drop, predict_artifact  # noqa: E402
from pocketformer.train import predict  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE = ROOT / "examples" / "minilm-sentiment"
sys.path.insert(0, str(ROOT / "benchmarks"))
from minilm_sentiment import DISTILL, PRUNE_MEDIUM, SHORT_DISTILL  # noqa: E402

# Hand-written recipes whose test drop was within 1 point (RESULTS.md, latency_pruning.md), by their stages after the
# example's fine-tune. Early exit (1.38-1.74x mean) and MatFormer width 1/2 (1.46x) are slower than these; the
# quantize stage's int8 weights (pruned+int8) are the same file as pruned-medium's ORT int8.
HAND_WRITTEN = {
    "pruned-medium (recipe.yaml)": [PRUNE_MEDIUM, DISTILL],
    "pruned+lowrank-light": [PRUNE_MEDIUM, DISTILL, {"lowrank": {"method": "budget", "budget": 0.8}}, DISTILL],
    "retraining-free 2x": [{"prune": {"speedup": 2.0}}],
    "retraining-free 3x + short distill (latency.yaml)": [{"prune": {"speedup": 3.0}}, SHORT_DISTILL],
}


def build(name: str, stages: list, work: Path) -> tuple[Path, dict[str, str]]:
    """The hand-written recipe compressed and exported to ONNX at fp32 and int8; a precision whose file the export's
    check refuses (its outputs do not survive int8 weights) is returned with the reason instead of a file."""
    recipe = load_recipe(EXAMPLE / "recipe.yaml").model_copy(update={"stages": stages, "name": "hand"})
    out = work / name.split(" (")[0].replace(" ", "-").replace("+", "-")
    pipeline.compress(recipe, recipe.resolve_model(), out, target="host-ort")
    try:
        pipeline.export(out, ["onnx"], int8=True, baseline_formats=[])
    except ExportFailures as e:
        refused = e.refused()
        if not refused or "fp32" in refused:
            raise  # not a refused quantized file: the benchmark cannot go on without this recipe's model
        return out, refused
    return out, {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-search-hand")
    ap.add_argument("--search", type=Path, default=ROOT / "runs" / "bench-search")
    ap.add_argument("--minutes", type=float, help="the search's --minutes for this run (a resumed search: the rest)")
    ap.add_argument("--trials", type=int, help="the search's --trials (a finished search given more goes on: the "
                                               "study keeps its trials and draws the rest)")
    args = ap.parse_args()
    cmd = [str(ROOT / ".venv" / "bin" / "pocketformer"), "search", str(EXAMPLE / "search.yaml"), "-o", str(args.search)]
    if args.minutes is not None:
        cmd += ["--minutes", str(args.minutes)]
    if args.trials is not None:
        cmd += ["--trials", str(args.trials)]
    started = time.time()
    subprocess.run(cmd, check=True)
    summary = json.loads((args.search / "search.json").read_text())
    profile = get_profile("host-ort")
    ref = summary["reference"]
    search_data = load_recipe(EXAMPLE / "search.yaml").data
    hand_data = load_recipe(EXAMPLE / "recipe.yaml").data
    # (label, kind, path, the fine-tuned model its drop is paired with: the search's own reference, or, for the
    # hand-written recipes, the model their recipe fine-tuned, when the search holds out more validation data)
    files = []
    if summary.get("chosen") is not None:
        chosen = next(p for p in summary["points"] if p["id"] == summary["chosen_id"])
        files.append((f"search: trial {chosen['number']}: {chosen['composition']} @ {chosen['precision']}", "search",
                      chosen["artifact"], "search"))
    refused = {}  # hand-written file -> why the export's check refused it
    for name, stages in HAND_WRITTEN.items():
        out, why = build(name, stages, args.work)
        refused.update({f"{name} {p}": w for p, w in why.items()})
        for precision in [p for p in ("fp32", "int8") if p not in why]:
            files.append((f"{name} {precision}", "hand-written", str(out / "artifacts" / f"model.{precision}.onnx"),
                          "search" if hand_data == search_data else str(out / "baseline")))
    files.append((f"reference (fine-tuned on {search_data}) fp32", "reference", ref["artifact"], "search"))
    references = {"search": np.load(ref["outputs"])["test"]}
    rows = []
    for label, kind, path, paired in files:
        run = Path(path).parent.parent
        model, _ = load(run / "model")
        ds = load_dataset("rotten_tomatoes", "test", 0).for_model("text", model.spec.head.labels, str(run))
        if paired not in references:  # a hand-written recipe's own fine-tuned model, in PyTorch
            base, _ = load(Path(paired))
            references[paired] = predict(base, ds, Encoder(Path(paired), 128)).numpy()
        out = predict_artifact(Path(path), profile, ds, Encoder(run / "model", 128), desc=f"test: {label}")
        figures, drop = accuracy_drop(model.task, out, references[paired], ds.labels, profile)
        rows.append({"variant": label, "kind": kind, "file": path, "size_mb": Path(path).stat().st_size / 1e6,
                     "accuracy": figures["accuracy"], "reference_accuracy": figures["reference_accuracy"],
                     "paired_with": "the search's reference" if paired == "search" else paired,
                     "test_drop": drop.drop, "test_drop_interval": list(drop.interval),
                     "within_budget": drop.drop <= summary["search"]["max_drop"]})
    ms = measure_files([r["file"] for r in rows], "host-ort", rounds=args.rounds)
    ref_ms = ms[-1]
    for r, m in zip(rows, ms):
        r["latency_p50_ms"] = m
        r["speedup"] = ref_ms / m if m else None
    within = [r for r in rows if r["within_budget"] and r["kind"] != "reference"]
    fastest_hand = min((r for r in within if r["kind"] == "hand-written"), key=lambda r: r["latency_p50_ms"],
                       default=None)
    search_row = next((r for r in rows if r["kind"] == "search"), None)
    env = {"cpu": store.fingerprint(), "threads": profile.threads, "runtime": "onnxruntime",
           "versions": store.package_versions("onnxruntime", "optuna", "torch"), "rounds": args.rounds,
           "date": time.strftime("%Y-%m-%d"), "command": " ".join(["benchmarks/search.py"] + sys.argv[1:]),
           "search_data": search_data, "hand_data": hand_data,
           "benchmark_seconds": round(time.time() - started, 1)}
    result = {"env": env, "search": {k: summary[k] for k in ("search", "wall_seconds_all_runs", "parallel",
                                                             "threads_per_trial", "chosen", "chosen_id", "pareto",
                                                             "cpu")},
              "trials": len(summary["trials"]), "trial_states": {s: sum(t["status"] == s for t in summary["trials"])
                                                                 for s in ("complete", "pruned", "failed")},
              "files": len(summary["points"]), "refused": sum(len(t.get("refused", {})) for t in summary["trials"]),
              "confirmation": summary.get("confirmation"), "rows": rows, "hand_written_refused": refused,
              "search_beats_hand_written": bool(search_row and search_row["within_budget"] and fastest_hand and
                                                search_row["latency_p50_ms"] < fastest_hand["latency_p50_ms"])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search.json").write_text(json.dumps(result, indent=2, default=str))
    (RESULTS / "search.md").write_text(markdown(result, summary, fastest_hand, search_row))
    print((RESULTS / "search.md").read_text())


def markdown(result: dict, summary: dict, fastest_hand, search_row) -> str:
    env, s = result["env"], result["search"]
    lines = ["# Search against the hand-written recipes (MiniLM sentiment, host-ort)", "",
             f"Command: `.venv/bin/python {env['command']}` ({env['date']}). CPU: {env['cpu']}, 2 vCPUs; ONNX Runtime "
             f"{env['versions'].get('onnxruntime')}, {env['threads']} threads, batch 1 x 128 tokens; latency = the "
             f"lowest p50 over {env['rounds']} fresh-process runs per file (50 runs after 10 warm-up each), all files "
             "in turn in this one run; accuracy on the 2,000 test reviews, drop paired with the fine-tuned model in "
             "PyTorch it was made from (95% interval from the discordant pairs): the search's reference for the "
             "search, the example's fine-tuned model for the hand-written recipes (the two differ when the search's "
             f"data holds out more validation examples: {env.get('search_data')} against {env.get('hand_data')}); "
             "speed-up against the search's reference file.", "",
             f"Search: `pocketformer search examples/minilm-sentiment/search.yaml` (Optuna {env['versions'].get('optuna')}"
             f", multi-objective TPE): {result['trials']} trials ({result['trial_states']['complete']} complete, "
             f"{result['trial_states']['failed']} failed; {result.get('files', '?')} files scored, "
             f"{result.get('refused', 0)} refused by the export's check), {s['parallel']} at a time with {s['threads_per_trial']} "
             f"PyTorch thread each, **{s['wall_seconds_all_runs'] / 60:.1f} minutes** wall-clock on this 2-core "
             "machine (stages shared with earlier runs came from the stage cache: the fine-tune, and any pruning "
             "asked twice).", ""]
    c = result.get("confirmation")
    if c:
        lines += [f"Chosen model, confirmed on the test split: {c['statement']}.", ""]
    lines += ["| variant | kind | test accuracy % (its reference's) | test drop (pts, 95% interval) | within 1 pt | "
              "p50 ms | speedup | size MB |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: r["latency_p50_ms"] or 1e9):
        lo, hi = r["test_drop_interval"]
        lines.append(f"| {r['variant']} | {r['kind']} | {r['accuracy']:.2f} ({r['reference_accuracy']:.2f}) | "
                     f"{r['test_drop']:+.2f} ({lo:+.2f}.."
                     f"{hi:+.2f}) | {'yes' if r['within_budget'] else 'no'} | {r['latency_p50_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['size_mb']:.1f} |")
    lines.append("")
    for label, why in result.get("hand_written_refused", {}).items():
        lines.append(f"- {label}: refused by the export's check ({why})")
    lines.append("")
    if search_row and fastest_hand:
        verdict = "faster than" if result["search_beats_hand_written"] else "NOT faster than"
        lines.append(f"The search's model ({search_row['speedup']:.2f}x, test drop {search_row['test_drop']:+.2f}) is "
                     f"{verdict} the fastest hand-written recipe within budget ({fastest_hand['variant']}: "
                     f"{fastest_hand['speedup']:.2f}x, {fastest_hand['test_drop']:+.2f}).")
    elif not search_row:
        lines.append("The search found no model within budget on the validation split.")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
