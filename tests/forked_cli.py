"""Many CLI commands at once, each in its own process, without paying Python's and torch's start-up for each: one
process imports what the commands import, then forks a child per command. A child is a fresh process as far as the
command can tell (its own argv, environment, working folder, user, stdout and stderr files) and runs the entry point
`python -m pocketformer.cli` runs (`pocketformer.cli.main`). Used by tests that give the CLI dozens of bad inputs
(test_bad_input.py), where start-up was most of the time; test_cli.py keeps real `python -m` processes.

    python forked_cli.py JOBS.json RESULTS.json PARALLEL

JOBS.json: a list of {"args", "env", "cwd", "stdout", "stderr", "uid"?, "gid"?}; RESULTS.json: their exit codes."""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

# What the commands import before they can refuse an input (none of these starts a thread on import).
PRELOAD = ("numpy", "yaml", "torch", "safetensors.torch", "transformers", "onnx", "onnxruntime",
           "pocketformer.cli", "pocketformer.recipe", "pocketformer.models", "pocketformer.pipeline",
           "pocketformer.targets")


def child(job: dict) -> int:
    """Run one command in this (forked) process; its exit code."""
    os.environ.clear()
    os.environ.update(job["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    if job.get("uid") is not None:  # as an unprivileged user, after the output files are open
        os.setgroups([])
        os.setgid(job["gid"])
        os.setuid(job["uid"])
    os.chdir(job["cwd"])
    sys.argv = [sys.executable, *job["args"]]
    try:
        from pocketformer.cli import main

        main()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # as Python itself would: the traceback, exit 1
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve(jobs: list[dict], parallel: int) -> list[int]:
    for name in PRELOAD:
        importlib.import_module(name)
    codes: list[int] = [-1] * len(jobs)
    running: dict[int, int] = {}  # pid -> job index
    pending = list(range(len(jobs)))
    while pending or running:
        while pending and len(running) < parallel:
            i = pending.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os._exit(child(jobs[i]))
            running[pid] = i
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    return codes


if __name__ == "__main__":
    jobs_path, results_path, parallel = sys.argv[1], sys.argv[2], int(sys.argv[3])
    jobs = json.loads(open(jobs_path).read())
    with open(results_path, "w") as f:
        json.dump(serve(jobs, parallel), f)
