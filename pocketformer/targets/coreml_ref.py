"""CoreML ML programs (.mlpackage): the runtime module for format "coreml".

On macOS, Core ML itself runs the package (`MLModel.predict`). Everywhere else Core ML does not exist (predict,
compile and MLComputePlan all need macOS), so the saved package is loaded back as a MIL program and executed op by op
in numpy, with coremltools' own per-op value inference where it exists and works, and small numpy/torch kernels for
the few ops where it does not. Values stay float32 between ops, rounded to float16 after every op the program computes
in fp16. That checks the converted graph and its weights, not Apple's runtime or Neural Engine numerics, and measures
no latency: every result made this way carries LABEL.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .. import progress
from ..errors import TargetError
from .ort import Run

NAME = "coreml-mil-reference"
FORMAT = "coreml"
LABEL = "MIL reference execution, not Apple runtime"
APPLE = "Apple Core ML runtime"


def on_macos() -> bool:
    return platform.system() == "Darwin"


MEASURES_LATENCY = on_macos()  # no latency is ever shown for CoreML off macOS


def execution() -> str:
    """What runs the packages here: Apple's runtime on macOS, the MIL reference elsewhere."""
    return APPLE if on_macos() else LABEL


def quiet():
    """coremltools prints a warning per missing native library and version it has not tested, on every import."""
    return progress.quiet("coremltools", stderr=True)


def _ct():
    with quiet():
        import coremltools

    return coremltools


def version() -> str:
    return f"coremltools {_ct().__version__} ({execution()})"


def load_program(path: Path):
    """The saved package's MIL program: its spec plus the weights file, no Core ML runtime needed."""
    ct = _ct()
    from coremltools.converters.mil.frontend.milproto import load as milproto

    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise TargetError(f"{path} is not a .mlpackage folder.", "export it with `pocketformer export --to coreml`.")
    with quiet():
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            raise TargetError(f"{path.name} is a neural network model, not an ML program.",
                              "re-export it with `pocketformer export --to coreml`.")
        return milproto.load(spec, specification_version=spec.specificationVersion,
                             file_weights_dir=model.weights_dir)


class Session:
    """A loaded package: Apple's MLModel on macOS, else the MIL program's main function."""

    def __init__(self, path: Path, apple_model=None, program=None):
        self.path = Path(path)
        self.apple_model = apple_model
        self.function = program.functions["main"] if program is not None else None
        if apple_model is not None:
            spec = apple_model.get_spec()
            self.inputs = {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input}
            self.input_dtypes = {i.name: _spec_dtype(i.type.multiArrayType.dataType) for i in spec.description.input}
            self.outputs = [o.name for o in spec.description.output]
        else:
            from coremltools.converters.mil.mil import types

            self.inputs = {n: list(v.shape) for n, v in self.function.inputs.items()}
            self.input_dtypes = {n: types.nptype_from_builtin(v.dtype) for n, v in self.function.inputs.items()}
            self.outputs = [o.name for o in self.function.outputs]


def _spec_dtype(code: int):
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType as A

    return {A.FLOAT32: np.float32, A.DOUBLE: np.float64, A.FLOAT16: np.float16, A.INT32: np.int32}[code]


def load(path: Path, threads: int) -> Session:
    """`threads` is not used: Core ML chooses its own, and the reference runs numpy's."""
    if on_macos():
        ct = _ct()
        with quiet():
            return Session(path, apple_model=ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.ALL))
    return Session(path, program=load_program(path))


def input_names(session: Session) -> list[str]:
    return list(session.inputs)


def input_shapes(session: Session) -> dict[str, list]:
    return dict(session.inputs)


def run_outputs(session: Session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of the package by name for `feeds` (cast to the package's input dtypes, e.g. int64 ids to
    int32; extra feeds ignored)."""
    feeds = {n: np.ascontiguousarray(feeds[n], dtype=session.input_dtypes[n]) for n in session.inputs}
    for n, v in feeds.items():
        if list(v.shape) != session.inputs[n]:
            raise TargetError(f"{session.path.name} takes {n} of shape {session.inputs[n]}, got {list(v.shape)}.",
                              "pad or truncate inputs to the package's fixed shape.")
    if session.apple_model is not None:
        return {k: np.asarray(v) for k, v in session.apple_model.predict(feeds).items()}
    return execute(session.function, feeds)


def run(session: Session, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The package's first output for `feeds`."""
    return run_outputs(session, feeds)[session.outputs[0]]


def benchmark(session: Session, feeds: dict[str, np.ndarray], warmup: int, repeats: int) -> list[float]:
    """Latency in ms of each of `repeats` predictions after `warmup` untimed ones: Apple's runtime only."""
    if session.apple_model is None:
        raise TargetError(f"No latency is measured for CoreML off macOS: {session.path.name} runs here only as a "
                          f"{LABEL}, whose speed says nothing about a device.",
                          "measure CoreML latency on a Mac (or an iPhone/iPad through Xcode's performance report).")
    feeds = {n: np.ascontiguousarray(feeds[n], dtype=session.input_dtypes[n]) for n in session.inputs}
    for _ in range(warmup):
        session.apple_model.predict(feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.apple_model.predict(feeds)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def segment_runs(segments: list[tuple[Path, Optional[str]]], threads: int) -> list[Run]:
    """One runner per segment package (feeds by name in, every output by name out), for the early-exit driver."""
    sessions = [load(path, threads) for path, _ in segments]
    return [lambda feeds, session=session: run_outputs(session, feeds) for session in sessions]


# -- the MIL reference interpreter -------------------------------------------------------------------------------

def _reduce(fn: Callable) -> Callable:
    # coremltools' reductions pass keep_dims as numpy.bool, which numpy 2 refuses as `keepdims`.
    def impl(op) -> np.ndarray:
        axes = None if op.axes is None else tuple(int(a) for a in op.axes.val)
        keep = False if op.keep_dims is None else bool(op.keep_dims.val)
        return fn(op.x.val, axis=axes, keepdims=keep)
    return impl


def _conv(op) -> np.ndarray:
    import torch
    from torch.nn import functional as F

    x = torch.from_numpy(np.asarray(op.x.val, np.float32))
    w = torch.from_numpy(np.asarray(op.weight.val, np.float32))
    b = None if op.bias is None else torch.from_numpy(np.asarray(op.bias.val, np.float32))
    rank = w.dim() - 2
    strides = [1] * rank if op.strides is None else [int(s) for s in op.strides.val]
    dilations = [1] * rank if op.dilations is None else [int(d) for d in op.dilations.val]
    groups = 1 if op.groups is None else int(op.groups.val)
    pad_type = "valid" if op.pad_type is None else str(op.pad_type.val)
    if pad_type == "custom":
        pads = [int(p) for p in op.pad.val]  # [begin_0, end_0, begin_1, end_1, ...]
        x = F.pad(x, [v for i in reversed(range(rank)) for v in (pads[2 * i], pads[2 * i + 1])])
    elif pad_type != "valid":
        raise TargetError(f"conv pad_type {pad_type!r} has no reference implementation.",
                          "export with static shapes (the exporter's default).")
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    return conv(x, w, b, stride=strides, dilation=dilations, groups=groups).numpy()


def _gather_nd(op) -> np.ndarray:
    if op.batch_dims is not None and int(op.batch_dims.val) != 0:
        raise TargetError(f"gather_nd with batch_dims {int(op.batch_dims.val)} has no reference implementation.",
                          f"add it to KERNELS in {__name__}.")
    indices = np.asarray(op.indices.val).astype(np.int64)
    return np.asarray(op.x.val)[tuple(np.moveaxis(indices, -1, 0))]


# Ops whose coremltools value inference is missing or broken under numpy 2.
KERNELS: dict[str, Callable[[Any], np.ndarray]] = {
    "conv": _conv,
    "gather_nd": _gather_nd,
    "reduce_sum": _reduce(np.sum),
    "reduce_mean": _reduce(np.mean),
    "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min),
    "reduce_prod": _reduce(np.prod),
}


def _store(var, value) -> None:
    """Give a Var a concrete value, the way coremltools' value inference reads its inputs (`var.val`).

    Floats stay float32 between ops (numpy's float16 matmul is slow and accumulates in half precision); an fp16
    var's value is rounded to float16 first, so the program's fp16 storage is honoured.
    """
    from coremltools.converters.mil.mil import types

    value = np.asarray(value)
    if types.is_float(var.dtype):
        if var.dtype == types.fp16:
            value = value.astype(np.float16)
        value = value.astype(np.float32)
    else:
        value = value.astype(types.nptype_from_builtin(var.dtype))
    sym = var.sym_type()
    sym._val = value  # the val setter would cast float32 back to float16: bypass it
    var._sym_val = sym


def _evaluate(op) -> tuple:
    if op.op_type.startswith("constexpr_"):
        out = op.materialized_val_inference()
    elif op.op_type in KERNELS:
        out = KERNELS[op.op_type](op)
    else:
        try:
            out = op.value_inference()
        except NotImplementedError:
            raise TargetError(f"MIL op {op.op_type!r} ({op.name}) has no reference implementation.",
                              f"add a kernel for it to KERNELS in {__name__}.") from None
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def execute(function, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a MIL function on `feeds`; return its outputs by name."""
    touched = []
    try:
        for name, var in function.inputs.items():
            _store(var, feeds[name])
            touched.append(var)
        with quiet():
            for op in function.operations:
                if op.op_type == "const":
                    continue
                for var, value in zip(op.outputs, _evaluate(op)):
                    if tuple(np.shape(value)) != tuple(var.shape):
                        raise TargetError(f"MIL op {op.name} produced shape {np.shape(value)}, the program "
                                          f"declares {var.shape}.", "report this with the package.")
                    _store(var, value)
                    touched.append(var)
        return {o.name: np.array(o.val) for o in function.outputs}
    finally:
        for var in touched:  # the program is the session: leave no values behind for the next run
            var._sym_val = None
