"""prune to a latency target: the settings it takes and refuses, the stage on a table it is given, and the whole way
(compress with a table measured on the real runtime -> export -> validate -> the report's predicted vs measured)."""

from __future__ import annotations

import copy
import json

import pytest
from pydantic import ValidationError

from pocketformer import pipeline
from pocketformer.compress import Context
from pocketformer.compress.prune import Prune, PruneConfig
from pocketformer.data import Encoder, load_dataset
from pocketformer.errors import RecipeError
from pocketformer.latency import Curve, LatencyTable
from pocketformer.recipe import parse_recipe
from pocketformer.report import latency_target_line

from conftest import write_profile

DIGITS = [str(i) for i in range(10)]


@pytest.mark.parametrize("settings, problem", [
    ({"speedup": 2, "latency_ms": 5}, "give one target"),
    ({"speedup": 2, "heads": 0.5}, "heads and a latency target both set"),
    ({"speedup": 2, "importance": "taylor"}, "prunes by Fisher importance, not taylor"),
    ({"target": "host-ort"}, "applies to a latency target only"),
    ({"importance": "fisher"}, "set speedup or latency_ms"),
    ({"speedup": 1.0}, "greater than 1"),
])
def test_latency_target_settings_that_contradict_are_refused(settings, problem):
    with pytest.raises(ValidationError, match=problem):
        PruneConfig(**settings)


def test_a_latency_target_ranks_by_fisher_and_a_recipe_names_the_mistake():
    assert PruneConfig(speedup=2).importance == "fisher"
    with pytest.raises(RecipeError, match="prune.*give one target"):
        parse_recipe({"model": "minilm", "stages": [{"prune": {"speedup": 2, "latency_ms": 3}}]})


def table_for_tiny(spec) -> LatencyTable:
    """A table for the tiny family whose costs rise with heads and neurons (an input, not a measurement)."""
    heads, width = spec.layers[0].heads, spec.layers[0].ffn
    return LatencyTable(target="made-up", runtime="onnxruntime", threads=1, seq_len=16,
                        family={"hidden": spec.hidden}, base_ms=1.0, layer_ms=0.2,
                        attention=Curve(points=[0, heads], ms=[0.0, 2.0]), ffn=Curve(points=[0, width], ms=[0.0, 3.0]))


def digits_context(model, table=None, target="made-up") -> Context:
    lookup = None if table is None else (lambda t, f, p, m: (t or target, table))
    return Context(teacher=copy.deepcopy(model).eval(), train=load_dataset("digits", "train"),
                   validation=load_dataset("digits", "validation"), encoder=Encoder(None), batch_size=8,
                   target=target if table is not None else None, latency_table=lookup)


def test_the_stage_meets_its_predicted_target_and_records_what_it_predicted(make_model):
    model = make_model("vision", labels=DIGITS)
    table = table_for_tiny(model.spec)
    stage = Prune(PruneConfig(speedup=1.6, calibration_examples=32))
    ctx = digits_context(model, table)
    result = stage.apply(model, ctx)
    lt = result.details["latency_target"]
    before = table.predict([(s.heads, s.ffn) for s in model.config.layers])
    after = table.predict([(s.heads, s.ffn) for s in result.model.config.layers])
    assert lt["predicted_before_ms"] == pytest.approx(before) and lt["predicted_ms"] == pytest.approx(after)
    assert after <= before / 1.6 + 1e-9 and lt["budget_ms"] == pytest.approx(before / 1.6)
    assert lt["target"] == "made-up" and lt["table_sha256"] == table.digest
    # the cache key carries the table: another table, another result
    assert stage.key_inputs(model, ctx) == {"target": "made-up", "latency_table": table.digest}
    assert Prune(PruneConfig(heads=1)).key_inputs(model, ctx) == {}  # other pruning: keyed as before


def test_without_a_target_the_stage_says_how_to_name_one(make_model):
    model = make_model("vision", labels=DIGITS)
    with pytest.raises(RecipeError, match="needs a target.*compress --target"):
        Prune(PruneConfig(speedup=2, calibration_examples=16)).apply(model, digits_context(model))


def test_a_target_that_cannot_measure_latency_here_is_refused_unless_a_table_is_given(
        tmp_path, tokenized_bert, sentiment_csv, run_cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": str(tokenized_bert), "data": str(sentiment_csv), "max_len": 32,
                                  "targets": ["iphone-coreml"],
                                  "stages": [{"prune": {"speedup": 2, "calibration_examples": 16}}]}))
    result = run_cli("compress", tokenized_bert, "--recipe", recipe, "-o", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and not any("measuring" in line for line in lines)
    assert lines[-1].startswith("error: ") and "pass it with `table: FILE`" in lines[-1]
    assert not (tmp_path / "out" / "model").exists()


@pytest.fixture(scope="module")
def targeted_run(tmp_path_factory, tokenized_bert, sentiment_csv):
    """compress with `prune: {speedup: 1.5}` on a fast ONNX Runtime profile of 48 tokens (its table measured on the
    real runtime; at the fast profile's 16 tokens the tiny model's embeddings and head are ~80% of its time, so no
    pruning reaches 1.5x), export, validate, report."""
    out = tmp_path_factory.mktemp("latency") / "out"
    fast_profile = write_profile(out.parent / "test-ort-48.yaml", seq_len=48)
    recipe = parse_recipe({"name": "targeted", "model": str(tokenized_bert), "data": str(sentiment_csv),
                           "max_len": 48, "batch_size": 16, "targets": [str(fast_profile)],
                           "stages": [{"prune": {"speedup": 1.5, "calibration_examples": 32}}]})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POCKETFORMER_CACHE", str(tmp_path_factory.mktemp("cache")))
        summary = pipeline.compress(recipe, tokenized_bert, out)
        pipeline.export(out, ["onnx"], int8=False)
        pipeline.validate(out, str(fast_profile))
        from pocketformer.report import write_report

        report = write_report(out)
    return out, summary, report


def test_the_pruned_model_meets_the_predicted_target_on_the_measured_table(targeted_run):
    _, summary, _ = targeted_run
    lt = summary["stages"][0]["details"]["latency_target"]
    assert lt["predicted_ms"] <= lt["budget_ms"] + 1e-9
    assert lt["budget_ms"] == pytest.approx(lt["predicted_before_ms"] / 1.5)
    assert lt["runtime"] == "onnxruntime" and lt["cpu"]
    assert summary["model"]["params"] < summary["baseline"]["params"]


def test_the_report_puts_the_measured_latency_beside_the_prediction(targeted_run):
    out, _, report = targeted_run
    (t,) = report["latency_targets"]
    rows = {r["variant"]: r for r in report["validation"]}
    assert t["measured_ms"] == rows["model.fp32"]["latency_p50_ms"]
    assert t["measured_speedup"] == pytest.approx(rows["baseline.fp32"]["latency_p50_ms"] / t["measured_ms"])
    assert t["met"] == (t["measured_speedup"] >= 1.5)
    line = latency_target_line(t)
    assert line in (out / "report.md").read_text()
    assert ("met" in line) if t["met"] else (f"MISSED by {t['missed_by_pct']:.1f}%" in line)
