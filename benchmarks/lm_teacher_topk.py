"""What distill's `teacher_topk` saves a step on SmolLM2-135M: distillation steps (batch 8 x 128 tokens) of the
3-layers-pruned student of examples/smollm2/layers.yaml against the imported model, with the teacher's whole
distribution computed every step, and with its top-64 logits read from the store that run wrote; each with and
without hidden-state matching.

    .venv/bin/python benchmarks/lm_teacher_topk.py [--steps 4] [--threads 2] [--run runs/bench-lm-variants/layers]

Needs a finished run of layers.yaml (benchmarks/lm_variants.py makes it), whose distill stored the windows' top-64
logits. Writes benchmarks/results/lm_teacher_topk.{json,md}. Seconds per step: the median over the steps, after
one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pocketformer import store  # noqa: E402
from pocketformer.compress.distill import DistillConfig, distill_loss, stored_topk, topk_details  # noqa: E402
from pocketformer.lm_pipeline import windows  # noqa: E402
from pocketformer.models import load  # noqa: E402
from results_io import md_table, write_results  # noqa: E402  (this folder: the scripts' own)
from pocketformer.train import text_batches  # noqa: E402



def step_seconds(student, teacher, batches, cfg: DistillConfig, steps: int) -> tuple[float, dict]:
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    times = []
    student.train()
    with stored_topk(cfg, teacher) as stored:
        for i, (inputs, labels) in enumerate(batches(0)):
            if i > steps:
                break
            t0 = time.perf_counter()
            loss = distill_loss(student, teacher, inputs, labels, cfg, stored)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i:  # the first step warms up
                times.append(time.perf_counter() - t0)
    return statistics.median(times), topk_details(stored).get("teacher_topk", {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-lm-variants" / "layers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher, _ = load(args.run / "baseline")
    teacher.eval()
    recipe = json.loads((args.run / "compress.json").read_text())["recipe"]
    train = windows(teacher, args.run / "baseline", recipe["data"], "train", recipe["seed"], recipe["max_len"], 512)
    batches, _ = text_batches(train, recipe["batch_size"], recipe["seed"])
    rows = []
    for hidden in (0.0, 1.0):
        for k in (0, 64):
            student, _ = load(args.run / "model")
            student.token_table().weight.requires_grad_(False)
            cfg = DistillConfig(hidden=hidden, temperature=1.0, teacher_topk=k)
            seconds, details = step_seconds(student, teacher, batches, cfg, args.steps)
            rows.append({"hidden": hidden, "teacher_topk": k, "seconds_per_step": seconds, "store": details})
            print(rows[-1], flush=True)
    for r in rows:
        full = next(x for x in rows if x["hidden"] == r["hidden"] and x["teacher_topk"] == 0)
        r["speedup"] = full["seconds_per_step"] / r["seconds_per_step"]
    result = {"env": {"cpu": store.fingerprint(), "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
                      "versions": store.package_versions("torch"), "steps": args.steps,
                      "batch": [recipe["batch_size"], recipe["max_len"]],
                      "command": " ".join(["benchmarks/lm_teacher_topk.py"] + sys.argv[1:])}, "rows": rows}
    env = result["env"]
    lines = ["# Distillation step with the teacher's stored top-64 logits (SmolLM2-135M, 27-layer student)", "",
             f"Command: `.venv/bin/python {env['command']}` ({env['date']}). CPU: {env['cpu']}; {env['threads']} "
             f"threads; torch {env['versions'].get('torch')}; batch {env['batch'][0]} x {env['batch'][1]} tokens; "
             f"median of {env['steps']} steps after one warm-up (forward, backward, AdamW).", ""]
    lines += md_table(["hidden-state matching", "teacher logits", "s / step", "x the whole distribution"],
                      [["yes" if r["hidden"] else "no", "top-64, stored" if r["teacher_topk"] else "whole, every step",
                        f"{r['seconds_per_step']:.2f}", f"{r['speedup']:.2f}x"] for r in rows])
    write_results("lm_teacher_topk", result, "\n".join(lines))


if __name__ == "__main__":
    main()
