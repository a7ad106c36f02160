"""CoreML ML programs (.mlpackage): the runtime module for format "coreml".

On macOS, Core ML itself runs the package (`MLModel.predict`). Everywhere else Core ML does not exist (predict,
compile and MLComputePlan all need macOS), so the saved package is loaded back as a MIL program and executed op by op
in numpy, with coremltools' own per-op value inference where it exists and works, and small numpy/torch kernels for
the few ops where it does not. Values stay float32 between ops, rounded to float16 after every op the program computes
in fp16. That checks the converted graph and its weights, not Apple's runtime or Neural Engine numerics, and measures
no latency: every result made this way carries LABEL. A classifier package (ct.ClassifierConfig) runs too: its
outputs are, as Core ML returns them, the class label and a dict of each class's probability.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import TargetError
from ..export.coreml import coremltools, load_program, on_macos, quiet
from .runtime import Runtime, Session

LABEL = "MIL reference execution, not Apple runtime"
APPLE = "Apple Core ML runtime"


def execution() -> str:
    """What runs the packages here: Apple's runtime on macOS, the MIL reference elsewhere."""
    return APPLE if on_macos() else LABEL


def _spec_dtype(code: int):
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType as A

    return {A.FLOAT32: np.float32, A.DOUBLE: np.float64, A.FLOAT16: np.float16, A.INT32: np.int32}[code]


class CoreMLSession(Session):
    """A loaded package: Apple's MLModel on macOS, else the MIL program's main function."""

    def __init__(self, path: Path, apple_model=None, program=None):
        self.apple_model = apple_model
        self.function = program.functions["main"] if program is not None else None
        if apple_model is not None:
            spec = apple_model.get_spec()
            ins = spec.description.input
            super().__init__(path, {i.name: list(i.type.multiArrayType.shape) for i in ins},
                             {i.name: _spec_dtype(i.type.multiArrayType.dataType) for i in ins},
                             [o.name for o in spec.description.output])
        else:
            from coremltools.converters.mil.mil import types

            fn = self.function
            super().__init__(path, {n: list(v.shape) for n, v in fn.inputs.items()},
                             {n: types.nptype_from_builtin(v.dtype) for n, v in fn.inputs.items()},
                             [o.name for o in fn.outputs])

    def invoke(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.apple_model is not None:  # a classifier's label (str, int) and probabilities (dict) stay as they are
            return {k: v if isinstance(v, (str, int, dict)) else np.asarray(v)
                    for k, v in self.apple_model.predict(feeds).items()}
        return execute(self.function, feeds)


class CoreMLReference(Runtime):
    """Format "coreml". On macOS, Core ML itself runs the package; elsewhere the MIL reference interpreter below,
    which measures no latency and checks a few examples per file at export (seconds per example)."""

    name = "coreml-mil-reference"
    format = "coreml"
    check_examples = None if on_macos() else 4

    @property
    def measures_latency(self) -> bool:
        return on_macos()  # no latency is ever shown for CoreML off macOS

    def no_latency(self) -> str:
        return ("No latency is measured for CoreML off macOS: packages run here only as a "
                f"{LABEL}, whose speed says nothing about a device.")

    def benchmark(self, session, feeds, warmup: int, repeats: int) -> list[float]:
        if not self.measures_latency:
            raise TargetError(self.no_latency(), "measure CoreML latency on a Mac (or an iPhone/iPad through "
                                                 "Xcode's performance report).")
        return super().benchmark(session, feeds, warmup, repeats)

    def version(self) -> str:
        return f"coremltools {coremltools().__version__} ({execution()})"

    def execution(self) -> str:
        return execution()

    def open(self, path: Path, threads: int, *, signature: Optional[str] = None,
             sequential: bool = False) -> CoreMLSession:
        """`threads` is not used: Core ML chooses its own, and the reference runs numpy's."""
        if on_macos():
            ct = coremltools()
            with quiet():
                return CoreMLSession(path, apple_model=ct.models.MLModel(str(path),
                                                                        compute_units=ct.ComputeUnit.ALL))
        return CoreMLSession(path, program=load_program(path))


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


def _classify(op) -> tuple:
    """Core ML's classifier outputs: the most probable class, and each class's probability by class. Like Core ML's
    classifiers it takes one example (the probabilities of every class, whatever their shape)."""
    probs = np.asarray(op.probabilities.val, np.float64).reshape(-1)
    classes = list(op.classes.val)
    return classes[int(probs.argmax())], {c: float(p) for c, p in zip(classes, probs)}


# Ops whose coremltools value inference is missing (classify) or broken under numpy 2.
KERNELS: dict[str, Callable[[Any], Any]] = {
    "classify": _classify,
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


def execute(function, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Run a MIL function on `feeds`; return its outputs by name (arrays; a classifier's label and dict as they
    are: no op reads them, they are the program's outputs)."""
    touched, final = [], {}
    try:
        for name, var in function.inputs.items():
            _store(var, feeds[name])
            touched.append(var)
        with quiet():
            for op in function.operations:
                if op.op_type == "const":
                    continue
                for var, value in zip(op.outputs, _evaluate(op)):
                    if isinstance(value, (str, dict)):
                        final[var.name] = value
                        continue
                    if tuple(np.shape(value)) != tuple(var.shape):
                        raise TargetError(f"MIL op {op.name} produced shape {np.shape(value)}, the program "
                                          f"declares {var.shape}.", "report this with the package.")
                    _store(var, value)
                    touched.append(var)
        return {o.name: final[o.name] if o.name in final else np.array(o.val) for o in function.outputs}
    finally:
        for var in touched:  # the program is the session: leave no values behind for the next run
            var._sym_val = None
