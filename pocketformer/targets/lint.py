"""Deployability lint: what will hurt when this artifact ships to this target, each finding with a fix.

Reads the artifact (never trusts its name) and the target profile: dynamic shapes where the runtime wants static
ones, ops outside the target delegate's list or beyond its runtime's op versions / opset, a file over the size
budget, int8 where int8 buys no speed (measured on this host for a this_host profile, as declared for a device). A
file of a format the target does not run is not linted at all: that is a TargetError (one line, exit 2), as is a
file that is not what its extension says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PocketformerError, TargetError
from ..export import FORMATS
from ..export.base import artifact_size, first_line, format_of
from . import Profile, tflite_legacy
from .int8_speed import PROBE, Probe, int8_speed, speeds_up
from .int8_speed import describe as describe_speed


@dataclass
class Finding:
    severity: str  # "error": will not run or breaks a budget; "warning": runs, but slower or riskier than it could;
    # "info": what the file bakes in that the app must honour (a language model's KV cache)
    check: str
    message: str
    fix: str

    def line(self) -> str:
        return f"{self.severity.upper():7} {self.check}: {self.message} Fix: {self.fix}"


def artifact_format(path: Path) -> str:
    fmt = format_of(path)
    if fmt is None:
        raise TargetError(f"{path} is not an artifact pocketformer knows "
                          f"({', '.join(f.extension for f in FORMATS.values())}).",
                          "pass a file written by `pocketformer export`.")
    if not Path(path).exists():
        raise TargetError(f"Artifact {path} does not exist.", "check the path, or run `pocketformer export`.")
    return fmt


def describe(path: Path, fmt: str) -> dict[str, Any]:
    """The format's description of the file; a file that is not one (garbage under the extension, a cut-short
    download) is one clear error, whatever the format's reader raises."""
    fix = "pass a file written by `pocketformer export`, or export it again."
    try:
        desc = FORMATS[fmt].describe(Path(path))
    except PocketformerError:
        raise
    except Exception as e:
        raise TargetError(f"{Path(path).name} is not a readable {fmt} file ({type(e).__name__}: {first_line(e)}).",
                          fix) from None
    if not desc.get("inputs"):  # e.g. an empty file, which parses as an empty ONNX graph
        raise TargetError(f"{Path(path).name} is not a readable {fmt} file (it declares no inputs).", fix)
    return desc


def lint(path: Path, profile: Profile, int8_probe: Probe = PROBE) -> list[Finding]:
    """`int8_probe`: the model int8's speed is measured with on a this_host profile (tests pass a smaller one)."""
    path = Path(path)
    fmt = artifact_format(path)
    out: list[Finding] = []
    if fmt != profile.format:  # nothing else can be judged: the target would not even open the file
        raise TargetError(f"{path.name} is {fmt}; target {profile.name} runs {profile.format} files "
                          f"({profile.runtime}).", f"lint the {profile.format} file instead; write one with "
                                                   f"`pocketformer export OUT/ --to {profile.format}`.")
    desc = describe(path, fmt)
    lm = language_model(desc)
    if lm:
        out.extend(_lm_findings(desc, profile))
    # shapes (a stateful CoreML decoder's token axis is a declared range: _lm_findings says what it costs)
    dynamic = {name: dims for name, dims in desc["inputs"].items()
               if any((not isinstance(d, int) or d <= 0) and not (lm and d == "flexible") for d in dims)}
    if dynamic and profile.static_shapes:
        out.append(Finding("error", "dynamic-shapes", f"inputs {', '.join(dynamic)} have dynamic axes "
                                                       f"({dynamic}); {profile.runtime} on {profile.name} needs "
                                                       "static shapes.",
                           f"pocketformer export OUT/ --to {fmt} --static {profile.batch}x{profile.seq_len}"))
    if not dynamic and not lm:
        first = next(iter(desc["inputs"].values()))
        want = [profile.batch, profile.seq_len][:len(first)] if len(first) == 2 else None
        if want and list(first) != want:
            out.append(Finding("warning", "shape", f"the file is fixed at {first}, the profile runs "
                                                   f"{want}: inputs will be padded, truncated or rejected.",
                               f"pocketformer export OUT/ --to {fmt} --static {profile.batch}x{profile.seq_len}"))
    # ops
    ops = desc.get("ops", {})
    if profile.delegate_ops is not None:
        outside = sorted(op for op in ops if op not in set(profile.delegate_ops))
        if outside:
            out.append(Finding("warning", "delegate-ops", f"{len(outside)} op types fall outside the "
                                                          f"{profile.delegate or 'delegate'} and run on slower "
                                                          f"fallback kernels: {', '.join(outside)}.",
                               "keep the model's forward to supported ops, or measure with `pocketformer validate` "
                               "to see what the fallback costs."))
    if profile.legacy_runtime and fmt == tflite_legacy.FORMAT and not lm:  # LM apps embed LiteRT-LM, not 2.14
        out.extend(_legacy_findings(path, desc, profile))
    if profile.max_opset and desc.get("opset") and desc["opset"] > profile.max_opset:
        out.append(Finding("error", "opset", f"the file uses opset {desc['opset']}; "
                                             f"{profile.runtime_version or profile.runtime} supports up to "
                                             f"{profile.max_opset}.",
                           "re-export with a lower opset, or update the runtime on the device."))
    # budgets and precision
    size = artifact_size(path) / 1e6
    budget = (profile.language_models.budgets.size_mb if profile.language_models else None) if lm else \
        profile.budgets.size_mb
    if budget is not None and size > budget:
        out.append(Finding("error", "size", f"{size:.1f} MB is over the {budget:g} MB budget.",
                           "quantize weights (int8: about 4x smaller; int4 for a language model) or prune more."))
    if FORMATS[fmt].holds_int8(path, desc) and not lm:  # an LM's decode speed is measured by validate instead
        out.extend(_int8_speed_findings(profile, int8_probe))
    return out


def language_model(desc: dict[str, Any]) -> bool:
    """Is the file a decoder with a KV cache (ONNX past/present, a fixed cache's kv_cache_*, or Core ML states)?"""
    names = list(desc["inputs"]) + list(desc.get("states", []))
    return any(n.startswith(("past_key_values.", "kv_cache_")) for n in names)


def _lm_findings(desc: dict[str, Any], profile: Profile) -> list[Finding]:
    """What a language model's file bakes in: its KV cache's layout and largest context, and (CoreML) the OS its
    state ops need."""
    inputs, out = desc["inputs"], []
    past = [n for n in inputs if n.startswith("past_key_values.")]
    fixed = [n for n in dict.fromkeys((*inputs, *desc.get("states", []))) if n.startswith("kv_cache_")]
    if past:
        out.append(Finding("info", "kv-cache", f"{len(past) // 2} layers' past keys and values go in and present "
                                               f"ones come out ({past[0]}: {inputs[past[0]]}), the ONNX Runtime "
                                               "GenAI / Optimum layout; the context grows with each step.",
                           "feed each step's present.N.* back as past_key_values.N.* (pocketformer generate does)."))
    if fixed:
        shape = inputs.get(fixed[0]) or []
        context = shape[2] if len(shape) == 4 else "?"
        tokens = (inputs.get("tokens") or [None, None])[1]
        where = "Core ML states" if desc.get("states") else "inputs and outputs of the same name"
        chunk = f"{tokens} tokens" if isinstance(tokens, int) else "up to its chunk of tokens"
        out.append(Finding("info", "kv-cache", f"{len(fixed) // 2} layers' caches of {context} slots each "
                                               f"((1, kv_heads, {context}, head_dim), {where}): a prompt plus its "
                                               f"continuation longer than {context} tokens is refused; prefill takes "
                                               f"{chunk} a call.",
                           "export again with a longer context if the app needs one."))
    if desc.get("states"):
        need = desc.get("min_ios", "iOS18")
        have = profile.deployment_target
        if have and _ios(have) < _ios(need):
            out.append(Finding("error", "coreml-states", f"the KV cache is Core ML state (read_state / "
                                                         f"coreml_update_state), which needs {need}; {profile.name} "
                                                         f"deploys to {have}.",
                               f"raise the app's deployment target to {need} (iOS 18 / macOS 15)."))
        out.append(Finding("warning", "flexible-shape", "the token axis is a range (prefill up to the prompt "
                                                        "chunk, decode one token): the Neural Engine may leave "
                                                        "flexible shapes to the GPU or CPU.",
                           "measure on the device with Xcode's performance report."))
    return out


def _ios(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 0


def _int8_speed_findings(profile: Profile, probe: Probe) -> list[Finding]:
    """int8 that buys no speed: on this host, as measured (targets/int8_speed.py); on a device, as its profile
    declares. Never from a constant where it can be measured."""
    fix = "use int8 only if size matters; for speed, prune or factorize (smaller matmuls)."
    if profile.this_host:
        measured = int8_speed(profile, probe)
        if speeds_up(measured):
            return []
        return [Finding("warning", "int8-speed", f"{describe_speed(measured)}: int8 buys size here, not speed, and "
                                                 "costs some accuracy.", fix)]
    if profile.int8_speedup is None:
        return [Finding("warning", "int8-speed", f"{profile.name} does not declare whether int8 runs faster than "
                                                 "fp32 on the device: int8 may buy size only.",
                        f"declare int8_speedup: true/false in the profile; {fix}")]
    if profile.int8_speedup:
        return []
    return [Finding("warning", "int8-speed", f"{profile.name} has no int8 acceleration (declared by the profile): "
                                             "int8 buys size there, not speed, and costs some accuracy.", fix)]


def _legacy_findings(path: Path, desc: dict[str, Any], profile: Profile) -> list[Finding]:
    """Run the file in the legacy runtime (its own environment) on deterministic inputs: measured, not a table."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for name, dims in desc["inputs"].items():
        dtype = desc.get("input_dtypes", {}).get(name, "FLOAT32")
        if name == "attention_mask":
            feeds[name] = np.ones(dims, dtype=np.int64)
        elif dtype.startswith("INT"):
            feeds[name] = rng.integers(1000, 2000, size=dims).astype(np.int64)
        else:
            feeds[name] = rng.standard_normal(dims).astype(np.float32)
    result = tflite_legacy.check(path, feeds)
    if not result["loads"]:
        return [Finding("error", "legacy-runtime", f"{result['runtime']} cannot load the file: {result['error']}",
                        "ship fp32 or int8 weight-only .tflite to apps on that runtime, or update their runtime.")]
    if not result.get("outputs_agree"):
        return [Finding("error", "legacy-runtime", result["error"] or f"{result['runtime']} fails on the file.",
                        "do not ship this precision to apps embedding that runtime: use fp32 or int8 weight-only.")]
    return []
