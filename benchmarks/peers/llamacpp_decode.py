"""llama.cpp peer for the LM benchmarks: prefill and greedy decode speed of a GGUF in llama-cpp-python.

    benchmarks/peers/.venv-llamacpp/bin/python benchmarks/peers/llamacpp_decode.py --gguf PATH \
        [--threads 2] [--prompt-tokens 128] [--new-tokens 64] [--repeats 3] [--prompt-ids IDS.json | --prompt-text F]

Runs in the peer venv made by setup_llamacpp.sh (no pocketformer imports). Measured the way
benchmarks/lm_smollm2.py measures ONNX, through the low-level API so that no sampler is timed:
- prefill: `llm.reset(); llm.eval(prompt)` of the P-token prompt in one batch (n_batch = P); its time is the
  time to first token (TTFT) and gives prefill tokens/s = P / time;
- decode: the first new token is the argmax of the prefill's last logits; each further token is one timed
  `llm.eval([token])`, then an untimed argmax over `llama_get_logits_ith(ctx, -1)` (exact greedy). N new tokens
  are N - 1 timed steps; no stop at end-of-sequence.
One warm-up generation (8 tokens), then R repeats. Reported: median prefill over repeats, median step over all
steps of all repeats (and the best repeat's median step, as lm_smollm2.py reports "lowest of rounds").
The prompt is `--prompt-ids` (a JSON list, inline or in a file: the exact ids another benchmark used) or the first
P tokens of `--prompt-text` (default: the Zen of Python, repeated), tokenized by the model's own tokenizer, no BOS.
Prints one JSON object on stdout, with the CPU seconds other processes used while it measured (other work
on the host skews every figure: run it on a quiet machine, and rerun when that is not ~0).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import time
from pathlib import Path

import llama_cpp
import numpy as np


def prompt_ids(args, llm) -> list[int]:
    if args.prompt_ids:
        text = Path(args.prompt_ids).read_text() if Path(args.prompt_ids).is_file() else args.prompt_ids
        ids = [int(t) for t in json.loads(text)]
    else:
        if args.prompt_text:
            text = Path(args.prompt_text).read_text()
        else:
            with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
                import this
            text = "".join(this.d.get(c, c) for c in this.s)
        ids = llm.tokenize(text.encode(), add_bos=False)
        while len(ids) < args.prompt_tokens:
            ids += ids
    if len(ids) < args.prompt_tokens:
        raise SystemExit(f"prompt has {len(ids)} tokens, fewer than --prompt-tokens {args.prompt_tokens}")
    return ids[:args.prompt_tokens]


def host_busy_s() -> float:
    """CPU seconds all processes of the host have used so far (Linux /proc/stat; user+nice+system+irq+softirq)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / os.sysconf("SC_CLK_TCK")


def generate(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], float, list[float]]:
    """Greedy ids, prefill seconds, per-step decode seconds."""
    n_vocab = llm.n_vocab()

    def argmax() -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - t0
    out, steps = [argmax()], []
    while len(out) < new_tokens:
        t0 = time.perf_counter()
        llm.eval([out[-1]])
        steps.append(time.perf_counter() - t0)
        out.append(argmax())
    return out, prefill, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-ids", help="JSON list of token ids, inline or a file holding one")
    ap.add_argument("--prompt-text", help="a text file; its first --prompt-tokens tokens are the prompt")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (binding default: off)")
    args = ap.parse_args()

    t_load = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(args.gguf), n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=args.prompt_tokens + args.new_tokens + 16, n_batch=args.prompt_tokens,
                          n_ubatch=args.prompt_tokens, flash_attn=args.flash_attn, seed=0, verbose=False)
    load_s = time.perf_counter() - t_load
    prompt = prompt_ids(args, llm)

    busy0, own0 = host_busy_s(), sum(os.times()[:2])
    t0 = time.perf_counter()
    generate(llm, prompt, 8)  # warm-up
    warmup_s = time.perf_counter() - t0
    runs = [generate(llm, prompt, args.new_tokens) for _ in range(args.repeats)]
    others = host_busy_s() - busy0 - (sum(os.times()[:2]) - own0)
    prefill = statistics.median(r[1] for r in runs)
    steps = [s for r in runs for s in r[2]]
    best_round = min(statistics.median(r[2]) for r in runs) if args.new_tokens > 1 else float("nan")

    info = llama_cpp.llama_print_system_info().decode()
    flags = sorted({kv.split(" = ")[0].split(":")[-1].strip()  # "CPU : SSE3 = 1 | AVX = 1 | ..."
                    for part in info.split("|") for kv in [part.strip()] if kv.endswith(" = 1")})
    print(json.dumps({
        "engine": "llama.cpp (llama-cpp-python)",
        "llama_cpp_python_version": llama_cpp.__version__,
        "system_info": info.strip(),
        "cpu_features_used": flags,
        "gguf": str(args.gguf.resolve()),
        "gguf_bytes": args.gguf.stat().st_size,
        "threads": args.threads,
        "flash_attn": args.flash_attn,
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "load_s": round(load_s, 3),
        "warmup_s": round(warmup_s, 3),
        "other_processes_cpu_s": round(others, 2),  # CPU time others used while this measured: ~0 = alone
        "ttft_ms": round(prefill * 1000, 2),
        "prefill_tokens_per_s": round(len(prompt) / prefill, 1),
        "decode_step_ms_median": round(statistics.median(steps) * 1000, 3),
        "decode_tokens_per_s": round(1 / statistics.median(steps), 1),
        "decode_tokens_per_s_best_round": round(1 / best_round, 1),
        "prefill_ms_each": [round(r[1] * 1000, 2) for r in runs],
        "decode_tokens_per_s_each": [round(1 / statistics.median(r[2]), 1) for r in runs],
        "prompt_ids": prompt,
        "generated_ids": runs[0][0],
        "greedy_same_every_repeat": all(r[0] == runs[0][0] for r in runs),
    }))


if __name__ == "__main__":
    main()
