"""Sparse weight storage for the exporters: a dense-sparse model's S matrices hold mostly exact zeros, which a dense
file stores at full price. Each format has its own sparse encoding; a tensor is converted only when that encoding is
smaller than its dense bytes, and each function returns what it did, for the artifact record:
  {"encoding", "tensors": converted, "dense_bytes" / "sparse_bytes": of the converted tensors,
   "left_dense": zero-heavy tensors (>= half zeros) that stayed dense, with "why_dense" when there are any}.

- ONNX: graph.sparse_initializer in COO form (values + int64 linearized indices, as the spec requires: 8 bytes of
  index per kept value, so fp32 pays below 1/3 density and int8 only below 1/9). ONNX Runtime densifies them when it
  loads the file. onnx.checker passes; its full_check does not (ONNX shape inference types a sparse initializer as a
  sparse tensor, which MatMul's inference rejects).
- TFLite: the tensor's SparsityParameters (one dimension dense, the other CSR with uint8/uint16/int32 indices, in
  whichever traversal order is smaller) and a DENSIFY op producing the dense tensor its FULLY_CONNECTED /
  BATCH_MATMUL (or DEQUANTIZE, for fp16 and int8 weight-only files) reads, as TensorFlow's converter writes sparse
  weights. Int8 weights that a dynamic-range kernel reads directly stay dense: XNNPACK cannot prepare that
  FULLY_CONNECTED from a DENSIFY output. Files are re-packed with every buffer inside the flatbuffer (under 2 GB).
- CoreML: constexpr_sparse_to_dense (non-zero values + a one-bit mask) through coremltools.optimize's threshold
  pruner, restricted by name to linear weights; int8 weights only on iOS18+ programs (joint compression).
Sparse storage changes the file, never the arithmetic: every runtime rebuilds the same dense matrix (once, when it
prepares the graph) before a dense matmul, so expect the dense model's latency, not a faster one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch import nn

from ..progress import quiet
from ..store import atomic_write_bytes

MIN_ELEMENTS = 1024  # smaller tensors stay dense: a few bytes saved are not worth a format feature
ZERO_HEAVY = 0.5  # tensors with at least this fraction of zeros are reported when they stay dense


def has_dense_sparse(model: nn.Module) -> bool:
    """Whether the model holds dense-sparse linears, whose S the exporters can store sparse."""
    from ..models.factorized import DenseSparseLinear

    return any(isinstance(m, DenseSparseLinear) for m in model.modules())


def _summary(encoding: str, converted: list[tuple[int, int]], left_dense: int, why_dense: str) -> dict[str, Any]:
    result = {"encoding": encoding, "tensors": len(converted), "dense_bytes": sum(d for d, _ in converted),
              "sparse_bytes": sum(s for _, s in converted), "left_dense": int(left_dense)}
    return {**result, "why_dense": why_dense} if left_dense else result


# -- ONNX -----------------------------------------------------------------------------------------------------------

ONNX_INDEX_BYTES = 8  # the spec's COO indices are int64


def onnx_sparse_initializers(proto) -> dict[str, Any]:
    """Move every initializer whose COO encoding is smaller than its dense bytes into graph.sparse_initializer
    (in place). Initializers that double as graph inputs stay: a caller may override those."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    overridable = {i.name for i in graph.input}
    keep, converted, left_dense = [], [], 0
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        nnz = int(np.count_nonzero(array))
        dense_bytes = array.nbytes
        sparse_bytes = nnz * (array.itemsize + ONNX_INDEX_BYTES)
        if array.size < MIN_ELEMENTS or init.name in overridable or sparse_bytes >= dense_bytes:
            left_dense += bool(array.size >= MIN_ELEMENTS and nnz <= (1 - ZERO_HEAVY) * array.size)
            keep.append(init)
            continue
        flat = array.reshape(-1)
        where = np.flatnonzero(flat)  # ascending, as the spec requires
        values = numpy_helper.from_array(flat[where], init.name)
        indices = numpy_helper.from_array(where.astype(np.int64))  # unnamed: the values carry the name
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
        converted.append((dense_bytes, sparse_bytes))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return _summary("ONNX sparse_initializer (COO, int64 linearized indices)", converted, left_dense,
                    "values + 8-byte indices would not be smaller than the dense tensor at its density")


def onnx_file(path: Path) -> dict[str, Any]:
    """Rewrite an ONNX file with sparse initializers where they are smaller; returns what was converted."""
    import onnx

    proto = onnx.load(str(path))
    result = onnx_sparse_initializers(proto)
    if result["tensors"]:
        atomic_write_bytes(Path(path), proto.SerializeToString())
    return result


def densified_onnx(path: Path, out: Path) -> Path:
    """A copy of an ONNX file with its sparse initializers dense again (`path` itself when it has none): tools such
    as ORT's quantizer read only graph.initializer."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    if not len(graph.sparse_initializer):
        return Path(path)
    for sparse in graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values)
        dense = np.zeros(int(np.prod(sparse.dims)), dtype=values.dtype)
        dense[numpy_helper.to_array(sparse.indices).reshape(-1)] = values
        graph.initializer.append(numpy_helper.from_array(dense.reshape(tuple(sparse.dims)), sparse.values.name))
    del graph.sparse_initializer[:]
    onnx.save(proto, str(out))
    return Path(out)


# -- TFLite ---------------------------------------------------------------------------------------------------------

TFLITE_WEIGHT_CONSUMERS = ("FULLY_CONNECTED", "BATCH_MATMUL")  # DEQUANTIZE in between for fp16/int8 weights
_TFLITE_DTYPES = {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT8": np.int8}
FLATBUFFER_LIMIT = 2 ** 31 - 2 ** 24  # a flatbuffer addresses 2 GB; keep room for the graph itself
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
    if not _inline_buffers(model, content):
        return content, {**_summary(TFLITE_ENCODING, [], 0, ""),
                         "why_dense": "weights near 2 GB: a re-packed flatbuffer could not hold them"}
    editor = _TfliteEditor(model, schema)
    for graph in model.subgraphs:
        densify_ops = [op for index, dequantized in sorted(editor.weights(graph).items())
                       if (op := editor.store_sparse(graph, index, dequantized)) is not None]
        graph.operators = densify_ops + list(graph.operators)  # DENSIFY reads only constants: it can run first
    result = _summary(TFLITE_ENCODING, editor.converted, editor.left_dense,
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
                len(tensor.shape) != 2 or int(np.prod(tensor.shape)) < MIN_ELEMENTS:
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
            self.left_dense += bool(np.count_nonzero(array) <= (1 - ZERO_HEAVY) * array.size)
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


def _inline_buffers(model, content: bytes) -> bool:
    """Move buffers stored after the flatbuffer (offset/size, as ai-edge-quantizer writes them) into it, so that
    re-packing keeps their data; False when the weights are too big for an inline flatbuffer (2 GB)."""
    if len(content) >= FLATBUFFER_LIMIT:
        return False
    for b in model.buffers:
        if b.offset > 1:  # 0 and 1 mean "no external data"
            b.data = np.frombuffer(content, np.uint8, count=int(b.size), offset=int(b.offset))
            b.offset = b.size = 0
    return True


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


# -- CoreML ---------------------------------------------------------------------------------------------------------

IOS18 = 9  # Core ML specification version of iOS18 / macOS15: the first with sparse + quantized weights together


def coreml_sparse_weights(mlmodel, quantized: bool = False) -> tuple[Any, dict[str, Any]]:
    """(ML program with its sparse linear weights stored sparse, what was converted).

    Float weights become constexpr_sparse_to_dense (kept values + a one-bit mask). With `quantized`, int8 weights
    (constexpr_blockwise_shift_scale) become constexpr_sparse_blockwise_shift_scale + constexpr_sparse_to_dense
    (coremltools' joint compression), which needs an iOS18 program: older targets keep them dense.
    Only weights that every reader uses as a `linear` weight are candidates, chosen by name; mask, position and other
    constants are never touched (compressing those yields NaN or garbage, METHODS.md). Zeros are counted in float32
    (fp16 weights included), and the pruner's threshold is 0.0: it stores exactly the zeros the weights already
    hold and changes no value.
    """
    import coremltools.optimize.coreml as cto

    joint = quantized and mlmodel.get_spec().specificationVersion >= IOS18
    converted, configs, left_dense = [], {}, 0
    for function in mlmodel._mil_program.functions.values():
        for op in function.operations:
            stored = _coreml_weight(op, quantized)
            if stored is None:
                continue
            value, itemsize = stored
            nnz = int(np.count_nonzero(value.astype(np.float32)))
            dense_bytes = value.size * itemsize
            sparse_bytes = nnz * itemsize + -(-value.size // 8)  # kept values + a one-bit mask
            if sparse_bytes >= dense_bytes or (quantized and not joint):
                left_dense += bool(nnz <= (1 - ZERO_HEAVY) * value.size)
                continue
            configs[op.name] = cto.OpThresholdPrunerConfig(threshold=0.0, minimum_sparsity_percentile=0.0,
                                                           weight_threshold=MIN_ELEMENTS - 1)
            converted.append((dense_bytes, sparse_bytes))
    why = "int8 weights stored sparse need an iOS18 (or later) deployment target" if quantized and not joint else \
        "a one-bit mask and the kept values would not be smaller at its density"
    result = _summary("CoreML constexpr_sparse_to_dense (values + 1-bit mask)", converted, left_dense, why)
    if not configs:
        return mlmodel, result
    with quiet("coremltools", stderr=True):
        pruned = cto.prune_weights(mlmodel, config=cto.OptimizationConfig(global_config=None,
                                                                           op_name_configs=configs),
                                   joint_compression=joint)
    return pruned, result


def _coreml_weight(op, quantized: bool):
    """(value, bytes per stored element) of a linear weight big enough to store sparse, else None: a float const,
    or with `quantized` an int8 weight (its dequantized value: symmetric int8 keeps zeros exact zeros)."""
    readers = op.outputs[0].child_ops if op.outputs else []
    if not readers or not all(r.op_type == "linear" and r.weight is op.outputs[0] for r in readers):
        return None
    if quantized:  # iOS18 programs quantize with constexpr_blockwise_shift_scale, older ones with affine_dequantize
        stored = {"constexpr_blockwise_shift_scale": "data", "constexpr_affine_dequantize": "quantized_data"}
        if op.op_type not in stored:
            return None
        value, itemsize = op.materialized_val_inference(), getattr(op, stored[op.op_type]).val.itemsize
    else:
        if op.op_type != "const":
            return None
        value = op.outputs[0].val
        if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
            return None
        itemsize = value.itemsize
    return (value, itemsize) if value.size >= MIN_ELEMENTS else None
