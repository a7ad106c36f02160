"""Early-exit models exported as segments, so a driver (pocketformer.targets.early_exit) can run them one after
another at batch 1 and stop at the exit: the only way early exit saves time in a runtime that runs whole graphs.

Segment 0 = embeddings + the layers up to the first exit + that exit's head: (model inputs) -> (hidden, exit_logits).
Segment i = the next layers + exit head i: (hidden_in[, attention_mask]) -> (hidden, exit_logits) (ONNX forbids
an input and an output of one name). The last segment ends
with the final head: -> (logits). `hidden` is the raw residual stream; each head normalises and pools it exactly as
the model does (CanonicalTransformer.exit_output).

ONNX: one file per segment (dynamic batch and sequence unless a static shape is asked), int8 by ORT dynamic
quantization. TFLite: one file with one signature per segment (`segment_0`, ...; XNNPACK runs every signature), in the
same precisions as the plain export. CoreML: one .mlpackage per segment. Each precision gets a manifest JSON (files,
signatures, inputs/outputs, exit layers, default gate, shapes) recorded in artifacts.json with "kind": "segments".
Every segment is run in its runtime against PyTorch on the same inputs (the PyTorch hidden state of the segment
before) before the manifest is written.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..models.exits import gate_of, predict_with_exits
from ..errors import ExportError
from ..models.canonical import CanonicalTransformer, attention_bias
from . import coreml, tflite
from . import onnx as onnx_export
from ..store import atomic_write_bytes
from .common import artifact_size, pad_to, parity, reduced_precision_ok

FORMAT_RUNTIME = {"onnx": "onnxruntime", "tflite": "litert", "coreml": "coreml-mil-reference"}
KIND = "segments"
# fp32 segments: both outputs as close as each format's plain fp32 file must be (max abs diff, min cosine).
FP32_TOLERANCE = {"onnx": (onnx_export.FP32_MAX_ABS, onnx_export.FP32_MIN_COSINE),
                  "tflite": (None, tflite.FP32_MIN_COSINE), "coreml": (coreml.FP32_MAX_ABS, coreml.FP32_MIN_COSINE)}


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
        self.layers = nn.ModuleList(model.layers[self.start:self.stop])
        self.norm = model.final_norm
        self.head = model.classifier if self.final else model.exit_heads[index]
        self.pool = model.pool  # a plain method: pooling has no weights
        text = model.spec.modality == "text"
        self.input_names = list(model.input_names) if index == 0 else ["hidden_in"] + (["attention_mask"] if text
                                                                                       else [])
        self.output_names = ["logits"] if self.final else ["hidden", "exit_logits"]
        self.as_dict = False  # LiteRT names a signature's outputs after the keys of a returned dict

    def compute(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        mask_add = attention_bias(attention_mask, x.dtype) if attention_mask is not None else None
        for layer in self.layers:
            x = layer(x, mask_add)
        logits = self.head(self.pool(self.norm(x) if self.norm is not None else x, attention_mask))
        outputs = (logits,) if self.final else (x, logits)
        return dict(zip(self.output_names, outputs)) if self.as_dict else outputs


# One class per input signature: exporters name inputs after the forward's parameters.
class _TextFirst(Segment):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.compute(self.embeddings(input_ids), attention_mask)


class _VisionFirst(Segment):
    def forward(self, pixel_values: torch.Tensor):
        return self.compute(self.embeddings(pixel_values), None)


class _TextNext(Segment):
    def forward(self, hidden_in: torch.Tensor, attention_mask: torch.Tensor):
        return self.compute(hidden_in, attention_mask)


class _VisionNext(Segment):
    def forward(self, hidden_in: torch.Tensor):
        return self.compute(hidden_in, None)


def segments(model: CanonicalTransformer) -> list[Segment]:
    """The model cut after each exit layer, in order."""
    require_classifier_with_exits(model)
    text = model.spec.modality == "text"
    kinds = {(True, True): _TextFirst, (True, False): _VisionFirst, (False, True): _TextNext,
             (False, False): _VisionNext}
    return [kinds[(i == 0, text)](model, i).eval() for i in range(len(model.spec.exits) + 1)]


def require_classifier_with_exits(model: CanonicalTransformer) -> None:
    if model.classifier is None:
        raise ExportError("Early-exit segments need a classifier: an embedding model has no exit heads.",
                          "export it without segments, or fine-tune it into a classifier first.")
    if not model.spec.exits:
        raise ExportError("The model has no exit heads to cut segments at.",
                          "add an early_exit stage to the recipe's stages.")


def torch_chain(segs: list[Segment], inputs: tuple[torch.Tensor, ...]) -> list[tuple[dict, dict]]:
    """(feeds, outputs) of every segment in PyTorch, each fed the previous segment's hidden state."""
    feeds = dict(zip(segs[0].input_names, inputs))
    chain = []
    with torch.no_grad():
        for seg in segs:
            outputs = dict(zip(seg.output_names, seg(*[feeds[n] for n in seg.input_names])))
            chain.append(({n: feeds[n] for n in seg.input_names}, outputs))
            if "hidden" in outputs:
                feeds = {**feeds, "hidden_in": outputs["hidden"]}
    return chain


def _batched(run, feeds: dict[str, torch.Tensor], batch: Optional[int]) -> dict[str, np.ndarray]:
    """`run` on all rows of `feeds`, in chunks of a fixed `batch` (None: all at once); every output concatenated."""
    n = len(next(iter(feeds.values())))
    step = batch or n
    parts = [run({k: v[s:s + step].numpy() for k, v in feeds.items()}) for s in range(0, n, step)]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


def check_segment(run, feeds: dict, want: dict, fmt: str, precision: str, batch: Optional[int],
                  name: str) -> dict[str, Any]:
    """Run one segment in its runtime on PyTorch's feeds and compare every output; raise ExportError beyond
    tolerance. fp32: each output as close as a plain fp32 file; reduced precision: the exit logits must make the
    same decisions (the hidden state is recorded, and judged through the logits of the segments after it)."""
    got = _batched(run, feeds, batch)
    result = {k: parity(want[k].numpy(), got[k].astype(np.float32)) for k in want}
    logits = result["logits" if "logits" in result else "exit_logits"]
    if precision == "fp32":
        max_abs, min_cos = FP32_TOLERANCE[fmt]
        ok = all((max_abs is None or r["max_abs_diff"] <= max_abs) and r["cosine"] >= min_cos
                 for r in result.values())
    else:
        ok = reduced_precision_ok(logits, classifier=True)
    finite = all(np.isfinite(v).all() for v in got.values())
    if not (ok and finite):
        worst = min(result.values(), key=lambda r: r["cosine"])
        raise ExportError(f"Segment {name} ({precision}) disagrees with PyTorch in {FORMAT_RUNTIME[fmt]} (max abs "
                          f"diff {worst['max_abs_diff']:.2e}, cosine {worst['cosine']:.5f}"
                          f"{'' if finite else ', non-finite outputs'}).",
                          "skip int8 (`--no-int8`): this model's decisions do not survive int8." if "int8" in precision
                          else "report this with the model's pocketformer.json.")
    return result


def _runs(fmt: str, files: list[tuple[Path, Optional[str]]]):
    import importlib

    from ..targets import RUNTIMES

    return importlib.import_module(RUNTIMES[FORMAT_RUNTIME[fmt]]).segment_runs(files, 1)


def _check_all(fmt: str, precision: str, files, chain, batch: Optional[int]) -> list[dict[str, Any]]:
    """Every segment checked; files that fail are deleted, so no manifest or later run can pick them up."""
    try:
        return [check_segment(run, feeds, want, fmt, precision, batch, f"{i} of {path.name}")
                for i, (run, (path, _), (feeds, want)) in enumerate(zip(_runs(fmt, files), files, chain))]
    except ExportError:
        for path in {path for path, _ in files}:
            path.unlink(missing_ok=True)
        raise


# -- the exporter ------------------------------------------------------------------------------------------------

def export(model: CanonicalTransformer, out_dir: Path, stem: str, inputs: tuple[torch.Tensor, ...], fmt: str, *,
           int8: bool = True, static_shape: Optional[tuple[int, int]] = None) -> list[dict[str, Any]]:
    """Write `model`'s segments in `fmt`, in the precisions its plain exporter writes, each with its manifest
    `{stem}.exits.{precision}.{fmt}.json`; return their artifacts.json records.

    Static formats (TFLite, CoreML; ONNX with `static_shape`) are fixed at batch 1, at `static_shape`'s sequence
    length or the format's default: early exit saves time one example at a time."""
    if fmt not in FORMAT_RUNTIME:
        raise ExportError(f"No segmented export for format {fmt!r}.", f"use one of {', '.join(FORMAT_RUNTIME)}.")
    model = model.eval()
    segs = segments(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {"onnx": _export_onnx, "tflite": _export_tflite, "coreml": _export_coreml}[fmt](
        model, segs, out_dir, stem, inputs, int8, static_shape)


def _export_onnx(model, segs, out_dir, stem, inputs, int8, static_shape) -> list[dict[str, Any]]:
    static = (1, static_shape[1]) if static_shape else None
    check_inputs = pad_to(inputs, static[1], model) if static else inputs
    chain = torch_chain(segs, check_inputs)
    batch = 1 if static else None
    files = []
    for seg, (feeds, _) in zip(segs, chain):
        path = out_dir / f"{stem}.exits.seg{seg.index}.fp32.onnx"
        example = tuple(feeds[n][:1] if static else feeds[n] for n in seg.input_names)
        onnx_export.export_module(seg, path, example, seg.input_names, seg.output_names,
                                  None if static else onnx_export.dynamic_axes(model, len(seg.input_names)))
        files.append((path, None))
    records = [_record(model, segs, chain, files, "onnx", "fp32", stem, out_dir, static, check_inputs,
                       _check_all("onnx", "fp32", files, chain, batch))]
    if int8:
        quantized = []
        for path, _ in files:
            q = path.with_name(path.name.replace(".fp32.onnx", ".int8.onnx"))
            onnx_export.quantize_int8(path, q)
            quantized.append((q, None))
        records.append(_record(model, segs, chain, quantized, "onnx", "int8", stem, out_dir, static, check_inputs,
                               _check_all("onnx", "int8", quantized, chain, batch)))
    return records


def _export_tflite(model, segs, out_dir, stem, inputs, int8, static_shape) -> list[dict[str, Any]]:
    from .tflite import _first_line, _quiet

    static = (1, static_shape[1] if static_shape else tflite.DEFAULT_SEQ)
    check_inputs = pad_to(inputs, static[1], model)
    chain = torch_chain(segs, check_inputs)
    fp32 = out_dir / f"{stem}.exits.fp32.tflite"
    with _quiet():
        import litert_torch

        converter = litert_torch.Converter()
        for seg, (feeds, _) in zip(segs, chain):
            seg.as_dict = True  # outputs named hidden / exit_logits / logits, not output_0, output_1
            converter.signature(f"segment_{seg.index}", seg, sample_kwargs={n: feeds[n][:1] for n in seg.input_names})
        try:
            content = converter.convert().model_content()
        except Exception as e:
            raise ExportError(f"litert-torch conversion of the segments failed: {_first_line(e)}",
                              "report this with the checkpoint's pocketformer.json.") from None
        finally:
            for seg in segs:
                seg.as_dict = False
    atomic_write_bytes(fp32, bytes(content))
    records = []
    for precision in ("fp32", "fp16") + (("int8-weight", "int8") if int8 else ()):
        path = fp32 if precision == "fp32" else out_dir / f"{stem}.exits.{tflite.SUFFIX[precision]}.tflite"
        if precision != "fp32":
            tflite.quantize(fp32, path, precision)
        files = [(path, f"segment_{seg.index}") for seg in segs]
        records.append(_record(model, segs, chain, files, "tflite", precision, stem, out_dir, static, check_inputs,
                               _check_all("tflite", precision, files, chain, 1)))
    return records


def _export_coreml(model, segs, out_dir, stem, inputs, int8, static_shape) -> list[dict[str, Any]]:
    from ..targets import coreml_ref

    shape, check_inputs = coreml.fixed_inputs(model, inputs, (1, static_shape[1]) if static_shape else None)
    if not coreml_ref.on_macos():  # the reference interpreter takes seconds per example
        check_inputs = tuple(t[:coreml.REFERENCE_CHECK_EXAMPLES] for t in check_inputs)
    chain = torch_chain(segs, check_inputs)
    records, built = [], {}
    for precision in ("fp32", "fp16") + (("int8",) if int8 else ()):
        files, checks = [], []
        for seg, (feeds, want) in zip(segs, chain):
            if precision == "int8":  # int8 weights on the fp16-compute program, as the plain export does
                mlmodel = coreml.quantize_int8(built[("fp16", seg.index)])
            else:
                mlmodel = coreml.convert_module(seg, tuple(feeds[n][:1] for n in seg.input_names), seg.input_names,
                                                seg.output_names, precision)
            built[(precision, seg.index)] = mlmodel
            path = out_dir / f"{stem}.exits.seg{seg.index}.{precision}.mlpackage"

            def check(staged: Path, feeds=feeds, want=want, index=seg.index, precision=precision):
                run = _runs("coreml", [(staged, None)])[0]
                return check_segment(run, feeds, want, "coreml", precision, 1, f"{index} ({staged.name})")

            checks.append(coreml.save_checked(mlmodel, path, check))
            files.append((path, None))
        records.append(_record(model, segs, chain, files, "coreml", precision, stem, out_dir, shape, check_inputs,
                               checks))
    return records


# -- the manifest and the record -----------------------------------------------------------------------------

def _dims(t: torch.Tensor, static: Optional[tuple[int, ...]], tokens: bool) -> list:
    """A tensor's shape as the file has it: batch 1 when static, else named dynamic axes (as ONNX names them);
    `tokens`: axis 1 is the text's sequence."""
    if static:
        return [1] + list(t.shape[1:])
    return ["batch"] + (["seq"] + list(t.shape[2:]) if tokens else list(t.shape[1:]))


def _describe(fmt: str, path: Path) -> dict[str, Any]:
    """Ops and weights of one segment file (every subgraph of a multi-signature .tflite)."""
    if fmt == "onnx":
        return onnx_export.describe(path)
    if fmt == "coreml":
        return coreml.describe(path)
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    fb = schema.Model.GetRootAs(Path(path).read_bytes(), 0)
    codes = [max(fb.OperatorCodes(i).BuiltinCode(), fb.OperatorCodes(i).DeprecatedBuiltinCode())
             for i in range(fb.OperatorCodesLength())]
    ops: Counter = Counter()
    for g in range(fb.SubgraphsLength()):
        graph = fb.Subgraphs(g)
        ops.update(names.get(codes[graph.Operators(j).OpcodeIndex()], "?") for j in range(graph.OperatorsLength()))
    return {"ops": dict(ops.most_common())}


def _record(model, segs, chain, files, fmt: str, precision: str, stem: str, out_dir: Path,
            static: Optional[tuple[int, ...]], check_inputs, checks: list[dict]) -> dict[str, Any]:
    """Write the manifest of one precision's segments; return its artifacts.json record."""
    from ..models.io import file_sha256
    from ..targets import coreml_ref

    suffix = {"int8-weight": "int8w"}.get(precision, precision)
    manifest_path = out_dir / f"{stem}.exits.{suffix}.{fmt}.json"
    text = model.spec.modality == "text"
    gate = gate_of(model)
    unique = sorted({path for path, _ in files})
    described = {path: _describe(fmt, path) for path in unique}
    entries = [{"index": seg.index, "file": path.name, "signature": signature, "layers": [seg.start, seg.stop],
                "head": "final" if seg.final else f"exit {seg.index}",
                "inputs": {n: _dims(feeds[n], static, text) for n in seg.input_names},
                "outputs": {n: _dims(want[n], static, text and n == "hidden") for n in seg.output_names},
                "logits_output": seg.output_names[-1], "parity_vs_pytorch": check}
               for seg, (path, signature), (feeds, want), check in zip(segs, files, chain, checks)]
    manifest = {"kind": KIND, "format": fmt, "precision": precision, "modality": model.spec.modality,
                "labels": list(model.spec.head.labels), "layers": len(model.layers), "exits": list(model.spec.exits),
                "gate": gate.model_dump(),
                "shapes": {"batch": 1 if static else None, "seq": static[1] if static and text else None,
                           "hidden": model.spec.hidden},
                "segments": entries}
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2).encode())
    logits = [c[seg.output_names[-1]] for seg, c in zip(segs, checks)]
    ops: Counter = Counter()
    for d in described.values():
        ops.update(d["ops"])
    return {"file": manifest_path.name, "kind": KIND, "variant": stem, "format": fmt, "precision": precision,
            "size_bytes": sum(artifact_size(p) for p in unique), "sha256": file_sha256(manifest_path),
            "files_sha256": {p.name: coreml.package_sha256(p) if p.is_dir() else file_sha256(p) for p in unique},
            "segments": [e["file"] + (f":{e['signature']}" if e["signature"] else "") for e in entries],
            "exits": list(model.spec.exits), "gate": gate.model_dump(),
            "parity_vs_pytorch": {"max_abs_diff": max(r["max_abs_diff"] for r in logits),
                                  "cosine": min(r["cosine"] for r in logits),
                                  "min_cosine": min(r["min_cosine"] for r in logits),
                                  "argmax_agreement": min(r["argmax_agreement"] for r in logits),
                                  "examples": logits[0]["examples"]},
            "exit_agreement_vs_pytorch": _exit_agreement(model, manifest_path, fmt, check_inputs),
            "inputs": entries[0]["inputs"], "outputs": entries[-1]["outputs"], "ops": dict(ops.most_common()),
            "weights": sum(d.get("weights", 0) for d in described.values()),
            **({"parity_execution": coreml_ref.execution()} if fmt == "coreml" else {})}


def _exit_agreement(model: CanonicalTransformer, manifest_path: Path, fmt: str, inputs) -> dict[str, float]:
    """The driver on the check inputs, one at a time, vs PyTorch's predict_with_exits, both with the default gate.
    Recorded, not enforced: an entropy a hair from the threshold may fall either side in another runtime."""
    from ..targets.early_exit import open_segments, run_example

    driver = open_segments(manifest_path, FORMAT_RUNTIME[fmt], 1)
    gate = gate_of(model)
    got = [run_example(driver, {n: t[i:i + 1].numpy() for n, t in zip(model.input_names, inputs)}, gate)
           for i in range(len(inputs[0]))]
    want = predict_with_exits(model, inputs, gate)
    return {"exits": float(np.mean([g.exit == w for g, w in zip(got, want.exits)])),
            "predictions": float(np.mean([g.label == w for g, w in zip(got, want.labels)])),
            "examples": len(got)}
