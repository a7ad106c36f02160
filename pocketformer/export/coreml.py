"""CoreML: torch.jit.trace -> coremltools ML program (.mlpackage) at fixed shapes, one package per graph, in fp32 and
fp16 compute, plus int8 weights (and optionally k-means palettized weights) for the linear, conv and embedding ops
only. Packages are checked in Core ML on macOS, elsewhere in the MIL reference execution of
pocketformer.targets.coreml_ref (which checks the graph and weights, not Apple's runtime). Reading a package back
(`load_program`) is the format's knowledge, used by `describe` and by that reference runtime. The card (export/card.py)
goes into the spec's metadata and feature descriptions; a package cannot hold files, so the tokenizer stays beside it.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .. import __version__, progress
from ..errors import ExportError, TargetError
from ..models.causal import fp16_safe_norms
from . import sparse as sparse_storage
from .base import Format, Plan, Tolerance, Written, tree_sha256
from .card import Card, from_metadata

# Weights may be compressed only where an op uses them as weights. Applied to every const, compression also hits
# constant mask/position tensors and yields NaN or garbage (METHODS.md).
WEIGHT_OPS = ("linear", "conv", "gather")
PALETTIZE_OPS = ("linear",)
WEIGHT_THRESHOLD = 2048  # tensors with fewer elements stay float (biases, norms, tiny classifiers)
FP32_MAX_ABS = 1e-3
FP32_MIN_COSINE = 0.9999
PAL_MIN_COSINE = 0.98
_FIXES = {"fp32": "report this with the model's pocketformer.json.",
          "fp16": "report this with the model's pocketformer.json (its activations may overflow fp16).",
          "int": "skip int8 for this model (`--no-int8`): its outputs do not survive int8 weights.",
          "int4": "leave out int4: this model's outputs do not survive 4-bit weights.",
          "pal": "use more palette bits (6 or 8), or no palettization."}


def on_macos() -> bool:
    return platform.system() == "Darwin"


def quiet():
    """coremltools prints a warning per missing native library and version it has not tested, on every import."""
    return progress.quiet("coremltools", stderr=True)


def coremltools():
    with quiet():
        import coremltools

    return coremltools


def load_program(path: Path):
    """The saved package's MIL program: its spec plus the weights file, no Core ML runtime needed."""
    ct = coremltools()
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


def _precision(ct, name: str):
    table = {"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}
    if name not in table:
        raise ExportError(f"CoreML compute precision {name!r} is not supported.", f"use one of {sorted(table)}.")
    return table[name]


def _target(ct, name: str):
    if not hasattr(ct.target, name):
        raise ExportError(f"CoreML deployment target {name!r} is unknown.",
                          "use one coremltools knows, e.g. iOS16, iOS17, iOS18, macOS14.")
    return getattr(ct.target, name)


def convert_module(module: torch.nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                   output_names: list[str], precision: str, deployment_target: str = "iOS17",
                   classes: Optional[Sequence[str]] = None):
    """An in-memory ML program of any module taking `example` positionally, at its shapes (integers as int32).
    `classes`: a Core ML classifier whose module returns probabilities (batch 1) in the classes' order; its outputs
    are then Core ML's classLabel (the most probable class) and classLabel_probs (class -> probability)."""
    ct = coremltools()
    classifier = ct.ClassifierConfig(list(classes)) if classes else None
    types = [ct.TensorType(name=n, shape=tuple(t.shape),
                           dtype=np.int32 if not t.is_floating_point() else np.float32)
             for n, t in zip(input_names, example)]
    with quiet():
        try:
            traced = torch.jit.trace(module.eval(), example)
            return ct.convert(traced, inputs=types, outputs=[ct.TensorType(name=n) for n in output_names],
                              convert_to="mlprogram", compute_precision=_precision(ct, precision),
                              minimum_deployment_target=_target(ct, deployment_target), skip_model_load=True,
                              classifier_config=classifier)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"coremltools could not convert the model: {str(e).splitlines()[0][:300]}",
                              "report this with the checkpoint's pocketformer.json.") from None


# -- a decoder's KV cache as Core ML states ------------------------------------------------------------------------

SIGNATURES_KEY = "signatures"  # user metadata (not the card's: annotate rewrites those): signature -> its tokens
STATE_TARGET = "iOS18"  # the first OS whose Core ML has states (read_state, coreml_update_state)


def stateful(plan: Plan) -> bool:
    """Are the plan's graphs a decoder's prefill and decode over a fixed cache (export/kv_cache.py), which CoreML
    writes as one package with the cache as states?"""
    graph = plan.graphs.get("prefill")
    return graph is not None and hasattr(graph.module.model, "slice_update")


def write_in_place(cache: torch.Tensor, new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """A fixed-cache decoder's cache write (models/causal.py) into a registered buffer, in place: coremltools turns
    it into read_state -> slice_update -> coreml_update_state. States are fp16 (Core ML allows no other dtype)."""
    cache[:, :, start[0]:start[0] + new.shape[2]] = new.to(cache.dtype)
    return cache.to(new.dtype)


class StatefulDecoder(torch.nn.Module):
    """A fixed-cache decoder whose caches are fp16 buffers updated in place: (tokens, input_pos) -> logits."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder
        self.cache = [t for t in decoder.io.inputs if t.name.startswith("kv_cache_")]
        for t in self.cache:
            self.register_buffer(t.name, torch.zeros(t.axes, dtype=torch.float16))

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.decoder(tokens, input_pos, *[getattr(self, t.name) for t in self.cache])[-1]


def convert_stateful(decoder: torch.nn.Module, precision: str, deployment_target: str):
    """One ML program for both of a decoder's graphs: its token axis flexible from 1 (decode) to the prefill length,
    every layer's cache a state. `decoder` is the prefill FixedCacheDecoder."""
    ct = coremltools()
    tokens = decoder.io.inputs[0].axes[1]
    target = max(_target(ct, deployment_target), _target(ct, STATE_TARGET))
    decoder.slice_update = write_in_place
    try:
        wrapper = StatefulDecoder(decoder).eval()
        safe = fp16_safe_norms(wrapper) if precision == "fp16" else contextlib.nullcontext()
        example = (torch.zeros(1, tokens, dtype=torch.int32), torch.arange(tokens, dtype=torch.int32))
        axis = ct.RangeDim(1, tokens, default=tokens)
        with quiet():
            try:
                with safe:
                    traced = torch.jit.trace(wrapper, example)
                program = ct.convert(
                    traced, inputs=[ct.TensorType("tokens", shape=(1, axis), dtype=np.int32),
                                    ct.TensorType("input_pos", shape=(axis,), dtype=np.int32)],
                    outputs=[ct.TensorType(name="logits")],
                    states=[ct.StateType(wrapped_type=ct.TensorType(shape=t.axes, dtype=np.float16), name=t.name)
                            for t in wrapper.cache],
                    convert_to="mlprogram", compute_precision=_precision(ct, precision),
                    minimum_deployment_target=target, skip_model_load=True)
            except Exception as e:
                raise ExportError(f"coremltools could not convert the decoder with its cache as states: "
                                  f"{str(e).splitlines()[0][:300]}",
                                  "report this with the checkpoint's pocketformer.json.") from None
    finally:
        del decoder.slice_update
    program.user_defined_metadata[SIGNATURES_KEY] = json.dumps({"prefill": tokens, "decode": 1})
    return program, target.name


def _weight_config(op_config, op_types: tuple[str, ...]):
    from coremltools.optimize.coreml import OptimizationConfig

    # No global config: a const is compressed only if every op that reads it is of one of these types.
    return OptimizationConfig(global_config=None, op_type_configs={t: op_config for t in op_types})


def quantize_int8(mlmodel):
    """Per-channel symmetric int8 weights of linear/conv/gather ops; compute precision unchanged."""
    import coremltools.optimize.coreml as cto

    op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                     weight_threshold=WEIGHT_THRESHOLD)
    with quiet():
        return cto.linear_quantize_weights(mlmodel, config=_weight_config(op, WEIGHT_OPS))


def quantize_int4(mlmodel):
    """Blockwise symmetric int4 weights (blocks of 32 along the input axis) of linear/conv/gather ops: Core ML's
    per-block quantization, iOS 18 and later."""
    import coremltools.optimize.coreml as cto

    op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32,
                                     weight_threshold=WEIGHT_THRESHOLD)
    with quiet():
        return cto.linear_quantize_weights(mlmodel, config=_weight_config(op, WEIGHT_OPS))


def palettize(mlmodel, nbits: int):
    """k-means palettized weights (2^nbits values per tensor) of linear ops only.

    scikit-learn's KMeans fits in float64 whatever the weights' dtype, so fp16 weights are clustered at full
    precision (unlike float16 percentiles under numpy 2, which return NaN).
    """
    import coremltools.optimize.coreml as cto

    op = cto.OpPalettizerConfig(mode="kmeans", nbits=nbits, granularity="per_tensor",
                                weight_threshold=WEIGHT_THRESHOLD)
    with quiet():
        return cto.palettize_weights(mlmodel, config=_weight_config(op, PALETTIZE_OPS))


def convert_like(record: dict[str, Any], module: torch.nn.Module, example: tuple[torch.Tensor, ...],
                 input_names: list[str], output_names: list[str], classes: Optional[Sequence[str]] = None):
    """An ML program of `module` made as the package of `record` (its artifacts.json record) was: the same compute
    precision and deployment target, then its int8 weights or palette, then sparse storage where it has some."""
    options, precision = record.get("coreml") or {}, record["precision"]
    program = convert_module(module, example, input_names, output_names,
                             options.get("compute_precision", precision if precision in ("fp32", "fp16") else "fp16"),
                             options.get("deployment_target", "iOS17"), classes)
    if precision == "int8":
        program = quantize_int8(program)
    elif precision.startswith("pal"):
        program = palettize(program, int(precision[3:]))
    if (record.get("sparse_storage") or {}).get("tensors"):
        program, _ = coreml_sparse_weights(program, quantized=precision == "int8")
    return program


def dims(shape) -> list:
    """A MIL shape as JSON: fixed sizes, and "flexible" for an axis of a range (a decoder's token axis)."""
    return [int(d) if isinstance(d, (int, np.integer)) else "flexible" for d in shape]


def describe(path: Path) -> dict[str, Any]:
    """Inputs/outputs with shapes, op counts, how many ops compute in fp16 vs fp32, and the weights by dtype."""
    from coremltools.converters.mil.mil import types

    program = load_program(path)
    fn = program.functions["main"]
    ops = list(fn.operations)
    compute = [op for op in ops if op.op_type != "const" and not op.op_type.startswith("constexpr_")]
    precision = Counter(types.builtin_to_string(op.outputs[0].dtype) for op in compute)
    weight_bytes: Counter = Counter()
    weights = 0
    for op in ops:
        if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray) and op.outputs[0].val.size > 1:
            weight_bytes[types.builtin_to_string(op.outputs[0].dtype)] += op.outputs[0].val.nbytes
            decompressed = any(c.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops)
            weights += 0 if decompressed else op.outputs[0].val.size  # counted once, as the dense tensor below
        elif op.op_type.startswith("constexpr_") and not any(c.op_type.startswith("constexpr_")
                                                             for c in op.outputs[0].child_ops):
            weights += int(np.prod(op.outputs[0].shape))
    weight_file = Path(path) / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    states = [n for n, v in fn.inputs.items() if types.is_state(v.sym_type)]
    return {"inputs": {n: dims(v.shape) for n, v in fn.inputs.items()},
            "input_dtypes": {n: types.builtin_to_string(v.dtype) for n, v in fn.inputs.items()},
            "outputs": {o.name: dims(o.shape) for o in fn.outputs},
            **({"states": states, "min_ios": "iOS18"} if states else {}),
            "ops": dict(Counter(op.op_type for op in ops if op.op_type != "const").most_common()),
            "op_precision": {k: precision[k] for k in sorted(precision)},
            "weights": weights,
            "weight_bytes_by_dtype": {k: weight_bytes[k] for k in sorted(weight_bytes)},
            "weight_file_bytes": weight_file.stat().st_size if weight_file.is_file() else 0,
            "opset": fn.opset_version.name if fn.opset_version is not None else None}


# -- the card (export/card.py) in the spec ---------------------------------------------------------------------------

AUTHOR = "pocketformer"
# coremltools stamps the day of conversion into every package: a re-export on another day would differ by it alone.
UNSTABLE_KEYS = ("com.github.apple.coremltools.conversion_date",)


def spec_file(path: Path) -> Path:
    """The package's spec (model.mlmodel), as its Manifest.json names it."""
    path = Path(path)
    manifest = json.loads((path / "Manifest.json").read_text())
    root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
    return path / "Data" / root


def read_spec(path: Path):
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file(path).read_bytes())
    return spec


def write_card(path: Path, card: Card, tokenizer_dir: Optional[str] = None) -> None:
    """Write `card` into a package's spec in place: author, license (when the provenance names one), description,
    version, each input's and output's meaning, and card.metadata() as user-defined metadata. Only the spec file
    changes (weights, int8, palettes and sparse storage stay as they are), serialised deterministically.
    `tokenizer_dir`: where the tokenizer files are relative to the package, when not card.tokenizer_dir."""
    spec = read_spec(path)
    meta = spec.description.metadata
    meta.author = AUTHOR
    if card.provenance.get("license"):
        meta.license = str(card.provenance["license"])
    meta.shortDescription = card.description()
    meta.versionString = str(card.provenance.get("pocketformer", __version__))
    props = card.metadata()
    if tokenizer_dir is not None and card.tokenizer is not None:
        props["pocketformer.tokenizer_dir"] = tokenizer_dir
    for key in [k for k in meta.userDefined if k.startswith("pocketformer.") or k in UNSTABLE_KEYS]:
        del meta.userDefined[key]
    meta.userDefined.update(props)
    meanings = {t["name"]: t["meaning"] for t in card.inputs}
    for feature in spec.description.input:
        feature.shortDescription = meanings.get(feature.name, "")
    labels = ", ".join(card.labels)
    for feature in spec.description.output:
        if feature.name == spec.description.predictedFeatureName:
            feature.shortDescription = f"the most probable label, one of: {labels}"
        elif feature.name == spec.description.predictedProbabilitiesName:
            feature.shortDescription = f"each label's probability (softmax of the logits): {labels}"
        else:
            feature.shortDescription = _output_meaning(card)
    spec_file(path).write_bytes(spec.SerializeToString(deterministic=True))


def _output_meaning(card: Card) -> str:
    out = card.output
    if card.labels:
        return f"{out.get('meaning')}: {', '.join(card.labels)}"
    return (f"{out.get('meaning')}: {out.get('dim')} values" + (", L2-normalised" if out.get("normalized") else ""))


def class_labels(spec) -> list:
    """The labels of an ML program classifier, in probability order: the `classes` of its classify op (Core ML keeps
    them there, not in the description)."""
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                if op.type != "classify":
                    continue
                values = op.inputs["classes"].arguments[0].value.immediateValue.list.values
                return [_scalar(v.immediateValue.tensor) for v in values]
    return []


def _scalar(tensor):
    for kind in ("strings", "longInts", "ints"):
        values = getattr(tensor, kind).values
        if len(values):
            return values[0]
    return None


def read_card(path: Path) -> Optional[dict[str, Any]]:
    """The card in a package's metadata, plus "tokenizer_location" and, for a classifier, its spec's labels and
    output names (`classifier`); None when the package carries no card."""
    spec = read_spec(path)
    card = from_metadata(dict(spec.description.metadata.userDefined))
    if card is None:
        return None
    if card.get("tokenizer_dir"):
        card["tokenizer_location"] = f"beside: {card['tokenizer_dir']}/"
    d = spec.description
    if d.predictedFeatureName:
        card["classifier"] = {"labels": class_labels(spec), "outputs": [o.name for o in d.output],
                              "predicted_feature": d.predictedFeatureName,
                              "probabilities": d.predictedProbabilitiesName}
    return card


# -- sparse storage (export/sparse.py) ---------------------------------------------------------------------------------------------------------

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
                left_dense += bool(nnz <= (1 - sparse_storage.ZERO_HEAVY) * value.size)
                continue
            configs[op.name] = cto.OpThresholdPrunerConfig(threshold=0.0, minimum_sparsity_percentile=0.0,
                                                           weight_threshold=sparse_storage.MIN_ELEMENTS - 1)
            converted.append((dense_bytes, sparse_bytes))
    why = "int8 weights stored sparse need an iOS18 (or later) deployment target" if quantized and not joint else \
        "a one-bit mask and the kept values would not be smaller at its density"
    result = sparse_storage.summary("CoreML constexpr_sparse_to_dense (values + 1-bit mask)", converted, left_dense, why)
    if not configs:
        return mlmodel, result
    with quiet():
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
    return (value, itemsize) if value.size >= sparse_storage.MIN_ELEMENTS else None


class CoreML(Format):
    name, extension, runtime = "coreml", ".mlpackage", "coreml-mil-reference"
    option_names = ("compute_precision", "deployment_target", "palettize_bits", "int4")
    float_precisions, int8_precisions = ("fp32", "fp16"), ("int8",)
    fp32_tolerance = Tolerance(FP32_MAX_ABS, FP32_MIN_COSINE)

    def check_options(self, options: dict[str, Any]) -> None:
        if options.get("compute_precision", "fp16") not in ("fp32", "fp16"):
            raise ExportError(f"CoreML compute precision {options['compute_precision']!r} is not supported.",
                              "use fp16 or fp32.")

    def precisions(self, int8: bool, options: dict[str, Any]) -> list[str]:
        bits = options.get("palettize_bits")
        return super().precisions(int8, options) + (["int4"] if options.get("int4") else []) + \
            ([f"pal{bits}"] if bits else [])

    def tolerance(self, precision: str, plan: Optional[Plan] = None) -> Tolerance:
        if precision.startswith("pal"):
            return Tolerance(min_cosine=PAL_MIN_COSINE)
        if precision == "fp32" and plan is not None and stateful(plan):  # its cache is fp16: direction, not digits
            return Tolerance(min_cosine=FP32_MIN_COSINE)
        return super().tolerance(precision)

    def fix(self, precision: str) -> str:
        return _FIXES.get(precision, _FIXES.get(precision[:3], _FIXES["fp32"]))

    def write(self, plan: Plan, precision: str, paths: dict[str, Path]) -> list[Written]:
        """fp32 and fp16 convert each graph; int8 and palettes compress the program of the compute precision
        (fp16 unless options say fp32). Sparse storage for fp32, fp16 and (iOS18+) int8; palettes stay dense."""
        compute = plan.options.get("compute_precision", "fp16")
        target = plan.options.get("deployment_target", "iOS17")
        if stateful(plan):
            return self.write_stateful(plan, precision, paths, compute, target)
        written = []
        t0 = time.perf_counter()
        for name, graph in plan.graphs.items():
            if precision in ("fp32", "fp16"):
                program = convert_module(graph.module, plan.examples[name], graph.io.input_names,
                                         graph.io.output_names, precision, target)
                info: dict[str, Any] = {"compute_precision": precision}
            elif precision == "int8":
                program = quantize_int8(plan.state[(compute, name)])
                info = {"compute_precision": compute, "weights": "int8 per-channel symmetric",
                        "compressed_ops": list(WEIGHT_OPS)}
            elif precision == "int4":
                if _target(coremltools(), target) < _target(coremltools(), STATE_TARGET):
                    raise ExportError(f"CoreML int4 (per-block) needs iOS 18; this export targets {target}.",
                                      "set the CoreML option deployment_target: iOS18, or leave out int4.")
                program = quantize_int4(plan.state[(compute, name)])
                info = {"compute_precision": compute, "weights": "int4 per-block (32) symmetric",
                        "compressed_ops": list(WEIGHT_OPS)}
            else:
                bits = plan.options["palettize_bits"]
                program = palettize(plan.state[(compute, name)], bits)
                info = {"compute_precision": compute, "weights": f"{bits}-bit k-means palette per tensor",
                        "compressed_ops": list(PALETTIZE_OPS)}
            plan.state[(precision, name)] = program
            storage = None
            if plan.sparse and precision in ("fp32", "fp16", "int8"):
                program, storage = coreml_sparse_weights(program, quantized=precision == "int8")
            with quiet():
                program.save(str(paths[name]))
            written.append(Written(name, paths[name], None, storage))
        info["build_seconds"] = round(time.perf_counter() - t0, 2)
        plan.state[("info", precision)] = info
        return written

    def write_stateful(self, plan: Plan, precision: str, paths: dict[str, Path], compute: str,
                       target: str) -> list[Written]:
        """A decoder's prefill and decode graphs (export/kv_cache.py) as one stateful package: the token axis
        flexible (1 for decode, up to the prefill length), the KV cache as fp16 Core ML states. The reference
        runtime (targets/coreml_ref.py) takes and gives the states under the cache's names, so the package is
        checked like a file whose cache is an input and an output."""
        t0 = time.perf_counter()
        path = paths["prefill"]
        if precision in ("fp32", "fp16"):
            program, target = convert_stateful(plan.graphs["prefill"].module.model, precision, target)
            info: dict[str, Any] = {"compute_precision": precision, "deployment_target": target}
        elif precision in ("int8", "int4"):
            program = (quantize_int8 if precision == "int8" else quantize_int4)(plan.state[(compute, "prefill")])
            info = {"compute_precision": compute, "deployment_target": plan.state[("target", compute)],
                    "weights": "int8 per-channel symmetric" if precision == "int8" else
                    "int4 per-block (32) symmetric", "compressed_ops": list(WEIGHT_OPS)}
        else:
            bits = plan.options["palettize_bits"]
            program = palettize(plan.state[(compute, "prefill")], bits)
            info = {"compute_precision": compute, "deployment_target": plan.state[("target", compute)],
                    "weights": f"{bits}-bit k-means palette per tensor", "compressed_ops": list(PALETTIZE_OPS)}
        plan.state[(precision, "prefill")] = program
        plan.state[("target", precision)] = info["deployment_target"]
        with quiet():
            program.save(str(path))
        info.update(kv_cache="Core ML states, fp16", build_seconds=round(time.perf_counter() - t0, 2))
        plan.state[("info", precision)] = info
        return [Written(graph, path, graph) for graph in plan.graphs]

    def record_extras(self, plan: Plan, precision: str) -> dict[str, Any]:
        fixed = plan.fixed or {}
        shape = [fixed["batch"]] + ([fixed["sequence"]] if "sequence" in fixed else [])
        return {"coreml": {"deployment_target": plan.options.get("deployment_target", "iOS17"), "shape": shape,
                           **plan.state[("info", precision)]}}

    def describe(self, path: Path) -> dict[str, Any]:
        return describe(path)

    def annotate(self, path: Path, card: Card, precision: str) -> None:
        write_card(path, card)

    def read_card(self, path: Path) -> Optional[dict[str, Any]]:
        return read_card(path)

    def content_sha256(self, path: Path) -> str:
        """Over the package's files without Manifest.json (random item UUIDs on every save), the spec re-serialised
        deterministically (coremltools writes protobuf maps in arbitrary order): equal for the same model."""
        from coremltools.proto import Model_pb2

        def canonical(f: Path) -> bytes:
            if f.suffix != ".mlmodel":
                return f.read_bytes()
            spec = Model_pb2.Model()
            spec.ParseFromString(f.read_bytes())
            return spec.SerializeToString(deterministic=True)

        return tree_sha256(path, skip=("Manifest.json",), content=canonical)
