"""Early-exit models exported as segments, so a driver (pocketformer.targets.early_exit) can run them one after another
at batch 1 and stop at the exit: the only way early exit saves time in a runtime that runs whole graphs.

Segment 0 = embeddings + the layers up to the first exit + that exit's head: (model inputs) -> (hidden, exit_logits).
Segment i = the next layers + exit head i: (hidden_in[, attention_mask]) -> (hidden, exit_logits) (ONNX forbids an
input and an output of one name). The last segment ends with the final head: -> (logits). `hidden` is the raw
residual stream; each head normalises and pools it exactly as the model does (CanonicalTransformer.exit_output).

The segments are one graph set of the export loop (export/loop.py), so every format writes them as it writes any set
of graphs: ONNX and CoreML one file per segment, TFLite one file with a signature per segment (XNNPACK runs every
signature). Each precision gets a manifest JSON (files, signatures, inputs/outputs, exit layers, default gate, shapes)
recorded in artifacts.json with "kind": "segments". `run_chain` is the driver's core, shared with the targets.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..models.canonical import CanonicalTransformer, attention_bias
from ..models.exits import Gate, gate_of, predict_with_exits, should_stop
from ..models.signature import Graph, GraphIO, TensorSpec, named_forward
from ..store import atomic_write_bytes
from .base import Format, Written, artifact_size
from .base import tree_sha256
from .loop import GraphSet, Reference, SetContext

KIND = "segments"


class Segment(nn.Module):
    """Layers [start, stop) of a model and the head after them (exit head `index`, or the final head after the
    last layer). Holds only its own modules, so each exported segment carries only its own weights."""

    def __init__(self, model: CanonicalTransformer, index: int):
        super().__init__()
        exits = model.spec.exits
        self.index = index
        self.final = index == len(exits)
        self.start = exits[index - 1] + 1 if index else 0
        self.stop = len(model.layers) if self.final else exits[index] + 1
        self.embeddings = model.embeddings if index == 0 else None
        self.embed = model.embed  # a plain method over self.embeddings' weights
        self.layers = nn.ModuleList(model.layers[self.start:self.stop])
        self.norm = model.final_norm
        self.head = model.classifier if self.final else model.exit_heads[index]
        self.pool = model.pool  # a plain method: pooling has no weights
        self.io = segment_io(model, index)
        self.mask_position = self.io.input_names.index("attention_mask") if "attention_mask" in \
            self.io.input_names else None

    def forward(self, *inputs: torch.Tensor):
        x = self.embed(*inputs) if self.embeddings is not None else inputs[0]
        mask = inputs[self.mask_position] if self.mask_position is not None else None
        mask_add = attention_bias(mask, x.dtype) if mask is not None else None
        for layer in self.layers:
            x = layer(x, mask_add)
        logits = self.head(self.pool(self.norm(x) if self.norm is not None else x, mask))
        return (logits,) if self.final else (x, logits)


def segment_io(model: CanonicalTransformer, index: int) -> GraphIO:
    """Segment `index`'s inputs and outputs, derived from the model's declaration."""
    io, spec = model.io, model.spec
    hidden = ("batch", spec.token_axis(), spec.hidden)
    if index == 0:
        inputs = io.inputs
    else:
        inputs = (TensorSpec("hidden_in", "float32", hidden),) + tuple(t for t in io.inputs
                                                                      if t.name == "attention_mask")
    logits = io.outputs[0]
    final = index == len(spec.exits)
    outputs = (logits,) if final else (TensorSpec("hidden", "float32", hidden),
                                       TensorSpec("exit_logits", logits.dtype, logits.axes))
    return GraphIO(tuple(inputs), outputs, io.bounds)


def segments(model: CanonicalTransformer) -> list[Segment]:
    """The model cut after each exit layer, in order."""
    require_labels_with_exits(model)
    return [Segment(model, i).eval() for i in range(len(model.spec.exits) + 1)]


def require_labels_with_exits(model: CanonicalTransformer) -> None:
    if not model.task.has_labels:
        raise ExportError("Early-exit segments need a classifier: an embedding model has no exit heads.",
                          "export it without segments, or fine-tune it into a classifier first.")
    if not model.spec.exits:
        raise ExportError("The model has no exit heads to cut segments at.",
                          "add an early_exit stage to the recipe's stages.")


def torch_chain(segs: list[Segment], inputs: tuple[torch.Tensor, ...]) -> Reference:
    """(feeds, outputs) of every segment in PyTorch, each fed the previous segment's hidden state."""
    feeds = dict(zip(segs[0].io.input_names, inputs))
    chain = {}
    with torch.no_grad():
        for seg in segs:
            outputs = dict(zip(seg.io.output_names, seg(*[feeds[n] for n in seg.io.input_names])))
            chain[f"segment_{seg.index}"] = ({n: feeds[n] for n in seg.io.input_names}, outputs)
            if "hidden" in outputs:
                feeds = {**feeds, "hidden_in": outputs["hidden"]}
    return chain


# -- the driver's core: shared by the export check and the targets ---------------------------------------------

class ExitRun(NamedTuple):
    label: int
    exit: int  # head index (the last = the final head)
    logits: np.ndarray  # (labels,) of that head
    latency_ms: float
    head_logits: list[np.ndarray]  # every head run, in order


def chain_feeds(segment: dict[str, Any], first_feeds: dict[str, np.ndarray],
                previous: Optional[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A segment's feeds: the model inputs for the first, else the previous hidden state (and the mask)."""
    if previous is None:
        return first_feeds
    return {name: previous["hidden"] if name == "hidden_in" else first_feeds[name] for name in segment["inputs"]}


def run_chain(sessions: list, entries: list[dict[str, Any]], feeds: dict[str, np.ndarray],
              gate: Optional[Gate]) -> ExitRun:
    """One example (batch 1) through the segments' sessions, stopping where `gate` says; None runs them all.
    `entries`: the manifest's segments (inputs, logits_output)."""
    heads: list[np.ndarray] = []
    previous = None
    t0 = time.perf_counter()
    for i, (session, entry) in enumerate(zip(sessions, entries)):
        previous = session.invoke(session.prepare(chain_feeds(entry, feeds, previous)))
        heads.append(np.asarray(previous[entry["logits_output"]])[0])
        if gate is not None and i < len(entries) - 1 and should_stop(gate, heads):
            break
    latency = (time.perf_counter() - t0) * 1000.0
    return ExitRun(int(np.argmax(heads[-1])), len(heads) - 1, heads[-1], latency, heads)


# -- the graph set -------------------------------------------------------------------------------------------------

class SegmentSet(GraphSet):
    kind = KIND
    batch = 1  # early exit saves time one example at a time
    # Segments are stored dense, in the plain precisions, at iOS17 for CoreML: their manifest records neither sparse
    # storage nor the format's own options.
    stores_sparse = False
    takes_options = False

    @classmethod
    def applies(cls, model: CanonicalTransformer, fmt: Format) -> bool:
        return bool(getattr(model.spec, "exits", None))

    def __init__(self, model: CanonicalTransformer, fmt: Format, static_shape: Optional[tuple[int, int]] = None):
        self.model = model
        self.segments = segments(model)
        self.graphs = {f"segment_{s.index}": Graph(named_forward(s, s.io.input_names, s.io.output_names), s.io)
                       for s in self.segments}

    def reference(self, inputs: tuple[torch.Tensor, ...]) -> Reference:
        return torch_chain(self.segments, inputs)

    def file_name(self, stem: str, fmt: Format, precision: str, graph: str) -> str:
        if fmt.shares_file():
            return f"{stem}.exits.{fmt.suffix(precision)}{fmt.extension}"
        return f"{stem}.exits.seg{graph.removeprefix('segment_')}.{fmt.suffix(precision)}{fmt.extension}"

    def records(self, ctx: SetContext, precision: str, written: list[Written],
                checks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Write the manifest of one precision's segments; return its artifacts.json record."""
        model, fmt = self.model, ctx.fmt
        manifest_path = ctx.out_dir / f"{ctx.stem}.exits.{fmt.suffix(precision)}.{fmt.name}.json"
        gate = gate_of(model)
        unique = list(dict.fromkeys(w.path for w in written))
        described = {path: fmt.describe(path) for path in unique}
        fixed = ctx.plan.fixed
        seq = fixed.get("sequence") if fixed else None

        def dims(spec: TensorSpec) -> list:
            return [fixed[a] if fixed and a in fixed else ("seq" if a == "sequence" else a) for a in spec.axes]

        entries = [{"index": seg.index, "file": w.path.name, "signature": w.signature,
                    "layers": [seg.start, seg.stop], "head": "final" if seg.final else f"exit {seg.index}",
                    "inputs": {t.name: dims(t) for t in seg.io.inputs},
                    "outputs": {t.name: dims(t) for t in seg.io.outputs},
                    "logits_output": seg.io.output_names[-1], "parity_vs_pytorch": checks[w.graph]}
                   for seg, w in zip(self.segments, written)]
        manifest = {"kind": KIND, "format": fmt.name, "precision": precision, "modality": model.spec.modality,
                    "labels": list(model.spec.head.labels), "layers": len(model.layers),
                    "exits": list(model.spec.exits), "gate": gate.model_dump(),
                    "shapes": {"batch": 1 if fixed else None, "seq": seq, "hidden": model.spec.hidden},
                    "segments": entries}
        atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2).encode())
        logits = [checks[w.graph][seg.io.output_names[-1]] for seg, w in zip(self.segments, written)]
        ops: Counter = Counter()
        for d in described.values():
            ops.update(d["ops"])
        return [{"file": manifest_path.name, "kind": KIND, "variant": ctx.stem, "format": fmt.name,
                 "precision": precision, "size_bytes": sum(artifact_size(p) for p in unique),
                 "sha256": tree_sha256(manifest_path),
                 "files_sha256": {p.name: fmt.content_sha256(p) for p in unique},
                 "segments": [e["file"] + (f":{e['signature']}" if e["signature"] else "") for e in entries],
                 "exits": list(model.spec.exits), "gate": gate.model_dump(),
                 "parity_vs_pytorch": {"max_abs_diff": max(r["max_abs_diff"] for r in logits),
                                       "cosine": min(r["cosine"] for r in logits),
                                       "min_cosine": min(r["min_cosine"] for r in logits),
                                       "argmax_agreement": min(r["argmax_agreement"] for r in logits),
                                       "examples": logits[0]["examples"], "execution": ctx.runtime.execution()},
                 "exit_agreement_vs_pytorch": self.exit_agreement(ctx, written, entries),
                 "inputs": entries[0]["inputs"], "outputs": entries[-1]["outputs"], "ops": dict(ops.most_common()),
                 "weights": sum(d.get("weights", 0) for d in described.values()),
                 "parity_execution": ctx.runtime.execution()}]

    def exit_agreement(self, ctx: SetContext, written: list[Written],
                       entries: list[dict[str, Any]]) -> dict[str, float]:
        """The driver on the check inputs, one at a time, vs PyTorch's predict_with_exits, both with the default
        gate. Recorded, not enforced: an entropy a hair from the threshold may fall either side in another
        runtime."""
        sessions = ctx.runtime.open_graphs([(w.path, w.signature) for w in written], 1)
        gate = gate_of(self.model)
        names = self.model.input_names
        got = [run_chain(sessions, entries, {n: t[i:i + 1].numpy() for n, t in zip(names, ctx.inputs)}, gate)
               for i in range(len(ctx.inputs[0]))]
        want = predict_with_exits(self.model, ctx.inputs, gate)
        return {"exits": float(np.mean([g.exit == w for g, w in zip(got, want.exits)])),
                "predictions": float(np.mean([g.label == w for g, w in zip(got, want.labels)])),
                "examples": len(got)}
