"""CoreML export: torch.jit.trace -> coremltools ML program (.mlpackage) at fixed shapes, in fp32 and fp16 compute,
plus int8 weights (and optionally k-means palettized weights) for the linear, conv and embedding ops only. Every
package is run against PyTorch on real inputs before it is kept: in Core ML on macOS, elsewhere in the MIL reference
execution of pocketformer.targets.coreml_ref (which checks the graph and weights, not Apple's runtime).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..errors import ExportError
from ..models.canonical import CanonicalTransformer
from ..targets import coreml_ref
from . import sparse as sparse_storage
from .common import artifact_size, named, pad_to, parity, reduced_precision_ok, run_in_batches

DEFAULT_SEQ = 128
# Weights may be compressed only where an op uses them as weights. Applied to every const, compression also hits
# constant mask/position tensors and yields NaN or garbage (METHODS.md).
WEIGHT_OPS = ("linear", "conv", "gather")
PALETTIZE_OPS = ("linear",)
WEIGHT_THRESHOLD = 2048  # tensors with fewer elements stay float (biases, norms, tiny classifiers)
FP32_MAX_ABS = 1e-3
FP32_MIN_COSINE = 0.9999
PAL_MIN_COSINE = 0.98
_FIXES = {"fp32": "report this with the model's pocketformer.json.",
          "fp16": "report this with the model's pocketformer.json (its activations may overflow fp16).",
          "int": "skip int8 for this model (`--no-int8`): its outputs do not survive int8 weights.",
          "pal": "use more palette bits (6 or 8), or no palettization."}


REFERENCE_CHECK_EXAMPLES = 4  # real test inputs checked per package off macOS


def _precision(ct, name: str):
    table = {"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}
    if name not in table:
        raise ExportError(f"CoreML compute precision {name!r} is not supported.", f"use one of {sorted(table)}.")
    return table[name]


def _target(ct, name: str):
    if not hasattr(ct.target, name):
        raise ExportError(f"CoreML deployment target {name!r} is unknown.",
                          "use one coremltools knows, e.g. iOS16, iOS17, iOS18, macOS14.")
    return getattr(ct.target, name)


def fixed_inputs(model: CanonicalTransformer, inputs: tuple[torch.Tensor, ...],
                 static_shape: Optional[tuple[int, int]]) -> tuple[tuple[int, ...], tuple[torch.Tensor, ...]]:
    """The package's batch (and sequence) and the inputs padded/truncated to that sequence length."""
    batch = static_shape[0] if static_shape else 1
    if model.spec.modality == "text":
        seq = static_shape[1] if static_shape else min(DEFAULT_SEQ, model.spec.max_positions -
                                                        model.spec.position_offset)
        return (batch, seq), pad_to(inputs, seq, model)
    return (batch,), inputs


def convert(model: CanonicalTransformer, example: tuple[torch.Tensor, ...], precision: str,
            deployment_target: str = "iOS17"):
    """An in-memory ML program of the canonical model at the example's shapes (text ids and mask as int32)."""
    return convert_module(named(model), example, model.input_names, [model.output_name], precision,
                          deployment_target)


def convert_module(module: torch.nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                   output_names: list[str], precision: str, deployment_target: str = "iOS17"):
    """An in-memory ML program of any module taking `example` positionally, at its shapes (integers as int32)."""
    ct = coreml_ref._ct()
    types = [ct.TensorType(name=n, shape=tuple(t.shape),
                           dtype=np.int32 if not t.is_floating_point() else np.float32)
             for n, t in zip(input_names, example)]
    with coreml_ref.quiet():
        try:
            traced = torch.jit.trace(module.eval(), example)
            return ct.convert(traced, inputs=types, outputs=[ct.TensorType(name=n) for n in output_names],
                              convert_to="mlprogram", compute_precision=_precision(ct, precision),
                              minimum_deployment_target=_target(ct, deployment_target), skip_model_load=True)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"coremltools could not convert the model: {str(e).splitlines()[0][:300]}",
                              "report this with the checkpoint's pocketformer.json.") from None


def _weight_config(op_config, op_types: tuple[str, ...]):
    from coremltools.optimize.coreml import OptimizationConfig

    # No global config: a const is compressed only if every op that reads it is of one of these types.
    return OptimizationConfig(global_config=None, op_type_configs={t: op_config for t in op_types})


def quantize_int8(mlmodel):
    """Per-channel symmetric int8 weights of linear/conv/gather ops; compute precision unchanged."""
    import coremltools.optimize.coreml as cto

    op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                     weight_threshold=WEIGHT_THRESHOLD)
    with coreml_ref.quiet():
        return cto.linear_quantize_weights(mlmodel, config=_weight_config(op, WEIGHT_OPS))


def palettize(mlmodel, nbits: int):
    """k-means palettized weights (2^nbits values per tensor) of linear ops only.

    scikit-learn's KMeans fits in float64 whatever the weights' dtype, so fp16 weights are clustered at full
    precision (unlike float16 percentiles under numpy 2, which return NaN).
    """
    import coremltools.optimize.coreml as cto

    op = cto.OpPalettizerConfig(mode="kmeans", nbits=nbits, granularity="per_tensor",
                                weight_threshold=WEIGHT_THRESHOLD)
    with coreml_ref.quiet():
        return cto.palettize_weights(mlmodel, config=_weight_config(op, PALETTIZE_OPS))


def save_checked(mlmodel, path: Path, check: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Build the package in a temporary folder beside `path`, check it there, then rename it into place: a package
    that fails its check never replaces a good one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with coreml_ref.quiet():
            mlmodel.save(str(staging / path.name))
        result = check(staging / path.name)
        if path.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside first
            os.replace(path, staging / "old")
        os.replace(staging / path.name, path)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def package_sha256(path: Path) -> str:
    """Hash over every file of the package (relative path and content), in path order."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def describe(path: Path) -> dict[str, Any]:
    """Inputs/outputs with shapes, op counts, how many ops compute in fp16 vs fp32, and the weights by dtype."""
    from coremltools.converters.mil.mil import types

    program = coreml_ref.load_program(path)
    fn = program.functions["main"]
    ops = list(fn.operations)
    compute = [op for op in ops if op.op_type != "const" and not op.op_type.startswith("constexpr_")]
    precision = Counter(types.builtin_to_string(op.outputs[0].dtype) for op in compute)
    weight_bytes: Counter = Counter()
    weights = 0
    for op in ops:
        if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray) and op.outputs[0].val.size > 1:
            weight_bytes[types.builtin_to_string(op.outputs[0].dtype)] += op.outputs[0].val.nbytes
            decompressed = any(c.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops)
            weights += 0 if decompressed else op.outputs[0].val.size  # counted once, as the dense tensor below
        elif op.op_type.startswith("constexpr_") and not any(c.op_type.startswith("constexpr_")
                                                             for c in op.outputs[0].child_ops):
            weights += int(np.prod(op.outputs[0].shape))
    weight_file = Path(path) / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    return {"inputs": {n: list(v.shape) for n, v in fn.inputs.items()},
            "input_dtypes": {n: types.builtin_to_string(v.dtype) for n, v in fn.inputs.items()},
            "outputs": {o.name: list(o.shape) for o in fn.outputs},
            "ops": dict(Counter(op.op_type for op in ops if op.op_type != "const").most_common()),
            "op_precision": {k: precision[k] for k in sorted(precision)},
            "weights": weights,
            "weight_bytes_by_dtype": {k: weight_bytes[k] for k in sorted(weight_bytes)},
            "weight_file_bytes": weight_file.stat().st_size if weight_file.is_file() else 0,
            "opset": fn.opset_version.name if fn.opset_version is not None else None}


def check(path: Path, model: CanonicalTransformer, inputs: tuple[torch.Tensor, ...], precision: str,
          batch: int) -> dict[str, Any]:
    """Run the package on real inputs (Core ML on macOS, else the MIL reference) against PyTorch; raise
    ExportError out of tolerance."""
    session = coreml_ref.load(path, threads=1)
    names = model.input_names
    got = run_in_batches(lambda feeds: coreml_ref.run(session, feeds), names, inputs, batch).astype(np.float32)
    with torch.no_grad():
        want = model(*inputs).numpy()
    result: dict[str, Any] = parity(want, got)
    finite = bool(np.isfinite(got).all())
    if precision == "fp32":
        ok = result["max_abs_diff"] <= FP32_MAX_ABS and result["cosine"] >= FP32_MIN_COSINE
    else:
        ok = reduced_precision_ok(result, model.classifier is not None) if precision in ("fp16", "int8") else \
            result["cosine"] >= PAL_MIN_COSINE
    if not (ok and finite):
        raise ExportError(f"{path.name} disagrees with PyTorch in the {coreml_ref.execution()} (max abs diff "
                          f"{result['max_abs_diff']:.2e}, cosine {result['cosine']:.5f}"
                          f"{'' if finite else ', non-finite outputs'}).",
                          _FIXES.get(precision[:3], _FIXES["fp32"]))
    result["execution"] = coreml_ref.execution()
    return result


def export(model: CanonicalTransformer, out_dir: Path, stem: str, inputs: tuple[torch.Tensor, ...], *,
           int8: bool = True, static_shape: Optional[tuple[int, int]] = None, compute_precision: str = "fp16",
           deployment_target: str = "iOS17", palettize_bits: Optional[int] = None,
           sparse: bool = True) -> list[dict[str, Any]]:
    """Write `{stem}.fp32.mlpackage` and `{stem}.fp16.mlpackage` (and `{stem}.int8.mlpackage`, int8 weights, and
    with `palettize_bits` `{stem}.pal{n}.mlpackage`, both computing in `compute_precision`); return their records.

    Shapes are fixed: `static_shape` (batch, seq), else batch 1 and 128 tokens (fewer if the model has fewer
    positions) for text, batch 1 for vision. With `sparse`, a dense-sparse model's mostly-zero linear weights are
    stored sparse in the fp32, fp16 and (iOS18+ targets) int8 packages (export.sparse; the records say what was
    converted); int8 and palettes are always made from the dense packages.
    """
    if compute_precision not in ("fp32", "fp16"):
        raise ExportError(f"CoreML compute precision {compute_precision!r} is not supported.", "use fp16 or fp32.")
    model = model.eval()
    shape, check_inputs = fixed_inputs(model, inputs, static_shape)
    if not coreml_ref.on_macos():  # the reference interpreter takes seconds per example
        check_inputs = tuple(t[:REFERENCE_CHECK_EXAMPLES] for t in check_inputs)
    batch = shape[0]
    example = tuple(t[:batch] if len(t) >= batch else torch.cat([t] + [t[-1:]] * (batch - len(t)))
                    for t in check_inputs)
    options = {"deployment_target": deployment_target, "shape": list(shape)}
    built = {}

    def build(precision: str):
        if precision in ("fp32", "fp16"):
            return convert(model, example, precision, deployment_target), {"compute_precision": precision}
        info = {"compute_precision": compute_precision}
        if precision == "int8":
            return quantize_int8(built[compute_precision]), {
                **info, "weights": "int8 per-channel symmetric", "compressed_ops": list(WEIGHT_OPS)}
        return palettize(built[compute_precision], palettize_bits), {
            **info, "weights": f"{palettize_bits}-bit k-means palette per tensor",
            "compressed_ops": list(PALETTIZE_OPS)}

    records = []
    precisions = ["fp32", "fp16"] + (["int8"] if int8 else []) + ([f"pal{palettize_bits}"] if palettize_bits else [])
    store_sparse = sparse and sparse_storage.has_dense_sparse(model)
    for precision in precisions:
        t0 = time.perf_counter()
        built[precision], info = build(precision)
        package, storage = built[precision], None
        if store_sparse and precision in ("fp32", "fp16", "int8"):
            package, storage = sparse_storage.coreml_sparse_weights(package, quantized=precision == "int8")
        info["build_seconds"] = round(time.perf_counter() - t0, 2)
        path = Path(out_dir) / f"{stem}.{precision}.mlpackage"
        result = save_checked(package, path, partial(check, model=model, inputs=check_inputs,
                                                     precision=precision, batch=batch))
        records.append(_record(path, stem, precision, result, {**options, **info}, storage))
    return records


def _record(path: Path, stem: str, precision: str, parity_result: dict[str, Any],
            options: dict[str, Any], storage: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    return {"file": path.name, "variant": stem, "format": "coreml", "precision": precision,
            "size_bytes": artifact_size(path), "sha256": package_sha256(path), "parity_vs_pytorch": parity_result,
            "parity_execution": coreml_ref.execution(), "coreml": options, **describe(path),
            **({"sparse_storage": storage} if storage is not None else {})}
