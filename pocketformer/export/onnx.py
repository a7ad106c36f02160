"""ONNX: torch.onnx (dynamo) -> onnxsim -> optional ORT per-channel dynamic int8. One file per graph, dynamic batch
and sequence axes unless fixed shapes are asked; mostly-zero weights stored as sparse initializers."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import torch

from .. import __version__
from ..errors import ExportError
from ..models.canonical import CanonicalTransformer
from ..models.signature import GraphIO, named_forward
from ..progress import quiet
from ..store import atomic_write_bytes, cpu, u8s8_saturates
from . import sparse as sparse_storage
from .base import Format, Plan, Tolerance, Written
from .card import PREFIX, Card, from_metadata

OPSET = 18
INT8_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "DequantizeLinear",
            "MatMulNBits"}
# fp32 files must match PyTorch closely; int8 ones make the same decisions (the task's rule).
FP32_MAX_ABS = 1e-3
FP32_MIN_COSINE = 0.9999


def _quiet():
    """The exporter prints pages of warnings about its own internals; users want one line per artifact."""
    return quiet("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")


def torch_dynamic_shapes(io: GraphIO) -> tuple[dict, ...]:
    """torch.export's dynamic shapes for every input, from the declared symbolic axes: one Dim per axis name,
    shared by every input that has it (batch up to io.bounds, sequence up to the model's positions)."""
    dims = {"batch": torch.export.Dim("batch", min=1, max=io.bounds.get("batch", 4096))}
    if "sequence" in io.bounds:
        dims["sequence"] = torch.export.Dim("seq", min=1, max=io.bounds["sequence"])
    if "past" in io.bounds:  # a decoder's cache: empty on the first step
        dims["past"] = torch.export.Dim("past", min=0, max=io.bounds["past"])
        dims["total"] = torch.export.Dim("total", min=1, max=io.bounds["total"])
    return tuple({axis: dims[name] for axis, name in io.dynamic_axes()[spec.name].items()} for spec in io.inputs)


def export_float(model: CanonicalTransformer, path: Path, example: tuple[torch.Tensor, ...],
                 static_shape: bool = False) -> None:
    """One unchecked fp32 file of the plain model (benchmarks and tests); `pocketformer export` goes through the
    loop, which checks every file."""
    io = model.io
    export_module(named_forward(model, io.input_names), path, example, io.input_names, io.output_names,
                  None if static_shape else torch_dynamic_shapes(io))


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


WEIGHT_BITS_KEY = "quantization.weight_bits"  # metadata of an int8 file whose weights are 7-bit


def on_8bit_grid(proto: onnx.ModelProto) -> bool:
    """Do the file's weight matrices lie on a per-channel 8-bit grid (the quantize stage's), so that ORT's 8-bit
    per-channel quantization stores them exactly?"""
    from onnx import numpy_helper

    for init in proto.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2 or np.prod(init.dims) < FP16_MIN_ELEMENTS:
            continue
        w = numpy_helper.to_array(init).astype(np.float64)
        for axis in (0, 1):
            scale = np.abs(w).max(axis=axis, keepdims=True) / 127
            q = w / np.where(scale > 0, scale, 1)
            if np.abs(q - np.round(q)).max() < 1e-3:
                return True
    return False


def quantize_int8(float_path: Path, path: Path) -> None:
    """ORT dynamic int8, per-channel weights (per-tensor loses accuracy, METHODS.md: cosine 0.963). Where this
    host's u8s8 kernels saturate (store.u8s8_saturates: x86-64 without VNNI), the weights are 7-bit (ORT's
    reduce_range, its advice for such CPUs): the check here then measures the file rather than this host's overflow,
    and a target CPU of the same kind runs it as checked. The file says so (metadata WEIGHT_BITS_KEY = "7"). Weights
    already on an 8-bit grid (the quantize stage's) keep 8 bits, which store that grid exactly (7 would round it
    again); on such a host their check measures the overflow, as before."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        pre = Path(tmp) / "pre.onnx"
        out = Path(tmp) / "q.onnx"
        # the quantizer reads only dense initializers: a dense-sparse model's fp32 file may hold sparse ones
        source = densified_onnx(float_path, Path(tmp) / "dense.onnx")
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        seven_bits = u8s8_saturates(cpu()) and not on_8bit_grid(onnx.load(str(source)))
        quantize_dynamic(str(pre), str(out), per_channel=True, weight_type=QuantType.QInt8, reduce_range=seven_bits,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        proto = onnx.load(str(out))
        if seven_bits:
            proto.metadata_props.add(key=WEIGHT_BITS_KEY, value="7")
        _save_atomic(proto, path)


def weights_fp16(float_path: Path, path: Path) -> None:
    """The fp32 file with its float weights stored in fp16, each cast back to float32 where the graph reads it: half
    the bytes to ship. ORT's CPU kernels compute in float32 (it folds the casts when it loads the file), so the file
    runs as fast as the fp32 one and holds as much memory once loaded; values outside fp16's range stay float32."""
    from onnx import TensorProto, helper, numpy_helper

    with tempfile.TemporaryDirectory() as tmp:
        proto = onnx.load(str(densified_onnx(float_path, Path(tmp) / "dense.onnx")))
    graph, casts = proto.graph, []
    overridable = {i.name for i in graph.input}
    for init in graph.initializer:
        array = numpy_helper.to_array(init) if init.data_type == TensorProto.FLOAT else None
        if array is None or array.size < FP16_MIN_ELEMENTS or init.name in overridable or \
                not np.all(np.abs(array) <= np.finfo(np.float16).max):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(array.astype(np.float16), f"{name}_fp16"))
        casts.append(helper.make_node("Cast", [f"{name}_fp16"], [name], name=f"{name}_cast", to=TensorProto.FLOAT))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    _save_atomic(proto, path)


FP16_MIN_ELEMENTS = 1024  # smaller tensors (norm scales, biases) stay float32: casting them saves nothing


def quantize_int8_weights(float_path: Path, path: Path) -> None:
    """Weight-only int8: every constant MatMul weight stored int8 with a symmetric scale per output column and read
    through DequantizeLinear (standard ONNX, opset 13), and every embedding table int8 with a scale per row, its
    rows gathered and scaled; a language model's tied output embedding is the table's transpose, stored once
    (Int8Weights). ORT's CPU provider fuses each DequantizeLinear -> MatMul into its 8-bit MatMulNBits kernel, which
    quantizes the activations per block of 32 at run time (accuracy level 4): no scale is shared across a whole
    activation tensor, as dynamic int8's is (quantize_int8), which SmolLM2's outlier channels break."""
    with tempfile.TemporaryDirectory() as tmp:
        proto = onnx.load(str(densified_onnx(float_path, Path(tmp) / "dense.onnx")))
    int8 = Int8Weights(proto.graph)
    nodes = []
    for node in proto.graph.node:
        table, weight = int8.table_of(node), int8.weight_of(node)
        nodes += int8.table(node, table) if table is not None else \
            int8.matmul(node, weight) if weight is not None else [node]
    int8.finish(nodes)
    _save_atomic(proto, path)


class Int8Weights:
    """Rewrites a graph's constant weights to int8 node by node: embedding tables (Gather on axis 0) with a scale
    per row, MatMul / plain Gemm weights behind a per-column DequantizeLinear; a weight equal to an int8 table's
    transpose (a tied output embedding) reads the table's codes transposed instead of storing them again."""

    def __init__(self, graph):
        from onnx import TensorProto

        self.graph, self.float = graph, TensorProto.FLOAT
        self.inits = {t.name: t for t in graph.initializer}
        self.overridable = {i.name for i in graph.input}
        self.tables: dict[bytes, str] = {}  # the transpose's bytes of each int8 table -> its codes' name

    def constant(self, name: str) -> Optional[np.ndarray]:
        """A float matrix the graph holds (not one a caller may override), else None."""
        from onnx import numpy_helper

        init = self.inits.get(name)
        if init is None or name in self.overridable or init.data_type != self.float or len(init.dims) != 2:
            return None
        return numpy_helper.to_array(init)

    def table_of(self, node) -> Optional[np.ndarray]:
        return self.constant(node.input[0]) if node.op_type == "Gather" and _attr(node, "axis", 0) == 0 else None

    def weight_of(self, node) -> Optional[np.ndarray]:
        """W of x W: a MatMul's constant right operand, or a plain Gemm's (transposed back when transB)."""
        if node.op_type == "MatMul" and len(node.input) == 2:
            return self.constant(node.input[1])
        if node.op_type == "Gemm" and not _attr(node, "transA", 0) and _attr(node, "alpha", 1.0) == 1.0 and \
                _attr(node, "beta", 1.0) == 1.0:
            w = self.constant(node.input[1])
            return w.T if w is not None and _attr(node, "transB", 0) else w
        return None

    def table(self, node, table: np.ndarray) -> list:
        from onnx import helper, numpy_helper

        stem = f"{node.name or node.output[0]}_int8"
        q, scale = symmetric_int8(table, axis=1)
        self.graph.initializer.extend([numpy_helper.from_array(q, f"{stem}_q"),
                                       numpy_helper.from_array(scale[:, None], f"{stem}_scale")])
        self.tables[np.ascontiguousarray(table.T).tobytes()] = f"{stem}_q"
        return [helper.make_node("Gather", [f"{stem}_q", node.input[1]], [f"{stem}_rows"], name=f"{stem}_rows",
                                 axis=0),
                helper.make_node("Gather", [f"{stem}_scale", node.input[1]], [f"{stem}_row_scales"],
                                 name=f"{stem}_row_scales", axis=0),
                helper.make_node("Cast", [f"{stem}_rows"], [f"{stem}_float"], name=f"{stem}_cast", to=self.float),
                helper.make_node("Mul", [f"{stem}_float", f"{stem}_row_scales"], list(node.output),
                                 name=f"{stem}_scaled")]

    def matmul(self, node, weight: np.ndarray) -> list:
        from onnx import helper, numpy_helper

        stem = f"{node.name or node.output[0]}_int8"
        q, scale = symmetric_int8(weight, axis=0)
        self.graph.initializer.append(numpy_helper.from_array(scale, f"{stem}_scale"))
        tied = self.tables.get(weight.tobytes())
        nodes = []
        if tied is not None:  # the same codes and scales as the table's: read them transposed
            nodes.append(helper.make_node("Transpose", [tied], [f"{stem}_q"], name=f"{stem}_tied", perm=[1, 0]))
        else:
            self.graph.initializer.append(numpy_helper.from_array(q, f"{stem}_q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{stem}_q", f"{stem}_scale"], [f"{stem}_w"],
                                      name=f"{stem}_dq", axis=1))
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:  # x W + bias
            return nodes + [helper.make_node("MatMul", [node.input[0], f"{stem}_w"], [f"{stem}_xw"], name=node.name),
                            helper.make_node("Add", [f"{stem}_xw", node.input[2]], list(node.output),
                                             name=f"{stem}_bias")]
        return nodes + [helper.make_node("MatMul", [node.input[0], f"{stem}_w"], list(node.output), name=node.name)]

    def finish(self, nodes: list) -> None:
        """The graph's nodes become `nodes`; initializers no node reads any more (the float weights) go."""
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        read = {i for node in self.graph.node for i in node.input} | {o.name for o in self.graph.output}
        kept = [t for t in self.graph.initializer if t.name in read]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)


def symmetric_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes in [-127, 127] and a float32 scale per slice along `axis` (the max |w| of the slice / 127)."""
    scale = np.abs(w).max(axis=axis) / 127
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(w / np.expand_dims(scale, axis)), -127, 127).astype(np.int8), scale


def _attr(node, name: str, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


INT4_BLOCK = 32



def quantize_int4(float_path: Path, path: Path) -> None:
    """Weight-only int4 for every MatMul with a constant weight (ORT MatMulNBits, blocks of 32 along the input axis),
    the precision batch-1 decoding needs since it reads every weight once per token.

    Each block's grid spans its own minimum to maximum in 15 steps, so weights that already lie on a 4-bit grid of
    that kind (a GGUF's Q4_0 / Q4_1 blocks, dequantized) are stored exactly, not rounded a second time (measured on
    SmolLM2's Q4_1 weights: ORT's own symmetric RTN re-quantization kept top-1 agreement with the dequantized model
    at 0.66). Such a grid has a float zero point, which ORT's fast MatMulNBits kernels do not take (measured: 3.2
    tok/s against fp32's 29). So the codes are stored symmetric (ORT's implicit zero point 8: w' = s (q - 8)) and the
    grid's offset is added back exactly by a small float product: w = w' + c per block, c = lo + 8 s, so
    x.W = MatMulNBits(x) + (x.S).C, where S (K x K/32, ones) sums x over each block and C (K/32 x N) holds c.

    The MatMul that makes a graph output (a language model's output embedding) and the embedding table are int8
    (Int8Weights, as in the int8 weight-only file): 4 bits would round a GGUF's 8-bit output weights again, and the
    table read transposed holds a tied head once."""
    from onnx import helper, numpy_helper

    with tempfile.TemporaryDirectory() as tmp:
        proto = onnx.load(str(densified_onnx(float_path, Path(tmp) / "dense.onnx")))
    graph = proto.graph
    int8 = Int8Weights(graph)
    outputs = {o.name for o in graph.output}
    nodes, ones, block_sums = [], {}, {}
    for node in graph.node:
        table, array = int8.table_of(node), int8.weight_of(node)
        if table is not None:
            nodes += int8.table(node, table)
            continue
        if array is None:
            nodes.append(node)
            continue
        if node.op_type != "MatMul" or any(o in outputs for o in node.output) or array.shape[0] % INT4_BLOCK:
            nodes += int8.matmul(node, array)
            continue
        k, n = array.shape
        packed, scales, offsets = block_grid(array.T, INT4_BLOCK)
        stem = f"{node.name or node.output[0]}_nbits"
        graph.initializer.extend([numpy_helper.from_array(packed, f"{stem}_B"),
                                  numpy_helper.from_array(scales, f"{stem}_scales")])
        exact = bool(np.any(offsets))
        out = f"{stem}_symmetric" if exact else node.output[0]
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], f"{stem}_B", f"{stem}_scales"], [out],
                                      name=stem, domain="com.microsoft", K=k, N=n, bits=4, block_size=INT4_BLOCK))
        if exact:  # the grid's offset, exactly: (x . S) . C; x . S once per input (q, k and v share theirs)
            if k not in ones:
                ones[k] = f"block_ones_{k}"
                matrix = np.kron(np.eye(k // INT4_BLOCK, dtype=np.float32), np.ones((INT4_BLOCK, 1), np.float32))
                graph.initializer.append(numpy_helper.from_array(matrix, ones[k]))
            if node.input[0] not in block_sums:
                block_sums[node.input[0]] = f"{stem}_block_sums"
                nodes.append(helper.make_node("MatMul", [node.input[0], ones[k]], [block_sums[node.input[0]]],
                                              name=f"{stem}_sum"))
            graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(offsets.reshape(n, k // INT4_BLOCK).T), f"{stem}_offsets"))
            nodes += [helper.make_node("MatMul", [block_sums[node.input[0]], f"{stem}_offsets"], [f"{stem}_offset"],
                                       name=f"{stem}_offset"),
                      helper.make_node("Add", [out, f"{stem}_offset"], list(node.output), name=f"{stem}_add")]
    int8.finish(nodes)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _save_atomic(proto, path)


def block_grid(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' 4-bit tensors for weights `w` (N outputs x K inputs) with ORT's implicit zero point 8: codes
    packed low bits first ([N, K/block, block / 2] uint8), a scale per block ([N * K/block]), and each block's offset
    c ([N * K/block]) such that w = s (q - 8) + c. A block already on a symmetric grid (w = s q, q in -8..7, s its
    largest magnitude / 7 or / 8: a GGUF's Q4_0, or the quantize stage's int4) keeps that grid, offset 0; any other
    block's grid runs from its minimum lo to its maximum in 15 steps (a Q4_1 block exactly), c = lo + 8 s."""
    n, k = w.shape
    blocks = w.reshape(n, k // block, block).astype(np.float64)
    lo, hi = blocks.min(-1), blocks.max(-1)
    scale = np.where(hi > lo, (hi - lo) / 15, 1.0)
    codes = np.clip(np.rint((blocks - lo[..., None]) / scale[..., None]), 0, 15)
    offsets = lo + 8 * scale
    amax, done = np.abs(blocks).max(-1), np.zeros(lo.shape, bool)
    for steps in (7, 8):
        s = np.where(amax > 0, amax / steps, 1.0)
        q = blocks / s[..., None]
        on = ~done & (np.abs(q - np.rint(q)).max(-1) <= 1e-3) & (np.rint(q).min(-1) >= -8) & (np.rint(q).max(-1) <= 7)
        codes[on], scale[on], offsets[on] = np.rint(q[on]) + 8, s[on], 0.0
        done |= on
    codes = codes.astype(np.uint8)
    codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(codes), scale.astype(np.float32).reshape(-1), offsets.astype(np.float32).reshape(-1)


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
    seven_bits = any(p.key == WEIGHT_BITS_KEY and p.value == "7" for p in proto.metadata_props)
    return {"inputs": {i.name: dims(i) for i in proto.graph.input},
            "outputs": {o.name: dims(o) for o in proto.graph.output},
            "ops": dict(Counter(n.op_type for n in proto.graph.node).most_common()),
            "weights": params, "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                                            default=None),
            **({"int8_weight_bits": 7} if seven_bits else {})}


# -- sparse storage (export/sparse.py) -----------------------------------------------------------------------------------------------------------

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
        if array.size < sparse_storage.MIN_ELEMENTS or init.name in overridable or sparse_bytes >= dense_bytes:
            left_dense += bool(array.size >= sparse_storage.MIN_ELEMENTS and nnz <= (1 - sparse_storage.ZERO_HEAVY) * array.size)
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
    return sparse_storage.summary("ONNX sparse_initializer (COO, int64 linearized indices)", converted, left_dense,
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


# -- the card (export/card.py) in metadata_props -------------------------------------------------------------------

TOKENIZER_KEY = PREFIX + "tokenizer.json"  # the checkpoint's tokenizer.json text, embedded
PRECISION_KEY = PREFIX + "precision"


def card_props(card: Card, precision: str, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Every metadata_props entry pocketformer writes into a file: the card's flat map, the precision, the tokenizer
    itself where the checkpoint has a tokenizer.json, and `extra` (an app's own keys), in key order."""
    props = card.metadata() | {PRECISION_KEY: precision} | (extra or {})
    tj = card.tokenizer.files.get("tokenizer.json") if card.tokenizer else None
    if tj:
        props[TOKENIZER_KEY] = Path(tj).read_text(encoding="utf-8")
    return dict(sorted(props.items()))


def annotate_onnx(path: Path, card: Card, precision: str, extra: Optional[dict[str, str]] = None) -> None:
    """Write the card into an ONNX file in place: metadata_props (older pocketformer.* entries replaced, others such
    as onnxsim's kept in their order), doc_string, producer. Weights in external data files are neither read nor
    moved (their references stay as they are); the file is replaced atomically, with the same bytes every time."""
    proto = onnx.load(str(path), load_external_data=False)
    kept = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(PREFIX)]
    del proto.metadata_props[:]
    for key, value in kept + list(card_props(card, precision, extra).items()):
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = card.description()
    proto.producer_name, proto.producer_version = "pocketformer", __version__
    atomic_write_bytes(Path(path), proto.SerializeToString())


def metadata_of(path: Path) -> dict[str, str]:
    """An ONNX file's metadata_props, without its external weights."""
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def embedded_tokenizer(path: Path) -> Optional[str]:
    """The tokenizer.json text an ONNX file carries, or None."""
    return metadata_of(path).get(TOKENIZER_KEY)


def read_onnx_card(path: Path) -> Optional[dict[str, Any]]:
    """The card of an ONNX file (export.card.from_metadata's values), with "tokenizer_location": "embedded" when
    the tokenizer itself is inside (read it with `embedded_tokenizer`); None when the file carries no card."""
    props = metadata_of(path)
    embedded = props.pop(TOKENIZER_KEY, None)
    card = from_metadata(props)
    if card is not None and embedded is not None:
        card["tokenizer_location"] = "embedded"
    return card


QUANTIZERS = {"fp16": weights_fp16, "int8-weight": quantize_int8_weights, "int8": quantize_int8, "int4": quantize_int4}


class Onnx(Format):
    name, extension, runtime, static_only = "onnx", ".onnx", "onnxruntime", False
    # fp16: weights stored fp16, computed fp32; int8-weight: int8 weights only; int8: ORT dynamic int8 (weights and
    # activations); all made from the fp32 file
    float_precisions, int8_precisions = ("fp32", "fp16"), ("int8-weight", "int8")
    suffixes = {"int8-weight": "int8w"}
    option_names = ("int4",)  # also a weight-only int4 file (MatMulNBits), made from the fp32 one
    fp32_tolerance = Tolerance(FP32_MAX_ABS, FP32_MIN_COSINE)
    fixes = {"int8": "skip int8 for this model (`--no-int8`): its outputs do not survive int8 weights.",
             "int8-weight": "leave out int8 weight-only (export.skip: [onnx.int8-weight]): this model's outputs do "
                            "not survive int8 weights.",
             "int4": "leave out int4: this model's outputs do not survive 4-bit weights.",
             "*": "report this with the model's pocketformer.json."}

    def precisions(self, int8: bool, options: dict[str, Any]) -> list[str]:
        return super().precisions(int8, options) + (["int4"] if options.get("int4") else [])

    def write(self, plan: Plan, precision: str, paths: dict[str, Path]) -> list[Written]:
        written = []
        for name, graph in plan.graphs.items():
            path = paths[name]
            if precision == "fp32":
                export_module(graph.module, path, plan.examples[name], graph.io.input_names, graph.io.output_names,
                              None if plan.fixed else torch_dynamic_shapes(graph.io))
                plan.state[name] = path
            else:
                QUANTIZERS[precision](plan.state[name], path)
            storage = onnx_file(path) if plan.sparse else None
            written.append(Written(name, path, None, storage))
        return written

    def describe(self, path: Path) -> dict[str, Any]:
        return describe(path)

    def holds_int8(self, path: Path, description: dict[str, Any]) -> bool:
        return bool(set(description.get("ops", {})) & INT8_OPS)

    def annotate(self, path: Path, card: Card, precision: str) -> None:
        annotate_onnx(path, card, precision)

    def read_card(self, path: Path) -> Optional[dict[str, Any]]:
        return read_onnx_card(path)
