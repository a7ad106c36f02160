"""Latency tables: measured on the real runtime (ONNX Runtime, the fast test profile) for the tiny model's family,
cached and reused, read from a user's file, refused where the target cannot measure and for another family."""

from __future__ import annotations

import json

import pytest

from pocketformer.errors import TargetError
from pocketformer.latency import Curve, LatencyTable, prediction_errors, read_table, write_table
from pocketformer.targets import get_profile
from pocketformer.targets.latency import (check_table, family_of, measure_models, random_shapes,
                                          shapes_of, table_for, table_key)


@pytest.fixture(scope="module")
def table_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("latency-cache")


@pytest.fixture(scope="module")
def tiny_table(fast_profile, make_config, table_cache):
    """The tiny family's table on the fast ONNX Runtime profile, measured once for the module (by table_for, into
    this module's cache)."""
    spec = make_config("text", labels=("neg", "pos"))
    profile = get_profile(str(fast_profile))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POCKETFORMER_CACHE", str(table_cache))
        return spec, profile, table_for(profile, spec, calibration_models=3)


def test_table_spans_the_family_and_its_curves_start_at_zero(tiny_table):
    spec, profile, table = tiny_table
    assert table.target == profile.name and table.runtime == "onnxruntime" and table.threads == profile.threads
    assert table.family == family_of(spec)
    heads, width = max(s.heads for s in spec.layers), max(s.ffn for s in spec.layers)
    assert table.attention.points[0] == 0 and table.attention.points[-1] == heads and table.attention.ms[0] == 0
    assert table.ffn.points[0] == 0 and table.ffn.points[-1] == width and table.ffn.ms[0] == 0
    assert all(m >= 0 for m in table.attention.ms + table.ffn.ms) and table.base_ms > 0
    assert table.calibration.models == 3 and table.calibration.scale > 0  # as asked, over the profile's 2
    assert table.measured["rounds"] == profile.latency_table.rounds == 1  # the profile's
    assert table.cpu["fingerprint"]


def test_prediction_is_the_calibrated_sum_of_blocks(tiny_table):
    spec, _, table = tiny_table
    shapes = shapes_of(spec)
    blocks = table.base_ms + sum(table.layer_ms + table.attention(h) + table.ffn(w) for h, w in shapes)
    assert table.blocks_ms(shapes) == pytest.approx(blocks)
    c = table.calibration
    assert table.predict(shapes) == pytest.approx(c.scale * blocks + c.offset_ms)
    # fewer heads and neurons never predict slower on a table whose curves rise
    rising = table.model_copy(update={"attention": Curve(points=[0, 4], ms=[0, 1.0]),
                                      "ffn": Curve(points=[0, 128], ms=[0, 2.0])})
    assert rising.predict([(2, 64)] * 2) < rising.predict([(4, 128)] * 2)


def test_check_measures_shapes_the_calibration_did_not_see(tiny_table):
    spec, profile, table = tiny_table
    result = check_table(table, profile, spec, n=3, seed=5)
    assert result["models"] == 3 and len(result["shapes"]) == 3
    for row in result["shapes"]:
        assert row["error"] == pytest.approx(row["predicted_ms"] / row["measured_ms"] - 1)
    assert result["worst_error"] == max((r["error"] for r in result["shapes"]), key=abs)
    assert 0 <= result["within_10pct"] <= 1
    assert random_shapes(spec, 3, seed=5) != random_shapes(spec, 3, seed=0)


def test_table_is_cached_and_reused(tiny_table, table_cache, monkeypatch):
    spec, profile, first = tiny_table  # measured by table_for into table_cache
    monkeypatch.setenv("POCKETFORMER_CACHE", str(table_cache))
    cached = list((table_cache / "latency").glob("*.json"))
    assert len(cached) == 1 and table_key(profile, spec, "fp32")[:20] in cached[0].name
    assert read_table(cached[0]).digest == first.digest
    stamp = cached[0].stat().st_mtime_ns
    again = table_for(profile, spec)
    assert again.digest == first.digest and cached[0].stat().st_mtime_ns == stamp
    # another thread count, precision or family is another table
    assert len({table_key(profile.model_copy(update={"threads": 2}), spec, "fp32"), table_key(profile, spec, "int8"),
                table_key(profile, spec.model_copy(update={"hidden": 128}), "fp32"),
                table_key(profile, spec, "fp32")}) == 4


def test_a_users_table_is_read_and_checked_against_the_family(tiny_table, tmp_path):
    spec, _, table = tiny_table
    path = tmp_path / "phone.json"
    write_table(table.model_copy(update={"target": "iphone-coreml", "runtime": "coreml"}), path)
    iphone = get_profile("iphone-coreml")
    mine = table_for(iphone, spec, path=path)  # no measurement: the runtime cannot run here, the file is used
    assert mine.target == "iphone-coreml" and mine.attention == table.attention
    wider = spec.model_copy(update={"hidden": spec.hidden * 2})
    with pytest.raises(TargetError, match="another model family.*hidden 128 \\(table: 64\\)"):
        table_for(iphone, wider, path=path)


def test_a_target_that_cannot_measure_here_is_refused_with_the_way_out(make_config):
    with pytest.raises(TargetError, match="measure a table on the device and pass it with `table: FILE`"):
        measure_models(make_config("text"), [[(1, 64)]], get_profile("iphone-coreml"))


@pytest.mark.parametrize("content, problem", [
    (None, "does not exist"), ("{not json", "not readable JSON"),
    (json.dumps({"schema": "other/1"}), "is invalid"),
])
def test_bad_table_files_are_one_clear_error(tmp_path, content, problem):
    path = tmp_path / "t.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TargetError, match=problem):
        read_table(path)


def test_layers_the_table_does_not_cover_are_not_predicted(make_config):
    spec = make_config("text")
    hashed = spec.model_copy(update={"layers": [spec.layers[0].model_copy(update={"attention": "ecoformer"}),
                                                spec.layers[1]]})
    assert shapes_of(spec) == [(s.heads, s.ffn) for s in spec.layers]
    with pytest.raises(TargetError, match="Layers \\[0\\] .*dense softmax layers only"):
        shapes_of(hashed)


def test_prediction_errors_summary():
    r = prediction_errors([11.0, 9.5, 13.0], [10.0, 10.0, 10.0])
    assert r["within_10pct"] == pytest.approx(2 / 3) and r["worst_error"] == pytest.approx(0.3)


def test_curve_extends_its_last_segment():
    c = Curve(points=[0, 2, 4], ms=[0.0, 1.0, 3.0])
    assert c(1) == pytest.approx(0.5) and c(6) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        Curve(points=[0, 2, 2], ms=[0, 1, 2])
    with pytest.raises(ValueError):
        LatencyTable.model_validate({"schema": "x"})


def test_measured_dips_are_pooled_into_a_curve_that_never_falls():
    from pocketformer.latency import monotone

    smooth = monotone([0.0, 1.3, 0.4, 3.7, 1.6, 6.4])
    assert all(a <= b for a, b in zip(smooth, smooth[1:]))
    assert sum(smooth) == pytest.approx(sum([0.0, 1.3, 0.4, 3.7, 1.6, 6.4]))  # least squares keeps the mass
    assert monotone([0.0, 1.0, 2.0]) == [0.0, 1.0, 2.0]


def test_profile_command_shows_a_brought_table_and_checks_it_on_the_runtime(tiny_table, tmp_path, run_cli):
    from pocketformer.models import CanonicalTransformer, save

    spec, profile, table = tiny_table
    folder = tmp_path / "tiny"
    save(CanonicalTransformer(spec), folder, {"role": "test"})
    path = tmp_path / "brought.json"
    write_table(table, path)
    result = run_cli("profile", "--help")
    assert "pocketformer-latency-table/1" in result.stdout  # the format a user brings is documented in --help
    (tmp_path / "p.yaml").write_text(json.dumps(profile.model_dump(exclude_none=True)))
    out = tmp_path / "check.json"
    result = run_cli("profile", "--target", tmp_path / "p.yaml", "--model", folder, "--table", path, "--check",
                     "--models", "2", "--json", out)
    assert result.returncode == 0, result.stderr
    assert f"latency table: {table.target}" in result.stdout and "calibration on 3 whole models" in result.stdout
    check = json.loads(out.read_text())["check"]
    assert check["models"] == 2 and "check on 2 random pruned shapes" in result.stdout
    assert f"worst {check['worst_error']:+.1%}" in result.stdout
