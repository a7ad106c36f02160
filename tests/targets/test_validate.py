"""Target profiles and validation of real exported files in ONNX Runtime: accuracy, latency, memory, size, budgets."""

import numpy as np
import pytest

from conftest import export_onnx
from pocketformer.data import Encoder, load_dataset
from pocketformer.errors import TargetError
from pocketformer.store import fingerprint
from pocketformer.targets import get_profile, list_profiles
from pocketformer.targets.validate import predict_artifact, validate_artifact
from pocketformer.train import predict

DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def test_digits():
    return load_dataset("digits", "test").head(24)


@pytest.fixture(scope="module")
def vision_artifact(tmp_path_factory, make_model, make_vision_inputs, test_digits):
    model = make_model("vision", labels=DIGITS)
    out = tmp_path_factory.mktemp("validate")
    record, _fp16 = export_onnx(model, out, "model", make_vision_inputs(batch=4), int8=False)
    reference_out = predict(model, test_digits, Encoder(None)).numpy()
    return model, out / record["file"], record, reference_out


def validate(artifact, profile_path, ds):
    model, path, record, reference_out = artifact
    return validate_artifact(path, record, get_profile(str(profile_path)), ds, Encoder(None), model, reference_out)


# -- profiles -------------------------------------------------------------------------------------------------------

def test_built_in_profiles_are_listed_and_found_by_name():
    names = [p.name for p in list_profiles()]
    assert "host-ort" in names
    assert get_profile("host-ort").runtime == "onnxruntime"


def test_a_profile_yaml_path_is_a_target(make_profile):
    profile = get_profile(str(make_profile("phone-ish", threads=2, seq_len=64)))
    assert (profile.name, profile.threads, profile.seq_len) == ("phone-ish", 2, 64)


def test_an_unknown_target_name_is_a_target_error():
    with pytest.raises(TargetError, match="no-such-target"):
        get_profile("no-such-target")


def test_a_profile_with_an_unknown_key_is_a_target_error(make_profile):
    with pytest.raises(TargetError, match="invalid"):
        get_profile(str(make_profile("bad", gpu=True)))


def test_a_profile_measured_here_does_not_declare_int8_speed(make_profile):
    with pytest.raises(TargetError, match="int8_speedup is measured on this host"):
        get_profile(str(make_profile("declares", this_host=True, int8_speedup=False)))


# -- validation rows -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def row(vision_artifact, fast_profile, test_digits):
    return validate(vision_artifact, fast_profile, test_digits)


def test_row_reports_accuracy_on_the_test_examples(row, test_digits):
    assert 0 <= row["accuracy"] <= 100 and row["examples"] == len(test_digits)


def test_fp32_artifact_agrees_with_the_pytorch_reference(row):
    assert row["agreement_with_reference"] == 100.0
    assert row["accuracy"] == row["reference_accuracy"] and row["accuracy_drop"] == 0
    assert row["output_cosine_with_reference"] > 0.9999


def test_row_reports_latency_percentiles_in_order(row):
    assert 0 < row["latency_p50_ms"] <= row["latency_p90_ms"]
    assert row["latency_runs"] == 6 and row["warmup_runs"] == 1


def test_row_reports_peak_memory_of_the_probe_process(row):
    assert row["peak_rss_mb"] > 0


def test_row_reports_the_file_size(row, vision_artifact):
    assert row["size_mb"] == pytest.approx(vision_artifact[1].stat().st_size / 1e6)


def test_row_names_the_runtime_target_and_threads(row):
    assert (row["runtime"], row["target"], row["threads"], row["precision"]) == ("onnxruntime", "test-ort", 1, "fp32")


def test_row_names_the_cpu_its_latency_was_measured_on(row):
    assert row["cpu"] == fingerprint()


def test_generous_budgets_pass(row):
    assert set(row["budgets"]) == {"latency_ms", "size_mb", "accuracy_drop"}
    assert all(check["pass"] for check in row["budgets"].values()) and row["pass"] is True


def test_a_size_budget_below_the_file_size_fails(vision_artifact, make_profile, test_digits):
    tight = make_profile("tight", budgets={"size_mb": 0.001})
    failed = validate(vision_artifact, tight, test_digits)
    assert failed["budgets"]["size_mb"]["pass"] is False and failed["pass"] is False
    assert failed["budgets"]["size_mb"]["verdict"] == failed["verdict"] == "FAIL"


def test_too_few_examples_to_resolve_the_accuracy_budget_are_inconclusive(vision_artifact, make_profile,
                                                                          test_digits):
    """The fp32 file makes the reference's every decision on 24 examples: a drop of 0, yet 24 examples cannot
    rule out a drop of 1.5 points (the 95% interval reaches 13.8); a 20-point budget they can."""
    strict = validate(vision_artifact, make_profile("strict", budgets={"accuracy_drop": 1.5}), test_digits)
    check = strict["budgets"]["accuracy_drop"]
    assert strict["accuracy_drop"] == 0.0 and check["value"] == 0.0
    assert check["interval"][1] > 1.5 and check["verdict"] == strict["verdict"] == "INCONCLUSIVE"
    assert strict["pass"] is False and check["detail"]["examples_needed"] > len(test_digits)
    assert "24 examples cannot tell; need about" in check["detail"]["reason"]
    loose = validate(vision_artifact, make_profile("loose", budgets={"accuracy_drop": 20}), test_digits)
    assert loose["budgets"]["accuracy_drop"]["verdict"] == loose["verdict"] == "PASS"


def test_the_latency_verdict_uses_the_p50_interval_over_runs(vision_artifact, make_profile, test_digits):
    row = validate(vision_artifact, make_profile("slow", repeats=20, budgets={"latency_ms": 1e-6}), test_digits)
    check = row["budgets"]["latency_ms"]
    low, high = row["latency_p50_interval_ms"]
    assert low <= row["latency_p50_ms"] <= high and check["interval"] == [low, high]
    assert check["verdict"] == "FAIL" and check["detail"]["runs"] == 20


def test_a_lower_confidence_gives_a_narrower_interval(vision_artifact, make_profile, test_digits):
    from pocketformer.targets import with_confidence

    model, path, record, reference_out = vision_artifact
    profile = get_profile(str(make_profile("conf", budgets={"accuracy_drop": 1.5})))
    rows = [validate_artifact(path, record, with_confidence(profile, c), test_digits, Encoder(None), model,
                              reference_out) for c in (0.8, 0.99)]
    assert rows[0]["confidence"] == 0.8 and rows[1]["confidence"] == 0.99
    assert rows[0]["accuracy_drop_interval"][1] < rows[1]["accuracy_drop_interval"][1]
    with pytest.raises(TargetError, match="outside"):
        with_confidence(profile, 1.0)


def test_a_budget_the_profile_does_not_set_is_not_judged(vision_artifact, make_profile, test_digits):
    only_size = make_profile("only-size", budgets={"size_mb": 1000})
    assert set(validate(vision_artifact, only_size, test_digits)["budgets"]) == {"size_mb"}


def test_static_batch_artifact_predicts_every_example(tmp_path, vision_artifact, fast_profile, test_digits):
    model, dynamic_path, _, _ = vision_artifact
    samples = Encoder(None).encode(test_digits, np.arange(4))
    record, _fp16 = export_onnx(model, tmp_path, "static", samples, int8=False, static_shape=(4, 0))
    profile = get_profile(str(fast_profile))
    ds = test_digits.head(10)  # not a multiple of the fixed batch of 4
    static_out = predict_artifact(tmp_path / record["file"], profile, ds, Encoder(None))
    dynamic_out = predict_artifact(dynamic_path, profile, ds, Encoder(None))
    assert static_out.shape == (10, 10)
    assert np.abs(static_out - dynamic_out).max() < 1e-4


def test_an_embedding_models_cosine_floor_is_a_verdict_on_its_mean(tmp_path, make_model, make_vision_inputs,
                                                                    make_profile, test_digits):
    """No labels, so no accuracy drop: the floor on the mean cosine with the uncompressed model's embeddings, by
    the mean's interval. The file against its own model's embeddings passes; against another model's it fails."""
    model = make_model("vision")
    assert not model.task.has_labels
    record, _fp16 = export_onnx(model, tmp_path, "emb", make_vision_inputs(batch=4), int8=False)
    profile = get_profile(str(make_profile("emb", budgets={"min_cosine": 0.95, "accuracy_drop": 1.5})))
    own = predict(model, test_digits, Encoder(None)).numpy()
    other = predict(make_model("vision", seed=1), test_digits, Encoder(None)).numpy()
    rows = [validate_artifact(tmp_path / record["file"], record, profile, test_digits, Encoder(None), model, ref)
            for ref in (own, other)]
    assert [set(r["budgets"]) for r in rows] == [{"min_cosine"}] * 2  # the accuracy budget does not apply
    same, unrelated = (r["budgets"]["min_cosine"] for r in rows)
    assert same["verdict"] == "PASS" and same["low"] >= 0.95 and same["value"] > 0.9999
    assert unrelated["verdict"] == "FAIL" and unrelated["high"] < 0.95
    assert unrelated["value"] == pytest.approx(rows[1]["output_cosine_with_reference"])
