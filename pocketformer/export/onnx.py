"""ONNX export: torch.onnx (dynamo) -> onnxsim -> optional ORT per-channel dynamic int8, each file checked in ONNX
Runtime against PyTorch on real inputs before it is kept."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import torch

from ..errors import ExportError
from ..models.canonical import CanonicalTransformer
from ..progress import quiet
from . import sparse as sparse_storage
from .common import named, pad_to, parity, reduced_precision_ok, run_in_batches

OPSET = 18
# fp32 artifacts must match PyTorch closely; int8 by export.common.reduced_precision_ok.
FP32_MAX_ABS = 1e-3
FP32_MIN_COSINE = 0.9999


def _quiet():
    """The exporter prints pages of warnings about its own internals; users want one line per artifact."""
    return quiet("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")


def export_float(model: CanonicalTransformer, path: Path, example: tuple[torch.Tensor, ...],
                 static_shape: bool = False) -> None:
    """Write a simplified fp32 ONNX file. Dynamic batch and sequence axes unless `static_shape`."""
    names = model.input_names
    export_module(named(model), path, example, names, [model.output_name],
                  None if static_shape else dynamic_axes(model, len(names)))


def dynamic_axes(model: CanonicalTransformer, n_inputs: int) -> tuple[dict, ...]:
    """For each of `n_inputs` inputs laid out like the model's (batch first, then tokens for text): the batch axis,
    and for text the sequence axis, left dynamic."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    if model.spec.modality == "text":
        seq = torch.export.Dim("seq", min=1, max=model.spec.max_positions - model.spec.position_offset)
        return tuple({0: batch, 1: seq} for _ in range(n_inputs))
    return tuple({0: batch} for _ in range(n_inputs))


def export_module(module: torch.nn.Module, path: Path, example: tuple[torch.Tensor, ...], input_names: list[str],
                  output_names: list[str], dynamic_shapes: Optional[tuple[dict, ...]] = None) -> None:
    """Write a simplified fp32 ONNX file of any module taking `example` positionally; static shapes unless
    `dynamic_shapes` (torch.export's, one per input)."""
    if dynamic_shapes is not None:  # trace with a batch of 2: a traced batch of 1 specialises the batch axis away
        example = tuple(t[:2] if len(t) >= 2 else torch.cat([t, t]) for t in example)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        raw = Path(tmp) / "raw.onnx"
        try:
            torch.onnx.export(module.eval(), example, str(raw), input_names=input_names, output_names=output_names,
                              dynamic_shapes=dynamic_shapes, dynamo=True, external_data=False, opset_version=OPSET,
                              optimize=True)
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed: {str(e).splitlines()[0][:300]}",
                              "report this with the checkpoint's pocketformer.json.") from None
        proto = onnx.load(str(raw))
        _rename_shadowing_values(proto)
        try:
            import onnxsim

            simplified, ok = onnxsim.simplify(proto)
            if ok:
                proto = simplified
        except Exception:  # onnxsim is an optimisation: the unsimplified graph is still correct
            pass
        _save_atomic(proto, path)


def _rename_shadowing_values(proto: onnx.ModelProto) -> None:
    """torch.onnx names values after the ops that make them, so a text embedding model (output `embedding`) also
    gets an internal `embedding` (the token lookup): one name defined twice, which ONNX Runtime refuses to load.
    Rename every definition of an input or output name except the graph output's own (the last one)."""
    graph = proto.graph
    io_names = {v.name for v in graph.input} | {v.name for v in graph.output}
    remaining = Counter(o for node in graph.node for o in node.output if o in io_names)
    outputs = {v.name for v in graph.output}
    current: dict[str, str] = {}  # name as written -> the definition it refers to at this point of the graph
    renamed: list[str] = []
    for node in graph.node:  # exported graphs are in topological order
        for i, name in enumerate(node.input):
            if name in current:
                node.input[i] = current[name]
        for j, name in enumerate(node.output):
            if name not in io_names:
                continue
            remaining[name] -= 1
            if remaining[name] > 0 or name not in outputs:
                node.output[j] = current[name] = f"{name}__internal{len(renamed)}"
                renamed.append(name)
            else:
                current.pop(name, None)
    if renamed:  # shapes recorded under a shadowed name may describe either definition
        kept = [vi for vi in graph.value_info if vi.name not in renamed]
        del graph.value_info[:]
        graph.value_info.extend(kept)


def quantize_int8(float_path: Path, path: Path) -> None:
    """ORT dynamic int8, per-channel weights (per-tensor loses accuracy, METHODS.md: cosine 0.963)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        pre = Path(tmp) / "pre.onnx"
        out = Path(tmp) / "q.onnx"
        # the quantizer reads only dense initializers: a dense-sparse model's fp32 file may hold sparse ones
        source = sparse_storage.densified_onnx(float_path, Path(tmp) / "dense.onnx")
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(str(pre), str(out), per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        _save_atomic(onnx.load(str(out)), path)


def _save_atomic(proto: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)


def describe(path: Path) -> dict[str, Any]:
    """Inputs with their shapes, op counts and weight counts of an ONNX file."""
    proto = onnx.load(str(path), load_external_data=False)

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer) + \
        sum(int(np.prod(t.dims)) for t in proto.graph.sparse_initializer)  # dense shape, as TFLite and CoreML count
    return {"inputs": {i.name: dims(i) for i in proto.graph.input},
            "outputs": {o.name: dims(o) for o in proto.graph.output},
            "ops": dict(Counter(n.op_type for n in proto.graph.node).most_common()),
            "weights": params, "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                                            default=None)}


def check(path: Path, model: CanonicalTransformer, inputs: tuple[torch.Tensor, ...], precision: str,
          static_batch: Optional[int] = None) -> dict[str, float]:
    """Run the file in ONNX Runtime on real inputs and compare with PyTorch; raise ExportError out of tolerance.
    A file with a fixed batch runs in chunks of that batch, the last one padded by repeating its last example."""
    from ..targets import ort as runtime

    session = runtime.load(path, threads=1)
    names = model.input_names
    if static_batch:
        got = run_in_batches(lambda feeds: runtime.run(session, feeds), names, inputs, static_batch)
    else:
        got = runtime.run(session, {n: t.numpy() for n, t in zip(names, inputs)})
    with torch.no_grad():
        want = model(*inputs).numpy()
    result = parity(want, got)
    ok = (result["max_abs_diff"] <= FP32_MAX_ABS and result["cosine"] >= FP32_MIN_COSINE) if precision == "fp32" \
        else reduced_precision_ok(result, model.classifier is not None)
    if not ok:
        raise ExportError(f"{path.name} disagrees with PyTorch in ONNX Runtime (max abs diff "
                          f"{result['max_abs_diff']:.2e}, cosine {result['cosine']:.5f}).",
                          "skip int8 for this model (`--no-int8`): its outputs do not survive int8 weights."
                          if precision == "int8" else "report this with the model's pocketformer.json.")
    return result


def export(model: CanonicalTransformer, out_dir: Path, stem: str, inputs: tuple[torch.Tensor, ...], *,
           int8: bool = True, static_shape: Optional[tuple[int, int]] = None,
           sparse: bool = True) -> list[dict[str, Any]]:
    """Export fp32 (and int8) ONNX files named `{stem}.fp32.onnx` / `{stem}.int8.onnx`; return their records.
    With `sparse`, a dense-sparse model's mostly-zero weights are stored as sparse initializers wherever that is
    smaller (export.sparse; the records say what was converted)."""
    model = model.eval()
    store_sparse = sparse and sparse_storage.has_dense_sparse(model)
    records = []
    static_batch = None
    if static_shape:
        static_batch, seq = static_shape
        check_inputs = pad_to(inputs, seq, model)
        # exactly `static_batch` examples to trace with, repeating the samples if there are fewer
        example = tuple(t[torch.arange(static_batch) % len(t)] for t in check_inputs)
    else:
        example = check_inputs = inputs
    fp32 = Path(out_dir) / f"{stem}.fp32.onnx"
    export_float(model, fp32, example, static_shape=bool(static_shape))
    storage = sparse_storage.onnx_file(fp32) if store_sparse else None
    records.append(_record(fp32, stem, "fp32", check(fp32, model, check_inputs, "fp32", static_batch), storage))
    if int8:
        q = Path(out_dir) / f"{stem}.int8.onnx"
        quantize_int8(fp32, q)
        storage = sparse_storage.onnx_file(q) if store_sparse else None
        records.append(_record(q, stem, "int8", check(q, model, check_inputs, "int8", static_batch), storage))
    return records


def _record(path: Path, stem: str, precision: str, parity_result: dict[str, float],
            storage: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    from ..models.io import file_sha256

    return {"file": path.name, "variant": stem, "format": "onnx", "precision": precision,
            "size_bytes": path.stat().st_size, "sha256": file_sha256(path), "parity_vs_pytorch": parity_result,
            **describe(path), **({"sparse_storage": storage} if storage is not None else {})}
