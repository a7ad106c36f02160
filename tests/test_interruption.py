"""Interruption: `pocketformer run` killed with SIGKILL at points spread over compress, export and validate (and once
interrupted with Ctrl-C) leaves no partial file under a final name, keeps what it finished, and the same command run
again resumes from the last finished step and ends with the hashes of an uninterrupted run.

KILL_POINTS are in the order a run reaches them: one run is killed at each in turn (see the test)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pocketformer.models import save

# (kill point, the stderr line that marks it, seconds to wait after that line)
KILL_POINTS = [
    ("after loading, before any stage", "loaded ckpt", 0.0),
    ("during prune", "[compress 1/2]", 0.0),
    ("between stages", "    params 69,194", 0.0),
    ("during distill", "[compress 2/2]", 0.3),
    ("after compress, before export", "    params 52,650 -> 52,650", 0.0),
    ("during the baseline's ONNX conversion", "export baseline -> onnx", 0.5),
    ("mid-artifact write", "export baseline -> onnx", 1.5),
    ("between artifacts", "    baseline.fp32.onnx:", 0.0),
    ("during the model's export", "export model -> onnx", 0.8),
    ("before validation", "validate on", 0.0),
    ("mid-validation", "validate on", 1.0),
    ("while writing the report", "    model.fp32.onnx: accuracy", 0.0),
]
STAGES = [{"prune": {"heads": 2, "ffn": 0.25, "importance": "magnitude", "calibration_examples": 16}},
          {"distill": {"epochs": 1, "max_examples": 256, "lr": 1e-3}}]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny ViT checkpoint, a recipe (digits, prune + distill, fp32 ONNX) and a fast profile."""
    from conftest import tiny_model

    work = tmp_path_factory.mktemp("interrupt")
    save(tiny_model("vision", labels=[str(i) for i in range(10)]), work / "ckpt")
    (work / "fast.yaml").write_text(yaml.safe_dump(
        {"name": "fast", "format": "onnx", "runtime": "onnxruntime", "threads": 1, "batch": 1, "seq_len": 16,
         "warmup": 1, "repeats": 3}))
    (work / "r.yaml").write_text(json.dumps(
        {"name": "k", "model": "ckpt", "data": "digits", "batch_size": 64, "stages": STAGES,
         "export": {"formats": ["onnx"], "baseline_formats": ["onnx"], "int8": False},
         "targets": [{"name": "fast.yaml", "limit": 100}]}))
    return work


def run(work: Path, tag: str, kill_at=None, sig=signal.SIGKILL) -> tuple[int, str]:
    """`pocketformer run` into out-TAG with cache-TAG; with `kill_at` (marker, delay), send `sig` that long after
    the first stderr line starting with the marker. Returns (exit code, stderr)."""
    env = {**os.environ, "POCKETFORMER_CACHE": str(work / f"cache-{tag}")}
    # A terminal's Ctrl-C reaches a process whose SIGINT is at its default. A suite started in the background
    # (`nohup ... &`) hands SIG_IGN down to every child, and the run would then ignore the Ctrl-C this test sends.
    proc = subprocess.Popen([sys.executable, "-m", "pocketformer.cli", "run", "r.yaml", "--out", f"out-{tag}"],
                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if kill_at and line.startswith(kill_at[0]):
            time.sleep(kill_at[1])
            proc.send_signal(sig)
            kill_at = None
    return proc.wait(timeout=600), "".join(lines)


def check_final_names(folder: Path) -> None:
    """Every file under a final name (no leading dot anywhere in its path) is complete: it parses or loads."""
    import onnx
    from safetensors.torch import load_file

    for path in folder.rglob("*"):
        if path.is_dir() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".onnx":
            onnx.load(str(path))
        elif path.suffix == ".safetensors":
            load_file(str(path))
        else:
            assert path.stat().st_size > 0, path


def stage_of(line: str) -> str:
    """The stage a "[compress i/n] stage: ..." line is about."""
    return line.split("]", 1)[1].split(":", 1)[0].strip()


def finished_stages(err: str) -> list[str]:
    """Stages whose report line ("    params a -> b ...") was printed: finished and cached before the kill."""
    current, finished = None, []
    for line in err.splitlines():
        if line.startswith("[compress"):
            current = stage_of(line)
        elif line.startswith("    params") and current:
            finished.append(current)
    return finished


def fingerprint(out: Path) -> dict:
    """What an uninterrupted run must end with: weights, artifacts and accuracies (latency aside)."""
    meta = {stem: json.loads((out / stem / "pocketformer.json").read_text())["weights_sha256"]
            for stem in ("baseline", "model")}
    artifacts = {r["file"]: r["sha256"] for r in json.loads((out / "artifacts" / "artifacts.json").read_text())}
    rows = json.loads((out / "validation" / "fast.json").read_text())["rows"]
    return {"weights": meta, "artifacts": artifacts, "accuracy": {r["file"]: r["accuracy"] for r in rows}}


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    code, err = run(workspace, "reference")
    assert code == 0, err
    return fingerprint(workspace / "out-reference")


def stage_lines(err: str) -> dict[str, list[str]]:
    """stage -> the "[compress i/n] stage: ..." lines a run printed for it."""
    lines: dict[str, list[str]] = {}
    for line in err.splitlines():
        if line.startswith("[compress"):
            lines.setdefault(stage_of(line), []).append(line)
    return lines


@pytest.mark.slow
def test_a_run_killed_anywhere_resumes_to_the_same_result(workspace, uninterrupted):
    """One run killed (SIGKILL) at each point in turn, in the order a run reaches them, and started again with the
    same command each time: after every kill no partial file is under a final name, every later start takes the
    stages finished before from the cache, and the start after the last kill ends with an uninterrupted run's
    hashes. (One chain of kills rather than a run per point: each point is reached from where the last kill left
    the run, as a user pressing the same command again would.)"""
    tag = "killed"
    out, cache = workspace / f"out-{tag}", workspace / f"cache-{tag}"
    done: set[str] = set()  # stages finished (so cached) before the current start

    def started_again(err: str, point: str) -> None:
        for stage in done:
            for line in stage_lines(err).get(stage, []):
                assert "reused cached result" in line, f"after the kill {point}: {stage} ran again: {line}"

    previous = "(none)"
    for point, marker, delay in KILL_POINTS:
        code, err = run(workspace, tag, (marker, delay))
        assert code == -signal.SIGKILL, f"{point}: the run ended before the kill point ({code}): {err[-500:]}"
        started_again(err, previous)
        if out.exists():
            check_final_names(out)
        check_final_names(cache)
        done |= set(finished_stages(err))
        previous = point
    code, again = run(workspace, tag)
    assert code == 0, again
    assert done == {"prune", "distill"}
    started_again(again, previous)
    assert all(f"{stage}: reused cached result" in again for stage in done)
    assert fingerprint(out) == uninterrupted


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_the_same_command_does(workspace, uninterrupted):
    code, err = run(workspace, "ctrl-c", ("[compress 2/2]", 0.3), sig=signal.SIGINT)
    assert code == 130 and "run the same command again to resume" in err.splitlines()[-1], \
        f"exit {code}; the run's stderr ended: {err[-1500:]}"
    assert "Traceback" not in err
    check_final_names(workspace / "cache-ctrl-c")
    code, again = run(workspace, "ctrl-c")
    assert code == 0 and "prune: reused cached result" in again
    assert fingerprint(workspace / "out-ctrl-c") == uninterrupted
