"""Two of issue 18's questions about SmolLM2-135M, answered with figures measured on this host rather than argued:

1. Early exit per token (CALM, Schuster et al. 2022): how many layers a decode step could skip, and what that would
   cost. On Wikipedia test windows, every layer's hidden state goes through the final norm and the shared output
   head (CALM's softmax-response confidence): the oracle (the first layer whose top-1 is the final layer's) and
   confidence thresholds (exit at the first layer whose top probability reaches it), with the perplexity of the
   exited predictions, and the decode step those exits would take on host-ort by the measured decode table: the
   layers run, one output head per exit check (the confidence needs the whole vocabulary's softmax), and the
   key-value projections of each skipped layer (CALM fills the skipped layers' cache from the exit state).
2. EcoFormer on a decoder: causal linear attention with hashed keys is a recurrent state (a sum of h(k) v^T per
   head, the same cost at every position), so what it could save is what a decode step's attention costs as the
   context grows. The decode step of the ONNX fp32 and int4 files measured after prompts of 32 to 960 tokens.

    .venv/bin/python benchmarks/lm_exit_attention.py [--threads 2] [--windows 24]

Needs the SmolLM2 run of benchmarks/lm_smollm2.py (runs/bench-lm-smollm2) and host-ort's decode table
(`pocketformer profile --target host-ort --model smollm2-135m`). Writes benchmarks/results/lm_exit_attention.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pocketformer import store  # noqa: E402
from pocketformer.latency import lm_units  # noqa: E402
from pocketformer.lm_pipeline import windows  # noqa: E402
from pocketformer.models import load  # noqa: E402
from pocketformer.targets import get_profile  # noqa: E402
from pocketformer.targets.lm_latency import lm_tables_for  # noqa: E402
from pocketformer.targets.lm_validate import measure_decoding  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUN = ROOT / "runs" / "bench-lm-smollm2"
THRESHOLDS = (0.99, 0.95, 0.9, 0.8, 0.6)
PROMPTS = (32, 128, 512, 960)


def layer_predictions(model, wins: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-1, top probability, log-probability of the next token) of every layer's state through the final norm
    and the output head: each (layers, tokens)."""
    tops, confs, nlls = [], [], []
    with torch.no_grad():
        for w in wins:
            ids = torch.tensor([w])
            _, hidden = model.encode(ids, all_hidden=True)
            target = ids[0, 1:]
            per_layer = []
            for i, h in enumerate(hidden[1:]):
                x = h if i == len(hidden) - 2 else model.final_norm(h)  # the last is already normed
                logp = F.log_softmax(model.logits(x)[0, :-1].float(), -1)
                p, top = logp.max(-1)
                per_layer.append((top, p.exp(), logp.gather(1, target[:, None])[:, 0]))
            tops.append(torch.stack([t for t, _, _ in per_layer]))
            confs.append(torch.stack([c for _, c, _ in per_layer]))
            nlls.append(torch.stack([n for _, _, n in per_layer]))
    return torch.cat(tops, 1), torch.cat(confs, 1), torch.cat(nlls, 1)


def exits(tops, confs, logps, decode, spec) -> list[dict]:
    """Per exit rule: layers run, agreement with the last layer, perplexity, and the decode step predicted."""
    L, n = tops.shape
    scale = decode.calibration.scale
    layer_ms = [scale * decode.layer_cost(h, w) for h, w in lm_units(spec)]  # each layer's share, by the table
    head_ms = scale * decode.base_ms  # embedding, final norm and the output head: one more head per exit check
    kv_share = [2 * s.kv_heads * s.head_dim / (2 * (s.heads + s.kv_heads) * s.head_dim + 3 * s.ffn)
                for s in spec.layers]  # a skipped layer's k and v projections, as a share of its weights
    full_ms = decode.predict(lm_units(spec))
    final = tops[-1]
    rules = [("no exit", torch.full((n,), L - 1))]
    same = tops == final[None]
    rules.append(("oracle (first layer that already predicts the last layer's top-1)",
                  same.float().argmax(0)))
    for t in THRESHOLDS:
        hit = confs >= t
        hit[-1] = True
        rules.append((f"confidence >= {t:g}", hit.float().argmax(0)))
    rows = []
    for name, exit_at in rules:
        idx = torch.arange(n)
        run = exit_at + 1  # layers run
        checks = run.clone() if name != "no exit" else torch.zeros(n, dtype=torch.long)
        step = torch.tensor([full_ms - sum(layer_ms[e + 1:]) + sum(layer_ms[j] * kv_share[j] for j in
                                                                 range(e + 1, L)) for e in exit_at.tolist()])
        if name not in ("no exit",) and not name.startswith("oracle"):
            step = step + checks.float() * head_ms  # the confidence of each layer run needs the head
        rows.append({"rule": name, "mean_layers": float(run.float().mean()), "layers": L,
                     "agreement_with_last_layer": float((tops[exit_at, idx] == final).float().mean()),
                     "perplexity": math.exp(-float(logps[exit_at, idx].mean())),
                     "predicted_decode_ms": float(step.mean()), "full_decode_ms": full_ms})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=24)
    args = ap.parse_args()
    started = time.time()
    torch.set_num_threads(args.threads)
    report = json.loads((RUN / "report.json").read_text())
    recipe = report["recipe"]
    model, _ = load(RUN / "baseline")
    model.eval()
    profile = get_profile("host-ort").model_copy(update={"threads": args.threads})
    decode = lm_tables_for(profile, model.config, "fp32")["decode"]
    wins = windows(model, RUN / "baseline", recipe["data"], "test", recipe["seed"], recipe["max_len"], args.windows)
    print(f"== every layer's prediction on {len(wins)} test windows", flush=True)
    tops, confs, logps = layer_predictions(model, wins)
    exit_rows = exits(tops, confs, logps, decode, model.config)

    print("== decode step after prompts of " + ", ".join(map(str, PROMPTS)) + " tokens", flush=True)
    text = [t for w in windows(model, RUN / "baseline", recipe["data"], "test", recipe["seed"], recipe["max_len"],
                               12) for t in w]
    context_rows = []
    for name in ("model.fp32.onnx", "model.int4.onnx"):
        for p in PROMPTS:
            m = measure_decoding(RUN / "artifacts" / name, profile, text[:p])
            context_rows.append({"file": name, "prompt_tokens": p, "decode_ms_p50": m["decode_ms_p50"],
                                 "decode_ms_interval": m["decode_ms_interval"]})
    result = {"env": {"cpu": store.fingerprint(), "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
                      "versions": store.package_versions("onnxruntime", "torch"),
                      "command": " ".join(["benchmarks/lm_exit_attention.py"] + sys.argv[1:]),
                      "seconds": round(time.time() - started)},
              "tokens": int(tops.shape[1]), "decode_table": decode.digest, "exits": exit_rows,
              "context": context_rows, "new_tokens": profile.language_models.new_tokens}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm_exit_attention.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "lm_exit_attention.md").write_text(markdown(result))
    print((RESULTS / "lm_exit_attention.md").read_text())


def markdown(result: dict) -> str:
    env = result["env"]
    base = result["exits"][0]
    lines = ["# SmolLM2-135M: early exit per token (CALM) and linear attention (EcoFormer), measured", "",
             f"Command: `.venv/bin/python {env['command']}` ({env['date']}, {env['seconds']} s). CPU: {env['cpu']}; "
             f"{env['threads']} threads; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".", "",
             f"## Early exit per token, on {result['tokens']:,} Wikipedia test tokens", "",
             "Every layer's state through the final norm and the shared output head. Decode step: host-ort's "
             f"measured decode table (fp32, {result['decode_table'][:12]}): the layers run, plus one output head "
             "per layer run for the confidence (none for the oracle, which no runtime has), plus each skipped "
             "layer's key-value projections (CALM's state propagation).", "",
             "| exit rule | mean layers run | top-1 = last layer's | perplexity | change | decode ms (predicted) | "
             "x no exit |", "|---|---|---|---|---|---|---|"]
    for r in result["exits"]:
        lines.append(f"| {r['rule']} | {r['mean_layers']:.1f} of {r['layers']} | "
                     f"{r['agreement_with_last_layer'] * 100:.1f}% | {r['perplexity']:.2f} | "
                     f"{(r['perplexity'] / base['perplexity'] - 1) * 100:+.1f}% | {r['predicted_decode_ms']:.2f} | "
                     f"{base['predicted_decode_ms'] / r['predicted_decode_ms']:.2f} |")
    lines += ["", f"## Decode step against context, host-ort, {result['new_tokens']} new tokens after the prompt", "",
              "| file | prompt tokens | decode ms (p50) | more than after 32 tokens |", "|---|---|---|---|"]
    first = {}
    for r in result["context"]:
        first.setdefault(r["file"], r["decode_ms_p50"])
        lines.append(f"| {r['file']} | {r['prompt_tokens']} | {r['decode_ms_p50']:.2f} | "
                     f"{(r['decode_ms_p50'] / first[r['file']] - 1) * 100:+.1f}% |")
    lines += ["", "What grows with the context is what a recurrent (linear, hashed) attention could save; "
              "everything else in the step is the same with EcoFormer.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
