"""ONNX int4: weights already on a 4-bit block grid (a GGUF's Q4_1, dequantized) are stored exactly, through ORT's
symmetric kernels plus an exact offset; the output projection is int8 weight-only (a scale per output); float
weights lose only a 4-bit rounding."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from pocketformer.export.onnx import INT4_BLOCK, quantize_int4
from pocketformer.targets import get_runtime


def two_matmuls(w1: np.ndarray, w2: np.ndarray, path):
    """x @ w1.T -> h (internal), h @ w2.T -> y (the graph's output)."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="first"),
             helper.make_node("MatMul", ["h", "W2"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w1.shape[1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w2.shape[0]])],
                              [numpy_helper.from_array(w1.T.copy(), "W1"), numpy_helper.from_array(w2.T.copy(), "W2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def q4_1(rng, n, k):
    codes = rng.integers(0, 16, size=(n, k // INT4_BLOCK, INT4_BLOCK))
    codes[..., 0], codes[..., 1] = 0, 15  # llama.cpp's Q4_1: each block's min and max are codes 0 and 15
    d = rng.uniform(0.01, 0.05, size=(n, k // INT4_BLOCK, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.4, 0.0, size=(n, k // INT4_BLOCK, 1)).astype(np.float16).astype(np.float32)
    return (codes * d + m).reshape(n, k).astype(np.float32)


def q8_0(rng, n, k):
    codes = rng.integers(-127, 128, size=(n, k // INT4_BLOCK, INT4_BLOCK))
    codes[..., 0] = 127  # Q8_0: the block's largest magnitude is code +-127
    d = rng.uniform(0.001, 0.01, size=(n, k // INT4_BLOCK, 1)).astype(np.float16).astype(np.float32)
    return (codes * d).reshape(n, k).astype(np.float32)


def run(path, x):
    return get_runtime("onnxruntime").open(path, 1).run({"x": x})["y"]


def test_gguf_grids_are_stored_exactly(tmp_path):
    rng = np.random.default_rng(0)
    w1, w2 = q4_1(rng, 64, 128), q8_0(rng, 40, 64)
    two_matmuls(w1, w2, tmp_path / "f.onnx")
    quantize_int4(tmp_path / "f.onnx", tmp_path / "q.onnx")
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    ops = {n.name: (n.op_type, {a.name: a.i for a in n.attribute}.get("bits")) for n in graph.node}
    # 4-bit codes symmetric (ORT's fast kernels take no zero point), the grid's offset added by two small MatMuls
    assert ops == {"first_nbits": ("MatMulNBits", 4), "first_nbits_sum": ("MatMul", None),
                   "first_nbits_offset": ("MatMul", None), "first_nbits_add": ("Add", None),
                   "head_int8_dq": ("DequantizeLinear", None), "head": ("MatMul", None)}  # the output: int8 weights
    assert all(len(n.input) == 3 for n in graph.node if n.op_type == "MatMulNBits")
    x = rng.standard_normal((3, 128)).astype(np.float32)
    h = x @ w1.T
    inner = {n.name: n for n in graph.node}["first_nbits_add"].output[0]
    # the 4-bit weight is exact: the hidden layer as the runtime computes it, read as an extra output
    extra = onnx.load(str(tmp_path / "q.onnx"))
    extra.graph.output.append(helper.make_tensor_value_info(inner, TensorProto.FLOAT, [None, 64]))
    onnx.save(extra, str(tmp_path / "h.onnx"))
    got_h = get_runtime("onnxruntime").open(tmp_path / "h.onnx", 1).run({"x": x})[inner]
    assert np.abs(got_h - h).max() < 1e-4 * np.abs(h).max()
    # the head: the Q8_0 weight to a per-output int8 grid, and ORT's 8-bit kernel quantizes its input per block
    want = h @ w2.T
    got = run(tmp_path / "q.onnx", x)
    assert 1e-5 < np.abs(got - want).max() < 0.03 * np.abs(want).max()


def test_float_weights_lose_a_4_bit_rounding(tmp_path):
    g = torch.Generator().manual_seed(0)
    w1, w2 = (torch.randn(64, 128, generator=g) * 0.1).numpy(), (torch.randn(40, 64, generator=g) * 0.1).numpy()
    two_matmuls(w1, w2, tmp_path / "f.onnx")
    quantize_int4(tmp_path / "f.onnx", tmp_path / "q.onnx")
    x = np.random.default_rng(1).standard_normal((3, 128)).astype(np.float32)
    want, got = (x @ w1.T) @ w2.T, run(tmp_path / "q.onnx", x)
    rel = np.abs(got - want).max() / np.abs(want).max()
    cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert 1e-4 < rel < 0.3 and cosine > 0.98  # a 4-bit step is ~1/15 of a block's range
    stored = sum(t.raw_data.__len__() for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer
                 if t.name.startswith("first_nbits"))  # codes, scales and offsets of the 4-bit weight
    assert stored < 0.25 * w1.nbytes


def test_a_symmetric_grid_is_kept_and_needs_no_offset(tmp_path):
    """The quantize stage's int4 (neural-compressor RTN, symmetric, scale = block max / 7) or a GGUF's Q4_0: the codes
    go to MatMulNBits as they are, exactly, with no offset products."""
    rng = np.random.default_rng(2)
    codes = rng.integers(-8, 8, size=(64, 128 // INT4_BLOCK, INT4_BLOCK))
    codes[..., 0] = 7  # the block's largest magnitude is code 7 (RTN's amax / 7)
    codes[:, ::2, 0] = -8  # or -8 (Q4_0, a clipped RTN: amax / 8)
    scales = rng.uniform(0.001, 0.02, size=(64, 128 // INT4_BLOCK, 1)).astype(np.float32)
    w1 = (codes * scales).reshape(64, 128).astype(np.float32)
    w2 = q8_0(rng, 40, 64)
    two_matmuls(w1, w2, tmp_path / "f.onnx")
    quantize_int4(tmp_path / "f.onnx", tmp_path / "q.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert ops == ["MatMulNBits", "DequantizeLinear", "MatMul"]  # no offset MatMuls, no Add
    h = onnx.load(str(tmp_path / "q.onnx"))
    h.graph.output[0].CopyFrom(helper.make_tensor_value_info(h.graph.node[0].output[0], TensorProto.FLOAT, [None, 64]))
    onnx.save(h, str(tmp_path / "h.onnx"))
    x = rng.standard_normal((3, 128)).astype(np.float32)
    got = get_runtime("onnxruntime").open(tmp_path / "h.onnx", 1).run({"x": x})[h.graph.node[0].output[0]]
    assert np.abs(got - x @ w1.T).max() < 1e-4 * np.abs(x @ w1.T).max()
