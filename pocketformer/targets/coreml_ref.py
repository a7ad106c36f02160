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
    """A loaded package: Apple's MLModel on macOS, else the MIL program's main function.

    A stateful package (a decoder's KV cache as Core ML states) is driven like a file whose cache is an input and an
    output: feeds named after its states set them before the run, and the run returns them after it. Its flexible
    token axis takes the size its `signature` names in the package's metadata (prefill: the prefill length; decode:
    one token)."""

    def __init__(self, path: Path, apple_model=None, program=None, signature: Optional[str] = None):
        import json

        from ..export.coreml import SIGNATURES_KEY, read_spec

        self.apple_model = apple_model
        self.function = program.functions["main"] if program is not None else None
        spec = apple_model.get_spec() if apple_model is not None else read_spec(path)
        sizes = json.loads(spec.description.metadata.userDefined.get(SIGNATURES_KEY, "{}"))
        if signature is not None and signature not in sizes:
            raise TargetError(f"{Path(path).name} has no signature {signature!r}"
                              f"{' (it has ' + ', '.join(sizes) + ')' if sizes else ''}.",
                              "open it without a signature.")
        flexible = sizes.get(signature) if signature is not None else max(sizes.values(), default=None)
        self.states = {s.name: list(s.type.stateType.arrayType.shape) for s in spec.description.state}
        inputs, dtypes = {}, {}
        for i in spec.description.input:
            array = i.type.multiArrayType
            shape = list(array.shape)
            if array.shapeRange.sizeRanges:  # a flexible axis: the signature's size
                shape = [int(r.lowerBound) if r.lowerBound == r.upperBound else flexible
                         for r in array.shapeRange.sizeRanges]
            inputs[i.name], dtypes[i.name] = shape, _spec_dtype(array.dataType)
        for name, shape in self.states.items():
            inputs[name], dtypes[name] = shape, np.float16
        super().__init__(path, inputs, dtypes, [o.name for o in spec.description.output] + list(self.states))

    def invoke(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        plain = {k: v for k, v in feeds.items() if k not in self.states}
        if self.apple_model is not None:  # a classifier's label (str, int) and probabilities (dict) stay as they are
            state = None
            if self.states:
                state = self.apple_model.make_state()
                for name in self.states:
                    state.write_state(name, feeds[name])
            out = self.apple_model.predict(plain, state=state) if state is not None else \
                self.apple_model.predict(plain)
            out = {k: v if isinstance(v, (str, int, dict)) else np.asarray(v) for k, v in out.items()}
            return {**out, **{name: np.asarray(state.read_state(name)) for name in self.states}}
        states = {name: np.asarray(feeds[name], np.float16) for name in self.states}
        out = execute(self.function, plain, states)
        return {**out, **states}


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
                return CoreMLSession(path, apple_model=ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.ALL),
                                     signature=signature)
        return CoreMLSession(path, program=load_program(path), signature=signature)


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


# Ops whose coremltools value inference is missing (classify), broken under numpy 2, or reads declared shapes.
KERNELS: dict[str, Callable[[Any], Any]] = {
    "classify": _classify,
    "shape": lambda op: np.asarray(np.shape(op.x.val), np.int32),  # value inference gives the declared shape
    "silu": lambda op: op.x.val / (1 + np.exp(-op.x.val)),
    "conv": _conv,
    "gather_nd": _gather_nd,
    "reduce_sum": _reduce(np.sum),
    "reduce_mean": _reduce(np.mean),
    "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min),
    "reduce_prod": _reduce(np.prod),
}


def _store(var, value, retyped: list) -> None:
    """Give a Var a concrete value, the way coremltools' value inference reads its inputs (`var.val`).

    Floats stay float32 between ops (numpy's float16 matmul is slow and accumulates in half precision); an fp16
    var's value is rounded to float16 first, so the program's fp16 storage is honoured. A var of a flexible
    (symbolic) shape takes its value's shape for the run, since value inference reads shapes from the type; it is
    listed in `retyped` with its declared type, to be restored.
    """
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.types.symbolic import any_symbolic

    value = np.asarray(value)
    if types.is_tensor(var.sym_type) and any_symbolic(var.shape):
        retyped.append((var, var.sym_type))
        var._sym_type = types.tensor(var.dtype, tuple(value.shape))
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


def _shape_ok(declared, got) -> bool:
    """Does a value's shape fit its declared shape (a symbolic axis fits any size)?"""
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    return len(declared) == len(got) and all(is_symbolic(d) or int(d) == g for d, g in zip(declared, got))


def execute(function, feeds: dict[str, np.ndarray], states: Optional[dict[str, np.ndarray]] = None
            ) -> dict[str, Any]:
    """Run a MIL function on `feeds`; return its outputs by name (arrays; a classifier's label and dict as they
    are: no op reads them, they are the program's outputs). `states` (name -> fp16 array) are read by read_state
    and replaced by coreml_update_state, in place."""
    touched, final, retyped = [], {}, []
    states = {} if states is None else states
    try:
        for name, var in function.inputs.items():
            if name in states:
                continue
            _store(var, feeds[name], retyped)
            touched.append(var)
        with quiet():
            for op in function.operations:
                if op.op_type == "const":
                    continue
                if op.op_type == "read_state":
                    values: tuple = (states[op.input.name],)
                elif op.op_type == "coreml_update_state":
                    states[op.state.name] = np.asarray(op.value.val).astype(np.float16)
                    values = (op.value.val,)
                else:
                    values = _evaluate(op)
                for var, value in zip(op.outputs, values):
                    if isinstance(value, (str, dict)):
                        final[var.name] = value
                        continue
                    if not _shape_ok(var.shape, np.shape(value)):
                        raise TargetError(f"MIL op {op.name} produced shape {np.shape(value)}, the program "
                                          f"declares {var.shape}.", "report this with the package.")
                    _store(var, value, retyped)
                    touched.append(var)
        return {o.name: final[o.name] if o.name in final else np.array(o.val) for o in function.outputs}
    finally:
        for var in touched:  # the program is the session: leave no values behind for the next run
            var._sym_val = None
        for var, declared in retyped:
            var._sym_type = declared
