"""The early-exit driver: it stops at the exit, calibration picks the most aggressive gate within the accuracy
budget, validation reports accuracy, the exit histogram and latency, and the pipeline exports and validates
segments for a model with exits."""

import json

import numpy as np
import pytest
import torch

from pocketformer import pipeline
from pocketformer.models.exits import Gate, entropy, exit_indices, predict_with_exits
from pocketformer.data import Encoder, load_dataset
from pocketformer.errors import TargetError
from pocketformer.models import HeadSpec, LayerShape
from pocketformer.recipe import parse_recipe
from pocketformer.targets import get_profile
from pocketformer.targets.early_exit import calibrate, open_segments, run_example, validate_segments
from conftest import export_segments

DIGITS = [str(i) for i in range(10)]


def layers(n):
    return [LayerShape(heads=4, head_dim=16, ffn=128) for _ in range(n)]


@pytest.fixture(scope="module")
def digits():
    return {split: load_dataset("digits", split).head(24) for split in ("validation", "test")}


@pytest.fixture(scope="module")
def vision(make_model, make_vision_inputs, tmp_path_factory):
    """A 4-layer digits classifier with exits after layers 0 and 2, as ONNX segments: (model, manifest path, record)."""
    model = make_model("vision", labels=DIGITS, layers=layers(4), head=HeadSpec(pooling="mean", labels=DIGITS))
    model.set_exits([0, 2])
    with torch.no_grad():
        for head in [*model.exit_heads, model.classifier]:
            head.out.weight.mul_(20.0)
    folder = tmp_path_factory.mktemp("driver")
    record, _fp16 = export_segments(model, folder, "model", make_vision_inputs(batch=4), "onnx", int8=False)
    return model.eval(), folder / record["file"], record


def feeds_of(inputs, i):
    return {"pixel_values": inputs[0][i:i + 1].numpy()}


# -- the driver ------------------------------------------------------------------------------------------------------

def test_the_driver_stops_at_the_first_confident_exit(vision, make_vision_inputs):
    model, path, _ = vision
    driver = open_segments(path, "onnxruntime", threads=1)
    run = run_example(driver, feeds_of(make_vision_inputs(batch=1), 0), Gate(kind="entropy", threshold=1.0))
    assert run.exit == 0 and len(run.head_logits) == 1  # only the first segment ran


def test_a_gate_that_never_stops_runs_every_segment_to_the_final_head(vision, make_vision_inputs):
    model, path, _ = vision
    driver = open_segments(path, "onnxruntime", threads=1)
    inputs = make_vision_inputs(batch=1)
    run = run_example(driver, feeds_of(inputs, 0), Gate(kind="entropy", threshold=0.0))
    with torch.no_grad():
        want = model(*inputs).numpy()[0]
    assert run.exit == 2 and len(run.head_logits) == 3
    assert np.abs(run.logits - want).max() < 1e-3 * np.abs(want).max()


def test_the_patience_gate_stops_where_pytorch_does(vision, make_vision_inputs):
    model, path, _ = vision
    driver = open_segments(path, "onnxruntime", threads=1)
    inputs = make_vision_inputs(batch=8)
    gate = Gate(kind="patience", patience=1)
    got = [run_example(driver, feeds_of(inputs, i), gate).exit for i in range(8)]
    assert got == predict_with_exits(model, inputs, gate).exits.tolist()


def test_stopping_after_one_of_eight_layers_is_faster_than_running_all(make_model, make_text_inputs, tmp_path):
    model = make_model("text", labels=("a", "b"), vocab_size=1000, max_positions=256, layers=layers(8))
    model.set_exits([0])
    inputs = make_text_inputs(batch=2, seq=128, vocab_size=1000)
    record, _fp16 = export_segments(model, tmp_path, "model", inputs, "onnx", int8=False)
    driver = open_segments(tmp_path / record["file"], "onnxruntime", threads=1)
    feeds = {n: t[:1].numpy() for n, t in zip(model.input_names, inputs)}

    def median_ms(gate):
        for _ in range(3):
            run_example(driver, feeds, gate)
        return float(np.median([run_example(driver, feeds, gate).latency_ms for _ in range(15)]))

    assert median_ms(Gate(kind="entropy", threshold=0.0)) > 2 * median_ms(Gate(kind="entropy", threshold=1.0))


def test_a_manifest_of_another_format_is_a_target_error(vision):
    _, path, _ = vision
    with pytest.raises(TargetError, match="onnx segments"):
        open_segments(path, "litert", threads=1)


# -- calibration -----------------------------------------------------------------------------------------------------

def synthetic_heads(seed=0, n=200):
    """One exit head and a final head that is always right; the exit head is right when confident, with a few
    confident mistakes, so the accuracy falls as the entropy threshold rises."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    final = np.eye(3)[labels] * 10
    margin = rng.uniform(0, 6, n)
    wrong = rng.random(n) < (0.6 - margin / 10)  # less confident, more often wrong
    predicted = np.where(wrong, (labels + 1) % 3, labels)
    exit_head = np.eye(3)[predicted] * margin[:, None]
    return np.stack([exit_head, final], axis=1), labels


def accuracy(gate, heads, labels):
    exits = exit_indices(gate, heads)
    return (heads[np.arange(len(exits)), exits].argmax(-1) == labels).mean() * 100


@pytest.mark.parametrize("budget", [1.0, 5.0, 20.0])
def test_the_point_rule_meets_the_budget_on_the_examples_it_saw(budget):
    heads, labels = synthetic_heads()
    gate, info = calibrate(heads, labels, "entropy", budget, rule="point")
    assert accuracy(gate, heads, labels) >= 100.0 - budget
    assert info["gate_accuracy"] == pytest.approx(accuracy(gate, heads, labels))


@pytest.mark.parametrize("budget", [1.0, 5.0, 20.0])
def test_the_bound_rule_keeps_the_upper_confidence_bound_within_the_budget(budget):
    heads, labels = synthetic_heads()
    gate, info = calibrate(heads, labels, "entropy", budget)
    assert info["rule"] == "bound" and info["confidence"] == 0.95
    assert info["drop_interval"][1] <= budget or info["early_exit_fraction"] == 0.0
    assert info["gate_accuracy"] == pytest.approx(accuracy(gate, heads, labels))
    point, _ = calibrate(heads, labels, "entropy", budget, rule="point")
    assert gate.threshold <= point.threshold  # the margin: never more aggressive than the point estimate


def test_the_point_rule_picks_the_most_aggressive_threshold_within_the_budget():
    heads, labels = synthetic_heads()
    gate, _ = calibrate(heads, labels, "entropy", 5.0, rule="point")
    above = np.sort(entropy(heads[:, 0]))
    above = above[above > gate.threshold]
    assert len(above) and all(accuracy(Gate(kind="entropy", threshold=t + 1e-9), heads, labels) < 95.0
                              for t in above)


@pytest.mark.parametrize("rule", ["point", "bound"])
def test_a_larger_budget_exits_earlier(rule):
    heads, labels = synthetic_heads()
    tight, _ = calibrate(heads, labels, "entropy", 1.0, rule=rule)
    loose, _ = calibrate(heads, labels, "entropy", 20.0, rule=rule)
    assert loose.threshold > tight.threshold


@pytest.mark.parametrize("rule", ["point", "bound"])
def test_with_no_room_in_the_budget_and_a_wrong_exit_head_nothing_exits_early(rule):
    heads, labels = synthetic_heads()
    heads[:, 0] = np.eye(3)[(labels + 1) % 3] * 10  # confidently wrong
    gate, info = calibrate(heads, labels, "entropy", 0.0, rule=rule)
    assert info["early_exit_fraction"] == 0.0 and info["gate_accuracy"] == 100.0


def test_patience_calibration_picks_the_smallest_patience_within_the_budget():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 100)
    heads = np.stack([np.eye(2)[labels] * 5] * 4, axis=1)
    heads[:10, 0] = np.eye(2)[1 - labels[:10]] * 5  # the first head is wrong on 10 examples
    heads[:10, 1] = np.eye(2)[1 - labels[:10]] * 5  # ... and so is the second
    assert calibrate(heads, labels, "patience", 20.0, rule="point")[0].patience == 1
    assert calibrate(heads, labels, "patience", 1.0, rule="point")[0].patience == 2
    # 10 of 100 lost: a drop of 10 points whose 95% upper bound (17.5) is over 15 and within 20
    assert calibrate(heads, labels, "patience", 20.0)[0].patience == 1
    assert calibrate(heads, labels, "patience", 15.0)[0].patience == 2


def test_a_full_depth_model_not_certified_leaves_the_exits_the_remainder_against_full_depth():
    """The final head is wrong on 30 of 200 examples the reference gets right: 15 points, whose 95% upper bound
    (20.6) is over a 20-point budget, so no gate is certified against the reference. The exits get what the
    full-depth model leaves (5 points), certified against full depth, and the whole story is recorded."""
    heads, labels = synthetic_heads()
    heads[:30, -1] = np.eye(3)[(labels[:30] + 1) % 3] * 10
    reference_correct = np.ones(len(labels), bool)
    gate, info = calibrate(heads, labels, "entropy", 20.0, reference_correct=reference_correct)
    assert info["mode"] == "remainder" and info["against"] == "full depth"
    assert info["full_depth_drop"] == pytest.approx(15.0) and info["full_depth_drop_interval"][1] > 20.0
    assert info["budget_for_exits"] == pytest.approx(5.0)
    assert info["drop_interval"][1] <= 5.0 or info["early_exit_fraction"] == 0.0
    exits = exit_indices(gate, heads)
    gated_ok = heads[np.arange(len(exits)), exits].argmax(-1) == labels
    assert info["drop_vs_reference"] == pytest.approx(100 * (1 - gated_ok.mean()))
    certified, info = calibrate(heads[30:], labels[30:], "entropy", 20.0, reference_correct=reference_correct[30:])
    assert info["mode"] == "total" and info["against"] == "the uncompressed model"


def population(rng, n):
    """Two exit heads and a final head (right 88% of the time) on a binary task: an exit head is more often right
    the more confident it is, so the drop against the final head grows with the entropy threshold."""
    labels = rng.integers(0, 2, n)
    final_ok = rng.random(n) < 0.88
    heads = []
    for h in range(2):
        conf = rng.uniform(0, 6, n)
        p = 0.55 + 0.4 * (conf / 6) ** 0.7 + 0.03 * h
        ok = rng.random(n) < np.where(final_ok, p, 1 - p)
        heads.append(np.eye(2)[np.where(ok, labels, 1 - labels)] * conf[:, None])
    final = np.eye(2)[np.where(final_ok, labels, 1 - labels)] * 8
    return np.stack(heads + [final], axis=1), labels


def test_the_point_estimate_breaks_the_budget_out_of_sample_and_the_bound_holds_it():
    """Calibrate on 1,000 examples, 100 times; judge each gate on 200,000 examples it never saw (the true drop).
    Choosing the most aggressive gate whose point estimate is within 2 points breaks the budget about half the
    time (selection on noise); the fixed-sequence bound rule breaks it at most 2.5% of the time, as stated."""
    held_out, held_labels = population(np.random.default_rng(0), 200_000)
    ent = entropy(held_out)
    final_ok = held_out[:, -1].argmax(-1) == held_labels

    def true_drop(gate):
        exits = exit_indices(gate, held_out, ent)
        return 100 * (final_ok.mean() - (held_out[np.arange(len(exits)), exits].argmax(-1) == held_labels).mean())

    broken = {"point": 0, "bound": 0}
    exiting = {"point": [], "bound": []}
    for r in range(100):
        heads, labels = population(np.random.default_rng(1000 + r), 1000)
        for rule in broken:
            gate, info = calibrate(heads, labels, "entropy", 2.0, rule=rule)
            broken[rule] += true_drop(gate) > 2.0
            exiting[rule].append(info["early_exit_fraction"])
    assert broken["point"] >= 30, broken
    assert broken["bound"] <= 5, broken
    assert np.mean(exiting["bound"]) > 0.1  # the margin still lets a useful share of examples exit early


# -- validation rows -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def row(vision, digits, tmp_path_factory):
    from conftest import write_profile

    model, path, record = vision
    profile = get_profile(str(write_profile(tmp_path_factory.mktemp("profile") / "ee.yaml", name="ee",
                                            budgets={"accuracy_drop": 2.0})))
    reference_out = predict_with_exits(model, (torch.from_numpy(digits["test"].images),),
                                       Gate(kind="entropy", threshold=0.0)).logits
    return validate_segments(path, record, profile, digits["test"], Encoder(None), model=model,
                             calibration=digits["validation"], reference_out=reference_out)


def test_row_reports_accuracy_against_full_depth_and_the_reference(row):
    assert 0 <= row["accuracy"] <= 100 and 0 <= row["full_depth_accuracy"] <= 100
    assert row["accuracy_drop_vs_full_depth"] == pytest.approx(row["full_depth_accuracy"] - row["accuracy"])
    assert row["reference_accuracy"] == pytest.approx(row["full_depth_accuracy"])


def test_row_exit_histogram_counts_every_example_by_layers_run(row):
    assert set(row["exit_histogram"]) == {"layer 1", "layer 3", "layer 4"}
    assert sum(row["exit_histogram"].values()) == row["examples"] == 24
    assert 1.0 <= row["mean_layers"] <= 4.0


def test_row_reports_mean_p50_p90_latency_and_full_depth_latency(row):
    assert 0 < row["latency_p50_ms"] <= row["latency_p90_ms"]
    assert row["latency_mean_ms"] > 0 and row["full_depth_latency_mean_ms"] > 0
    assert row["speedup_vs_full_depth"] == pytest.approx(row["full_depth_latency_mean_ms"] / row["latency_mean_ms"])


def test_row_agrees_with_pytorch_exits(row):
    assert row["pytorch_exit_agreement"] == 100.0 and row["pytorch_prediction_agreement"] == 100.0


def test_the_gate_is_calibrated_to_the_budget_on_the_validation_split(row):
    cal = row["calibration"]
    assert cal["split"] == "validation" and cal["examples"] == 24 and cal["against"] == "full depth"
    assert cal["drop_interval"][1] <= 2.0 or cal["early_exit_fraction"] == 0.0
    assert row["gate"] == cal["gate"]


def test_the_test_split_drop_is_judged_with_its_interval(row):
    check = row["budgets"]["accuracy_drop"]
    low, high = row["accuracy_drop_interval"]
    assert low <= row["accuracy_drop"] <= high and check["interval"] == [low, high]
    assert check["verdict"] == ("PASS" if high <= 2.0 else "FAIL" if low > 2.0 else "INCONCLUSIVE")
    assert row["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE") and row["pass"] == (row["verdict"] == "PASS")


def test_too_few_calibration_examples_certify_no_exit(vision, digits, make_profile):
    """8 validation examples cannot bound a drop within 2 points: the gate never exits, and the line says so."""
    model, path, record = vision
    profile = get_profile(str(make_profile("ee-few", budgets={"accuracy_drop": 2.0})))
    row = validate_segments(path, record, profile, digits["test"].head(4), Encoder(None), model=model,
                            calibration=digits["validation"].head(8))
    assert row["calibration"]["examples"] == 8 and row["calibration"]["early_exit_fraction"] == 0.0
    assert row["mean_layers"] == row["layers"]


def test_litert_segments_validate_with_the_same_exits_as_pytorch(make_model, make_vision_inputs, digits, tmp_path,
                                                                   make_profile):
    model = make_model("vision", labels=DIGITS, layers=layers(3), head=HeadSpec(pooling="mean", labels=DIGITS))
    model.set_exits([0, 1])
    with torch.no_grad():
        for head in [*model.exit_heads, model.classifier]:
            head.out.weight.mul_(20.0)
    model.spec.exit_gate = Gate(kind="patience", patience=1).model_dump()
    records = export_segments(model, tmp_path, "model", make_vision_inputs(batch=2), "tflite", int8=False)
    fp32 = next(r for r in records if r["precision"] == "fp32")
    profile = get_profile(str(make_profile("ee-litert", format="tflite", runtime="litert", precisions=["fp32"])))
    row = validate_segments(tmp_path / fp32["file"], fp32, profile, digits["test"].head(8), Encoder(None),
                            model=model)
    assert row["runtime"] == "litert" and row["calibration"] is None and row["gate"]["kind"] == "patience"
    assert row["pytorch_exit_agreement"] == 100.0


# -- the pipeline ----------------------------------------------------------------------------------------------------

def test_the_pipeline_exports_and_validates_segments(tmp_path, tokenized_bert, sentiment_csv, fast_profile):
    recipe = parse_recipe(dict(name="ee", model=str(tokenized_bert), data=str(sentiment_csv), max_len=32,
                               batch_size=16, prepare=[{"finetune": {"epochs": 1, "lr": 1e-3}}],
                               stages=[{"early_exit": {"exits": "all", "epochs": 1}}]))
    out = tmp_path / "run"
    pipeline.compress(recipe, tokenized_bert, out)
    records = pipeline.export(out, ["onnx"], int8=False, baseline_formats=[])
    kinds = {r["file"]: r.get("kind") for r in records}
    assert kinds == {f"model.{p}.onnx": None for p in ("fp32", "fp16")} | \
        {f"model.exits.{p}.onnx.json": "segments" for p in ("fp32", "fp16")}
    rows = pipeline.validate(out, str(fast_profile))
    segment_row = next(r for r in rows if r.get("kind") == "segments")
    assert segment_row["exits"] == [0] and segment_row["calibration"]["split"] == "validation"
    assert sum(segment_row["exit_histogram"].values()) == segment_row["examples"]
    saved = json.loads((out / "validation" / "test-ort.json").read_text())["rows"]
    assert [r["file"] for r in saved] == [r["file"] for r in rows]
