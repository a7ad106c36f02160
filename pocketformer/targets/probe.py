"""Latency probe, run in its own process: load an artifact, warm up, time repeated runs, report peak RSS.

Usage: python -m pocketformer.targets.probe MODULE:RUNTIME ARTIFACT FEEDS.npz THREADS WARMUP REPEATS
Prints one JSON line: {"latencies_ms": [...], "peak_rss_mb": ...}.

Only the runtime's own module is imported (not every runtime, nor torch through the exporters): the peak memory is
the artifact's and its runtime's, not pocketformer's.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys

import numpy as np


def main(argv: list[str]) -> None:
    where, artifact, feeds_path, threads, warmup, repeats = argv
    module, _, runtime = where.partition(":")
    importlib.import_module(module)  # registers its runtime
    from .runtime import RUNTIMES

    rt = RUNTIMES[runtime]
    feeds = dict(np.load(feeds_path))
    session = rt.open(artifact, int(threads))
    times = rt.benchmark(session, feeds, int(warmup), int(repeats))
    print(json.dumps({"latencies_ms": times, "peak_rss_mb": peak_rss_kb() / 1024.0}))


def peak_rss_kb() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


if __name__ == "__main__":
    main(sys.argv[1:])
