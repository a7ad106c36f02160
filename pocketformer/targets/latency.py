"""Per-target latency tables, measured: what one attention block costs as a function of its heads, one FFN as a
function of its width, an empty layer, and the embeddings with the head, each timed in the target's own runtime with
its own threads and shapes (pocketformer.latency holds the table and the predictor; the format is documented there).

How a table is measured, for a model family (hidden size, head size, vocabulary...) and a precision:
- every point is a whole model of random weights, exported by the format's own exporter (so the runtime sees the
  graphs real artifacts have: same fusions, same kernels) and timed in a fresh process (validate's probe: p50 of the
  profile's repeats after its warm-up), twice, models in turn, the lower p50 kept;
- an empty layer (no heads, no FFN neurons) and the embeddings + head come from stacks of 1 and L empty layers;
- attention(h) is (stack of L layers of h heads and no FFN - the empty stack) / L, at a handful of head counts;
  ffn(w) likewise at a handful of widths rounded to multiples of 64; both piecewise linear between points, made
  non-decreasing (a measured dip is noise: more units never cost less);
- a calibration on whole random pruned models fits measured ~ a * (sum of blocks) + b: what the sum misses
  (fusion across blocks, memory), per target.
Tables are cached under the cache root by (profile, runtime and its version, threads, batch, sequence length,
precision, model family, CPU fingerprint) and reused by every later run. `check_table` measures random pruned shapes
the calibration did not see and reports the share predicted within +-10% and the worst error.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .. import __version__
from ..errors import TargetError
from ..latency import FAMILY_KEYS, Curve, LatencyTable, monotone, prediction_errors, read_table, write_table
from ..models.canonical import CanonicalTransformer, LayerShape, ModelConfig
from ..models.factorized import quiet_empty
from ..progress import info, progress_bar
from ..store import cache_root, cpu, digest, fingerprint
from . import Profile, TableSettings, runtime_of, static_shape

TABLE_VERSION = 2  # bump when the way tables are measured changes: old cached tables are then not reused
ROUNDS = TableSettings().rounds  # fresh-process timings of each model, the lowest p50 kept (a profile may say)
WIDTH_STEP = 64  # FFN widths measured and drawn in random shapes: multiples the runtimes' kernels tile well


def family_of(spec: ModelConfig) -> dict[str, Any]:
    """What a table is valid for: everything of the model but its layers' shapes."""
    shapes = spec.layers
    return {"modality": spec.modality, "hidden": spec.hidden, "head_dim": shapes[0].head_dim if shapes else 0,
            "act": spec.act, "norm": spec.norm, "vocab_size": spec.vocab_size, "max_positions": spec.max_positions}


def shapes_of(model_or_spec) -> list[tuple[int, int]]:
    """(heads, FFN neurons) of each layer: what the table predicts from. Only dense softmax layers are covered."""
    spec = model_or_spec.config if isinstance(model_or_spec, CanonicalTransformer) else model_or_spec
    odd = [i for i, s in enumerate(spec.layers) if s.linears or s.attention != "softmax"]
    if odd:
        raise TargetError(f"Layers {odd} are factorized or use another attention; latency tables cover dense "
                          "softmax layers only.", "predict (and prune to a latency target) before low-rank, "
                                                  "dense-sparse or EcoFormer stages.")
    return [(s.heads, s.ffn) for s in spec.layers]


def _full_shape(spec: ModelConfig) -> tuple[int, int]:
    """The widest layer of the family: the heads and FFN width the table spans."""
    return max(s.heads for s in spec.layers), max(s.ffn for s in spec.layers)


def model_of(spec: ModelConfig, shapes: Sequence[tuple[int, int]], seed: int = 0) -> CanonicalTransformer:
    """A model of the family with these (heads, ffn) layers and random weights (latency does not see weights)."""
    head_dim = spec.layers[0].head_dim
    cfg = spec.model_copy(update={"layers": [LayerShape(heads=h, head_dim=head_dim, ffn=w) for h, w in shapes],
                                  "exits": [], "exit_gate": {}, "nested_ffn": [], "quantization": {}}, deep=True)
    torch.manual_seed(seed)
    with quiet_empty():  # a layer of 0 heads or 0 neurons (a shape pruning makes) has empty linears, as meant
        return CanonicalTransformer(cfg).eval()


def _feeds(model: CanonicalTransformer, profile: Profile) -> dict[str, np.ndarray]:
    """Inputs at the profile's shape: random tokens at full length (or random pixels)."""
    spec, g = model.spec, np.random.default_rng(0)
    if spec.modality == "vision":
        return {model.input_names[0]: g.standard_normal((profile.batch, spec.channels, spec.image_size,
                                                          spec.image_size)).astype(np.float32)}
    ids = g.integers(3, max(4, spec.vocab_size), size=(profile.batch, profile.seq_len)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def measurable(profile: Profile):
    """The profile's runtime, if latency measured here means something; else the way to bring a table."""
    runtime = runtime_of(profile)
    if not runtime.measures_latency:
        raise TargetError(f"{runtime.no_latency()} Target {profile.name} cannot be profiled on this machine.",
                          "measure a table on the device and pass it with `table: FILE` in prune (or `--table FILE`; "
                          "format: `pocketformer profile --help`), or use a target whose runtime runs here.")
    return runtime


def measure_models(spec: ModelConfig, shape_sets: Sequence[Sequence[tuple[int, int]]], profile: Profile,
                   precision: str = "fp32", desc: str = "measuring", rounds: Optional[int] = None) -> list[float]:
    """The latency (ms) on the profile's runtime of a model of each shape set, each exported by the profile's
    format: the lowest of `rounds` p50s, each in a fresh process, the models taken in turn in every round (on a
    shared machine interference only ever slows a run down, and it comes in bursts that one model's back-to-back
    runs would all share)."""
    from ..export import FORMATS, export
    from ..models.importers import parity_inputs
    from .validate import measure_latency

    runtime = measurable(profile)
    fmt, static = FORMATS[profile.format], static_shape(profile)
    rounds = profile.latency_table.rounds if rounds is None else rounds
    others = frozenset(fmt.precisions(True, {})) - {precision}  # only the file timed is written and checked
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        with progress_bar(f"{desc}: exporting ({profile.name}, {precision})", len(shape_sets)) as advance:
            for i, shapes in enumerate(shape_sets):
                model = model_of(spec, shapes)
                check = parity_inputs(model.spec, batch=2, seq=min(16, profile.seq_len))
                records = export(model, Path(tmp), f"m{i}", check, fmt, runtime, int8=precision.startswith("int8"),
                                 static_shape=static, kinds={None}, skip=others)
                record = next((r for r in records if r["precision"] == precision), None)
                if record is None:
                    raise TargetError(f"The {profile.format} exporter writes no {precision} file.",
                                      f"choose one of {', '.join(r['precision'] for r in records)}.")
                files.append((Path(tmp) / record["file"], _feeds(model, profile)))
                advance()
        best = [float("inf")] * len(files)
        with progress_bar(f"{desc}: timing ({profile.name}, {precision})", rounds * len(files)) as advance:
            for _ in range(rounds):
                for i, (path, feeds) in enumerate(files):
                    best[i] = min(best[i], measure_latency(path, profile, feeds)["latency_p50_ms"])
                    advance()
    return best


def _points(full: int, fractions: Sequence[float], step: int, small: Sequence[int] = ()) -> list[int]:
    pts = {max(1, int(round(full * f / step)) * step) if full >= step else max(1, int(round(full * f)))
           for f in fractions} | {p for p in small if p <= full} | {full}
    return sorted(p for p in pts if 0 < p <= full)


def random_shapes(spec: ModelConfig, n: int, seed: int) -> list[list[tuple[int, int]]]:
    """n random pruned shapes of the family's widest layer: L/2..L layers, 1..H heads (now and then 0) and FFN
    widths in multiples of 64 (now and then 0) per layer."""
    heads, width = _full_shape(spec)
    L = len(spec.layers)
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        layers = int(g.integers(max(1, L // 2), L + 1))
        shape = []
        for _ in range(layers):
            h = 0 if g.random() < 0.08 else int(g.integers(1, heads + 1))
            w = 0 if g.random() < 0.08 else int(g.integers(1, max(1, width // WIDTH_STEP) + 1)) * WIDTH_STEP
            shape.append((h, min(w, width)))
        out.append(shape)
    return out


def build_table(profile: Profile, spec: ModelConfig, precision: str = "fp32",
                calibration_models: Optional[int] = None) -> LatencyTable:
    """Measure a table for the family of `spec` on `profile` (see the module docstring); `calibration_models`: the
    profile's (latency_table) unless given."""
    if calibration_models is None:
        calibration_models = profile.latency_table.calibration_models
    measurable(profile)
    positions = spec.max_positions - spec.position_offset
    if spec.modality == "text" and profile.seq_len > positions:
        raise TargetError(f"Target {profile.name} runs {profile.seq_len} tokens, and this model takes at most "
                          f"{positions} positions.", "profile it with a target of a shorter seq_len (a profile "
                                                     ".yaml), or a model that takes the target's length.")
    t0 = time.monotonic()
    heads, width = _full_shape(spec)
    L = max(2, len(spec.layers))
    head_pts = _points(heads, (0.25, 0.5, 0.75, 1.0), 1, small=(1, 2))
    width_pts = _points(width, (0.125, 0.25, 0.5, 0.75, 1.0), WIDTH_STEP)
    sets = [[(0, 0)], [(0, 0)] * L] + [[(h, 0)] * L for h in head_pts] + [[(0, w)] * L for w in width_pts]
    info(f"profile {profile.name}: measuring {len(sets)} block models and {calibration_models} whole models "
         f"({precision}, batch {profile.batch} x {profile.seq_len}, {profile.threads} threads)")
    ms = measure_models(spec, sets, profile, precision, "latency table")
    one, empty = ms[0], ms[1]
    layer_ms = max(0.0, (empty - one) / (L - 1))
    attention = monotone([0.0] + [max(0.0, (t - empty) / L) for t in ms[2:2 + len(head_pts)]])
    ffn = monotone([0.0] + [max(0.0, (t - empty) / L) for t in ms[2 + len(head_pts):]])
    rt = runtime_of(profile)
    table = LatencyTable(target=profile.name, runtime=rt.name, runtime_version=rt.version(), threads=profile.threads,
                         batch=profile.batch, seq_len=profile.seq_len, precision=precision,
                         cpu=cpu(), family=family_of(spec),
                         base_ms=max(0.0, one - layer_ms), layer_ms=layer_ms,
                         attention=Curve(points=[0] + head_pts, ms=attention),
                         ffn=Curve(points=[0] + width_pts, ms=ffn),
                         measured={"by": f"pocketformer {__version__}", "table_version": TABLE_VERSION,
                                   "rounds": profile.latency_table.rounds, "date": time.strftime("%Y-%m-%d"),
                                   "warmup": profile.warmup,
                                   "repeats": profile.repeats})
    if calibration_models:
        shapes = random_shapes(spec, calibration_models, seed=0)
        measured = measure_models(spec, shapes, profile, precision, "latency calibration")
        table = table.calibrated([table.blocks_ms(s) for s in shapes], measured)
    table.measured["seconds"] = round(time.monotonic() - t0, 1)
    return table


def table_key(profile: Profile, spec: ModelConfig, precision: str) -> str:
    rt = runtime_of(profile)
    # a profile measuring its tables as every profile did before it could choose keeps those tables
    same = {"latency_table"} if profile.latency_table == TableSettings() else set()
    return digest({"profile": profile.model_dump(exclude={"budgets", "description", *same}), "runtime": rt.name,
                   "runtime_version": rt.version(), "precision": precision, "family": family_of(spec),
                   "full": _full_shape(spec), "layers": len(spec.layers), "cpu": fingerprint(),
                   "table_version": TABLE_VERSION})


def table_for(profile: Profile, spec: ModelConfig, precision: str = "fp32", path: Optional[Path] = None,
              rebuild: bool = False, calibration_models: Optional[int] = None) -> LatencyTable:
    """The table of `profile` for the family of `spec`: the user's file (`path`), else the cached measurement,
    else measured now and cached."""
    family = family_of(spec)
    if path is not None:
        table = read_table(Path(path))
        table.check_family(family, "this model")
        return table
    cached = cache_root() / "latency" / f"{profile.name}-{precision}-{table_key(profile, spec, precision)[:20]}.json"
    if cached.is_file() and not rebuild:
        return read_table(cached)
    table = build_table(profile, spec, precision, calibration_models)
    write_table(table, cached)
    info(f"profile {profile.name}: table cached at {cached}")
    return table


def check_table(table: LatencyTable, profile: Profile, spec: ModelConfig, n: int = 30, seed: int = 1
                ) -> dict[str, Any]:
    """Predicted against measured latency on `n` random pruned shapes the calibration did not see."""
    shapes = random_shapes(spec, n, seed)
    measured = measure_models(spec, shapes, profile, table.precision, "latency check")
    predicted = [table.predict(s) for s in shapes]
    rows = [{"layers": len(s), "heads": [h for h, _ in s], "ffn": [w for _, w in s], "predicted_ms": p,
             "measured_ms": m, "error": p / m - 1.0} for s, p, m in zip(shapes, predicted, measured)]
    return {"target": table.target, "runtime": table.runtime, "runtime_version": table.runtime_version,
            "threads": table.threads, "precision": table.precision, "cpu": table.cpu.get("fingerprint"),
            **prediction_errors(predicted, measured), "shapes": rows}


def table_lines(table: LatencyTable) -> list[str]:
    """The table as a person reads it."""
    c = table.calibration
    lm = table.measure != "latency"  # a language model's decode or prefill table (targets/lm_latency.py)
    shape = f"{table.measure} after a {table.seq_len}-token prompt" if table.measure == "decode" else \
        f"prefill of {table.seq_len} tokens" if lm else f"batch {table.batch} x {table.seq_len}"
    lines = [f"latency table: {table.target} ({table.runtime} {table.runtime_version}, {table.threads} threads, "
             f"{shape}, {table.precision}) on {table.cpu.get('fingerprint', '?')}",
             "  family: " + ", ".join(f"{k} {table.family[k]}" for k in FAMILY_KEYS if k in table.family),
             f"  embeddings + head: {table.base_ms:.3f} ms; " + (
                 f"a layer of 1 group of 1 head and {table.ffn.points[0]} FFN neurons: {table.layer_ms:.3f} ms" if lm
                 else f"empty layer (norms, residuals): {table.layer_ms:.3f} ms"),
             ("  attention, ms per layer by query + key-value heads (beyond the smallest): " if lm else
              "  attention, ms per layer by heads: ") + ", ".join(f"{p}: {m:.3f}" for p, m in
                                                               zip(table.attention.points, table.attention.ms)),
             "  FFN, ms per layer by neurons: " + ", ".join(f"{p}: {m:.3f}" for p, m in
                                                           zip(table.ffn.points, table.ffn.ms)),
             f"  calibration on {c.models} whole models: measured = {c.scale:.3f} x blocks "
             f"{c.offset_ms:+.3f} ms"]
    if table.measured.get("seconds") is not None:
        lines.append(f"  measured {table.measured.get('date', '?')} in {table.measured['seconds']:.0f} s by "
                     f"{table.measured.get('by', '?')}")
    return lines
