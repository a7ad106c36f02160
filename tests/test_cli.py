"""The command line, run as users run it (a fresh `python -m pocketformer.cli` process): bad input is one line on
stderr starting with "error:" and exit code 2, never a traceback (usage errors here, every other kind of bad input in
test_bad_input.py); the happy path works step by step."""

import json

import pytest
from conftest import assert_one_line_error

from pocketformer.models import save


# -- listings ---------------------------------------------------------------------------------------------------------

def test_targets_lists_the_built_in_profiles(run_cli):
    proc = run_cli("targets")
    assert proc.returncode == 0 and "host-ort " in proc.stdout


def test_targets_name_this_hosts_cpu_for_profiles_measured_here(run_cli):
    from pocketformer.store import fingerprint

    proc = run_cli("targets")
    assert f"this host's CPU: {fingerprint()}" in proc.stdout
    assert "int8's speed is measured when an int8 file is linted" in proc.stdout  # nothing measured in a fresh cache


def test_stages_lists_each_stage_with_its_settings(run_cli):
    proc = run_cli("stages")
    assert proc.returncode == 0
    for expected in ("prune:", "distill:", "finetune:", "importance = 'taylor'", "round_to = 8", "temperature"):
        assert expected in proc.stdout
    prune = proc.stdout.split("prune:")[1].split("\n")[1]  # what a stage runs on comes first
    assert prune.strip() == "# runs on: encoders, decoder-only language models"
    binarize = proc.stdout.split("binarize:")[1].split("\n")[1]
    assert binarize.strip() == "# runs on: encoders"


def test_inspect_shows_each_layers_shape(run_cli, tmp_path, make_model):
    model = make_model("text")
    model.keep_heads(0, [0, 2, 3])
    model.keep_neurons(1, list(range(40)))
    save(model, tmp_path / "ckpt")
    proc = run_cli("inspect", tmp_path / "ckpt")
    assert proc.returncode == 0, proc.stderr
    assert "layer 0: heads 3 x 16, ffn 128" in proc.stdout and "layer 1: heads 4 x 16, ffn 40" in proc.stdout


# -- step by step: compress, export, validate, inspect ---------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, make_model, fast_profile):
    """A tiny ViT on digits through `compress`, `export --no-int8` and `validate`, each its own process."""
    import os
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("cli")
    save(make_model("vision", labels=[str(i) for i in range(10)]), work / "ckpt")
    (work / "recipe.yaml").write_text(json.dumps({
        "name": "cli", "model": "ckpt", "data": "digits", "batch_size": 64,
        "stages": [{"prune": {"heads": 2, "ffn": 0.25, "importance": "magnitude", "calibration_examples": 16}},
                   {"distill": {"epochs": 1, "max_examples": 64, "lr": 1e-3}}]}))
    env = {**os.environ, "POCKETFORMER_CACHE": str(work / "cache")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pocketformer.cli", *map(str, args)], capture_output=True,
                              text=True, cwd=work, env=env, timeout=300)

    procs = {"compress": cli("compress", "ckpt", "--recipe", "recipe.yaml", "--out", "out"),
             "export": cli("export", "out", "--to", "onnx", "--no-int8"),
             "validate": cli("validate", "out", "--target", fast_profile, "--limit", "40"),
             "inspect": cli("inspect", "out")}
    return work / "out", procs


@pytest.mark.parametrize("step", ["compress", "export", "validate", "inspect"])
def test_each_step_succeeds(cli_run, step):
    _, procs = cli_run
    assert procs[step].returncode == 0, procs[step].stderr
    assert "Traceback" not in procs[step].stderr


def test_compress_prints_the_size_change(cli_run):
    _, procs = cli_run
    assert procs["compress"].stdout.startswith("compressed: params ")


def test_export_writes_the_baseline_and_model_files(cli_run):
    out, _ = cli_run
    assert sorted(p.name for p in (out / "artifacts").glob("*.onnx")) == ["baseline.fp16.onnx", "baseline.fp32.onnx",
                                                                          "model.fp16.onnx", "model.fp32.onnx"]


def test_validate_writes_a_report_with_a_row_per_artifact(cli_run):
    out, procs = cli_run
    report = json.loads((out / "report.json").read_text())
    assert sorted(r["variant"] for r in report["validation"]) == ["baseline.fp32", "model.fp32"]
    assert all(r["examples"] == 40 for r in report["validation"])
    verdicts = [r["verdict"] for r in report["validation"]]
    counts = "; ".join(f"{v} {verdicts.count(v)}" for v in ("PASS", "INCONCLUSIVE", "FAIL"))
    line = procs["validate"].stdout
    assert line.startswith(f"{report['validation'][0]['target']}'s budgets at 95% confidence: {counts.split(';')[0]}")
    assert all(f"{v} {verdicts.count(v)}" in line for v in ("PASS", "INCONCLUSIVE", "FAIL"))


def test_inspect_of_a_run_folder_shows_baseline_and_model(cli_run):
    _, procs = cli_run
    assert "baseline: vision encoder" in procs["inspect"].stdout
    assert "model: vision encoder" in procs["inspect"].stdout
    assert "heads 4 x 16" in procs["inspect"].stdout


def test_inspect_of_an_onnx_file_shows_its_inputs(cli_run, run_cli):
    out, _ = cli_run
    proc = run_cli("inspect", out / "artifacts" / "model.fp32.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "pixel_values" in proc.stdout and "opset" in proc.stdout


@pytest.mark.slow
def test_inspect_minilm(run_cli, minilm_path):
    proc = run_cli("inspect", minilm_path)
    assert proc.returncode == 0, proc.stderr
    assert "text encoder, task embedding, hidden 384, 6 layers" in proc.stdout
    assert proc.stdout.count("heads 12 x 32, ffn 1536") == 6


# -- usage errors: every verb, as typer's own (vendored) click raises them ---------------------------------------

USAGE_ERRORS = [
    (["compress", "minilm", "-o", "OUT"], ["--recipe", "pocketformer compress --help"]),  # forgot --recipe
    (["compress", "--recipe", "r.yaml"], ["checkpoint"]),  # no checkpoint argument
    (["export", "OUT", "--frobnicate"], ["--frobnicate", "pocketformer export --help"]),
    (["export"], ["out"]),
    (["validate"], ["out"]),
    (["validate", "OUT", "--limit", "many"], ["--limit"]),
    (["validate", "OUT", "--target"], ["--target"]),  # an option without its value
    (["run"], ["recipe"]),
    (["run", "r.yaml", "--out"], ["--out"]),
    (["lint", "a.onnx"], ["--target"]),
    (["inspect"], ["path"]),
    (["inspect", "x", "--seq-len", "abc"], ["--seq-len"]),
    (["extract", "SRC"], ["--out"]),
    (["targets", "--all"], ["--all"]),
    (["stages", "extra-argument"], ["extra-argument"]),
    (["nosuchverb"], ["nosuchverb"]),
]


@pytest.mark.parametrize("args,mentions", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line_naming_the_help(run_cli, args, mentions):
    proc = run_cli(*args)
    assert_one_line_error(proc, *mentions)
    assert "--help" in proc.stderr


def test_no_arguments_shows_the_help(run_cli):
    proc = run_cli()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert "compress" in proc.stdout + proc.stderr


def test_inspect_shows_an_artifacts_provenance_and_whether_it_changed(cli_run, run_cli, tmp_path):
    import shutil

    out, procs = cli_run
    assert "made by role compressed, recipe_sha256" in procs["inspect"].stdout
    copy = tmp_path / "artifacts"
    shutil.copytree(out / "artifacts", copy)
    proc = run_cli("inspect", copy / "model.fp32.onnx")
    assert proc.returncode == 0 and "provenance: recipe sha256" in proc.stdout and "matches its record" in proc.stdout
    shutil.copy2(copy / "baseline.fp32.onnx", copy / "model.fp32.onnx")  # another valid file under its name
    assert "DIFFERS from its record" in run_cli("inspect", copy / "model.fp32.onnx").stdout
