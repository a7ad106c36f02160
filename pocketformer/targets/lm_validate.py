"""Validate a decoder-only language model's file on a target: perplexity on test-text windows (paired with the
uncompressed model's, window by window), greedy continuations compared with PyTorch's token by token, prefill
tokens/s and time to first token at the profile's prompt length, decode tokens/s at batch 1, peak memory and size;
then a verdict against each of the profile's language-model budgets at its confidence.

Latency and memory come from a fresh process (targets/lm_probe.py), as targets/validate.py does for encoders; a
runtime that measures no latency here (CoreML off macOS) leaves those budgets INCONCLUSIVE, never PASS.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import TargetError
from ..export.base import artifact_size
from ..progress import progress_bar
from ..store import fingerprint
from ..verdict import Check, latency_check, median_interval, overall, size_check, unmeasured, verdict_of
from . import LMSettings, Profile, runtime_of
from .lm import open_lm, token_match


@dataclass
class LMReference:
    """What every file is compared with: the uncompressed model's summed next-token NLL and predicted-token count
    per test window, and its greedy continuation of each prompt."""

    windows: list[list[int]]
    nll: np.ndarray
    counts: np.ndarray
    prompts: list[list[int]]
    greedy: list[list[int]]

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll.sum() / self.counts.sum())


def window_nll(driver, windows: list[list[int]], desc: str) -> np.ndarray:
    out = []
    with progress_bar(desc, len(windows)) as advance:
        for w in windows:
            out.append(driver.nll([w])[0])
            advance()
    return np.asarray(out)


def perplexity_check(reference: LMReference, nll: np.ndarray, budget: float, confidence: float) -> Check:
    """Is the perplexity increase over the uncompressed model within `budget` %? Per window, the difference of the
    mean next-token NLL (paired: the same tokens); the t-interval of its mean over windows at `confidence`, as a
    perplexity ratio exp(d) - 1."""
    from scipy.stats import t

    d = (nll - reference.nll) / reference.counts
    n = len(d)
    value = (math.exp(float((nll.sum() - reference.nll.sum()) / reference.counts.sum())) - 1) * 100
    method = "perplexity ratio on the test windows; t-interval of the paired per-window NLL difference"
    if n < 2:
        return Check(budget=budget, value=value, low=None, high=None, verdict="INCONCLUSIVE", confidence=None,
                     method=method, unit="%", detail={"windows": n, "reason": "one window gives no interval"})
    half = float(t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    low, high = ((math.exp(float(d.mean()) + s * half) - 1) * 100 for s in (-1, 1))
    detail: dict[str, Any] = {"windows": n}
    verdict = verdict_of(low, high, budget)
    if verdict == "INCONCLUSIVE":
        detail["reason"] = f"the increase's interval over {n} windows straddles the budget; score more windows"
    return Check(budget=budget, value=value, low=low, high=high, verdict=verdict, confidence=confidence,
                 method=method, unit="%", detail=detail)


def measure_decoding(path: Path, profile: Profile, prompt: list[int]) -> dict[str, Any]:
    """Prefill and per-token decode times and peak memory of greedy generations, in a fresh process; `tokens`: the
    last generation's."""
    lm: LMSettings = profile.language_models
    rt = runtime_of(profile)
    with tempfile.TemporaryDirectory() as tmp:
        prompt_path = Path(tmp) / "prompt.json"
        prompt_path.write_text(json.dumps(prompt))
        cmd = [sys.executable, "-m", "pocketformer.targets.lm_probe", f"{type(rt).__module__}:{rt.name}", str(path),
               str(prompt_path), str(profile.threads), str(lm.new_tokens), str(lm.warmup), str(lm.repeats),
               str(lm.prefills)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise TargetError(f"{path.name} failed to generate on {profile.runtime}: {last}",
                          "run `pocketformer generate` on the artifact to see it run.")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    prefill, decode = np.asarray(result["prefill_ms"]), np.asarray(result["decode_ms"])
    decode_interval = median_interval(decode, lm.budgets.confidence)
    ttft_interval = median_interval(prefill, lm.budgets.confidence)
    return {"ttft_ms": float(np.median(prefill)), "ttft_interval_ms": None if ttft_interval is None else
            list(ttft_interval), "prefill_tokens_per_s": len(prompt) / (float(np.median(prefill)) / 1000),
            "decode_ms_p50": float(np.median(decode)), "decode_ms_interval": None if decode_interval is None else
            list(decode_interval), "decode_tokens_per_s": 1000 / float(np.median(decode)),
            "decode_steps": len(decode), "prefills": len(prefill), "peak_rss_mb": result["peak_rss_mb"],
            "tokens": result["tokens"]}


def judge(lm: LMSettings, row: dict[str, Any], reference: LMReference, nll: np.ndarray) -> None:
    b = lm.budgets
    checks = {}
    measured = row.get("decode_ms_p50") is not None
    why = f"{row['runtime']} measures no latency here: validate on a host that runs it"
    if b.decode_ms is not None:
        checks["decode_ms"] = (latency_check(row["decode_ms_p50"], _pair(row["decode_ms_interval"]),
                                             row["decode_steps"], b.decode_ms, b.confidence) if measured
                               else unmeasured(b.decode_ms, "ms", why)).to_json()
    if b.ttft_ms is not None:
        checks["ttft_ms"] = (latency_check(row["ttft_ms"], _pair(row["ttft_interval_ms"]), row["prefills"],
                                           b.ttft_ms, b.confidence) if measured
                             else unmeasured(b.ttft_ms, "ms", why)).to_json()
    if b.perplexity_increase_pct is not None:
        checks["perplexity_increase_pct"] = perplexity_check(reference, nll, b.perplexity_increase_pct,
                                                             b.confidence).to_json()
    if b.size_mb is not None:
        checks["size_mb"] = size_check(row["size_mb"], b.size_mb).to_json()
    row["budgets"], row["confidence"] = checks, b.confidence
    row["verdict"] = overall(checks)
    row["pass"] = row["verdict"] == "PASS"


def _pair(interval: Optional[list]) -> Optional[tuple[float, float]]:
    return None if interval is None else (interval[0], interval[1])


def validate_lm(path: Path, record: dict[str, Any], profile: Profile, reference: LMReference) -> dict[str, Any]:
    """One row for one language-model file on one target."""
    lm: LMSettings = profile.language_models
    rt = runtime_of(profile)
    driver = open_lm(rt, path, profile.threads)
    nll = window_nll(driver, reference.windows, f"perplexity {path.name}")
    continuations = [driver.generate(p, lm.new_tokens) for p in reference.prompts]
    matches = [token_match(got, want) for got, want in zip(continuations, reference.greedy)]
    row: dict[str, Any] = {
        "variant": f"{record['variant']}.{record['precision']}", "file": path.name, "format": record["format"],
        "precision": record["precision"], "runtime": rt.name, "runtime_version": rt.version(),
        "target": profile.name, "threads": profile.threads, "size_mb": artifact_size(path) / 1e6, "measured": True,
        "cpu": fingerprint(), "windows": len(reference.windows), "window_tokens": int(reference.counts.sum()),
        "perplexity": math.exp(float(nll.sum() / reference.counts.sum())),
        "reference_perplexity": reference.perplexity,
        "token_match": float(np.mean([m["match"] for m in matches])),
        "first_divergence": int(min(m["first_divergence"] for m in matches)),
        "prompts": len(reference.prompts), "new_tokens": lm.new_tokens, "prompt_tokens": lm.prompt_tokens,
    }
    row["perplexity_increase_pct"] = (row["perplexity"] / row["reference_perplexity"] - 1) * 100
    if rt.measures_latency:
        timed = measure_decoding(path, profile, (reference.windows[0] * lm.prompt_tokens)[:lm.prompt_tokens])
        timed.pop("tokens")  # the greedy match is judged on the reference's own prompts
        row.update(timed)
        row["latency_measured_on"] = "target" if profile.this_host else \
            "this host, with the target's runtime and threads (not the device)"
    else:
        row.update({"ttft_ms": None, "prefill_tokens_per_s": None, "decode_ms_p50": None,
                    "decode_tokens_per_s": None, "peak_rss_mb": None, "latency_measured_on": None})
    row["execution"] = rt.execution()
    judge(lm, row, reference, nll)
    return row

