"""Deployability lint on real exported files: each finding names the problem and carries a fix."""

from __future__ import annotations

import pytest

from pocketformer.errors import TargetError
from pocketformer.targets import get_profile
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


def test_int8_on_a_cpu_without_int8_speedup_is_a_warning(onnx_files, make_profile):
    profile = get_profile(str(make_profile("no-vnni", int8_speedup=False)))
    assert "int8-speed" in checks(lint(onnx_files[1], profile), "warning")
    assert "int8-speed" not in checks(lint(onnx_files[0], profile))


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
