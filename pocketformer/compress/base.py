"""The stage contract: a registered class with a pydantic config and one `apply(model, ctx) -> StageResult`.

The registry maps recipe names to stages, so the recipe validator, the CLI help and the docs all read the same
declarations. A stage's header says who it is: `class Prune(Stage[PruneConfig], name="prune", version=1,
summary="...")`. Besides its name, summary and config, a stage declares:
- `version` (bump it when the stage's code changes) and `libraries` (the distributions it calls): both join its
  cache key, so an edited stage never serves old results;
- what it needs of the model and what it does to it, in facts of FACTS (`requires`, `excludes`, `provides`,
  `invalidates`, narrowed to its settings by `effects()`), and how many layers it needs (`min_layers`): a recipe is
  checked against these when parsed, and against the loaded model before any stage runs (`check_plan`);
- which settings a search may vary, and over which range, in each field (`pocketformer.space.searchable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Generic, Literal, Optional, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field

from ..data import Dataset, Encoder
from ..latency import LatencyTable
from ..models.canonical import LINEAR_NAMES, CanonicalTransformer, count_params, encoder_macs
from ..models.causal import LM_LINEAR_NAMES
from ..space import search_space, searchable

REGISTRY: dict[str, type["Stage"]] = {}
# Model kinds (a canonical model's `kind`) as `pocketformer stages` names them.
KIND_NAMES = {"encoder": "encoders", "causal_lm": "decoder-only language models"}


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Settings added after results were cached, whose default keeps the behaviour those results were made with: at
    # that default they are left out of the cache key (key_settings), so adding a setting does not discard every
    # earlier result of the stage. A setting whose default changes what the stage does belongs in a version bump.
    added_settings: ClassVar[frozenset[str]] = frozenset()

    def key_settings(self) -> dict[str, Any]:
        """The settings in the stage's cache key: all, but added_settings left at their defaults."""
        fields = type(self).model_fields
        return {k: v for k, v in self.model_dump().items()
                if not (k in self.added_settings and v == fields[k].get_default(call_default_factory=True))}


class TrainingConfig(StageConfig):
    """Settings every stage that trains on the train split shares."""

    epochs: float = Field(1.0, gt=0, le=100, description="passes over the train split (fractions allowed)",
                          json_schema_extra=searchable(0.5, 5))
    lr: float = Field(1e-4, gt=0, lt=1, description="learning rate (AdamW)",
                      json_schema_extra=searchable(1e-5, 1e-3, log=True))
    max_examples: int = Field(0, ge=0, description="train on at most this many examples (0 = all)")
    freeze_embeddings: bool = Field(True, description="keep the token embedding table fixed: no stage changes "
                                                      "it, and updating it slows every step")


class FactorizationConfig(StageConfig):
    """Settings every stage that factorizes linears shares."""

    linears: Optional[list[Literal["q", "k", "v", "o", "fc1", "fc2", "gate", "up", "down"]]] = Field(
        None, description="which linears of every layer to factorize (default: all the model has: q, k, v, o, fc1, "
                          "fc2 in an encoder; q, k, v, o, gate, up, down in a decoder-only language model)")

    def linears_of(self, model) -> list[str]:
        """The linears to factorize in `model`; a name the model does not have is one recipe error."""
        own = list(model.linear_names)
        if self.linears is None:
            return own
        foreign = [n for n in self.linears if n not in own]
        if foreign:
            from ..errors import RecipeError

            raise RecipeError(f"linears: {foreign[0]!r} is not a linear of this model (a "
                              f"{KIND_NAMES.get(model.kind, model.kind)[:-1]}: {', '.join(own)}).",
                              f"name some of {', '.join(own)}, or leave `linears` out for all of them.")
        return list(self.linears)


@dataclass
class Context:
    """What a stage may use besides the model: the original model as teacher, data, and the run's settings. A
    language model's run has no examples (train, validation and encoder are None): its data is token windows of
    the text, by split (`text`)."""

    teacher: CanonicalTransformer
    train: Optional[Dataset]
    validation: Optional[Dataset]
    encoder: Optional[Encoder]
    seed: int = 0
    batch_size: int = 32
    # The target a latency-driven stage aims at when its settings name none (the recipe's first target), and how to
    # get a target's latency table: latency_table(target, table_file, precision, model) -> (target, table), measured
    # on the target's runtime (cached) or read from the user's file. Supplied by the pipeline (the compress layer
    # does not run runtimes); None where no target is known.
    target: Optional[str] = None
    latency_table: Optional[Callable[[Optional[str], Optional[str], Optional[str], CanonicalTransformer],
                                     tuple[str, LatencyTable]]] = None
    text: dict[str, list[list[int]]] = field(default_factory=dict)

    def train_batches(self, limit: int = 0):
        """What a stage trains on (train.Batches): the labelled examples of the train split, or a language model's
        train text windows; at most `limit` examples or windows (0: all)."""
        from ..train import example_batches, text_batches

        if self.text:
            windows = self.text["train"]
            return text_batches(windows[:limit] if limit else windows, self.batch_size, self.seed)
        data = self.train.head(limit) if limit else self.train
        return example_batches(data, self.encoder, self.batch_size, self.seed)


@dataclass
class StageResult:
    """What a stage returns: the model it made, and what this stage alone did or measured (JSON-able)."""

    model: CanonicalTransformer
    details: dict[str, Any] = field(default_factory=dict)


# -- facts: what a stage needs of the model and does to it ----------------------------------------------------------

# every linear name a model kind has (an encoder's, then a decoder's own)
ALL_LINEARS = LINEAR_NAMES + tuple(n for n in LM_LINEAR_NAMES if n not in LINEAR_NAMES)

FACTS: dict[str, str] = {
    "labels": "a classifier (an output that predicts the data's labels)",
    "exits": "early-exit heads",
    "nested_ffn": "nested (MatFormer) FFN widths",
    "quantized": "weights on an int grid",
    "binarized": "EcoFormer attention in every layer",
    **{f"factorized:{n}": f"factorized {n} linears" for n in ALL_LINEARS},
}


def factorized(names) -> frozenset[str]:
    """The facts "these linears of every layer are factorized (low-rank or dense-sparse)"."""
    return frozenset(f"factorized:{n}" for n in names)


@dataclass(frozen=True)
class Effects:
    """What a stage, as configured, needs of the model and does to it, in facts of FACTS:
    requires    must hold before it;                excludes    must not hold before it;
    provides    hold after it;                      invalidates no longer hold after it (an error when a stage
                                                                earlier in the recipe made them hold: its work is lost);
    only_new    it acts only where its `provides` do not hold yet: with all of them holding it has nothing to do."""

    requires: frozenset[str] = frozenset()
    excludes: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()
    invalidates: frozenset[str] = frozenset()
    only_new: bool = False


@dataclass
class ModelFacts:
    """What is known of the model at one point of a recipe: `known[fact]` True or False, absent when not known (a
    recipe checked before its model is loaded); `by[fact]` is the (stage, recipe item) that made it hold or end;
    `layers` is the layer count where known."""

    known: dict[str, bool] = field(default_factory=dict)
    by: dict[str, tuple[str, str]] = field(default_factory=dict)
    layers: Optional[int] = None

    @classmethod
    def of(cls, model: CanonicalTransformer) -> "ModelFacts":
        shapes = model.config.layers
        known = {"labels": model.task.has_labels, "exits": bool(model.spec.exits),
                 "nested_ffn": bool(model.spec.nested_ffn), "quantized": bool(model.spec.quantization),
                 "binarized": bool(shapes) and all(s.attention != "softmax" for s in shapes)}
        known.update({f"factorized:{n}": any(n in s.linears for s in shapes) for n in ALL_LINEARS})
        return cls(known=known, layers=len(shapes))


@dataclass(frozen=True)
class Conflict:
    """A stage the model will not suit where the recipe puts it: the problem, and the fix."""

    problem: str
    fix: str


C = TypeVar("C", bound=StageConfig)


class Stage(Generic[C]):
    """A compression stage; a new stage is one module in `compress/`. Its header declares its config and identity,
    which become the class attributes below, and registers it by name:

        class Prune(Stage[PruneConfig], name="prune", version=1, summary="structured pruning of ..."):

    A class still generic in its config (`class Factorization(Stage[F])`) is a base that stages share: it is neither
    checked nor registered."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[StageConfig]]  # the type argument of its Stage[...] base: what `self.config` is
    version: ClassVar[int]  # bump when the stage's code changes what it makes: the cache then runs it again
    libraries: ClassVar[tuple[str, ...]] = ("torch",)  # distributions whose versions join the cache key
    # The most this stage may need and do (facts of FACTS); effects() narrows them to its settings.
    requires: ClassVar[frozenset[str]] = frozenset()
    excludes: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    only_new: ClassVar[bool] = False
    # The model architectures it runs on (a model's `kind`: "encoder", "causal_lm"); a recipe naming a stage for a
    # model of another kind is refused before anything runs.
    kinds: ClassVar[frozenset[str]] = frozenset({"encoder"})
    # Whether the model after this stage is what ships, as one plain file per format: a search (search.py) scores a
    # trial by that file. False for stages whose model ships through something else (exit segments and a driver,
    # a nested checkpoint cut by `extract`).
    ships_plain: ClassVar[bool] = True
    # fact -> why this stage needs it, cannot run after it, or ends it (one clause for the error line); and
    # fact -> another fix besides reordering ("{other}" is the other stage's name)
    reasons: ClassVar[dict[str, str]] = {}
    remedies: ClassVar[dict[str, str]] = {}

    def __init__(self, config: C):
        self.config = config

    def __init_subclass__(cls, *, name: Optional[str] = None, summary: Optional[str] = None,
                          version: Optional[int] = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__parameters__:  # still generic in its config: a base for stages, not one
            if any(v is not None for v in (name, summary, version)):
                raise TypeError(f"{cls.__name__} is generic in its config, a base for stages: name, summary and "
                                f"version belong in the headers of the stages that fix its config")
            return
        config = next((arg for base in vars(cls).get("__orig_bases__", ()) for arg in get_args(base)), None)
        if config is not None and not (isinstance(config, type) and issubclass(config, StageConfig)):
            raise TypeError(f"stage {cls.__name__}: its config {config!r} must be a StageConfig")
        missing = [a for a, v in (("name", name), ("summary", summary), ("version", version)) if v is None]
        if config is None and not hasattr(cls, "Config"):
            missing.insert(0, "Config")
        if missing:
            raise TypeError(f"stage {cls.__name__} must declare {', '.join(missing)} in its header: "
                            f"class {cls.__name__}(Stage[ItsConfig], name=..., version=..., summary=...)")
        if not isinstance(version, int) or isinstance(version, bool):
            raise TypeError(f"stage {cls.__name__}: version must be an int")
        cls.name, cls.summary, cls.version = name, summary, version
        if config is not None:
            cls.Config = config
        unknown = sorted((cls.requires | cls.excludes | cls.provides | cls.invalidates) - set(FACTS))
        if unknown:
            raise TypeError(f"stage {cls.__name__} declares unknown facts {unknown}; known: {', '.join(FACTS)}")
        REGISTRY[cls.name] = cls

    def apply(self, model: CanonicalTransformer, ctx: Context) -> StageResult:
        raise NotImplementedError

    def effects(self) -> Effects:
        """What this stage, with its settings, needs of the model and does to it: by default all it declares.
        Stages whose settings decide it (prune removes layers only when asked to) override this."""
        cls = type(self)
        return Effects(cls.requires, cls.excludes, cls.provides, cls.invalidates, cls.only_new)

    def min_layers(self) -> tuple[int, str]:
        """The fewest layers the model may have when this stage runs, and why."""
        return 0, ""

    def check_model(self, model, where: str = "") -> None:
        """Refuse (RecipeError) a model this stage cannot run on with these settings, before any stage runs: by
        default a model of a kind it does not declare."""
        if model.kind not in self.kinds:
            from ..errors import RecipeError

            able = sorted(name for name, cls in REGISTRY.items() if model.kind in cls.kinds)
            raise RecipeError(f"{where}stage {self.name!r} does not run on "
                              f"{KIND_NAMES.get(model.kind, model.kind)} yet.",
                              f"remove it; the stages that do: {', '.join(able)}.")

    def key_inputs(self, model: CanonicalTransformer, ctx: Context) -> dict[str, Any]:
        """What this stage's result depends on besides its input model, settings, data and versions (joined to its
        cache key): e.g. the latency table a latency-targeted stage prunes by. Default: nothing."""
        return {}

    def layers_after(self, layers: int) -> Optional[int]:
        """The model's layer count after this stage, from the count before it (None: known only once it ran)."""
        return layers

    @classmethod
    def search_space(cls) -> dict[str, dict[str, Any]]:
        """{setting path: range} of every setting a search may vary (`pocketformer.space`)."""
        return search_space(cls.Config)

    def fit(self, model: CanonicalTransformer, ctx: Context, loss_fn, desc: str) -> list[float]:
        """Train `model` on the train split (examples, or a language model's text) with this stage's
        TrainingConfig; returns the per-step losses."""
        from ..train import optimise

        cfg = self.config
        if cfg.freeze_embeddings and model.token_table() is not None:
            model.token_table().weight.requires_grad_(False)
        try:
            return optimise(model, *ctx.train_batches(cfg.max_examples), loss_fn, epochs=cfg.epochs, lr=cfg.lr,
                            desc=desc)
        finally:
            model.requires_grad_(True)


F = TypeVar("F", bound=FactorizationConfig)


class Factorization(Stage[F]):
    """What the stages that factorize linears (lowrank, dense_sparse) declare alike: they add factorized linears,
    each only those its `linears` name, and refuse quantized weights."""

    kinds = frozenset({"encoder", "causal_lm"})
    excludes = frozenset({"quantized"})
    provides = factorized(ALL_LINEARS)
    only_new = True  # a factorized linear is skipped: factorizing its factors would compound errors, buy nothing
    reasons = {"quantized": "factorizing quantized weights would move them off their int grid"}

    def effects(self) -> Effects:
        return replace(super().effects(), provides=factorized(self.config.linears or ALL_LINEARS))


# -- the plan check: every stage's declarations over the whole recipe, before anything runs -------------------------

def _providers(fact: str) -> list[str]:
    return [name for name, cls in REGISTRY.items() if fact in cls.provides]


def facts_text(facts) -> str:
    """Facts for a sentence, factorized linears as one phrase: "factorized q, fc1 linears, weights on an int grid"."""
    linears = [n for n in ALL_LINEARS if f"factorized:{n}" in facts]
    parts = [f"factorized {', '.join(linears)} linears"] if linears else []
    return ", ".join(parts + [FACTS[f] for f in sorted(facts) if not f.startswith("factorized:")])


def check_plan(steps: list[tuple[str, Stage]], facts: Optional[ModelFacts] = None) -> Optional[Conflict]:
    """The first stage whose declared needs the model will not meet where the recipe puts it, or None.

    `steps` are (where, stage) in order, `where` naming the recipe item ("stages item 2"). With `facts` None nothing
    is known of the model (a recipe being parsed): only what the recipe's own order decides is checked; with the
    loaded model's facts, everything is."""
    state = ModelFacts(dict(facts.known), dict(facts.by), facts.layers) if facts else ModelFacts()
    for i, (where, stage) in enumerate(steps):
        step = _Step(stage, where, stage.effects(), state)
        conflict = (step.requires(steps[i + 1:]) or step.excludes() or step.nothing_left() or step.undoes()
                    or step.layers())
        if conflict:
            return conflict
        step.advance()
    return None


class _Step:
    """One stage of a plan against the facts known before it: each check returns the Conflict it finds, or None."""

    def __init__(self, stage: Stage, where: str, eff: Effects, state: ModelFacts):
        self.stage, self.where, self.eff, self.state = stage, where, eff, state
        self.me = f"{stage.name} ({where})"

    def why(self, fact: str) -> str:
        return self.stage.reasons.get(fact, f"{self.stage.name} does not work with {FACTS[fact]}")

    def remedy(self, fact: str, other: str) -> str:
        text = self.stage.remedies.get(fact, "").format(other=other)
        return f", or {text}" if text else ""

    def requires(self, later_steps: list[tuple[str, Stage]]) -> Optional[Conflict]:
        name, state = self.stage.name, self.state
        for fact in sorted(self.eff.requires):
            have = state.known.get(fact)
            if have:
                continue
            if have is False and fact in state.by:
                other, at = state.by[fact]
                return Conflict(f"{self.me} needs {FACTS[fact]}, which {other} ({at}) removes before it: "
                                f"{self.why(fact)}.", f"put {name} before {other}{self.remedy(fact, other)}.")
            if have is False:
                makers = " or ".join(_providers(fact)) or "a stage that adds it"
                return Conflict(f"{self.me} needs {FACTS[fact]}, and the model has none: {self.why(fact)}.",
                                f"put {makers} before {name} (in prepare), or start from a model with "
                                f"{FACTS[fact]}.")
            later = next(((w, s) for w, s in later_steps if fact in s.effects().provides), None)
            if later:
                at, other = later[0], later[1].name
                return Conflict(f"{self.me} needs {FACTS[fact]}, which {other} ({at}) adds only after it: "
                                f"{self.why(fact)}.", f"put {other} before {name}{self.remedy(fact, other)}.")
        return None

    def excludes(self) -> Optional[Conflict]:
        name, state = self.stage.name, self.state
        for fact in sorted(self.eff.excludes):
            if not state.known.get(fact):
                continue
            if fact in state.by and state.by[fact][0] == name:
                return Conflict(f"{self.me} cannot follow another {name} ({state.by[fact][1]}): {self.why(fact)}.",
                                "drop one of the two, or give them other settings.")
            if fact in state.by:
                other, at = state.by[fact]
                return Conflict(f"{self.me} must come before {other} ({at}): {self.why(fact)}.",
                                f"put {other} after {name}{self.remedy(fact, other)}.")
            return Conflict(f"{self.me} cannot run on this model, which has {FACTS[fact]}: {self.why(fact)}.",
                            f"drop {name}, or start from a model without {FACTS[fact]}.")
        return None

    def nothing_left(self) -> Optional[Conflict]:
        eff, state = self.eff, self.state
        if eff.only_new and eff.provides and all(state.known.get(f) for f in eff.provides):
            done = sorted({"{} ({})".format(*state.by[f]) if f in state.by else "the input model"
                           for f in eff.provides})
            return Conflict(f"{self.me} has nothing left to do: the model already has {facts_text(eff.provides)} "
                            f"({', '.join(done)}).", f"give {self.stage.name} other settings, or drop it.")
        return None

    def undoes(self) -> Optional[Conflict]:
        for fact in sorted(self.eff.invalidates):
            if self.state.known.get(fact) and fact in self.state.by:
                other, at = self.state.by[fact]
                return Conflict(f"{self.me} undoes {other} ({at}): {self.why(fact)}.",
                                f"put {self.stage.name} before {other}{self.remedy(fact, other)}.")
        return None

    def layers(self) -> Optional[Conflict]:
        need, reason = self.stage.min_layers()
        if self.state.layers is not None and self.state.layers < need:
            return Conflict(f"{self.me} needs at least {need} layers ({reason}), and the model has "
                            f"{self.state.layers} there.",
                            f"remove fewer layers before {self.stage.name}, or change its layer settings.")
        return None

    def advance(self) -> None:
        """The facts after this stage."""
        state = self.state
        if state.layers is not None:
            state.layers = self.stage.layers_after(state.layers)
        for fact in self.eff.invalidates:
            state.known[fact], state.by[fact] = False, (self.stage.name, self.where)
        for fact in self.eff.provides:
            state.known[fact], state.by[fact] = True, (self.stage.name, self.where)


# -- what a stage changed ---------------------------------------------------------------------------------------------

class StageReport(BaseModel):
    """What a stage changed, measured on the model before and after it."""

    stage: str
    config: dict[str, Any]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    size_bytes_before: int = 0
    size_bytes_after: int = 0
    layers_after: list[dict[str, Any]]
    validation_accuracy: Optional[float] = None
    validation_perplexity: Optional[float] = None  # a language model's, on the validation text
    seconds: float = 0.0
    cached: bool = False
    details: dict[str, Any] = {}


def stored_bytes(model: CanonicalTransformer) -> int:
    """Bytes the weights take stored as the model says: float32, except Linear weights a quantize stage put on an
    int grid (bits per weight plus a float32 scale per row and group); a dense-sparse S counts its kept entries."""
    total = 4 * count_params(model)
    q = model.spec.quantization
    if q.get("bits"):
        import torch

        from ..models.factorized import DenseSparseLinear

        kept = {id(m.first): min(m.nnz, m.rank) * m.in_features for m in model.modules()
                if isinstance(m, DenseSparseLinear)}  # S stores only its kept entries, as count_params counts
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.numel():
                n = kept.get(id(m), m.weight.numel())
                groups = 1 if q.get("group_size", -1) <= 0 else -(-m.in_features // q["group_size"])
                total -= n * 4 - (n * q["bits"] + 7) // 8 - 4 * m.out_features * groups
    return total


def describe(model: CanonicalTransformer, seq_len: int) -> dict[str, Any]:
    cfg = model.config
    return {"params": count_params(model), "macs": encoder_macs(cfg, seq_len), "size_bytes": stored_bytes(model),
            "layers": [s.summary() for s in cfg.layers]}
