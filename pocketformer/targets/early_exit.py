"""The early-exit driver: run an exported model's segments one after another at batch 1, apply the gate after each
exit head, and stop there. Plus what validation needs around it: a whole split run through the driver, the gate
calibrated on the validation split to the accuracy budget, and the report row (accuracy, agreement with PyTorch,
exit histogram, mean/p50/p90 latency over the examples, the same artifact run to full depth for comparison).

A segmented artifact is a manifest (JSON, written by pocketformer.export.segments) naming each segment's file (and,
for TFLite, its signature), its inputs and outputs and the gate's default. Segments run in the profile's runtime;
latency is measured in this process, after warm-up, at the profile's thread count. Off macOS, CoreML packages run in
the MIL reference interpreter, which measures no latency.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..export.segments import ExitRun, run_chain
from ..models.exits import Gate, entropy, exit_indices, predict_with_exits
from ..models.tasks import TASKS
from ..verdict import DEFAULT_CONFIDENCE, PairedDrop, paired_drop
from ..data import Dataset, Encoder
from ..errors import TargetError
from ..store import contained
from ..models.canonical import CanonicalTransformer
from ..progress import info, progress_bar
from . import Profile
from .runtime import Session, get_runtime

# The accuracy budget when the profile sets none: the "within 1 accuracy point" of the no-exit model.
DEFAULT_ACCURACY_DROP = 1.0
# Validation examples calibration uses at least, whatever a target's `limit` on the test split: fewer certify no
# exit (the bound rule: one example is more than a point), and the gate would never exit.
MIN_CALIBRATION_EXAMPLES = 100
# Candidate entropy thresholds the point rule tried (quantiles of the exit heads' entropies beyond this many).
MAX_THRESHOLDS = 400
# The bound rule's fixed grid of entropy thresholds: (k / (ENTROPY_GRID - 1))^2, k = 0..ENTROPY_GRID - 1.
ENTROPY_GRID = 401


# -- the driver ----------------------------------------------------------------------------------------------

@dataclass
class SegmentedModel:
    """A loaded segmented artifact: its manifest and one runner per segment."""

    manifest: dict[str, Any]
    sessions: list[Session]
    path: Path
    measures_latency: bool = True
    runtime: str = ""
    runtime_version: str = ""
    execution: str = ""

    @property
    def gate(self) -> Gate:
        return Gate.model_validate(self.manifest["gate"])

    @property
    def input_names(self) -> list[str]:
        return list(self.manifest["segments"][0]["inputs"])

    @property
    def depths(self) -> list[int]:
        """Layers run up to each head, the final one last."""
        return [s["layers"][1] for s in self.manifest["segments"]]


def load(manifest_path: Path, profile: Profile) -> SegmentedModel:
    """Open every segment of a manifest in the profile's runtime at its thread count."""
    return open_segments(manifest_path, profile.runtime, profile.threads)


def open_segments(manifest_path: Path, runtime: str, threads: int) -> SegmentedModel:
    """Open every segment of a manifest in `runtime` (a RUNTIMES name) on `threads` threads."""
    manifest_path = Path(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TargetError(f"Cannot read the segments manifest {manifest_path}: {e}.",
                          "re-export the model (`pocketformer export`).") from None
    rt = get_runtime(runtime)
    if manifest.get("format") != rt.format:
        raise TargetError(f"{manifest_path.name} holds {manifest.get('format')} segments; {rt.name} runs "
                          f"{rt.format}.", f"validate it on a {manifest.get('format')} target.")
    files = [(contained(manifest_path.parent, s["file"], manifest_path.name), s.get("signature"))
             for s in manifest["segments"]]
    return SegmentedModel(manifest, rt.open_graphs(files, threads), manifest_path,
                          measures_latency=rt.measures_latency, runtime=rt.name, runtime_version=rt.version(),
                          execution=rt.execution())


def run_example(model: SegmentedModel, feeds: dict[str, np.ndarray], gate: Optional[Gate]) -> ExitRun:
    """One example (batch 1) through the segments, stopping where `gate` says; gate None runs every segment."""
    return run_chain(model.sessions, model.manifest["segments"], feeds, gate)


@dataclass
class SplitRun:
    """A split through the driver: the gated run of each example, and (optionally) its full-depth run."""

    labels: np.ndarray
    exits: np.ndarray
    logits: np.ndarray
    latency_ms: np.ndarray
    head_logits: Optional[np.ndarray] = None  # (N, heads, labels), from the full-depth runs
    full_latency_ms: Optional[np.ndarray] = None
    extra: dict[str, Any] = field(default_factory=dict)


def example_feeds(model: SegmentedModel, ds: Dataset, enc: Encoder, i: int, seq_len: int) -> dict[str, np.ndarray]:
    """Example i at batch 1, text padded to the artifact's fixed length (else the profile's), as the latency of
    the plain artifacts is measured."""
    seq = model.manifest["shapes"].get("seq") or seq_len
    inputs = enc.encode(ds, np.asarray([i]), pad_to=seq)  # images have no sequence to pad
    return {name: t.numpy() for name, t in zip(model.input_names, inputs)}


def run_split(model: SegmentedModel, ds: Dataset, enc: Encoder, gate: Optional[Gate], full_depth: bool,
              seq_len: int, warmup: int = 0, desc: str = "") -> SplitRun:
    """Every example of `ds` through the driver with `gate` (None: no gated run) and, with `full_depth`, through
    every segment too; the two runs of an example are back to back, so host noise hits both alike."""
    if warmup and len(ds):
        first = example_feeds(model, ds, enc, 0, seq_len)
        for _ in range(warmup):
            run_example(model, first, None)
    gated, full = [], []
    with progress_bar(desc or f"early exit {model.path.name}", len(ds)) as advance:
        for i in range(len(ds)):
            feeds = example_feeds(model, ds, enc, i, seq_len)
            if gate is not None:
                gated.append(run_example(model, feeds, gate))
            if full_depth:
                full.append(run_example(model, feeds, None))
            advance()
    main = gated or full
    return SplitRun(labels=np.asarray([r.label for r in main]), exits=np.asarray([r.exit for r in main]),
                    logits=np.stack([r.logits for r in main]), latency_ms=np.asarray([r.latency_ms for r in main]),
                    head_logits=np.stack([np.stack(r.head_logits) for r in full]) if full else None,
                    full_latency_ms=np.asarray([r.latency_ms for r in full]) if full else None)


# -- calibration ---------------------------------------------------------------------------------------------

def candidate_gates(kind: str, head_logits: np.ndarray, rule: str) -> list[Gate]:
    """Gates of `kind`, ordered from least to most aggressive (the first never exits early). The bound rule tests a
    fixed grid of entropy thresholds (denser near 0, where confident heads sit), chosen before any data is seen, as
    fixed-sequence testing needs; the point rule (the earlier calibration, kept to compare) tried the midpoints of
    the observed entropies."""
    if kind == "patience":
        return [Gate(kind="patience", patience=p) for p in range(max(1, head_logits.shape[1] - 1), 0, -1)]
    if rule == "bound":
        return [Gate(kind="entropy", threshold=float(t)) for t in np.linspace(0, 1, ENTROPY_GRID) ** 2]
    values = np.unique(entropy(head_logits[:, :-1]))
    if len(values) > MAX_THRESHOLDS:
        values = np.quantile(values, np.linspace(0, 1, MAX_THRESHOLDS))
    # between observed entropies (a threshold on one would make ties decide), plus never and always
    return [Gate(kind="entropy", threshold=float(t))
            for t in np.concatenate([[0.0], (values[1:] + values[:-1]) / 2, [1.0]])]


def calibrate(head_logits: np.ndarray, labels: np.ndarray, kind: str, accuracy_drop: float, *,
              reference_correct: Optional[np.ndarray] = None, confidence: float = DEFAULT_CONFIDENCE,
              rule: str = "bound") -> tuple[Gate, dict]:
    """The most aggressive gate of `kind` that keeps the accuracy drop within `accuracy_drop` points, on
    (head_logits, labels). The drop is paired, example by example, against `reference_correct` (the uncompressed
    model's correctness on the same examples: what the target's budget is judged against), else against the final
    head's.

    rule "bound" (the default): walk the gates from least to most aggressive and keep the last one whose drop's
    upper bound at `confidence` (pocketformer.verdict) is within the budget, stopping at the first that is not.
    Testing a fixed sequence this way keeps the stated confidence for the gate chosen, on examples calibration did
    not see (fixed-sequence testing; Angelopoulos et al. 2021, "Learn then Test"). When the full-depth model alone
    is not certified within the budget against the reference on these examples (a pruned model, a few hundred
    examples), no gate could be; the exits are then calibrated against full depth to what the full-depth model's
    point estimate leaves of the budget, which certifies what the exits add, and the total is left to the test
    split's verdict (the record says which). rule "point": the most aggressive gate whose point estimate is within
    the budget, the earlier calibration, which breaks the budget out of sample (selection on noise). A gate that
    never exits early is chosen when nothing else qualifies."""
    n_heads = head_logits.shape[1]
    final_correct = head_logits[:, -1].argmax(-1) == labels
    # mode "total": the budget against `against`; "remainder": the exits' share, against full depth
    ref, budget, against, mode, full = final_correct, accuracy_drop, "full depth", "total", None
    if reference_correct is not None:
        reference_correct = np.asarray(reference_correct, dtype=bool)
        full = paired_drop(reference_correct, final_correct, confidence)
        ref, against = reference_correct, "the uncompressed model"
        if rule == "bound" and full.upper > accuracy_drop:
            ref, against, mode = final_correct, "full depth", "remainder"
            budget = max(0.0, accuracy_drop - full.drop)
    candidates = candidate_gates(kind, head_logits, rule)
    chosen, chosen_drop, chosen_correct = candidates[0], None, final_correct
    chosen_exits = np.full(len(labels), n_heads - 1)
    tried, entropies = 0, entropy(head_logits)
    for gate in candidates:
        exits = exit_indices(gate, head_logits, entropies)
        tried += 1
        if ref is final_correct and (exits == n_heads - 1).all():
            continue  # no example exits early: the full-depth model itself, a drop of exactly 0, nothing to test
        correct = head_logits[np.arange(len(exits)), exits].argmax(-1) == labels
        drop = paired_drop(ref, correct, confidence)
        if (drop.upper if rule == "bound" else drop.drop) <= budget:
            chosen, chosen_drop, chosen_correct, chosen_exits = gate, drop, correct, exits
        elif rule == "bound":
            break  # the fixed sequence stops at its first failure
    if chosen_drop is None and ref is final_correct:  # nothing exits early: full depth against itself, exactly 0
        drop_record = {"drop": 0.0, "drop_interval": [0.0, 0.0]}
    else:
        chosen_drop = chosen_drop or paired_drop(ref, final_correct, confidence)
        drop_record = {"drop": chosen_drop.drop, "drop_interval": list(chosen_drop.interval)}
    record = {"examples": int(len(labels)), "accuracy_drop_budget": accuracy_drop, "rule": rule,
              "confidence": confidence if rule == "bound" else None, "against": against, "mode": mode,
              "budget_for_exits": budget, "full_depth_accuracy": float(final_correct.mean() * 100),
              "gate_accuracy": float(chosen_correct.mean() * 100), **drop_record,
              "early_exit_fraction": float((chosen_exits < n_heads - 1).mean()),
              "candidates": len(candidates), "candidates_tested": tried}
    if reference_correct is not None:  # the split's whole story against the reference, whatever was calibrated
        total = paired_drop(reference_correct, chosen_correct, confidence)
        record.update({"reference_accuracy": float(reference_correct.mean() * 100),
                       "full_depth_drop": full.drop, "full_depth_drop_interval": list(full.interval),
                       "drop_vs_reference": total.drop, "drop_vs_reference_interval": list(total.interval)})
    return chosen, record


# -- the validation row ------------------------------------------------------------------------------------------

def _stats(ms: Optional[np.ndarray], prefix: str) -> dict[str, Optional[float]]:
    if ms is None:
        return {f"{prefix}_mean_ms": None, f"{prefix}_p50_ms": None, f"{prefix}_p90_ms": None}
    return {f"{prefix}_mean_ms": float(ms.mean()), f"{prefix}_p50_ms": float(np.percentile(ms, 50)),
            f"{prefix}_p90_ms": float(np.percentile(ms, 90))}


def validate_segments(manifest_path: Path, record: dict[str, Any], profile: Profile, ds: Dataset, enc: Encoder, *,
                      model: Optional[CanonicalTransformer] = None, calibration: Optional[Dataset] = None,
                      reference_out: Optional[np.ndarray] = None,
                      calibration_reference_out: Optional[np.ndarray] = None) -> dict[str, Any]:
    """One row for a segmented artifact on a target. The gate is calibrated on `calibration` (the validation split)
    to the profile's accuracy budget at its confidence, against the uncompressed model's outputs on that split
    (`calibration_reference_out`; without them, against full depth), else the manifest's gate is kept; the test
    split `ds` is then run through the driver with that gate and, back to back, to full depth, and judged against
    the budgets as plain artifacts are. `model` (the exported PyTorch model) gives the reference exits;
    `reference_out` (the uncompressed model's outputs on `ds`) the accuracy drop."""
    from .validate import judge, latency_interval

    seg, task = load(manifest_path, profile), _task(model)
    gate, calibration_info = calibrated_gate(seg, profile, calibration, enc, calibration_reference_out, task)
    test = run_split(seg, ds, enc, gate, True, profile.seq_len, warmup=profile.warmup,
                     desc=f"early exit {manifest_path.name}")
    accuracy, drop = _accuracy(seg, test, ds, reference_out, profile, task)
    row = {**_identity(seg, record, profile, ds), "gate": gate.model_dump(), "gate_default": seg.gate.model_dump(),
           "calibration": calibration_info, **accuracy}
    if model is not None:
        ref = [predict_with_exits(model, inputs, gate) for _, inputs in enc.batches(ds, 64)]
        row["pytorch_exit_agreement"] = float((np.concatenate([r.exits for r in ref]) == test.exits).mean() * 100)
        row["pytorch_prediction_agreement"] = float(
            (np.concatenate([r.labels for r in ref]) == test.labels).mean() * 100)
    row.update(_latency(seg, test, profile, len(ds)))
    if seg.measures_latency:
        row.update(latency_interval(test.latency_ms, profile))
    row["peak_rss_mb"] = None  # measured in the validating process, whose memory is not the artifact's
    row["execution"] = seg.execution
    judge(profile, row, task, drop)
    info(summary_line(row))
    return row


def calibrated_gate(seg: SegmentedModel, profile: Profile, calibration: Optional[Dataset], enc: Encoder,
                    reference_out: Optional[np.ndarray], task) -> tuple[Gate, Optional[dict[str, Any]]]:
    """The gate calibrated on the validation split to the profile's accuracy budget at its confidence (against
    the uncompressed model's outputs on that split, `reference_out`, when given), or the manifest's own gate when
    there is no split to calibrate on. A split too small to certify any exit gives the gate that never exits."""
    budget = profile.budgets.accuracy_drop if profile.budgets.accuracy_drop is not None else DEFAULT_ACCURACY_DROP
    if calibration is None or not len(calibration):
        return seg.gate, None
    cal = run_split(seg, calibration, enc, None, True, profile.seq_len, desc=f"calibrate {seg.path.name}")
    reference_correct = None if reference_out is None else task.correct(reference_out, calibration.labels)
    gate, info_ = calibrate(cal.head_logits, calibration.labels, seg.gate.kind, budget,
                            reference_correct=reference_correct, confidence=profile.budgets.confidence)
    info_.update({"split": calibration.split, "gate": gate.model_dump()})
    return gate, info_


def _task(model: Optional[CanonicalTransformer]):
    """The task the exit heads predict: the model's (the early_exit stage requires one with labels)."""
    return model.task if model is not None else TASKS["classification"]


def _identity(seg: SegmentedModel, record: dict[str, Any], profile: Profile, ds: Dataset) -> dict[str, Any]:
    return {"variant": f"{record['variant']}.exits.{record['precision']}", "file": seg.path.name,
            "kind": "segments", "format": record["format"], "precision": record["precision"], "runtime": seg.runtime,
            "runtime_version": seg.runtime_version, "target": profile.name, "threads": profile.threads,
            "shape": {"batch": 1, "seq_len": seg.manifest["shapes"].get("seq") or profile.seq_len},
            "examples": len(ds), "size_mb": record["size_bytes"] / 1e6, "measured": True,
            "segments": len(seg.sessions), "exits": seg.manifest["exits"]}


def _accuracy(seg: SegmentedModel, test: SplitRun, ds: Dataset, reference_out: Optional[np.ndarray],
              profile: Profile, task) -> tuple[dict[str, Any], Optional[PairedDrop]]:
    """Accuracy gated and at full depth, where examples exit, and the paired drop against the uncompressed model."""
    from .validate import accuracy_drop

    depths = np.asarray(seg.depths)
    full_depth = test.head_logits[:, -1]
    row: dict[str, Any] = {
        "accuracy": float((test.labels == ds.labels).mean() * 100),
        "full_depth_accuracy": float((full_depth.argmax(-1) == ds.labels).mean() * 100),
        "exit_histogram": {f"layer {d}": int((depths[test.exits] == d).sum()) for d in depths},
        "mean_layers": float(depths[test.exits].mean()), "layers": int(depths[-1]),
    }
    row["accuracy_drop_vs_full_depth"] = row["full_depth_accuracy"] - row["accuracy"]
    if reference_out is None:
        return row, None
    figures, drop = accuracy_drop(task, test.logits, reference_out, ds.labels, profile)
    row.update(figures)
    row["agreement_with_reference"] = float((test.labels == reference_out.argmax(-1)).mean() * 100)
    return row, drop


def _latency(seg: SegmentedModel, test: SplitRun, profile: Profile, examples: int) -> dict[str, Any]:
    """Mean/p50/p90 gated and at full depth, where the runtime's timing means something."""
    if not seg.measures_latency:
        return {**_stats(None, "latency"), **_stats(None, "full_depth_latency"), "latency_measured_on": None}
    row = {**_stats(test.latency_ms, "latency"), **_stats(test.full_latency_ms, "full_depth_latency"),
           "latency_runs": int(examples), "warmup_runs": profile.warmup}
    row["speedup_vs_full_depth"] = row["full_depth_latency_mean_ms"] / row["latency_mean_ms"]
    row["latency_measured_on"] = "target" if profile.this_host else \
        "this host, with the target's runtime, threads and shapes (not the device)"
    return row


def summary_line(row: dict[str, Any]) -> str:
    """What early exit bought, in one line: the gate, how it was calibrated, depth, accuracy and latency against full
    depth, and the drop on the test split against the budget."""
    gate = Gate.model_validate(row["gate"]).summary()
    cal = row.get("calibration")
    if not cal:
        source = "the exported default"
    else:
        low, high = cal["drop_interval"]
        source = f"calibrated on {cal['examples']} {cal['split']} examples at {cal['confidence']:.0%}: "
        if cal["mode"] == "remainder":
            f_low, f_high = cal["full_depth_drop_interval"]
            source += (f"the full-depth model alone is {cal['full_depth_drop']:+.2f} ({f_low:+.2f}..{f_high:+.2f}) "
                       f"against the uncompressed model there, not certified within {cal['accuracy_drop_budget']:g}, "
                       f"so the exits may lose the remaining {cal['budget_for_exits']:.2f} pts against full depth: "
                       f"they lose {cal['drop']:+.2f} ({low:+.2f}..{high:+.2f}); the test split judges the total")
        else:
            source += (f"to lose <= {cal['budget_for_exits']:g} pts against {cal['against']}: there "
                       f"{cal['drop']:+.2f} ({low:+.2f}..{high:+.2f})")
        if cal["early_exit_fraction"] == 0:
            source += ("; no early exit is certified within the budget on these examples, so none is taken: the "
                       "plain file is the faster one to ship")
    line = (f"    early exit ({gate}, {source}): {row['mean_layers']:.2f} of {row['layers']} layers on average, "
            f"accuracy {row['accuracy']:.2f}% vs {row['full_depth_accuracy']:.2f}% at full depth")
    if row.get("latency_mean_ms") is not None:
        line += (f", mean {row['latency_mean_ms']:.2f} ms vs {row['full_depth_latency_mean_ms']:.2f} ms "
                 f"({row['speedup_vs_full_depth']:.2f}x)")
    return line
