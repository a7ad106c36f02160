"""TFLite (LiteRT): litert-torch -> fp32 .tflite at static shapes (several graphs: one signature each, in one file);
fp16, int8 weight-only and dynamic int8 by ai-edge-quantizer applied to that float file.

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
from ..models.signature import Graph, named_forward
from ..progress import quiet, silenced_stderr
from ..store import atomic_write_bytes
from . import sparse as sparse_storage
from .base import Format, Plan, Tolerance, Written, first_line

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


def convert(plan: Plan) -> bytes:
    """The fp32 flatbuffer of every graph at the plan's static shapes, inputs named as declared. One graph is the
    file's only signature; several are one signature each, named after the graphs, with named outputs."""
    with _quiet():
        import litert_torch

        try:
            if len(plan.graphs) == 1:
                (name, graph), = plan.graphs.items()
                # Keyword sample args: the signature's inputs take our names (positional ones become args_0, ...).
                edge = litert_torch.convert(graph.module, sample_kwargs=dict(zip(graph.io.input_names,
                                                                                 plan.examples[name])))
                return bytes(edge.model_content())
            converter = litert_torch.Converter()
            for name, graph in plan.graphs.items():
                graph.module.dict_outputs = True  # LiteRT names a signature's outputs after the dict's keys
                converter.signature(name, graph.module,
                                    sample_kwargs=dict(zip(graph.io.input_names, plan.examples[name])))
            return bytes(converter.convert().model_content())
        except Exception as e:
            raise ExportError(f"litert-torch conversion failed: {first_line(e)}",
                              "report this with the checkpoint's pocketformer.json.") from None
        finally:
            for graph in plan.graphs.values():
                graph.module.dict_outputs = False


def export_float(model: CanonicalTransformer, path: Path, example: tuple[torch.Tensor, ...]) -> None:
    """One unchecked fp32 file of the plain model at the example's shapes (benchmarks and tests); `pocketformer
    export` goes through the loop, which checks every file."""
    plan = Plan({"model": Graph(named_forward(model, model.input_names), model.io)}, {"model": example},
                fixed=None, sparse=False, options={})
    atomic_write_bytes(Path(path), convert(plan))


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
            raise ExportError(f"ai-edge-quantizer failed on {float_path.name} ({precision}): {first_line(e)}",
                              FIX[precision]) from None
    atomic_write_bytes(path, bytes(result.quantized_model))


class Tflite(Format):
    name, extension, runtime, default_seq = "tflite", ".tflite", "litert", DEFAULT_SEQ
    float_precisions, int8_precisions = ("fp32", "fp16"), ("int8-weight", "int8")
    suffixes = SUFFIX
    fp32_tolerance = Tolerance(min_cosine=FP32_MIN_COSINE)
    fixes = {**FIX, "*": FIX["fp32"]}

    def shares_file(self) -> bool:
        return True

    def write(self, plan: Plan, precision: str, paths: dict[str, Path]) -> list[Written]:
        path = next(iter(paths.values()))  # one file holds every graph
        if precision == "fp32":
            content = convert(plan)
            atomic_write_bytes(path, content)
            plan.state.update(fp32=path, dense=content if plan.sparse else None)
        else:
            quantize(plan.state["fp32"], path, precision, float_content=plan.state["dense"])
        storage = sparse_storage.tflite_file(path) if plan.sparse else None
        signed = len(plan.graphs) > 1
        return [Written(name, path, name if signed else None, storage) for name in plan.graphs]

    def describe(self, path: Path) -> dict[str, Any]:
        return describe(path)

    def holds_int8(self, path: Path, description: dict[str, Any]) -> bool:
        return ".int8" in Path(path).name or "DEQUANTIZE" in description.get("ops", {})


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
    ops: Counter = Counter()
    for g in range(fb.SubgraphsLength()):  # a multi-signature file: every signature's subgraph
        sub = fb.Subgraphs(g)
        ops.update(codes[sub.Operators(j).OpcodeIndex()][0] for j in range(sub.OperatorsLength()))
    graph = fb.Subgraphs(0)
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
    counted: dict[int, int] = {}  # buffer -> elements: signatures of one file may share a buffer
    for g in range(fb.SubgraphsLength()):
        sub = fb.Subgraphs(g)
        for k in range(sub.TensorsLength()):
            t = sub.Tensors(k)
            b = fb.Buffers(t.Buffer())
            if b is not None and (b.DataLength() or b.Offset()):
                counted[t.Buffer()] = int(np.prod(t.ShapeAsNumpy())) if t.ShapeLength() else 1
    weights = sum(counted.values())
    return {"inputs": {name: tensor(i)[0] for name, i in ins}, "outputs": {name: tensor(i)[0] for name, i in outs},
            "input_dtypes": {name: tensor(i)[1] for name, i in ins}, "ops": dict(ops.most_common()),
            "op_versions": dict(sorted(versions.items())), "weights": weights}
