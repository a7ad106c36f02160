"""TFLite (LiteRT) export: litert-torch -> fp32 .tflite at a static shape; fp16, int8 weight-only and dynamic int8
by ai-edge-quantizer applied to that float file. Each file is run in LiteRT against PyTorch on real inputs before it
is kept.

Not offered, on purpose (METHODS.md): litert-torch's own dynamic int8 (its EMBEDDING_LOOKUP fails at run time) and
static int8/int16 recipes (transformer outputs lose their direction: cosine 0.14).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import ExportError
from ..models.canonical import CanonicalTransformer
from ..progress import quiet
from . import sparse as sparse_storage
from ..store import atomic_write_bytes
from .common import named, pad_to, parity, reduced_precision_ok

DEFAULT_SEQ = 128
FP32_MIN_COSINE = 0.999
# precision -> file suffix. fp16 is litert-torch's full_fp16_recipe (float-cast weights, explicit dequantize), which
# litert-torch itself applies with ai-edge-quantizer after converting: applying it to our float file is the same
# (identical bytes) without converting twice.
SUFFIX = {"fp32": "fp32", "fp16": "fp16", "int8-weight": "int8w", "int8": "int8"}
FIX = {
    "fp32": "report this with the model's pocketformer.json.",
    "fp16": "use the fp32 .tflite file: this model's outputs do not survive fp16 weights.",
    "int8-weight": "skip int8 (`--no-int8`): this model's outputs do not survive int8 weights.",
    "int8": "skip int8 (`--no-int8`) or use the int8-weight file: dynamic int8 activations lose this model's outputs.",
}


@contextlib.contextmanager
def _quiet():
    """litert-torch, the MLIR converter, TF and the quantizer print pages of progress and warnings (some from
    native code, past sys.stderr); users want one line per artifact."""
    from ..targets.litert import silenced_stderr

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GLOG_minloglevel", "3")
    previous = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "0"  # litert_torch.config.show_progress reads this
    root = logging.getLogger()
    # litert-torch warns through the root logger; a handler stops logging.warning() from calling basicConfig.
    guard = logging.NullHandler()
    root.addHandler(guard)
    try:
        with quiet("", "torch.export", "torch._dynamo", "torch.fx", "litert_torch", "ai_edge_quantizer", "absl",
                   "jax"), silenced_stderr():
            yield
    finally:
        root.removeHandler(guard)
        if previous is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = previous


def export_float(model: CanonicalTransformer, path: Path, example: tuple[torch.Tensor, ...]) -> None:
    """Write an fp32 .tflite at the example's (static) shapes, inputs named as the model names them."""
    with _quiet():
        import litert_torch

        try:
            # Keyword sample args: the signature's inputs take our names (positional ones become args_0, args_1).
            edge = litert_torch.convert(named(model), sample_kwargs=dict(zip(model.input_names, example)))
            content = edge.model_content()
        except Exception as e:
            raise ExportError(f"litert-torch conversion failed: {_first_line(e)}",
                              "report this with the checkpoint's pocketformer.json.") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, bytes(content))


def recipe(precision: str):
    """The ai-edge-quantizer recipe for a quantized precision. Only weights are stored quantized."""
    from ai_edge_quantizer import algorithm_manager, qtyping, recipe_manager
    from ai_edge_quantizer import recipe as recipes

    if precision == "fp16":
        rm = recipe_manager.RecipeManager()
        rm.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                  granularity=qtyping.QuantGranularity.TENSORWISE,
                                  algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING)
        return rm.get_quantization_recipe()
    if precision == "int8-weight":  # int8 per-channel weights, dequantized to float before each op
        return recipes.weight_only_wi8_afp32()
    if precision == "int8":  # int8 per-channel weights, activations quantized on the fly by the kernels
        return recipes.dynamic_wi8_afp32()
    raise ValueError(precision)


def quantize(float_path: Path, path: Path, precision: str, float_content: Optional[bytes] = None) -> None:
    """`float_content`: the float model's dense bytes, when the file at `float_path` stores sparse weights (DENSIFY
    ops), which the quantizer does not read."""
    from ai_edge_quantizer import quantizer

    with _quiet():
        try:
            source = bytearray(float_content) if float_content is not None else str(float_path)
            result = quantizer.Quantizer(source, recipe(precision)).quantize(
                enable_progress_bar=False, enable_progress_report=False)
        except Exception as e:
            raise ExportError(f"ai-edge-quantizer failed on {float_path.name} ({precision}): {_first_line(e)}",
                              FIX[precision]) from None
    atomic_write_bytes(path, bytes(result.quantized_model))


def check(path: Path, model: CanonicalTransformer, inputs: tuple[torch.Tensor, ...],
          precision: str) -> dict[str, float]:
    """Run the file in LiteRT (one static-shape batch at a time) on real inputs and compare with PyTorch; raise
    ExportError, and delete the file, when the cosine is below tolerance."""
    from ..errors import TargetError
    from ..targets import litert as runtime

    try:
        session = runtime.load(path, threads=1)
    except TargetError as e:
        path.unlink(missing_ok=True)
        raise ExportError(e.problem, FIX[precision]) from None
    got = runtime.run(session, {n: t.numpy() for n, t in zip(model.input_names, inputs)})
    with torch.no_grad():
        want = model(*inputs).numpy()
    result = parity(want, got)
    # A 2-logit classifier with logits near zero makes cosine noisy: record the error relative to the output scale.
    scale = float(np.abs(want).max())
    result.update({"reference_max_abs": scale, "relative_max_abs_diff": result["max_abs_diff"] / (scale + 1e-12)})
    ok = result["cosine"] >= FP32_MIN_COSINE if precision == "fp32" else \
        reduced_precision_ok(result, model.classifier is not None)
    if not ok:
        near_zero = " (PyTorch's outputs are near zero, which makes cosine noisy)" if scale < 1e-2 else ""
        path.unlink(missing_ok=True)  # a file that fails its check is never left where a manifest could find it
        raise ExportError(f"{path.name} disagrees with PyTorch in LiteRT: cosine {result['cosine']:.5f}, label "
                          f"agreement {result['argmax_agreement']:.2f}, max abs diff {result['max_abs_diff']:.2e}"
                          f"{near_zero}.", FIX[precision])
    return result


def export(model: CanonicalTransformer, out_dir: Path, stem: str, inputs: tuple[torch.Tensor, ...], *,
           int8: bool = True, static_shape: Optional[tuple[int, int]] = None,
           sparse: bool = True) -> list[dict[str, Any]]:
    """Export `{stem}.fp32.tflite`, `{stem}.fp16.tflite` and, with int8, `{stem}.int8w.tflite` (int8 weights) and
    `{stem}.int8.tflite` (dynamic int8); return their records. Shapes are static: `static_shape` (batch, seq), by
    default batch 1 and 128 tokens (text inputs are padded or truncated to it). With `sparse`, a dense-sparse model's
    mostly-zero weights are stored sparse (+ DENSIFY) wherever that is smaller (export.sparse; the records say what
    was converted)."""
    model = model.eval()
    batch, seq = static_shape or (1, DEFAULT_SEQ)
    check_inputs = pad_to(inputs, seq, model)
    rows = torch.arange(batch) % len(check_inputs[0])  # fewer examples than the batch: repeat them
    example = tuple(t[rows] for t in check_inputs)
    out_dir = Path(out_dir)
    fp32 = out_dir / f"{stem}.fp32.tflite"
    export_float(model, fp32, example)
    store_sparse = sparse and sparse_storage.has_dense_sparse(model)
    dense = fp32.read_bytes() if store_sparse else None
    storage = sparse_storage.tflite_file(fp32) if store_sparse else None
    records = [_record(fp32, stem, "fp32", check(fp32, model, check_inputs, "fp32"), storage)]
    for precision in ("fp16",) + (("int8-weight", "int8") if int8 else ()):
        path = out_dir / f"{stem}.{SUFFIX[precision]}.tflite"
        quantize(fp32, path, precision, float_content=dense)
        storage = sparse_storage.tflite_file(path) if store_sparse else None
        records.append(_record(path, stem, precision, check(path, model, check_inputs, precision), storage))
    return records


def describe(path: Path) -> dict[str, Any]:
    """Inputs and outputs (signature names, shapes, dtypes), op counts, op versions and weight count of a .tflite."""
    from ai_edge_litert import schema_py_generated as schema

    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    buf = Path(path).read_bytes()
    fb = schema.Model.GetRootAs(buf, 0)
    codes = []
    for i in range(fb.OperatorCodesLength()):
        c = fb.OperatorCodes(i)
        code = max(c.BuiltinCode(), c.DeprecatedBuiltinCode())  # small codes live in the deprecated field
        name = f"CUSTOM:{c.CustomCode().decode()}" if code == schema.BuiltinOperator.CUSTOM else \
            op_names.get(code, str(code))
        codes.append((name, c.Version()))
    graph = fb.Subgraphs(0)
    ops = Counter(codes[graph.Operators(j).OpcodeIndex()][0] for j in range(graph.OperatorsLength()))
    versions: dict[str, int] = {}
    for name, version in codes:
        versions[name] = max(version, versions.get(name, 0))

    def tensor(index: int) -> tuple[list[int], str]:
        t = graph.Tensors(index)
        return t.ShapeAsNumpy().tolist() if t.ShapeLength() else [], type_names.get(t.Type(), str(t.Type()))

    if fb.SignatureDefsLength():  # signature names are the ones users feed (input_ids, not serving_default_...)
        sig = fb.SignatureDefs(0)
        ins = sorted(((sig.Inputs(k).Name().decode(), sig.Inputs(k).TensorIndex()) for k in range(sig.InputsLength())),
                     key=lambda item: item[1])
        outs = sorted(((sig.Outputs(k).Name().decode(), sig.Outputs(k).TensorIndex())
                       for k in range(sig.OutputsLength())), key=lambda item: item[1])
    else:
        ins = [(graph.Tensors(i).Name().decode(), int(i)) for i in graph.InputsAsNumpy()]
        outs = [(graph.Tensors(i).Name().decode(), int(i)) for i in graph.OutputsAsNumpy()]
    weights = 0
    for k in range(graph.TensorsLength()):
        t = graph.Tensors(k)
        b = fb.Buffers(t.Buffer())
        if b is not None and (b.DataLength() or b.Offset()):
            weights += int(np.prod(t.ShapeAsNumpy())) if t.ShapeLength() else 1
    return {"inputs": {name: tensor(i)[0] for name, i in ins}, "outputs": {name: tensor(i)[0] for name, i in outs},
            "input_dtypes": {name: tensor(i)[1] for name, i in ins}, "ops": dict(ops.most_common()),
            "op_versions": dict(sorted(versions.items())), "weights": weights}


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _record(path: Path, stem: str, precision: str, parity_result: dict[str, float],
            storage: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    from ..models.io import file_sha256

    return {"file": path.name, "variant": stem, "format": "tflite", "precision": precision,
            "size_bytes": path.stat().st_size, "sha256": file_sha256(path), "parity_vs_pytorch": parity_result,
            **describe(path), **({"sparse_storage": storage} if storage is not None else {})}
