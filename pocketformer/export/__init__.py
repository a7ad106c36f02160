"""Exporters, one module per format. Each: export(model, out_dir, stem, inputs, int8=, static_shape=) -> records."""

from . import coreml as _coreml
from . import onnx as _onnx
from . import tflite as _tflite

EXPORTERS = {"onnx": _onnx.export, "tflite": _tflite.export, "coreml": _coreml.export}

__all__ = ["EXPORTERS"]
