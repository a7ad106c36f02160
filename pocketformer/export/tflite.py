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
from . import tflite_metadata
from .base import Format, Plan, Tolerance, Written, first_line
from .card import Card
from .tflite_metadata import Annotation, TensorMeta, inline_buffers

FP32_MIN_COSINE = 0.999
# precision -> file suffix. fp16 is litert-torch's full_fp16_recipe (float-cast weights, explicit dequantize), which
# litert-torch itself applies with ai-edge-quantizer after converting: applying it to our float file is the same
# (identical bytes) without converting twice.
SUFFIX = {"fp32": "fp32", "fp16": "fp16", "int8-weight": "int8w", "int8": "int8", "int4": "int4"}
FIX = {
    "fp32": "report this with the model's pocketformer.json.",
    "fp16": "use the fp32 .tflite file: this model's outputs do not survive fp16 weights.",
    "int8-weight": "skip int8 (`--no-int8`): this model's outputs do not survive int8 weights.",
    "int8": "skip int8 (`--no-int8`) or use the int8-weight file: dynamic int8 activations lose this model's outputs.",
    "int4": "leave out int4: this model's outputs do not survive 4-bit weights.",
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
    cached = [g.module.model for g in plan.graphs.values() if hasattr(g.module.model, "slice_update")]
    try:
        for module in cached:
            module.slice_update = dynamic_update_slice
        if len(plan.graphs) == 1:
            (name, graph), = plan.graphs.items()
            return convert_module(graph.module, dict(zip(graph.io.input_names, plan.examples[name])))
        for graph in plan.graphs.values():
            graph.module.dict_outputs = True  # LiteRT names a signature's outputs after the dict's keys
        return convert_module(None, {}, signatures={
            name: (graph.module, dict(zip(graph.io.input_names, plan.examples[name])))
            for name, graph in plan.graphs.items()})
    finally:
        for graph in plan.graphs.values():
            graph.module.dict_outputs = False
        for module in cached:
            del module.slice_update  # back to the class's own write


def dynamic_update_slice(cache: torch.Tensor, new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """A fixed-cache decoder's cache write (models/causal.py) as TFLite's DYNAMIC_UPDATE_SLICE, through litert-torch's
    own op (its generative models write their caches so); torch's index_copy would convert to a STABLEHLO_SCATTER
    over the whole cache."""
    from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice as dus

    zero = torch.zeros([], dtype=torch.int32)
    return dus(cache, new, [zero, zero, start.to(torch.int32).reshape([]), zero])


def convert_module(module: Optional[torch.nn.Module], sample_kwargs: dict[str, torch.Tensor],
                   signatures: Optional[dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor]]]] = None) -> bytes:
    """The fp32 flatbuffer of `module` at the samples' shapes, its inputs named after the samples' keywords (positional
    ones would become args_0, ...); or of several `signatures` (name -> module, samples), one signature each."""
    with _quiet():
        import litert_torch

        try:
            if signatures is None:
                return bytes(litert_torch.convert(module, sample_kwargs=sample_kwargs).model_content())
            converter = litert_torch.Converter()
            for name, (m, kwargs) in signatures.items():
                converter.signature(name, m, sample_kwargs=kwargs)
            return bytes(converter.convert().model_content())
        except Exception as e:
            raise ExportError(f"litert-torch conversion failed: {first_line(e)}",
                              "report this with the checkpoint's pocketformer.json.") from None


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
    if precision == "int4":  # int4 per-channel weights, XNNPACK's dynamic-range kernels (blockwise int4 weights do
        return recipes.dynamic_wi4_afp32()  # not load in LiteRT 2.3's XNNPACK: "unsupported scale value")
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


# -- sparse storage (export/sparse.py) ---------------------------------------------------------------------------------------------------------

TFLITE_WEIGHT_CONSUMERS = ("FULLY_CONNECTED", "BATCH_MATMUL")  # DEQUANTIZE in between for fp16/int8 weights
_TFLITE_DTYPES = {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT8": np.int8}
TFLITE_ENCODING = "TFLite SparsityParameters (a dense dimension, a CSR dimension) + DENSIFY"


def _index_vector(values: np.ndarray):
    """The smallest SparseIndexVector type holding `values` (uint8, uint16 or int32), as (type, table, bytes)."""
    from ai_edge_litert import schema_py_generated as schema

    top = int(values.max(initial=0))
    for limit, dtype, kind, table in ((255, np.uint8, schema.SparseIndexVector.Uint8Vector, schema.Uint8VectorT),
                                      (65535, np.uint16, schema.SparseIndexVector.Uint16Vector, schema.Uint16VectorT),
                                      (2 ** 31 - 1, np.int32, schema.SparseIndexVector.Int32Vector,
                                       schema.Int32VectorT)):
        if top <= limit:
            vector = table()
            vector.values = values.astype(dtype)
            return kind, vector, values.size * np.dtype(dtype).itemsize
    raise ValueError(f"index {top} does not fit a TFLite sparse index vector")


def csr_sparsity(array: np.ndarray, order: tuple[int, int] = (0, 1)):
    """(SparsityParametersT, non-zero values in traversal order, encoded bytes) for a 2-D array: dimension
    `order[0]` dense, dimension `order[1]` CSR, as TFLite's DENSIFY and its format converter read them. (1, 0)
    walks columns first: a dense-sparse S stored as (rank, in) then needs indices below the rank, often one byte."""
    from ai_edge_litert import schema_py_generated as schema

    traversed = array.transpose(order)
    rows = traversed.shape[0]
    kept = traversed != 0
    segments = np.concatenate([[0], np.cumsum(kept.sum(axis=1))])
    columns = np.nonzero(kept)[1]
    seg_type, seg_vector, seg_bytes = _index_vector(segments)
    idx_type, idx_vector, idx_bytes = _index_vector(columns)
    dense_dim = schema.DimensionMetadataT()
    dense_dim.format, dense_dim.denseSize = schema.DimensionType.DENSE, rows
    csr_dim = schema.DimensionMetadataT()
    csr_dim.format = schema.DimensionType.SPARSE_CSR
    csr_dim.arraySegmentsType, csr_dim.arraySegments = seg_type, seg_vector
    csr_dim.arrayIndicesType, csr_dim.arrayIndices = idx_type, idx_vector
    params = schema.SparsityParametersT()
    params.traversalOrder, params.blockMap, params.dimMetadata = list(order), [], [dense_dim, csr_dim]
    values = traversed[kept]
    return params, values, values.nbytes + seg_bytes + idx_bytes


def tflite_sparse_weights(content: bytes) -> tuple[bytes, dict[str, Any]]:
    """A .tflite whose constant 2-D weights read by FULLY_CONNECTED / BATCH_MATMUL (directly or through a
    DEQUANTIZE) are stored CSR-sparse wherever that is smaller, each densified by a DENSIFY op placed first in the
    graph; returns (new content, what was converted)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    if not inline_buffers(model, content):
        return content, {**sparse_storage.summary(TFLITE_ENCODING, [], 0, ""),
                         "why_dense": "weights near 2 GB: a re-packed flatbuffer could not hold them"}
    editor = _TfliteEditor(model, schema)
    for graph in model.subgraphs:
        densify_ops = [op for index, dequantized in sorted(editor.weights(graph).items())
                       if (op := editor.store_sparse(graph, index, dequantized)) is not None]
        graph.operators = densify_ops + list(graph.operators)  # DENSIFY reads only constants: it can run first
    result = sparse_storage.summary(TFLITE_ENCODING, editor.converted, editor.left_dense,
                      "not smaller at its density, or int8 weights of a dynamic-range kernel, which XNNPACK "
                      "cannot prepare from a DENSIFY output")
    if not editor.converted:
        return content, result
    builder = flatbuffers.Builder(len(content))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), result


class _TfliteEditor:
    """The steps of tflite_sparse_weights over one unpacked model: find the weights, encode one, swap it in."""

    def __init__(self, model, schema):
        self.model, self.schema = model, schema
        self.op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        self.type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        self.buffer_users: dict[int, int] = {}
        for graph in model.subgraphs:
            for tensor in graph.tensors:
                self.buffer_users[tensor.buffer] = self.buffer_users.get(tensor.buffer, 0) + 1
        self.converted: list[tuple[int, int]] = []
        self.left_dense = 0
        self.densify_code = None

    def op_name(self, op) -> str:
        code = self.model.operatorCodes[op.opcodeIndex]
        return self.op_names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "")

    def weights(self, graph) -> dict[int, bool]:
        """Tensor index -> read only through a DEQUANTIZE, for every input of a weight-consuming op."""
        readers: dict[int, list] = {}
        for op in graph.operators:
            for i in op.inputs if op.inputs is not None else []:
                readers.setdefault(int(i), []).append(op)
        weights: dict[int, bool] = {}
        for op in graph.operators:
            name = self.op_name(op)
            if name in TFLITE_WEIGHT_CONSUMERS:
                weights.update({int(i): False for i in op.inputs if i >= 0})
            elif name == "DEQUANTIZE" and all(self.op_name(r) in TFLITE_WEIGHT_CONSUMERS
                                              for r in readers.get(int(op.outputs[0]), [])):
                for i in op.inputs:
                    weights.setdefault(int(i), True)
        return weights

    def dense_array(self, tensor) -> Optional[np.ndarray]:
        """A constant 2-D weight big enough to store sparse, as an array; else None."""
        data = self.model.buffers[tensor.buffer].data if tensor.buffer else None
        dtype = _TFLITE_DTYPES.get(self.type_names.get(tensor.type, ""))
        if data is None or dtype is None or tensor.sparsity is not None or tensor.shape is None or \
                len(tensor.shape) != 2 or int(np.prod(tensor.shape)) < sparse_storage.MIN_ELEMENTS:
            return None
        return np.frombuffer(np.asarray(data, np.uint8).tobytes(), dtype).reshape(tuple(tensor.shape))

    def store_sparse(self, graph, index: int, dequantized: bool):
        """Store tensor `index` CSR-sparse where that is smaller; return the DENSIFY op that rebuilds it, or None."""
        import copy

        tensor = graph.tensors[index]
        array = self.dense_array(tensor)
        if array is None:
            return None
        sparsity, values, sparse_bytes = min((csr_sparsity(array, order) for order in ((0, 1), (1, 0))),
                                             key=lambda encoded: encoded[2])
        # int8 weights read directly are dynamic-range kernels' operands: XNNPACK fails to prepare such a
        # FULLY_CONNECTED when its weights come from DENSIFY (LiteRT 2.3), so they stay dense.
        if sparse_bytes >= array.nbytes or (array.dtype == np.int8 and not dequantized):
            self.left_dense += bool(np.count_nonzero(array) <= (1 - sparse_storage.ZERO_HEAVY) * array.size)
            return None
        model, schema = self.model, self.schema
        payload = np.frombuffer(values.tobytes(), np.uint8)
        if self.buffer_users[tensor.buffer] == 1:  # the dense bytes go: the sparse tensor takes over the buffer
            model.buffers[tensor.buffer].data = payload
            sparse_buffer = tensor.buffer
        else:
            model.buffers.append(schema.BufferT())
            model.buffers[-1].data = payload
            sparse_buffer = len(model.buffers) - 1
        sparse_tensor = schema.TensorT()
        sparse_tensor.shape, sparse_tensor.type, sparse_tensor.buffer = list(tensor.shape), tensor.type, sparse_buffer
        sparse_tensor.name = (tensor.name or b"") + b"_sparse"
        sparse_tensor.quantization = copy.deepcopy(tensor.quantization)
        sparse_tensor.sparsity = sparsity
        graph.tensors.append(sparse_tensor)
        tensor.buffer = _empty_buffer(model, schema)  # now computed by DENSIFY at load
        if self.densify_code is None:
            self.densify_code = _operator_code(model, schema, schema.BuiltinOperator.DENSIFY)
        densify = schema.OperatorT()
        densify.opcodeIndex, densify.inputs, densify.outputs = self.densify_code, [len(graph.tensors) - 1], [index]
        densify.builtinOptionsType = schema.BuiltinOptions.DensifyOptions
        densify.builtinOptions = schema.DensifyOptionsT()
        self.converted.append((array.nbytes, sparse_bytes))
        return densify


def _empty_buffer(model, schema) -> int:
    """Index of an empty buffer (TFLite keeps buffer 0 empty for non-constant tensors)."""
    if model.buffers and model.buffers[0].data is None and not model.buffers[0].size:
        return 0
    model.buffers.append(schema.BufferT())
    return len(model.buffers) - 1


def _operator_code(model, schema, builtin: int) -> int:
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def tflite_file(path: Path) -> dict[str, Any]:
    """Rewrite a .tflite file with sparse weights where they are smaller; returns what was converted."""
    content, result = tflite_sparse_weights(Path(path).read_bytes())
    if result["tensors"]:
        atomic_write_bytes(Path(path), content)
    return result


class Tflite(Format):
    name, extension, runtime = "tflite", ".tflite", "litert"
    float_precisions, int8_precisions = ("fp32", "fp16"), ("int8-weight", "int8")
    option_names = ("int4",)  # also an int4-weight file (dynamic-range kernels), made from the fp32 one
    suffixes = SUFFIX
    fp32_tolerance = Tolerance(min_cosine=FP32_MIN_COSINE)
    fixes = {**FIX, "*": FIX["fp32"]}

    def shares_file(self) -> bool:
        return True

    def precisions(self, int8: bool, options: dict[str, Any]) -> list[str]:
        return super().precisions(int8, options) + (["int4"] if options.get("int4") else [])

    def write(self, plan: Plan, precision: str, paths: dict[str, Path]) -> list[Written]:
        path = next(iter(paths.values()))  # one file holds every graph
        if precision == "fp32":
            content = convert(plan)
            atomic_write_bytes(path, content)
            # The quantized precisions are made from these bytes: dense (the quantizer reads no DENSIFY) and without
            # the card (annotate re-packs the file and appends an archive the quantizer would drop).
            plan.state.update(fp32=path, float=content)
        else:
            quantize(plan.state["fp32"], path, precision, float_content=plan.state["float"])
        storage = tflite_file(path) if plan.sparse else None
        signed = len(plan.graphs) > 1
        return [Written(name, path, name if signed else None, storage) for name in plan.graphs]

    def describe(self, path: Path) -> dict[str, Any]:
        return describe(path)

    def holds_int8(self, path: Path, description: dict[str, Any]) -> bool:
        return ".int8" in Path(path).name or ".int4" in Path(path).name or "DEQUANTIZE" in description.get("ops", {})

    def annotate(self, path: Path, card: Card, precision: str) -> None:
        """TFLite Model Metadata: name, description, each input's and the output's meaning, labels.txt on a
        classifier's output, vocab.txt in a BertTokenizer unit, the card as pocketformer.json. Files past 2 GB
        (which a re-packed flatbuffer cannot hold) stay as they are."""
        content = Path(path).read_bytes()
        annotated = tflite_metadata.annotate(content, card, plain_annotation(content, card))
        if annotated is not None:
            atomic_write_bytes(Path(path), annotated)

    def read_card(self, path: Path) -> Optional[dict[str, Any]]:
        return tflite_metadata.read_card(Path(path).read_bytes())


def plain_annotation(content: bytes, card: Card) -> Annotation:
    """The metadata of one of our files: its first graph's inputs and outputs in the file's order, under the names
    users feed (signature keys) and with the card's meanings; the labels on the output when it is the card's."""
    from ai_edge_litert import schema_py_generated as schema

    fb = schema.Model.GetRootAs(content, 0)
    graph = fb.Subgraphs(0)
    keys: dict[int, str] = {}
    if fb.SignatureDefsLength():
        sig = fb.SignatureDefs(0)
        keys = {sig.Inputs(k).TensorIndex(): sig.Inputs(k).Name().decode() for k in range(sig.InputsLength())}
        keys |= {sig.Outputs(k).TensorIndex(): sig.Outputs(k).Name().decode() for k in range(sig.OutputsLength())}

    def name(index: int) -> str:
        return keys.get(index) or graph.Tensors(index).Name().decode().split(":")[0]

    meanings = {t["name"]: t["meaning"] for t in card.inputs}
    inputs = [TensorMeta(n, meanings.get(n, "")) for n in map(name, graph.InputsAsNumpy().tolist())]
    single = fb.SubgraphsLength() == 1
    outputs = [TensorMeta(n, card.output.get("meaning", "") if single else "",
                          labels=single and bool(card.labels) and i == graph.OutputsLength() - 1)
               for i, n in enumerate(map(name, graph.OutputsAsNumpy().tolist()))]
    return Annotation(inputs, outputs, bert_tokenizer=card.tokenizer is not None and card.tokenizer.wordpiece)


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
