"""Validate artifacts on a target: task accuracy and agreement with the uncompressed model on the test split (on the
target's own runtime), latency p50/p90 at the profile's threads and shapes after warm-up, peak memory, file size,
and pass/fail against the profile's budgets. Never branches on the format: the runtime module does the running."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..data import Dataset, Encoder
from ..export.common import artifact_size, fill_batch
from ..errors import TargetError
from ..models.canonical import CanonicalTransformer
from ..progress import progress_bar
from . import Profile, runtime_module


def _static_dims(shapes: dict[str, list]) -> tuple[Optional[int], Optional[int]]:
    """(batch, seq) fixed in the artifact's first input, or None where the axis is dynamic."""
    dims = next(iter(shapes.values()))
    fixed = [d if isinstance(d, int) and d > 0 else None for d in dims]
    return fixed[0], (fixed[1] if len(fixed) > 1 else None)


def predict_artifact(path: Path, profile: Profile, ds: Dataset, enc: Encoder, batch_size: int = 32,
                     desc: str = "") -> np.ndarray:
    """Outputs for every test example, run in the target's runtime (static artifacts run at their fixed shapes)."""
    rt = runtime_module(profile)
    session = rt.load(path, profile.threads)
    names = rt.input_names(session)
    static_batch, static_seq = _static_dims(rt.input_shapes(session))
    bs = static_batch or batch_size
    outs = []
    with progress_bar(desc or f"accuracy {path.name}", (len(ds) + bs - 1) // bs) as advance:
        for idx, inputs in enc.batches(ds, bs, pad_to=static_seq):
            n = len(idx)
            if static_batch:  # the last batch is filled up to the file's fixed batch
                inputs = fill_batch(inputs, static_batch)
            outs.append(rt.run(session, {k: v.numpy() for k, v in zip(names, inputs)})[:n])
            advance()
    return np.concatenate(outs)


def latency_feeds(model_inputs: list[str], ds: Dataset, enc: Encoder, profile: Profile) -> dict[str, np.ndarray]:
    """Real examples at the profile's shape: the first `batch` test examples padded/truncated to `seq_len`."""
    idx = np.arange(min(profile.batch, len(ds)))
    idx = np.resize(idx, profile.batch)
    inputs = enc.encode(ds, idx, pad_to=profile.seq_len if ds.modality == "text" else None)
    return {k: v.numpy() for k, v in zip(model_inputs, inputs)}


def measure_latency(path: Path, profile: Profile, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Latency and peak memory in a fresh process, so the memory is the artifact's alone."""
    with tempfile.TemporaryDirectory() as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **feeds)
        cmd = [sys.executable, "-m", "pocketformer.targets.probe", profile.runtime, str(path), str(feeds_path),
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
            "peak_rss_mb": result["peak_rss_mb"]}


def budget_checks(profile: Profile, row: dict[str, Any]) -> dict[str, Any]:
    b = profile.budgets
    checks = {}
    if b.latency_ms is not None and row.get("latency_p50_ms") is not None:
        checks["latency_ms"] = {"budget": b.latency_ms, "value": row["latency_p50_ms"],
                                "pass": row["latency_p50_ms"] <= b.latency_ms}
    if b.size_mb is not None:
        checks["size_mb"] = {"budget": b.size_mb, "value": row["size_mb"], "pass": row["size_mb"] <= b.size_mb}
    if b.accuracy_drop is not None and row.get("accuracy_drop") is not None:
        checks["accuracy_drop"] = {"budget": b.accuracy_drop, "value": row["accuracy_drop"],
                                   "pass": row["accuracy_drop"] <= b.accuracy_drop}
    return checks


def validate_artifact(path: Path, record: dict[str, Any], profile: Profile, ds: Dataset, enc: Encoder,
                      reference: CanonicalTransformer, reference_out: np.ndarray) -> dict[str, Any]:
    """One row: accuracy, agreement, latency, memory, size and budgets for one artifact on one target."""
    rt = runtime_module(profile)
    out = predict_artifact(path, profile, ds, enc)
    row: dict[str, Any] = {
        "variant": f"{record['variant']}.{record['precision']}", "file": path.name, "format": record["format"],
        "precision": record["precision"], "runtime": rt.NAME, "runtime_version": rt.version(),
        "target": profile.name, "threads": profile.threads, "shape": {"batch": profile.batch,
                                                                     "seq_len": profile.seq_len},
        "examples": len(ds), "size_mb": artifact_size(path) / 1e6, "measured": True,
    }
    if ds.labels is not None and out.ndim == 2 and out.shape[1] == len(ds.label_names):
        ref_pred = reference_out.argmax(1)
        row["accuracy"] = float((out.argmax(1) == ds.labels).mean() * 100)
        row["reference_accuracy"] = float((ref_pred == ds.labels).mean() * 100)
        row["accuracy_drop"] = row["reference_accuracy"] - row["accuracy"]
        row["agreement_with_reference"] = float((out.argmax(1) == ref_pred).mean() * 100)
    ref = reference_out.reshape(len(out), -1)
    cos = (ref * out.reshape(len(out), -1)).sum(1) / (np.linalg.norm(ref, axis=1) *
                                                      np.linalg.norm(out.reshape(len(out), -1), axis=1) + 1e-12)
    row["output_cosine_with_reference"] = float(cos.mean())
    if getattr(rt, "MEASURES_LATENCY", True):
        row.update(measure_latency(path, profile, latency_feeds(reference.input_names, ds, enc, profile)))
        row["latency_measured_on"] = "target" if profile.this_host else \
            "this host, with the target's runtime, threads and shapes (not the device)"
    else:
        row.update({"latency_p50_ms": None, "latency_p90_ms": None, "peak_rss_mb": None,
                    "latency_measured_on": None})
    row["execution"] = getattr(rt, "execution", lambda: rt.NAME)()
    row["budgets"] = budget_checks(profile, row)
    row["pass"] = all(c["pass"] for c in row["budgets"].values())
    return row
