"""Does a .tflite still work on the runtime many shipped apps embed? tflite-runtime 2.14 needs numpy<2, so it runs in
its own virtual environment (made on first use under cache_root()/envs, reused after) and is driven by subprocess.

Two failures matter (METHODS.md): the file does not load (an op version newer than 2.14 knows: GATHER_ND v5,
FULLY_CONNECTED v12), or, worse, it loads and runs but its outputs disagree with current LiteRT.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import TargetError

FORMAT = "tflite"  # the files this older runtime runs
VERSION = "2.14.0"
ENV_NAME = "tflite-runtime-2.14"
REQUIREMENTS = [f"tflite-runtime=={VERSION}", "numpy<2"]
# tflite-runtime 2.14.0 has wheels for CPython 3.8-3.11 on Linux (x86_64, aarch64) only.
PYTHONS = ((3, 11), (3, 10), (3, 9), (3, 8))
READY = "pocketformer-ready.json"
AGREE_MIN_COSINE = 0.999
TIMEOUT_S = 600

# Runs inside the legacy environment: python SCRIPT ARTIFACT FEEDS.npz OUT.npz. Feeds are input_0.. in the
# artifact's input order. Prints "LOADED" once the interpreter is built, then one JSON line.
_SCRIPT = r'''
import json, sys
import numpy as np
artifact, feeds_path, out_path = sys.argv[1:4]
try:
    from tflite_runtime.interpreter import Interpreter
    it = Interpreter(model_path=artifact, num_threads=1)
    it.allocate_tensors()
except Exception as e:
    print(json.dumps({"loads": False, "error": " ".join(str(e).split())}))
    sys.exit(0)
print("LOADED", flush=True)
inputs = sorted(it.get_input_details(), key=lambda d: d["index"])
output = it.get_output_details()[0]["index"]
feeds = np.load(feeds_path)
values = [feeds["input_%d" % i] for i in range(len(inputs))]
batch, n = int(inputs[0]["shape"][0]), len(values[0])
outs = []
try:
    for start in range(0, n, batch):
        chunk = [v[start:start + batch] for v in values]
        short = batch - len(chunk[0])
        if short:
            chunk = [np.concatenate([c, np.repeat(c[-1:], short, axis=0)]) for c in chunk]
        for d, v in zip(inputs, chunk):
            it.set_tensor(d["index"], np.ascontiguousarray(v, dtype=d["dtype"]))
        it.invoke()
        outs.append(it.get_tensor(output)[:batch - short].copy())
except Exception as e:
    print(json.dumps({"loads": True, "runs": False, "error": " ".join(str(e).split())}))
    sys.exit(0)
np.save(out_path, np.concatenate(outs))
import tflite_runtime
print(json.dumps({"loads": True, "runs": True, "error": None, "tflite_runtime": tflite_runtime.__version__,
                  "numpy": np.__version__}))
'''


def env_dir() -> Path:
    from ..store import cache_root

    return cache_root() / "envs" / ENV_NAME


def env_python(env: Path) -> Path:
    return env / "bin" / "python"


def _base_python() -> str:
    """A CPython for which tflite-runtime 2.14 has a wheel: this one if it qualifies, else python3.X on PATH."""
    if platform.system() != "Linux":
        raise TargetError(f"tflite-runtime {VERSION} ships wheels for Linux only (this is {platform.system()}).",
                          "run the old-runtime check on a Linux machine.")
    if sys.version_info[:2] in PYTHONS:
        return sys.executable
    for major, minor in PYTHONS:
        found = shutil.which(f"python{major}.{minor}")
        if found:
            return found
    raise TargetError(f"tflite-runtime {VERSION} needs CPython 3.8-3.11, and none is on PATH "
                      f"(this is {platform.python_version()}).", "install python3.11 (e.g. with pyenv).")


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        last = ([line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()] or ["no output"])[-1]
        raise TargetError(f"Could not {what} for the tflite-runtime {VERSION} check: {last.strip()[:300]}",
                          f"check network access to PyPI (needed once; the environment in {env_dir()} is reused "
                          "after), or point PIP_INDEX_URL at a mirror.")
    return proc


def ensure_env() -> Path:
    """The environment holding tflite-runtime 2.14 and numpy<2, created on first use (needs PyPI once)."""
    env = env_dir()
    if (env / READY).is_file() and env_python(env).exists():
        return env
    env.parent.mkdir(parents=True, exist_ok=True)
    tmp = env.with_name(f".{env.name}.tmp-{os.getpid()}")  # built aside, renamed into place when complete
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _run([_base_python(), "-m", "venv", tmp], "create a virtual environment")
        py = env_python(tmp)
        _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS],
             f"install {' '.join(REQUIREMENTS)}")
        versions = _run([py, "-c", "import json, numpy, tflite_runtime; print(json.dumps("
                                   "{'tflite_runtime': tflite_runtime.__version__, 'numpy': numpy.__version__}))"],
                        "import tflite_runtime").stdout.strip().splitlines()[-1]
        (tmp / READY).write_text(versions)
        if env.exists() and not (env / READY).is_file():  # a half-made environment from an interrupted run
            shutil.rmtree(env, ignore_errors=True)
        try:
            os.replace(tmp, env)
        except OSError:  # another process finished first: use theirs
            if not (env / READY).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return env


def _diagnose(error: str) -> dict[str, Any]:
    """One line with the missing op and version (or the op that failed) up front, then the runtime's own words."""
    error = error.replace("Failed to apply the default TensorFlow Lite delegate indexed at 0.", "").strip()
    m = re.search(r"Didn't find op for builtin opcode '(\w+)' version '(\d+)'", error)
    if m:
        return {"error": f"tflite-runtime {VERSION} has no {m.group(1)} version {m.group(2)}, which the file needs "
                         f"({error})"[:400], "op": m.group(1), "op_version": int(m.group(2))}
    m = re.search(r"Node number \d+ \((\w+)\) failed to (prepare|invoke)", error)
    if m:
        stage = "load" if m.group(2) == "prepare" else "run"
        return {"error": f"tflite-runtime {VERSION} cannot {stage} the file's {m.group(1)} op ({error})"[:400],
                "op": m.group(1)}
    return {"error": f"tflite-runtime {VERSION}: {error}"[:400]}


def check(artifact: Path, feeds: dict[str, np.ndarray], reference_outputs: Optional[np.ndarray] = None
          ) -> dict[str, Any]:
    """Load and run `artifact` in tflite-runtime 2.14 and compare its outputs with `reference_outputs` (by default
    current LiteRT's on the same feeds). Feeds are keyed by input name; more rows than the artifact's batch run in
    chunks. Returns loads, runs, error (one line), op/op_version (what failed, when known), outputs_agree (None when
    it did not run), cosine (the lowest over examples), max_abs_diff, and the parity details."""
    from ..export.base import parity
    from ..export.tflite import describe
    from . import litert
    from .runtime import get_runtime

    names = list(describe(Path(artifact))["inputs"])  # from the file itself: it need not load in LiteRT
    ordered: list = [None] * len(names)
    for name, value in feeds.items():
        ordered[litert.position(names, name)] = np.asarray(value)
    reference = "LiteRT" if reference_outputs is None else "the reference outputs"
    if reference_outputs is None:
        reference_outputs = get_runtime("litert").open(Path(artifact), 1).output(feeds)
    env = ensure_env()
    result: dict[str, Any] = {"runtime": f"tflite-runtime {VERSION}", "loads": False, "runs": False, "error": None,
                              "outputs_agree": None, "cosine": None, "max_abs_diff": None}
    with tempfile.TemporaryDirectory() as tmp:
        script, feeds_path, out_path = Path(tmp) / "run.py", Path(tmp) / "feeds.npz", Path(tmp) / "out.npy"
        script.write_text(_SCRIPT)
        np.savez(feeds_path, **{f"input_{i}": v for i, v in enumerate(ordered)})
        try:
            proc = subprocess.run([str(env_python(env)), str(script), str(Path(artifact).resolve()),
                                   str(feeds_path), str(out_path)], capture_output=True, text=True, timeout=TIMEOUT_S,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        except subprocess.TimeoutExpired:
            result["error"] = f"tflite-runtime {VERSION} did not finish within {TIMEOUT_S} s."
            return result
        lines = proc.stdout.strip().splitlines()
        loaded = "LOADED" in lines
        report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
        if report is None:  # the process died (a native crash leaves no JSON line)
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
            last = ([line for line in proc.stderr.splitlines() if line.strip()] or ["no output"])[-1]
            result.update(loads=loaded, error=f"tflite-runtime {VERSION} crashed ({how}) while "
                                              f"{'running' if loaded else 'loading'} the file: {last.strip()[:200]}")
            return result
        result.update({k: v for k, v in report.items() if k != "error"})
        if report.get("error"):
            result.update(_diagnose(report["error"]))
            return result
        got = np.load(out_path)
    ref = np.asarray(reference_outputs)
    if got.shape != ref.shape or not np.isfinite(got).all():
        result.update(outputs_agree=False, error=f"tflite-runtime {VERSION} ran but returned "
                                                 f"{'non-finite values' if got.shape == ref.shape else got.shape}.")
        return result
    p = parity(ref, got)
    agree = p["min_cosine"] >= AGREE_MIN_COSINE
    result.update(outputs_agree=agree, cosine=p["min_cosine"], max_abs_diff=p["max_abs_diff"], parity=p)
    if not agree:
        result["error"] = (f"tflite-runtime {VERSION} loads and runs the file but its outputs disagree with "
                           f"{reference} (lowest cosine {p['min_cosine']:.4f}, max abs diff {p['max_abs_diff']:.3g}): "
                           "a silent wrong answer on devices with this runtime.")
    return result
