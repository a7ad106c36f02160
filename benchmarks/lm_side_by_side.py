"""Decode and prefill of chosen SmolLM2 files side by side (a fresh process each, files in turn, the best of the
rounds kept) and their greedy continuation of one test prompt against the baseline PyTorch model's: the last step
of benchmarks/lm_variants.py for a few of its runs, when the whole table is not being made.

    .venv/bin/python benchmarks/lm_side_by_side.py base:model.fp32.onnx base:model.int8w.onnx layers:model.int8w.onnx
        [--rounds 2] [--threads 2] [--work runs/bench-lm-variants]

Each argument is RUN:FILE, RUN a folder under --work holding artifacts/FILE; `base` (the baseline run) must be there.
ONNX files run on host-ort, TFLite files on host-litert.
Prints one line per file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pocketformer import store  # noqa: E402
from pocketformer.models import load  # noqa: E402
from pocketformer.targets import get_profile  # noqa: E402
from pocketformer.targets.lm import token_match  # noqa: E402
from pocketformer.targets.lm_validate import measure_decoding  # noqa: E402

from lm_smollm2 import side_prompt  # noqa: E402  (this folder: the script's own)


PROFILES = {".onnx": "host-ort", ".tflite": "host-litert"}  # each file's runtime, by its suffix


def profile_of(path: Path, threads: int):
    """The profile a file is measured with: its format's host target, at `threads`."""
    return get_profile(PROFILES[path.suffix]).model_copy(update={"threads": threads})


def side_by_side(files: dict[Path, Any], prompt: list[int], want: list[int], rounds: int) -> dict[Path, dict]:
    """Each file's decode and prefill on `prompt` on its profile's runtime (files: path -> profile;
    measure_decoding: a fresh process each, the files in turn, `rounds` rounds, the lowest decode p50 kept) and its
    greedy continuation's token match with `want` ("match")."""
    best: dict[Path, dict] = {}
    for _ in range(rounds):
        for path, profile in files.items():
            m = measure_decoding(path, profile, prompt)
            match = token_match(m.pop("tokens", []), want)["match"]
            if path not in best or m["decode_ms_p50"] < best[path]["decode_ms_p50"]:
                best[path] = {**m, "match": match}
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="RUN:FILE")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-lm-variants")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, _ = load(args.work / "base" / "baseline")
    recipe = json.loads((args.work / "base" / "report.json").read_text())["recipe"]
    lm = get_profile("host-ort").language_models
    prompt, want = side_prompt(base, args.work / "base" / "baseline", recipe, lm)
    paths = {item: args.work / item.split(":", 1)[0] / "artifacts" / item.split(":", 1)[1] for item in args.files}
    measured = side_by_side({path: profile_of(path, args.threads) for path in paths.values()}, prompt, want,
                            args.rounds)
    best = {item: measured[path] for item, path in paths.items()}
    print(f"{store.fingerprint()}; {args.threads} threads; {len(prompt)}-token prompt, {lm.new_tokens} new tokens; "
          f"best of {args.rounds} rounds")
    for item, m in best.items():
        print(f"{item}: decode {m['decode_ms_p50']:.2f} ms ({m['decode_tokens_per_s']:.1f} tok/s), prefill "
              f"{m['prefill_tokens_per_s']:.0f} tok/s, greedy match with the baseline's PyTorch {m['match']:.1%}")


if __name__ == "__main__":
    main()
