"""What low-rank and dense-sparse factorization do to SmolLM2-135M before any recovery: the `lowrank` stage at
several budgets and the `dense_sparse` stage, each on every linear (q, k, v, o, gate, up, down) of the imported
model, scored by perplexity on the run's validation and test windows, with the weights the linears store.

    .venv/bin/python benchmarks/lm_factorize.py [--threads 2] [--windows 16] [--run runs/bench-lm-variants/base]

Needs the baseline run of benchmarks/lm_variants.py (its baseline/ is the imported model). Writes
benchmarks/results/lm_factorize.{json,md}. No latency: a decode step at batch 1 reads every weight once, so what a
factorization can buy there is its stored-weight ratio (and two matmuls where there was one); the perplexity says
whether it is worth buying.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pocketformer import store  # noqa: E402
from pocketformer.compress import REGISTRY, Context  # noqa: E402
from pocketformer.lm_pipeline import windows  # noqa: E402
from pocketformer.models import load  # noqa: E402
from results_io import md_table, write_results  # noqa: E402  (this folder: the scripts' own)
from pocketformer.models.causal import window_perplexity  # noqa: E402

VARIANTS = [("lowrank", {"method": "budget", "budget": b}) for b in (0.9, 0.75, 0.5)] + \
    [("lowrank", {"method": "energy", "energy": 0.99}), ("dense_sparse", {"rank": 0.5, "nnz": 0.25})]


def linear_weights(model) -> int:
    return sum(p.numel() for _, _, _, lin in model.linears() for p in lin.parameters() if p.dim() > 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-lm-variants" / "base")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    model, _ = load(args.run / "baseline")
    recipe = json.loads((args.run / "compress.json").read_text())["recipe"]
    text = {split: windows(model, args.run / "baseline", recipe["data"], split, recipe["seed"], recipe["max_len"],
                           args.windows) for split in ("validation", "test")}
    base = {split: window_perplexity(model, w) for split, w in text.items()}
    dense = linear_weights(model)
    rows = [{"stage": "none (the imported model)", "settings": {}, "linear_weights": dense, "factorized": 0,
             **{f"{s}_perplexity": p for s, p in base.items()}}]
    for stage, settings in VARIANTS:
        cls = REGISTRY[stage]
        t0 = time.time()
        result = cls(cls.Config.model_validate(settings)).apply(copy.deepcopy(model), Context(
            teacher=None, train=None, validation=None, encoder=None, text=None))
        seconds = time.time() - t0
        done = [d for d in result.details["linears"] if d["rank"]]
        stored = result.details.get("stored_params")  # dense-sparse: S is held dense in PyTorch, stored sparse
        weights = dense - stored["before"] + stored["after"] if stored else linear_weights(result.model)
        row = {"stage": stage, "settings": settings, "linear_weights": weights,
               "factorized": len(done), "linears": len(result.details["linears"]), "seconds": round(seconds, 1),
               **{f"{s}_perplexity": window_perplexity(result.model, w) for s, w in text.items()}}
        rows.append(row)
        print(row, flush=True)
    for r in rows:
        r["weights_ratio"] = r["linear_weights"] / dense
        r["test_change_pct"] = (r["test_perplexity"] / base["test"] - 1) * 100
    result = {"env": {"cpu": store.fingerprint(), "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
                      "versions": store.package_versions("torch"), "windows": args.windows,
                      "window_tokens": recipe["max_len"], "seconds": round(time.time() - started),
                      "command": " ".join(["benchmarks/lm_factorize.py"] + sys.argv[1:])},
              "params": sum(p.numel() for p in model.parameters()), "rows": rows}
    env = result["env"]
    lines = ["# Low-rank and dense-sparse factorization of SmolLM2-135M's linears, before recovery", "",
             f"Command: `.venv/bin/python {env['command']}` ({env['date']}, {env['seconds']} s). CPU: {env['cpu']}; "
             f"{env['threads']} threads; torch {env['versions'].get('torch')}. Perplexity on {env['windows']} "
             f"Wikipedia windows of {env['window_tokens']} tokens per split (the run's own). Linear weights: what "
             f"q, k, v, o, gate, up and down store, of the model's {result['params'] / 1e6:.1f} M parameters (the "
             "rest is the tied embedding, 28.3 M, and norms).", ""]
    lines += md_table(["stage", "settings", "linears factorized", "linear weights (M)", "x dense", "validation ppl",
                       "test ppl", "test change"],
                      [[r["stage"], ", ".join(f"{k} {v}" for k, v in r["settings"].items()) or "-",
                        f"{r['factorized']}/{r.get('linears', '-')}", f"{r['linear_weights'] / 1e6:.1f}",
                        f"{r['weights_ratio']:.2f}", f"{r['validation_perplexity']:.2f}", f"{r['test_perplexity']:.2f}",
                        f"{r['test_change_pct']:+.0f}%"] for r in rows])
    write_results("lm_factorize", result, "\n".join(lines))


if __name__ == "__main__":
    main()
