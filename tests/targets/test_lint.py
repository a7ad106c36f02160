"""Deployability lint on real exported files: each finding names the problem and carries a fix."""

from __future__ import annotations

import pytest

from pocketformer.errors import TargetError
from pocketformer.store import fingerprint
from pocketformer.targets import get_profile
from pocketformer.targets.int8_speed import SPEEDUP, Probe, cached
from pocketformer.targets.lint import lint
from conftest import export_onnx


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    from conftest import text_inputs, tiny_model

    out = tmp_path_factory.mktemp("lint-artifacts")
    # an embedding model: the int8 gate compares output vectors, which 2-logit random classifiers make fragile
    export_onnx(tiny_model("text"), out, "model", text_inputs(), int8=True)
    return out / "model.fp32.onnx", out / "model.int8.onnx"


def checks(findings, severity=None):
    return {f.check for f in findings if severity is None or f.severity == severity}


def test_dynamic_shapes_on_a_static_runtime_are_an_error(onnx_files, make_profile):
    profile = get_profile(str(make_profile("static-ort", static_shapes=True)))
    findings = lint(onnx_files[0], profile)
    assert "dynamic-shapes" in checks(findings, "error")
    assert any("--static 1x16" in f.fix for f in findings if f.check == "dynamic-shapes")


def test_dynamic_shapes_are_fine_where_the_runtime_takes_them(onnx_files, make_profile):
    profile = get_profile(str(make_profile("dynamic-ort")))
    assert "dynamic-shapes" not in checks(lint(onnx_files[0], profile))


# int8 probes cheaper than the production one (hidden 384, 2 layers, the profile's shape and repeats): a BERT-shaped
# layer at 32 tokens, and a model so small that quantizing its activations may cost what its int8 matmuls save.
PROBES = {"bert-layer": Probe(layers=1, vocab_size=1000, seq_len=32, warmup=2, repeats=6, rounds=1),
          "tiny": Probe(hidden=64, heads=4, head_dim=16, ffn=128, layers=1, vocab_size=100, seq_len=8, warmup=2,
                        repeats=6, rounds=1)}


@pytest.mark.parametrize("probe", PROBES.values(), ids=PROBES)
def test_int8_speed_on_this_host_is_measured_not_assumed(onnx_files, probe):
    profile = get_profile("host-ort")
    findings = [f for f in lint(onnx_files[1], profile, int8_probe=probe) if f.check == "int8-speed"]
    measured = cached(profile, probe)  # what lint measured, read back from the cache
    assert measured is not None and measured["fingerprint"] == fingerprint()
    assert bool(findings) == (measured["speedup"] < SPEEDUP)
    for f in findings:
        assert f.severity == "warning" and f"measured on this host ({fingerprint()})" in f.message
        assert f"int8 ran at {measured['speedup']:.2f}x fp32 speed" in f.message
    assert "int8-speed" not in checks(lint(onnx_files[0], profile, int8_probe=probe))


def test_int8_on_a_device_declared_without_int8_speedup_is_a_warning(onnx_files, make_profile, isolated_cache):
    profile = get_profile(str(make_profile("no-vnni", int8_speedup=False)))
    findings = [f for f in lint(onnx_files[1], profile) if f.check == "int8-speed"]
    assert [f.severity for f in findings] == ["warning"] and "declared by the profile" in findings[0].message
    assert "int8-speed" not in checks(lint(onnx_files[0], profile))
    assert not (isolated_cache / "latency").exists()  # a device's property is declared, never measured here


def test_int8_on_a_device_declared_with_int8_speedup_is_fine(onnx_files, make_profile, isolated_cache):
    profile = get_profile(str(make_profile("vnni", int8_speedup=True)))
    assert "int8-speed" not in checks(lint(onnx_files[1], profile))
    assert not (isolated_cache / "latency").exists()


def test_file_over_the_size_budget_is_an_error(onnx_files, make_profile):
    profile = get_profile(str(make_profile("tiny-budget", budgets={"size_mb": 0.01})))
    assert "size" in checks(lint(onnx_files[0], profile), "error")


def test_opset_newer_than_the_device_runtime_is_an_error(onnx_files, make_profile):
    profile = get_profile(str(make_profile("old-ort", max_opset=13, runtime_version="onnxruntime 1.10")))
    findings = [f for f in lint(onnx_files[0], profile) if f.check == "opset"]
    assert findings and "13" in findings[0].message


def test_wrong_format_is_refused_naming_the_export_that_fixes_it(onnx_files):
    with pytest.raises(TargetError, match="runs tflite files") as e:
        lint(onnx_files[0], get_profile("android-litert"))
    assert "--to tflite" in e.value.fix


def test_cli_exit_codes(onnx_files, run_cli, make_profile):
    clean = run_cli("lint", onnx_files[0], "--target", make_profile("clean"))
    assert clean.returncode == 0, clean.stderr
    assert "0 errors" in clean.stdout
    bad = run_cli("lint", onnx_files[0], "--target", make_profile("tiny-budget", budgets={"size_mb": 0.01}))
    assert bad.returncode == 1
    assert "ERROR" in bad.stdout and "Fix:" in bad.stdout
    missing = run_cli("lint", onnx_files[0].with_name("absent.onnx"), "--target", "host-ort")
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and missing.stderr.startswith("error:")
