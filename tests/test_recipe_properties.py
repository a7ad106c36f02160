"""Property tests of the recipe parser: whatever YAML a user writes, the answer is a valid recipe or one RecipeError
(problem + fix), never a crash (hypothesis, pinned in the test extra)."""

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketformer.compress import REGISTRY
from pocketformer.errors import RecipeError
from pocketformer.recipe import Recipe, parse_recipe

KEYS = [k for k in Recipe.model_fields if k != "source_path"] + ["stage", "formats", "prune", "heads"]
STAGES = sorted(REGISTRY)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(KEYS + STAGES + ["all", "onnx", "host-ort", "minilm"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS + STAGES), st.text(max_size=8)), inner, max_size=4)),
    max_leaves=12)
stage_items = st.lists(st.dictionaries(st.sampled_from(STAGES), st.one_of(st.none(), st.dictionaries(
    st.sampled_from(["layers", "heads", "ffn", "epochs", "lr", "exits", "widths", "bits", "rank", "nnz",
                     "importance", "mode", "linears", "energy"]), scalars, max_size=3)), min_size=1, max_size=1),
    max_size=4)
recipes = st.fixed_dictionaries({"model": st.sampled_from(["minilm", "some/folder"])},
                                optional={"data": scalars, "seed": scalars, "max_len": scalars, "stages": stage_items,
                                          "prepare": stage_items, "export": values, "targets": values,
                                          "name": scalars})


def parsed_or_clear_error(data) -> None:
    try:
        recipe = parse_recipe(data, "r.yaml")
    except RecipeError as e:
        assert e.problem and e.fix and "\n" not in e.line()
        return
    assert isinstance(recipe, Recipe)
    assert [list(s) for s in recipe.stages] == [list(s) for s in data.get("stages", [])]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_any_yaml_value_is_a_recipe_or_one_clear_error(data):
    parsed_or_clear_error(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes)
def test_any_recipe_shaped_mapping_is_a_recipe_or_one_clear_error(data):
    parsed_or_clear_error(data)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_any_text_as_a_yaml_file_is_a_recipe_or_one_clear_error(text, tmp_path_factory):
    from pocketformer.recipe import load_recipe

    path = tmp_path_factory.mktemp("r") / "r.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except RecipeError as e:
        assert e.problem and e.fix
    except yaml.YAMLError:  # pragma: no cover - load_recipe turns these into RecipeError
        raise AssertionError("a YAML error escaped")
