"""Latency tables of decoder-only language models: what one generated token (decode) and the prompt (prefill) cost on
a target, by each layer's attention and FFN widths, measured in the target's own runtime; the LM counterpart of
targets/latency.py, in the same table format (pocketformer.latency.LatencyTable, `measure` "decode" or "prefill").

A layer's attention is counted in units: its query heads plus its key-value heads. At batch 1 a step reads every
weight once, and each unit is one head_dim-wide slice of hidden x hidden weights (q and o for a query head, k and v
for a key-value head), so a layer with g groups of p query heads costs about the same as any other with g (p + 1)
units, whether pruning dropped whole groups or heads within them. FFN width is its gated neurons (gate, up, down).

How a table is measured, for a model family (hidden size, head size, vocabulary, activation...) and a precision:
- every point is a whole LM of random weights exported with its cache by the target's format (the graphs a real
  artifact has) and timed in a fresh process by validate's probe (targets/lm_validate.measure_decoding: a prefill of
  the profile's prompt_tokens, then decode steps; p50s), twice, models in turn, the lower p50 kept; one probe gives
  both the decode and the prefill figure, so both tables come from the same files;
- stacks of L layers (L = the family's depth, at most STACK_LAYERS) at a handful of attention widths (the smallest
  FFN) and of FFN widths (the smallest attention), and one layer of the smallest shape: attention(u) and ffn(w) are
  the differences per layer, relative to the smallest shape, which `layer_ms` (one layer of the smallest shape) and
  `base_ms` (embeddings, final norm, output projection) hold; a pruned LM keeps at least one group and one FFN block
  in every layer it keeps (compress/lm_prune.py), so no prediction goes below the smallest shape;
- a calibration on whole random pruned LMs of the family's depth fits measured ~ a * (sum of blocks) + b.
Tables are cached as the encoders' are, keyed by profile, runtime and version, precision, family, depth, CPU, measure.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import __version__
from ..latency import Curve, LatencyTable, lm_units, monotone
from ..models.causal import CausalLM, CausalLMConfig, DecoderLayerShape
from ..progress import info, progress_bar
from ..store import cpu, fingerprint
from . import Profile, runtime_of
from .latency import ROUNDS, WIDTH_STEP, measurable

LM_TABLE_VERSION = 1  # bump when the way LM tables are measured changes: old cached tables are then not reused
STACK_LAYERS = 8  # layers of the block stacks: enough to lift a layer's cost above the output projection's noise
MEASURES = ("decode", "prefill")
Shape = tuple[int, int, int]  # (key-value groups, query heads per group, FFN neurons) of one layer


def lm_family_of(spec: CausalLMConfig) -> dict[str, Any]:
    """What an LM table is valid for: everything but the layers' widths."""
    first = spec.layers[0]
    return {"modality": "text", "kind": spec.kind, "hidden": spec.hidden, "head_dim": first.head_dim,
            "act": spec.act, "norm": "rms", "vocab_size": spec.vocab_size, "max_positions": spec.max_positions,
            "tie_embeddings": spec.tie_embeddings}


def _widest(spec: CausalLMConfig) -> tuple[int, int, int]:
    """Groups, query heads per group and FFN neurons of the family's widest layer."""
    widest = max(spec.layers, key=lambda s: (s.heads + s.kv_heads, s.ffn))
    return widest.kv_heads, widest.group, max(s.ffn for s in spec.layers)


def lm_model_of(spec: CausalLMConfig, shapes: Sequence[Shape], seed: int = 0) -> CausalLM:
    """An LM of the family with these layers and random weights (latency does not see weights)."""
    template = spec.layers[0]
    layers = [DecoderLayerShape(heads=g * p, kv_heads=g, head_dim=template.head_dim, ffn=w, window=template.window,
                                rope_base=template.rope_base, rope_factor=template.rope_factor) for g, p, w in shapes]
    cfg = spec.model_copy(update={"layers": layers, "quantization": {}, "nested_ffn": []}, deep=True)
    torch.manual_seed(seed)
    model = CausalLM(cfg).eval()
    with torch.no_grad():  # random weights of a trained model's scale: no inf or nan on the way through 30 layers
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model


def measure_lm_models(spec: CausalLMConfig, shape_sets: Sequence[Sequence[Shape]], profile: Profile,
                      precision: str = "fp32", desc: str = "measuring", rounds: int = ROUNDS
                      ) -> list[dict[str, float]]:
    """{"decode": ms per generated token, "prefill": ms of the profile's prompt} of an LM of each shape set on the
    profile's runtime, each exported with its cache by the profile's format: the lowest of `rounds` p50s, each in a
    fresh process, the models in turn every round."""
    from ..export import FORMATS, export
    from .lm_validate import measure_decoding

    runtime = measurable(profile)
    lm = profile.language_models
    fmt = FORMATS[profile.format]
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, spec.vocab_size, lm.prompt_tokens)]
    everything = set(fmt.precisions(True, {"int4": True}))
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        with progress_bar(f"{desc}: exporting ({profile.name}, {precision})", len(shape_sets)) as advance:
            for i, shapes in enumerate(shape_sets):
                model = lm_model_of(spec, shapes)
                check = model.graph_inputs(torch.tensor([prompt[:12]]), 8)
                records = export(model, Path(tmp), f"m{i}", check, fmt, runtime, int8=precision != "fp32",
                                 int4=precision == "int4", kinds={None},
                                 skip=frozenset(everything - {precision, fmt.float_precisions[0]}))
                record = next((r for r in records if r["precision"] == precision), None)
                if record is None:
                    from ..errors import TargetError

                    raise TargetError(f"The {profile.format} exporter writes no {precision} file for a language "
                                      "model.", f"choose one of {', '.join(r['precision'] for r in records)}.")
                files.append(Path(tmp) / record["file"])
                advance()
        best = [{m: float("inf") for m in MEASURES} for _ in files]
        with progress_bar(f"{desc}: timing ({profile.name}, {precision})", rounds * len(files)) as advance:
            for _ in range(rounds):
                for i, path in enumerate(files):
                    got = measure_decoding(path, profile, prompt)
                    best[i]["decode"] = min(best[i]["decode"], got["decode_ms_p50"])
                    best[i]["prefill"] = min(best[i]["prefill"], got["ttft_ms"])
                    advance()
    return best


def _points(full: int, fractions: Sequence[float], step: int, least: int) -> list[int]:
    pts = {max(least, int(round(full * f / step)) * step) for f in fractions} | {least, full}
    return sorted(p for p in pts if least <= p <= full)


def attention_shapes(groups: int, per_group: int) -> list[tuple[int, int]]:
    """(groups, heads per group) whose units g (p + 1) span the smallest (1 group of 1 head) to the widest layer:
    whole groups dropped and heads dropped within groups."""
    shapes = {(1, 1), (groups, per_group)} | {(g, per_group) for g in range(1, groups + 1)} | \
        {(groups, p) for p in range(1, per_group + 1)}
    by_units: dict[int, tuple[int, int]] = {}
    for g, p in sorted(shapes):
        by_units.setdefault(g * (p + 1), (g, p))
    units = sorted(by_units)
    if len(units) > 6:  # a handful, spread over the range
        keep = {units[int(round(i * (len(units) - 1) / 5))] for i in range(6)}
        units = sorted(keep)
    return [by_units[u] for u in units]


def random_lm_shapes(spec: CausalLMConfig, n: int, seed: int) -> list[list[Shape]]:
    """n random pruned LMs of the family's depth: L/2..L layers, each 1..G groups of 1..P heads and 1..W/64 FFN
    blocks of 64 neurons."""
    groups, per_group, width = _widest(spec)
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        layers = int(g.integers(max(1, len(spec.layers) // 2), len(spec.layers) + 1))
        out.append([(int(g.integers(1, groups + 1)), int(g.integers(1, per_group + 1)),
                     min(width, int(g.integers(1, max(1, width // WIDTH_STEP) + 1)) * WIDTH_STEP))
                    for _ in range(layers)])
    return out


def build_lm_tables(profile: Profile, spec: CausalLMConfig, precision: str = "fp32", calibration_models: int = 4,
                    rounds: int = ROUNDS) -> dict[str, LatencyTable]:
    """Measure the decode and the prefill table of the family of `spec` on `profile` (see the module docstring)."""
    measurable(profile)
    t0 = time.monotonic()
    groups, per_group, width = _widest(spec)
    least_w = min(WIDTH_STEP, max(1, width // 2))  # two widths at least, for a narrow toy model too
    L = max(2, min(STACK_LAYERS, len(spec.layers)))
    attn = attention_shapes(groups, per_group)
    widths = _points(width, (0.125, 0.25, 0.5, 0.75, 1.0), least_w, least_w)
    # one layer of the smallest shape; L of it (attention's first point and the FFN's: measured once); L layers
    # of each wider attention, and of each wider FFN
    sets = [[(1, 1, least_w)]] + [[(g, p, least_w)] * L for g, p in attn] + [[(1, 1, w)] * L for w in widths[1:]]
    info(f"profile {profile.name}: measuring {len(sets)} block LMs and {calibration_models} whole LMs ({precision}, "
         f"a {profile.language_models.prompt_tokens}-token prompt, {profile.threads} threads)")
    ms = measure_lm_models(spec, sets, profile, precision, "LM latency table", rounds)
    rt = runtime_of(profile)
    tables = {}
    for measure in MEASURES:
        t = [m[measure] for m in ms]
        one, smallest = t[0], t[1]  # one layer, and L layers, of the smallest shape (attention's first point)
        layer_ms = max(0.0, (smallest - one) / (L - 1))
        attention = monotone([max(0.0, (x - smallest) / L) for x in t[1:1 + len(attn)]])
        ffn = monotone([0.0] + [max(0.0, (x - smallest) / L) for x in t[1 + len(attn):]])
        tables[measure] = LatencyTable(
            target=profile.name, runtime=rt.name, runtime_version=rt.version(), threads=profile.threads, batch=1,
            seq_len=profile.language_models.prompt_tokens, precision=precision, measure=measure, cpu=cpu(),
            family=lm_family_of(spec), base_ms=max(0.0, one - layer_ms), layer_ms=layer_ms,
            attention=Curve(points=[g * (p + 1) for g, p in attn], ms=attention),
            ffn=Curve(points=widths, ms=ffn),
            measured={"by": f"pocketformer {__version__}", "rounds": rounds, "date": time.strftime("%Y-%m-%d"),
                      "stack_layers": L, "units": "query heads + key-value heads",
                      "prompt_tokens": profile.language_models.prompt_tokens})
    if calibration_models:
        shapes = random_lm_shapes(spec, calibration_models, seed=0)
        measured = measure_lm_models(spec, shapes, profile, precision, "LM latency calibration", rounds)
        for measure, table in tables.items():
            units = [[(g * (p + 1), w) for g, p, w in s] for s in shapes]
            tables[measure] = table.calibrated([table.blocks_ms(u) for u in units], [m[measure] for m in measured])
    for table in tables.values():
        table.measured["seconds"] = round(time.monotonic() - t0, 1)
    return tables


def check_lm_tables(tables: dict[str, LatencyTable], profile: Profile, spec: CausalLMConfig, n: int = 8,
                    seed: int = 1, rounds: int = ROUNDS) -> dict[str, Any]:
    """Predicted against measured decode and prefill of `n` random pruned LMs the calibration did not see."""
    from ..latency import prediction_errors

    shapes = random_lm_shapes(spec, n, seed)
    precision = next(iter(tables.values())).precision
    measured = measure_lm_models(spec, shapes, profile, precision, "LM latency check", rounds)
    out: dict[str, Any] = {"target": profile.name, "precision": precision, "models": n}
    for measure, table in tables.items():
        predicted = [table.predict([(g * (p + 1), w) for g, p, w in s]) for s in shapes]
        out[measure] = {**prediction_errors(predicted, [m[measure] for m in measured]),
                        "shapes": [{"layers": len(s), "predicted_ms": pr, "measured_ms": m[measure]}
                                   for s, pr, m in zip(shapes, predicted, measured)]}
    return out


def lm_table_key(profile: Profile, spec: CausalLMConfig, precision: str) -> dict[str, Any]:
    rt = runtime_of(profile)
    return {"profile": profile.model_dump(exclude={"budgets", "description"}), "runtime": rt.name,
            "runtime_version": rt.version(), "precision": precision, "family": lm_family_of(spec),
            "widest": _widest(spec), "layers": len(spec.layers), "stack_layers": STACK_LAYERS,
            "cpu": fingerprint(), "table_version": LM_TABLE_VERSION}


def predict_lm(table: LatencyTable, spec: CausalLMConfig) -> float:
    return table.predict(lm_units(spec))



def lm_tables_for(profile: Profile, spec: CausalLMConfig, precision: str = "fp32", rebuild: bool = False,
                  calibration_models: int = 4, rounds: int = ROUNDS) -> dict[str, LatencyTable]:
    """The decode and prefill tables of `profile` for the family of `spec`: cached, else measured now and cached."""
    from ..latency import read_table, write_table

    paths = lm_table_paths(profile, spec, precision)
    if not rebuild and all(p.is_file() for p in paths.values()):
        return {m: read_table(p) for m, p in paths.items()}
    tables = build_lm_tables(profile, spec, precision, calibration_models, rounds)
    for m, table in tables.items():
        write_table(table, paths[m])
    info(f"profile {profile.name}: tables cached at {paths['decode'].parent}")
    return tables


def lm_table_paths(profile: Profile, spec: CausalLMConfig, precision: str) -> dict[str, Path]:
    """Where the cached decode and prefill tables of `profile` for the family of `spec` are (or go)."""
    from ..store import cache_root, digest

    key = digest(lm_table_key(profile, spec, precision))[:20]
    return {m: cache_root() / "latency" / f"{profile.name}-{precision}-{m}-{key}.json" for m in MEASURES}
