"""Does int8 run faster than fp32 here? Measured, not assumed, for profiles whose latency is this host's.

Whether int8 kernels beat fp32 depends on the CPU (x86 VNNI/AMX, arm64 dotprod/i8mm) and on what the runtime's
version does with them, so a constant in a profile is wrong on the next machine. Instead a fixed probe model (a
randomly initialised BERT-shaped text encoder, seed 0: hidden 384, 12 heads of 32, FFN 1536, 2 layers, BERT's
vocabulary) is exported in the profile's format, fp32 and int8, and both files are timed in the profile's runtime
with its threads, shape, warm-up and repeats (alternately, each in a fresh process; the lower p50 of each). The
result is cached as JSON under the cache root's latency/ folder, keyed by the CPU fingerprint, the runtime and its
version, threads, batch, sequence length and the probe: measured once per machine kind.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .. import __version__, store
from ..errors import TargetError
from ..models.canonical import CanonicalTransformer, HeadSpec, LayerShape, ModelConfig
from ..models.importers import parity_inputs
from ..progress import info
from . import Profile, runtime_of, static_shape

SPEEDUP = 1.15  # int8 at least this much faster than fp32 counts as a speedup; below, it is size only (and noise)
PROBE_VERSION = 1  # bump when the probe or the way it is timed changes: older cached figures are then not reused


@dataclass(frozen=True)
class Probe:
    """The probe model's shape and how it is timed. None: the profile's own (sequence length, batch, warm-up,
    repeats). A smaller probe (tests) is cached under its own key, never read as the production figure."""

    hidden: int = 384
    heads: int = 12
    head_dim: int = 32
    ffn: int = 1536
    layers: int = 2
    vocab_size: int = 30522
    seq_len: Optional[int] = None
    batch: Optional[int] = None
    warmup: Optional[int] = None
    repeats: Optional[int] = None
    rounds: int = 2  # fp32 and int8 each timed this many times, alternately

    def settled(self, profile: Profile) -> "Probe":
        return replace(self, **{k: getattr(profile, k) for k in ("seq_len", "batch", "warmup", "repeats")
                                if getattr(self, k) is None})


PROBE = Probe()


def probe_model(probe: Probe) -> CanonicalTransformer:
    """The probe: random weights (latency does not see them), an embedding head (the int8 export check compares
    embeddings by cosine, which random weights pass; a random classifier's argmax can flip either way)."""
    cfg = ModelConfig(modality="text", hidden=probe.hidden, vocab_size=probe.vocab_size,
                      max_positions=max(probe.seq_len, 16), type_vocab_size=2, head=HeadSpec(pooling="mean"),
                      layers=[LayerShape(heads=probe.heads, head_dim=probe.head_dim, ffn=probe.ffn)
                              for _ in range(probe.layers)])
    torch.manual_seed(0)
    return CanonicalTransformer(cfg).eval()


def cache_key(profile: Profile, probe: Probe = PROBE) -> dict[str, Any]:
    rt = runtime_of(profile)
    probe = probe.settled(profile)
    return {"fingerprint": store.fingerprint(), "runtime": rt.name, "runtime_version": rt.version(),
            "threads": profile.threads, "batch": probe.batch, "seq_len": probe.seq_len, "probe": asdict(probe),
            "probe_version": PROBE_VERSION}


def cache_path(key: dict[str, Any]) -> Path:
    return store.cache_root() / "latency" / f"int8-speed-{store.digest(key)[:20]}.json"


def cached(profile: Profile, probe: Probe = PROBE) -> Optional[dict[str, Any]]:
    """The measurement for this machine kind and the profile's settings, if one was made; else None."""
    key = cache_key(profile, probe)
    try:
        result = json.loads(cache_path(key).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # absent or damaged: measured again
    return result if isinstance(result, dict) and result.get("key") == key else None


def int8_speed(profile: Profile, probe: Probe = PROBE) -> dict[str, Any]:
    """{fp32_ms, int8_ms, speedup, fingerprint, runtime, runtime_version, threads, seq_len, batch, ...} of the
    probe on this host in the profile's runtime: read from the cache, else measured (and cached)."""
    found = cached(profile, probe)
    if found is not None:
        return found
    result = measure(profile, probe)
    store.write_json(cache_path(result["key"]), result)
    return result


def measure(profile: Profile, probe: Probe = PROBE) -> dict[str, Any]:
    """Export the probe in fp32 and int8 and time both in the profile's runtime (no cache)."""
    from ..export import export
    from .validate import measure_latency

    rt = runtime_of(profile)
    if not rt.measures_latency:
        raise TargetError(f"{rt.no_latency()} int8's speed cannot be measured for target {profile.name} here.",
                          "use a runtime that runs here, or make it a device profile (this_host: false) that "
                          "declares int8_speedup: true/false.")
    key = cache_key(profile, probe)
    probe = probe.settled(profile)
    timing = profile.model_copy(update={k: getattr(probe, k) for k in ("seq_len", "batch", "warmup", "repeats")})
    runtime_text = f"{rt.display or rt.name} {key['runtime_version']}"
    info(f"measuring int8 against fp32 on this host ({key['fingerprint']}; {runtime_text}, "
         f"{threads_text(profile.threads)}, {probe.batch}x{probe.seq_len}): once per machine kind, then cached")
    t0 = time.monotonic()
    model = probe_model(probe)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, probe.vocab_size, size=(probe.batch, probe.seq_len)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    p50s: dict[str, list[float]] = {"fp32": [], "int8": []}
    with tempfile.TemporaryDirectory() as tmp:
        records = export(model, Path(tmp), "int8-probe", parity_inputs(model.spec, batch=2,
                                                                         seq=min(16, probe.seq_len)),
                         profile.format, rt, int8=True, static_shape=static_shape(timing), kinds={None})
        files = {r["precision"]: Path(tmp) / r["file"] for r in records if r["precision"] in p50s}
        if set(files) != set(p50s):
            raise TargetError(f"The {profile.format} exporter wrote no {' or '.join(sorted(set(p50s) - set(files)))} "
                              "file of the int8 probe.", "make it a device profile (this_host: false) that declares "
                                                          "int8_speedup: true/false.")
        for _ in range(probe.rounds):
            for precision, path in files.items():
                p50s[precision].append(measure_latency(path, timing, feeds)["latency_p50_ms"])
    fp32_ms, int8_ms = min(p50s["fp32"]), min(p50s["int8"])
    return {"fp32_ms": fp32_ms, "int8_ms": int8_ms, "speedup": fp32_ms / int8_ms,
            "fingerprint": key["fingerprint"], "cpu_model": store.cpu()["model"], "runtime": rt.name,
            "runtime_display": rt.display or rt.name, "runtime_version": key["runtime_version"],
            "threads": profile.threads, "seq_len": probe.seq_len, "batch": probe.batch, "p50s_ms": p50s,
            "measured": {"date": time.strftime("%Y-%m-%d"), "seconds": round(time.monotonic() - t0, 1),
                         "by": f"pocketformer {__version__}"}, "key": key}


def speeds_up(result: dict[str, Any]) -> bool:
    """Does a measurement count as int8 being faster (at least SPEEDUP x fp32)?"""
    return result["speedup"] >= SPEEDUP


def describe(result: dict[str, Any]) -> str:
    """ "measured on this host (x86-64 AVX2 FMA): int8 ran at 1.02x fp32 speed (ONNX Runtime 1.20.1, 2 threads)" """
    return (f"measured on this host ({result['fingerprint']}): int8 ran at {result['speedup']:.2f}x fp32 speed "
            f"({result['runtime_display']} {result['runtime_version']}, {threads_text(result['threads'])})")


def threads_text(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"
