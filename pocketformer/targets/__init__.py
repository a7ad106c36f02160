"""Targets: device profiles as data (profiles/*.yaml) and one runtime module per runtime (targets/runtime.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import TargetError, first_error
from ..registry import member_of
from ..verdict import DEFAULT_CONFIDENCE, Confidence
from .runtime import RUNTIMES, Runtime, discover, get_runtime

PROFILE_DIR = Path(__file__).parent / "profiles"


class Budgets(BaseModel):
    model_config = ConfigDict(extra="forbid")
    latency_ms: Optional[float] = Field(None, gt=0)
    size_mb: Optional[float] = Field(None, gt=0)
    accuracy_drop: Optional[float] = Field(None, ge=0)
    # Embedding models (no labels): the mean cosine of each file's embeddings with the uncompressed model's.
    min_cosine: Optional[float] = Field(None, gt=-1, le=1)
    # Each verdict is PASS only when the whole interval of the measured value at this confidence is within budget
    # (pocketformer.verdict): 0.95 = a true drop over budget still PASSes about 2.5% of the time.
    confidence: Confidence = DEFAULT_CONFIDENCE


PRECISIONS = Literal["fp32", "fp16", "int8-weight", "int8", "int4"]


class LMBudgets(BaseModel):
    """A decoder-only language model's budgets on the target, each a verdict at `confidence`."""

    model_config = ConfigDict(extra="forbid")
    decode_ms: Optional[float] = Field(None, gt=0, description="p50 ms per generated token at batch 1")
    ttft_ms: Optional[float] = Field(None, gt=0, description="time to first token: prefill of prompt_tokens")
    perplexity_increase_pct: Optional[float] = Field(None, ge=0, description="perplexity on the test text above "
                                                                              "the uncompressed model's, in %")
    size_mb: Optional[float] = Field(None, gt=0)
    confidence: Confidence = DEFAULT_CONFIDENCE


class LMSettings(BaseModel):
    """How a decoder-only language model is validated on the target: which precisions, the prompt's length
    (prefill tokens/s and time to first token are measured at it), generated tokens, and the budgets."""

    model_config = ConfigDict(extra="forbid")
    precisions: list[PRECISIONS] = ["fp32"]
    prompt_tokens: int = Field(128, ge=1)
    new_tokens: int = Field(64, ge=2)
    prompts: int = Field(2, ge=1, description="greedy continuations compared with PyTorch's, token by token")
    windows: int = Field(24, ge=1, description="test-text windows of the recipe's max_len scored for perplexity")
    warmup: int = Field(1, ge=0)
    repeats: int = Field(3, ge=1, description="timed generations (each: one prefill, new_tokens - 1 decode steps)")
    prefills: int = Field(10, ge=0, description="timed prefills besides the generations' (time to first token)")
    budgets: LMBudgets = LMBudgets()


class TableSettings(BaseModel):
    """How hard a latency table of this target is measured (targets/latency.py): whole random pruned models fitted
    for its calibration, and fresh-process timings of every model (the lowest p50 kept). Fewer cost less to measure
    and predict less well (`pocketformer profile --check` says how well)."""

    model_config = ConfigDict(extra="forbid")
    calibration_models: int = Field(6, ge=0)
    rounds: int = Field(2, ge=1)


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    format: str = Field(description="a registered format (pocketformer.export.FORMATS)")
    runtime: str = Field(description="a registered runtime (pocketformer.targets.runtime.RUNTIMES) that runs it")
    threads: int = Field(ge=1, le=256)
    batch: int = Field(1, ge=1)
    seq_len: int = Field(128, ge=1)
    precisions: list[Literal["fp32", "fp16", "int8-weight", "int8"]] = ["fp32"]
    language_models: Optional[LMSettings] = Field(None, description="how decoder-only LMs are validated here")
    latency_table: TableSettings = TableSettings()
    warmup: int = Field(10, ge=0)
    repeats: int = Field(50, ge=3)
    budgets: Budgets = Budgets()
    this_host: bool = False  # latency measured here is the device's own (else: this host running its settings)
    # What the lint checks against (pocketformer lint ARTIFACT --target NAME)
    static_shapes: bool = False  # the runtime needs fixed input shapes
    # Do int8 kernels run faster than fp32 on the device (ARM dotprod, x86 VNNI)? A device profile declares it; a
    # this_host profile leaves it unset and int8's speed is measured on this host (targets/int8_speed.py).
    int8_speedup: Optional[bool] = None
    delegate: Optional[str] = None  # e.g. XNNPACK, ANE
    delegate_ops: Optional[list[str]] = None  # op types the delegate runs; others fall back
    runtime_version: Optional[str] = None  # the runtime version on the device, e.g. "onnxruntime 1.16"
    max_opset: Optional[int] = Field(None, ge=1)
    legacy_runtime: Optional[Literal["tflite-runtime 2.14"]] = None  # older runtime apps on such devices embed
    deployment_target: Optional[str] = None  # CoreML minimum OS, e.g. iOS17


    _known_format = member_of("format", lambda: _formats(), "format")
    _known_runtime = member_of("runtime", discover, "runtime")

    @model_validator(mode="after")
    def _runtime_runs_format(self):
        if RUNTIMES[self.runtime].format != self.format:
            raise ValueError(f"runtime {self.runtime} runs {RUNTIMES[self.runtime].format} files, not {self.format}")
        return self

    @model_validator(mode="after")
    def _int8_speed_measured_here(self):
        if self.this_host and self.int8_speedup is not None:
            raise ValueError("int8_speedup is measured on this host for a this_host profile, not declared: "
                             "remove it")
        return self


def _formats():
    """The registered formats, imported when a profile is read (not when a latency probe imports a runtime)."""
    from ..export import FORMATS

    return FORMATS


def _parse(path: Path) -> Profile:
    fields = ", ".join(Profile.model_fields)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TargetError(f"Target profile {path} cannot be read ({e.strerror or e}).",
                          "check the file's permissions.") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise TargetError(f"Target profile {path} is not valid YAML ({first_error(e)}).", "fix the YAML syntax.") \
            from None
    if data is None:
        raise TargetError(f"Target profile {path} is empty.", f"write its fields ({fields}); see "
                                                              f"{PROFILE_DIR / 'host-ort.yaml'}.")
    if not isinstance(data, dict):
        raise TargetError(f"Target profile {path} is not a mapping of fields to values.",
                          f"see {PROFILE_DIR / 'host-ort.yaml'}.")
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        what = f"unknown field {'.'.join(map(str, err['loc']))!r}" if err["type"] == "extra_forbidden" \
            else first_error(e).replace("Value error, ", "")
        raise TargetError(f"Target profile {path} is invalid: {what}.", f"fix the profile file (fields: {fields}).") \
            from None


def list_profiles() -> list[Profile]:
    return [_parse(p) for p in sorted(PROFILE_DIR.glob("*.yaml"))]


def get_profile(name: str) -> Profile:
    """A built-in profile by name, or a profile YAML file by path."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if path.is_dir():
            raise TargetError(f"Target profile {path} is a folder, not a YAML file.", "pass the profile file itself.")
        if not path.is_file():
            raise TargetError(f"Target profile {path} does not exist.",
                              "check the path, or name a built-in target (see `pocketformer targets`).")
        return _parse(path)
    for p in list_profiles():
        if p.name == name:
            return p
    raise TargetError(f"Unknown target {name!r}.",
                      f"use one of {', '.join(p.name for p in list_profiles())} (see `pocketformer targets`), "
                      "or a path to a profile .yaml.")


def with_confidence(profile: Profile, confidence: Optional[float]) -> Profile:
    """The profile with its budgets' verdicts at `confidence` (None: as the profile says)."""
    if confidence is None:
        return profile
    if not 0.5 <= confidence < 1:
        raise TargetError(f"Confidence {confidence:g} is outside [0.5, 1).", "give e.g. 0.95 for 95%.")
    update = {"budgets": profile.budgets.model_copy(update={"confidence": confidence})}
    if profile.language_models is not None:
        lm = profile.language_models
        update["language_models"] = lm.model_copy(update={"budgets": lm.budgets.model_copy(
            update={"confidence": confidence})})
    return profile.model_copy(update=update)


def runtime_of(profile: Profile) -> Runtime:
    return get_runtime(profile.runtime)


def static_shape(profile: Profile) -> Optional[tuple[int, int]]:
    """The (batch, seq_len) files for this target are exported at, or None where the runtime takes dynamic shapes."""
    return (profile.batch, profile.seq_len) if profile.static_shapes or _formats()[profile.format].static_only \
        else None


def export_checked(model, out_dir: Path, stem: str, inputs, fmt: str, **options):
    """The export loop for one format, each file checked on the runtime that runs the format here."""
    from ..export import export
    from .runtime import runtime_for_format

    return export(model, out_dir, stem, inputs, fmt, runtime_for_format(fmt), **options)
