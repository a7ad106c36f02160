"""Decoding probe, run in its own process: open a language model's file, warm up, then time greedy generations
(each one prefill of the prompt and new_tokens - 1 decode steps), and report peak RSS.

Usage: python -m pocketformer.targets.lm_probe MODULE:RUNTIME ARTIFACT PROMPT.json THREADS NEW_TOKENS WARMUP REPEATS
                                               PREFILLS
Prints one JSON line: {"prefill_ms": [...], "decode_ms": [...], "tokens": [...], "peak_rss_mb": ...}: the prefill
times of every generation and of PREFILLS more prefills alone (time to first token needs more samples than the
generations give for an interval of its median).

As targets/probe.py: only the runtime's own module is imported, so the memory is the file's and its runtime's.
"""

from __future__ import annotations

import importlib
import json
import sys
import time


def main(argv: list[str]) -> None:
    where, artifact, prompt_path, threads, new_tokens, warmup, repeats, prefills = argv
    module, _, runtime = where.partition(":")
    importlib.import_module(module)  # registers its runtime
    from .lm import open_lm
    from .probe import peak_rss_kb
    from .runtime import RUNTIMES

    prompt = json.loads(open(prompt_path).read())
    driver = open_lm(RUNTIMES[runtime], artifact, int(threads))
    for _ in range(int(warmup)):
        driver.generate(prompt, int(new_tokens))
    prefill, decode, tokens = [], [], []
    for _ in range(int(repeats)):
        tokens, timings = driver.generate(prompt, int(new_tokens), timings=True)
        prefill.append(timings.prefill_ms)
        decode.extend(timings.decode_ms)
    for _ in range(int(prefills)):
        t0 = time.perf_counter()
        driver.prefill(prompt)
        prefill.append((time.perf_counter() - t0) * 1000)
    print(json.dumps({"prefill_ms": prefill, "decode_ms": decode, "tokens": tokens,
                      "peak_rss_mb": peak_rss_kb() / 1024.0}))


if __name__ == "__main__":
    main(sys.argv[1:])
