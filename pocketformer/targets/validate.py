"""Validate artifacts on a target: task accuracy and agreement with the uncompressed model on the test split (on the
target's own runtime), latency p50/p90 at the profile's threads and shapes after warm-up, peak memory, file size,
and a verdict against each of the profile's budgets: PASS, FAIL or INCONCLUSIVE at the profile's confidence, from the
paired accuracy difference and the p50's interval (pocketformer.verdict). Never branches on the format: the runtime
module does the running."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..data import Dataset, Encoder
from ..errors import TargetError
from ..export.base import artifact_size
from ..models.canonical import CanonicalTransformer
from ..models.tasks import cosine_rows
from ..progress import progress_bar
from ..store import fingerprint
from ..verdict import (PairedDrop, accuracy_check, latency_check, mean_floor_check, median_interval, overall,
                       paired_drop, size_check, unmeasured)
from . import Profile, runtime_of


def predict_artifact(path: Path, profile: Profile, ds: Dataset, enc: Encoder, batch_size: int = 32,
                     desc: str = "") -> np.ndarray:
    """Outputs for every test example, run in the target's runtime (static artifacts run at their fixed shapes;
    the session fills a last short batch)."""
    session = runtime_of(profile).open(path, profile.threads)
    bs = session.static_batch or batch_size
    outs = []
    with progress_bar(desc or f"accuracy {path.name}", (len(ds) + bs - 1) // bs) as advance:
        for _, inputs in enc.batches(ds, bs, pad_to=session.static_seq):
            outs.append(session.output({k: v.numpy() for k, v in zip(session.input_names, inputs)}))
            advance()
    return np.concatenate(outs)


def latency_feeds(model_inputs: list[str], ds: Dataset, enc: Encoder, profile: Profile) -> dict[str, np.ndarray]:
    """Real examples at the profile's shape: the first `batch` test examples padded/truncated to `seq_len`."""
    idx = np.arange(min(profile.batch, len(ds)))
    idx = np.resize(idx, profile.batch)
    inputs = enc.encode(ds, idx, pad_to=profile.seq_len)  # images have no sequence to pad
    return {k: v.numpy() for k, v in zip(model_inputs, inputs)}


def measure_latency(path: Path, profile: Profile, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Latency and peak memory in a fresh process, so the memory is the artifact's alone."""
    with tempfile.TemporaryDirectory() as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **feeds)
        rt = runtime_of(profile)
        cmd = [sys.executable, "-m", "pocketformer.targets.probe", f"{type(rt).__module__}:{rt.name}", str(path),
               str(feeds_path),
               str(profile.threads), str(profile.warmup), str(profile.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise TargetError(f"{path.name} failed to run on {profile.runtime}: {last}",
                          "run `pocketformer inspect` on the artifact and export it for this target's format.")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    times = np.asarray(result["latencies_ms"])
    return {"latency_p50_ms": float(np.percentile(times, 50)), "latency_p90_ms": float(np.percentile(times, 90)),
            "latency_mean_ms": float(times.mean()), "latency_runs": len(times), "warmup_runs": profile.warmup,
            **latency_interval(times, profile), "peak_rss_mb": result["peak_rss_mb"]}


def latency_interval(times_ms: np.ndarray, profile: Profile) -> dict[str, Any]:
    """The p50's interval over the repeated runs, at the profile's confidence: the run-to-run spread."""
    interval = median_interval(times_ms, profile.budgets.confidence)
    return {"latency_p50_interval_ms": None if interval is None else list(interval)}


def accuracy_drop(task, out: np.ndarray, reference_out: np.ndarray, labels: np.ndarray,
                  profile: Profile) -> tuple[dict[str, Any], PairedDrop]:
    """Accuracy, the reference's accuracy on the same examples, and the paired drop with its interval."""
    ref_ok, ok = task.correct(reference_out, labels), task.correct(out, labels)
    drop = paired_drop(ref_ok, ok, profile.budgets.confidence)
    return {"accuracy": float(ok.mean() * 100), "reference_accuracy": float(ref_ok.mean() * 100),
            "accuracy_drop": drop.drop, "accuracy_drop_interval": list(drop.interval),
            "discordant": {"lost": drop.lost, "gained": drop.gained}}, drop


def judge(profile: Profile, row: dict[str, Any], task, drop: Optional[PairedDrop],
          cosines: Optional[np.ndarray] = None) -> None:
    """Each of the profile's budgets that applies to `task` as a verdict at its confidence (row["budgets"]), and the
    row's verdict: FAIL if any fails, INCONCLUSIVE if any cannot tell, else PASS (row["pass"] is PASS alone).
    `drop`: a labelled model's paired accuracy drop; `cosines`: an embedding model's per-example cosine with the
    uncompressed model. A budget that applies but was not measured is INCONCLUSIVE, never silently skipped."""
    b = profile.budgets
    checks = {}
    if b.latency_ms is not None:
        if row.get("latency_p50_ms") is None:
            checks["latency_ms"] = unmeasured(b.latency_ms, "ms", f"{row['runtime']} measures no latency here: "
                                                                  "validate on a host that runs it").to_json()
        else:
            interval = row.get("latency_p50_interval_ms")
            checks["latency_ms"] = latency_check(row["latency_p50_ms"], None if interval is None else tuple(interval),
                                                 row.get("latency_runs"), b.latency_ms, b.confidence).to_json()
    if b.size_mb is not None:
        checks["size_mb"] = size_check(row["size_mb"], b.size_mb).to_json()
    if b.accuracy_drop is not None and task.has_labels:
        checks["accuracy_drop"] = (accuracy_check(drop, b.accuracy_drop) if drop is not None else unmeasured(
            b.accuracy_drop, "pts", "no labels in the data, or no reference outputs, to measure it on")).to_json()
    if b.min_cosine is not None and not task.has_labels:
        checks["min_cosine"] = (mean_floor_check(cosines, b.min_cosine, b.confidence) if cosines is not None else
                                unmeasured(b.min_cosine, "cosine", "no reference outputs")).to_json()
    row["budgets"] = checks
    row["confidence"] = b.confidence
    row["verdict"] = overall(checks)
    row["pass"] = row["verdict"] == "PASS"


def validate_artifact(path: Path, record: dict[str, Any], profile: Profile, ds: Dataset, enc: Encoder,
                      reference: CanonicalTransformer, reference_out: np.ndarray) -> dict[str, Any]:
    """One row: accuracy, agreement, latency, memory, size and budgets for one artifact on one target."""
    rt = runtime_of(profile)
    out = predict_artifact(path, profile, ds, enc)
    row: dict[str, Any] = {
        "variant": f"{record['variant']}.{record['precision']}", "file": path.name, "format": record["format"],
        "precision": record["precision"], "runtime": rt.name, "runtime_version": rt.version(),
        "target": profile.name, "threads": profile.threads, "shape": {"batch": profile.batch,
                                                                     "seq_len": profile.seq_len},
        "examples": len(ds), "size_mb": artifact_size(path) / 1e6, "measured": True,
        "cpu": fingerprint(),  # a latency figure names the CPU it was measured on
    }
    task, drop = reference.task, None
    if task.has_labels and ds.labels is not None and out.shape[-1] == len(ds.label_names):
        figures, drop = accuracy_drop(task, out, reference_out, ds.labels, profile)
        row.update(figures)
    # the task's agreement with the uncompressed model: same labels (classifier), or mean cosine (embedding)
    row["agreement_with_reference"] = 100.0 * task.agreement(out, reference_out)
    cosines = cosine_rows(reference_out, out)
    row["output_cosine_with_reference"] = float(cosines.mean())
    if rt.measures_latency:
        row.update(measure_latency(path, profile, latency_feeds(reference.input_names, ds, enc, profile)))
        row["latency_measured_on"] = "target" if profile.this_host else \
            "this host, with the target's runtime, threads and shapes (not the device)"
    else:
        row.update({"latency_p50_ms": None, "latency_p90_ms": None, "peak_rss_mb": None,
                    "latency_measured_on": None})
    row["execution"] = rt.execution()
    judge(profile, row, task, drop, None if task.has_labels else cosines)
    return row
