"""Exporters, one module per format. Each: export(model, out_dir, stem, inputs, int8=, static_shape=) -> records."""

from . import onnx as _onnx

EXPORTERS = {"onnx": _onnx.export}

__all__ = ["EXPORTERS"]
