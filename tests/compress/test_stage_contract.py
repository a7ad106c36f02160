"""The stage contract, for every registered stage: described settings, search ranges its config accepts, a version
and the libraries it calls, declared needs the recipe parser enforces, and `apply` returning a typed result.

A new stage is tested here the moment it registers; it only has to say (below) which settings make it do all it
declares and which settings make it cheap enough to run on the tiny model."""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import pkgutil
from functools import lru_cache

import pytest
from pydantic import BaseModel

import pocketformer.compress as compress_pkg
from pocketformer.compress import REGISTRY, Context, Stage, StageResult, base
from pocketformer.compress.base import FACTS, Effects, ModelFacts, check_plan
from pocketformer.data import Encoder, load_dataset
from pocketformer.errors import RecipeError
from pocketformer.models import LayerShape
from pocketformer.models.factorized import LinearShape
from pocketformer.recipe import parse_recipe
from pocketformer.space import endpoints, search_space, settings_models, setting
from pocketformer.store import package_versions

STAGES = sorted(REGISTRY)
DIGITS = [str(i) for i in range(10)]

# Settings under which a stage does all it declares (effects() == its class declarations); {} = its defaults.
FULL = {"prune": {"layers": 1, "ffn": 0.5}, "early_exit": {"mode": "pabee"}}
# Settings that make a stage fast on a 2-layer, hidden-64 model and 16 digit images.
CHEAP = {
    "binarize": {"calibration_examples": 8, "hash_steps": 2, "anchors": 4},
    "dense_sparse": {"rank": 32, "nnz": 4},
    "distill": {"max_examples": 16},
    "early_exit": {"max_examples": 16},
    "finetune": {"max_examples": 16},
    "lowrank": {"method": "ranks", "ranks": 8},
    "matformer": {"max_examples": 16, "calibration_examples": 8, "importance": "magnitude"},
    "prune": {"heads": 1, "ffn": 0.25, "importance": "magnitude", "calibration_examples": 8},
    "quantize": {"tolerable_loss": 100, "min_agreement": 0.0, "eval_examples": 16,
                 "candidates": [{"bits": 8}]},
}


def make(name: str, settings: dict | None = None) -> Stage:
    cls = REGISTRY[name]
    return cls(cls.Config.model_validate(FULL.get(name, {}) if settings is None else settings))


def declared(cls: type[Stage]) -> Effects:
    return Effects(cls.requires, cls.excludes, cls.provides, cls.invalidates, cls.only_new)


def providers(fact: str) -> list[str]:
    return [name for name in STAGES if fact in make(name).effects().provides]


def recipe(*items: tuple[str, dict], prepare=()) -> dict:
    return {"model": "m", "prepare": [{n: s} for n, s in prepare], "stages": [{n: s} for n, s in items]}


def fields_of(model: type[BaseModel], prefix: str = ""):
    """(path, FieldInfo) of a settings model and of every settings model its fields hold."""
    for name, field in model.model_fields.items():
        yield prefix + name, field
        for inner in settings_models(field.annotation):
            yield from fields_of(inner, f"{prefix}{name}.")


# -- discovery ------------------------------------------------------------------------------------------------------

def test_every_stage_class_in_the_package_is_registered_without_a_hand_written_list():
    found = set()
    for info in pkgutil.iter_modules(compress_pkg.__path__):
        module = importlib.import_module(f"pocketformer.compress.{info.name}")
        found |= {obj.name for obj in vars(module).values()  # a class still generic in its config is a base
                  if inspect.isclass(obj) and issubclass(obj, Stage) and not obj.__parameters__}
    assert found == set(REGISTRY)


def test_the_registry_is_in_name_order_whatever_the_import_order():
    assert list(REGISTRY) == sorted(REGISTRY)


# -- declarations, per stage -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", STAGES)
def test_every_setting_has_a_description(name):
    missing = [path for path, field in fields_of(REGISTRY[name].Config) if not field.description]
    assert not missing, f"{name}: settings without a description: {missing}"


@pytest.mark.parametrize("name", STAGES)
def test_search_ranges_name_real_settings_and_their_ends_are_accepted(name):
    cls = REGISTRY[name]
    space = cls.search_space()
    assert space == search_space(cls.Config)
    paths = {path for path, _ in fields_of(cls.Config)}
    for path, rng in space.items():
        assert path in paths, f"{name}: search range for unknown setting {path!r}"
        for value in endpoints(rng):
            cls.Config.model_validate(setting(path, value))  # raises if the config refuses an end of its range


def test_the_settings_a_search_varies_are_declared():
    spaces = {name: REGISTRY[name].search_space() for name in STAGES}
    assert {"layers", "heads", "ffn"} <= set(spaces["prune"])
    assert {"energy", "budget"} <= set(spaces["lowrank"]) and {"rank", "nnz"} <= set(spaces["dense_sparse"])
    assert "gate.threshold" in spaces["early_exit"] and "candidates" in spaces["quantize"]
    assert "epochs" in spaces["distill"]


@pytest.mark.parametrize("name", STAGES)
def test_version_is_an_int_and_the_libraries_are_installed_distributions(name):
    cls = REGISTRY[name]
    assert isinstance(cls.version, int) and not isinstance(cls.version, bool) and cls.version >= 1
    assert "version" in vars(cls), f"{name} must declare its own version"
    assert cls.libraries and "absent" not in package_versions(*cls.libraries).values()


def test_a_stage_without_a_version_cannot_register():
    with pytest.raises(TypeError, match="must declare version in its header"):
        class Unversioned(Stage[REGISTRY["distill"].Config], name="unversioned", summary=""):
            pass
    assert "unversioned" not in REGISTRY


def test_the_header_declares_the_stage_and_registers_it(monkeypatch):
    monkeypatch.setattr(base, "REGISTRY", {})
    config = REGISTRY["distill"].Config

    class Example(Stage[config], name="example", version=2, summary="an example"):
        pass

    assert base.REGISTRY == {"example": Example}
    assert {a: vars(Example)[a] for a in ("name", "version", "summary", "Config")} == {
        "name": "example", "version": 2, "summary": "an example", "Config": config}


def test_a_stage_config_must_be_a_stage_config(monkeypatch):
    monkeypatch.setattr(base, "REGISTRY", {})
    with pytest.raises(TypeError, match="must be a StageConfig"):
        class Untyped(Stage[dict], name="untyped", version=1, summary=""):
            pass
    assert not base.REGISTRY


@pytest.mark.parametrize("name", STAGES)
def test_declared_facts_are_known_and_each_need_says_why(name):
    cls = REGISTRY[name]
    d = declared(cls)
    assert d.requires | d.excludes | d.provides | d.invalidates <= set(FACTS)
    unexplained = sorted((d.requires | d.excludes | d.invalidates) - set(cls.reasons))
    assert not unexplained, f"{name} declares {unexplained} without a reason for the error line"


@pytest.mark.parametrize("name", STAGES)
def test_settings_narrow_the_declarations_and_the_full_settings_reach_them(name):
    cls = REGISTRY[name]
    full, default, cheap = (make(name).effects(), make(name, {}).effects(), make(name, CHEAP.get(name, {})).effects())
    assert full == declared(cls), f"{name}: add settings to FULL that make it do all it declares"
    for e in (default, cheap):
        assert e.requires <= full.requires and e.excludes <= full.excludes
        assert e.provides <= full.provides and e.invalidates <= full.invalidates


# -- declared needs are enforced when the recipe is parsed -----------------------------------------------------------

def violations():
    """(stage, relation, fact, recipe that breaks it, the other stage) for every declaration of every stage."""
    cases = []
    for name in STAGES:
        full = make(name).effects()
        for relation, facts in (("requires", full.requires), ("excludes", full.excludes),
                                ("invalidates", full.invalidates)):
            for fact in sorted(facts):
                makers = providers(fact)
                assert makers, f"no stage provides {fact!r}, which {name} {relation}"
                other = next((m for m in makers if m != name), makers[0])
                mine, theirs = (name, FULL.get(name, {})), (other, FULL.get(other, {}))
                order = (mine, theirs) if relation == "requires" else (theirs, mine)
                cases.append(pytest.param(name, fact, recipe(*order), other, id=f"{name}-{relation}-{fact}"))
        if full.only_new:
            cases.append(pytest.param(name, None, recipe((name, {}), (name, {})), name, id=f"{name}-twice"))
    return cases


@pytest.mark.parametrize("name,fact,data,other", violations())
def test_each_declared_need_is_enforced_at_parse_time(name, fact, data, other):
    with pytest.raises(RecipeError) as err:
        parse_recipe(data)
    line = err.value.line()
    assert f"{name} (stages item" in line and f"{other} (stages item" in line
    if fact is not None:
        assert REGISTRY[name].reasons[fact] in line
    assert "Fix:" in line and "\n" not in line


@pytest.mark.parametrize("name,fact,data,other", violations())
def test_the_order_the_fix_asks_for_parses(name, fact, data, other):
    if other == name:
        pytest.skip("a stage that conflicts with itself has no order that helps")
    data["stages"].reverse()
    parse_recipe(data)


def test_a_requirement_met_in_prepare_holds_for_the_stages():
    parse_recipe(recipe(("early_exit", {}), prepare=[("finetune", {})]))


def test_settings_that_do_not_touch_a_fact_do_not_conflict():
    parse_recipe(recipe(("early_exit", {}), ("prune", {"heads": 1})))  # no layers removed
    parse_recipe(recipe(("lowrank", {"linears": ["q", "k", "v", "o"]}), ("matformer", {})))  # FFN stays dense
    parse_recipe(recipe(("quantize", {}), ("early_exit", {"mode": "deebert"})))  # backbone frozen
    parse_recipe(recipe(("lowrank", {"linears": ["q"]}), ("dense_sparse", {"linears": ["q", "fc1"]})))


def test_the_example_in_the_issue_reads_as_one_line_with_the_fix():
    with pytest.raises(RecipeError) as err:
        parse_recipe(recipe(("lowrank", {}), ("matformer", {})))
    assert err.value.line() == (
        "Recipe <recipe>: matformer (stages item 1) must come before lowrank (stages item 0): nested widths need "
        "dense FFN linears. Fix: put lowrank after matformer, or run lowrank on the model `pocketformer extract` "
        "writes.")


# -- what only the loaded model tells ---------------------------------------------------------------------------------

def plan(model, *items: tuple[str, dict]):
    return check_plan([(f"stages item {i}", make(n, s)) for i, (n, s) in enumerate(items)], ModelFacts.of(model))


def test_facts_are_read_from_the_model(make_model, make_config):
    from pocketformer.models import CanonicalTransformer

    assert ModelFacts.of(make_model("vision")).known["labels"] is False
    cfg = make_config("vision", labels=DIGITS)
    cfg.layers[0] = LayerShape(heads=4, head_dim=16, ffn=128, linears={"fc2": LinearShape(kind="lowrank", rank=8)})
    facts = ModelFacts.of(CanonicalTransformer(cfg))
    assert facts.known["labels"] and facts.known["factorized:fc2"] and not facts.known["factorized:fc1"]
    assert facts.layers == 2 and not facts.known["exits"] and not facts.known["quantized"]


def test_an_embedding_model_without_finetune_is_refused_naming_the_stage_that_adds_labels(make_model):
    conflict = plan(make_model("vision"), ("distill", {}), ("early_exit", {}))
    assert "early_exit (stages item 1) needs a classifier" in conflict.problem and "finetune" in conflict.fix
    assert plan(make_model("vision", labels=DIGITS), ("distill", {}), ("early_exit", {})) is None


def test_layer_counts_are_followed_through_pruning(make_model):
    model = make_model("vision", labels=DIGITS)  # 2 layers
    conflict = plan(model, ("prune", {"layers": 1}), ("early_exit", {}))
    assert "needs at least 2 layers" in conflict.problem and "has 1 there" in conflict.problem
    assert "needs at least 3 layers" in plan(model, ("early_exit", {"exits": [1]})).problem
    assert plan(model, ("prune", {"layers": 1, "importance": "accuracy"}), ("early_exit", {})) is None  # not known


def test_a_model_that_already_has_an_excluded_fact_is_refused(make_model):
    model = make_model("vision", labels=DIGITS)
    model.spec.quantization = {"bits": 8}
    conflict = plan(model, ("distill", {}))
    assert "cannot run on this model, which has weights on an int grid" in conflict.problem


# -- apply returns a typed result ------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def digits(split: str):
    return load_dataset("digits", split).head(16)


@pytest.mark.parametrize("name", STAGES)
def test_apply_returns_a_stage_result_with_json_details(name, make_model):
    assert name in CHEAP, f"add settings that make {name} cheap on the tiny model to CHEAP"
    model = make_model("vision", labels=DIGITS)
    ctx = Context(teacher=copy.deepcopy(model).eval(), train=digits("train"), validation=digits("validation"),
                  encoder=Encoder(None), batch_size=8)
    result = make(name, CHEAP[name]).apply(model, ctx)
    assert isinstance(result, StageResult) and result.model is not None
    assert isinstance(result.details, dict)
    json.dumps(result.details)
    assert not hasattr(ctx, "notes")
