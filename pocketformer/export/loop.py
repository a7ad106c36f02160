"""The one export loop: for every graph set of a model, in every precision its format writes:
convert (or quantize) -> store sparse -> check against PyTorch on a runtime -> record; then the checked files are
renamed into place. Every failure is collected before the loop reports, and a file that fails its check never
reaches a final name.

A graph set is the model as one graph (a plain artifact) or as several (early-exit segments, export/segments.py),
each graph declaring its inputs and outputs (models/signature.py). The runtime that checks files is handed in by
the caller (pocketformer.targets knows runtimes; this package does not import it): anything with
`open_graphs([(path, signature)], threads) -> sessions` whose sessions `run(feeds) -> outputs by name`, plus
`execution()` and `check_examples`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch

from ..errors import ExportError, TargetError
from ..models.canonical import CanonicalTransformer
from ..models.signature import Graph, GraphIO, named_forward
from .base import FORMATS, Format, Plan, Tolerance, Written, artifact_size, parity, repeat_rows
from .card import Card
from .sparse import has_dense_sparse

Reference = dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]  # graph -> (feeds, outputs)


class CheckRuntime(Protocol):
    check_examples: Optional[int]

    def open_graphs(self, files: list[tuple[Path, Optional[str]]], threads: int) -> list[Any]: ...

    def execution(self) -> str: ...


class ExportFailures(ExportError):
    """One or more files failed; `records` holds those that passed, so the caller can keep them."""

    def __init__(self, failures: list[ExportError], records: list[dict[str, Any]]):
        self.failures, self.records = failures, records
        first = failures[0]
        more = f" (and {len(failures) - 1} more: " + "; ".join(f.problem for f in failures[1:]) + ")" \
            if len(failures) > 1 else ""
        super().__init__(first.problem + more, first.fix)

    def refused(self) -> dict[str, str]:
        """precision -> why, for the failures of one precision's file (a file its check refused)."""
        return {f.precision: f.problem for f in self.failures if f.precision is not None}


GRAPH_SETS: list[type["GraphSet"]] = []


class GraphSet:
    """The model as one graph: what `pocketformer export` writes for every model. Other ways to cut a model into
    graphs (early-exit segments) subclass this and register by subclassing; `applies` says for which models."""

    kind: Optional[str] = None  # None: a plain artifact; else the record's "kind" (segments)
    batch: Optional[int] = None  # a fixed batch every file of the set has, whatever the caller asks
    stores_sparse = True  # mostly-zero weights stored sparse where the format can (export.sparse)
    takes_options = True  # the format's own options (CoreML palettes, compute precision) apply to this set

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        GRAPH_SETS.append(cls)

    @classmethod
    def applies(cls, model: CanonicalTransformer, fmt: Format) -> bool:
        """A model that declares its own graphs for fixed-shape files (a decoder's prefill and decode over a fixed
        cache: export/kv_cache.py) is not exported as its one graph to a fixed-shape format."""
        return not (fmt.static_only and hasattr(model, "fixed_cache_graphs"))

    def __init__(self, model: CanonicalTransformer, fmt: Format, static_shape: Optional[tuple[int, int]] = None):
        self.model = model
        self.graphs = {"model": Graph(named_forward(model.graph_module(), model.input_names), model.io)}

    def reference(self, inputs: tuple[torch.Tensor, ...]) -> Reference:
        """Each graph's feeds and PyTorch outputs on `inputs` (later graphs are fed earlier ones' outputs)."""
        io = self.graphs["model"].io
        with torch.no_grad():
            out = self.model.graph_module()(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        return {"model": (dict(zip(io.input_names, inputs)), dict(zip(io.output_names, outs)))}

    def file_name(self, stem: str, fmt: Format, precision: str, graph: str) -> str:
        return f"{stem}.{fmt.suffix(precision)}{fmt.extension}"

    def records(self, ctx: "SetContext", precision: str, written: list[Written],
                checks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        (w,) = written
        return [{"file": w.path.name, "variant": ctx.stem, "format": ctx.fmt.name, "precision": precision,
                 "size_bytes": artifact_size(w.path), "sha256": ctx.fmt.content_sha256(w.path),
                 "parity_vs_pytorch": {**checks[w.graph][self.graphs[w.graph].io.output_names[-1]],
                                       "execution": ctx.runtime.execution()},
                 "parity_execution": ctx.runtime.execution(), **ctx.fmt.record_extras(ctx.plan, precision),
                 **ctx.fmt.describe(w.path), **({"sparse_storage": w.storage} if w.storage is not None else {})}]


class SetContext:
    """What one graph set's export knows, for the records: format, runtime, plan, stem, folder, check inputs."""

    def __init__(self, fmt: Format, runtime: CheckRuntime, plan: Plan, stem: str, out_dir: Path,
                 inputs: tuple[torch.Tensor, ...], reference: Reference):
        self.fmt, self.runtime, self.plan, self.stem, self.out_dir = fmt, runtime, plan, stem, out_dir
        self.inputs, self.reference = inputs, reference


def graph_sets(model: CanonicalTransformer, fmt: Format, kinds: Optional[set] = None,
               static_shape: Optional[tuple[int, int]] = None) -> list[GraphSet]:
    """How the model exports to `fmt`: as one graph (or, for a decoder in a fixed-shape format, its prefill and
    decode graphs), plus every registered set that applies (with exit heads: the segments an early-exit driver
    runs); `kinds` keeps only those kinds, and asks for them even where none applies (so the set's own refusal
    explains why). A plain artifact (kind None) is always one set: the one that applies."""
    chosen = [cls for cls in [GraphSet, *GRAPH_SETS]
              if (cls.kind in kinds if kinds is not None else True)
              and (cls.applies(model, fmt) or (kinds is not None and cls.kind is not None))]
    return [cls(model, fmt, static_shape) for cls in chosen]


# -- shapes and inputs ---------------------------------------------------------------------------------------------

def fixed_sizes(fmt: Format, gs: GraphSet, io: GraphIO,
                static_shape: Optional[tuple[int, int]]) -> Optional[dict[str, int]]:
    """Sizes of the symbolic axes in the files (None: dynamic): `static_shape` (batch, seq) when asked, else the
    format's defaults for a fixed-shape format (batch 1, default_seq tokens or fewer if the model has fewer)."""
    if static_shape is None and not fmt.static_only:
        return None
    sizes = {"batch": gs.batch or (static_shape[0] if static_shape else 1)}
    if io.has_axis("sequence"):
        sizes["sequence"] = static_shape[1] if static_shape else min(fmt.default_seq, io.bounds["sequence"])
    return sizes


# -- checking ------------------------------------------------------------------------------------------------------

def check_graph(session, feeds: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tolerance: Tolerance,
                model: CanonicalTransformer) -> tuple[dict[str, dict[str, Any]], bool]:
    """Run one graph on PyTorch's feeds; compare every output. fp32: each output within the tolerance; reduced
    precision: the task output (the last) judged by the task; every output finite."""
    got = session.run({k: v.numpy() for k, v in feeds.items()})
    if not set(want) <= set(got) and len(got) == len(want):  # a converter that names outputs its own way
        got = dict(zip(want, got.values()))
    results = {}
    task_out = list(want)[-1]
    for name, ref in want.items():
        ref = ref.numpy()
        cand = np.asarray(got[name]).astype(np.float32)
        r: dict[str, Any] = parity(ref, cand, per_position=name == task_out and model.task.per_position)
        scale = float(np.abs(ref).max())
        r.update(reference_max_abs=scale, relative_max_abs_diff=r["max_abs_diff"] / (scale + 1e-12))
        r["finite"] = bool(np.isfinite(cand).all())
        results[name] = r
    if tolerance.task:
        ok = model.task.reduced_precision_ok(results[task_out])
    else:
        ok = all((tolerance.max_abs is None or r["max_abs_diff"] <= tolerance.max_abs)
                 and (tolerance.min_cosine is None or r["cosine"] >= tolerance.min_cosine) for r in results.values())
    return results, ok and all(r["finite"] for r in results.values())


def _failure(w: Written, precision: str, results: dict[str, dict[str, Any]], ctx: SetContext,
             judged: str, several: bool) -> ExportError:
    """One line: which file (and graph of a multi-graph set), by how much, and the format's fix. Reduced
    precisions name the output they are judged by; fp32 the worst output."""
    shown = results[judged] if ctx.fmt.tolerance(precision, ctx.plan).task else min(results.values(),
                                                                         key=lambda r: r["cosine"])
    finite = all(r["finite"] for r in results.values())
    near_zero = " (PyTorch's outputs are near zero, which makes cosine noisy)" \
        if shown["reference_max_abs"] < 1e-2 else ""
    where = f"{w.path.name} ({w.graph}, {precision})" if several else f"{w.path.name} ({precision})"
    return ExportError(f"{where} disagrees with PyTorch in {ctx.runtime.execution()}: max abs diff "
                       f"{shown['max_abs_diff']:.2e}, cosine {shown['cosine']:.5f}, label agreement "
                       f"{shown['argmax_agreement']:.2f}{'' if finite else ', non-finite outputs'}{near_zero}.",
                       ctx.fmt.fix(precision))


def _check_precision(ctx: SetContext, gs: GraphSet, precision: str,
                     written: list[Written]) -> dict[str, dict[str, Any]]:
    """Every graph of one precision checked; raises the first graph's failure. A file the runtime cannot load or
    run fails its check like one that disagrees: with the format's fix, not the runtime's."""
    try:
        sessions = ctx.runtime.open_graphs([(w.path, w.signature) for w in written], 1)
        checks = {}
        for w, session in zip(written, sessions):
            feeds, want = ctx.reference[w.graph]
            results, ok = check_graph(session, feeds, want, ctx.fmt.tolerance(precision, ctx.plan), gs.model)
            if not ok:
                raise _failure(w, precision, results, ctx, gs.graphs[w.graph].io.output_names[-1], len(written) > 1)
            checks[w.graph] = results
        return checks
    except TargetError as e:
        raise ExportError(f"{written[0].path.name} ({precision}): {e.problem}", ctx.fmt.fix(precision)) from None


# -- the loop -----------------------------------------------------------------------------------------------------

def export(model: CanonicalTransformer, out_dir: Path, stem: str, inputs: tuple[torch.Tensor, ...],
           fmt: str | Format, runtime: CheckRuntime, *, int8: bool = True,
           static_shape: Optional[tuple[int, int]] = None, sparse: bool = True, kinds: Optional[set] = None,
           card: Optional[Card] = None, skip: frozenset = frozenset(), **options: Any) -> list[dict[str, Any]]:
    """Export every graph set of `model` to `fmt` in each of its precisions, each file checked on `runtime`
    against PyTorch on `inputs` (real test inputs); return the artifacts.json records. `kinds`: only the graph
    sets of these kinds (None: the plain model; "segments"), default all that apply. Raises ExportFailures
    (holding the records that passed) after trying everything, if any file failed. `card`: what every file
    carries about the model (export/card.py), written by the format before the file's check. `skip`: precisions
    not to write (the first, which the others are made from, is always written)."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    unknown = sorted(set(options) - set(fmt.option_names))
    if unknown:
        raise ExportError(f"Format {fmt.name} takes no option {unknown[0]!r}.",
                          f"its options are {', '.join(fmt.option_names) or 'none beyond int8, static, sparse'}.")
    fmt.check_options(options)
    model = model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    failures: list[ExportError] = []
    for gs in graph_sets(model, fmt, kinds, static_shape):
        try:
            records += export_set(gs, fmt, runtime, out_dir, stem, inputs, int8, static_shape,
                                  sparse and has_dense_sparse(model), options, failures, card, skip)
        except ExportError as e:  # the set cannot be converted at all
            failures.append(e)
    if failures:
        raise ExportFailures(failures, records)
    return records


def export_set(gs: GraphSet, fmt: Format, runtime: CheckRuntime, out_dir: Path, stem: str,
               inputs: tuple[torch.Tensor, ...], int8: bool, static_shape: Optional[tuple[int, int]], sparse: bool,
               options: dict[str, Any], failures: list[ExportError],
               card: Optional[Card] = None, skip: frozenset = frozenset()) -> list[dict[str, Any]]:
    io = gs.model.io
    fixed = fixed_sizes(fmt, gs, io, static_shape)
    check_inputs = io.fit(inputs, fixed) if fixed else tuple(inputs)
    if runtime.check_examples:  # a reference interpreter that takes seconds per example checks a few
        check_inputs = tuple(t[:runtime.check_examples] for t in check_inputs)
    reference = gs.reference(check_inputs)
    batch = fixed["batch"] if fixed else None
    examples = {g: tuple(repeat_rows(feeds[t.name], batch) if batch and t.axes[:1] == ("batch",) else feeds[t.name]
                         for t in gs.graphs[g].io.inputs)
                for g, (feeds, _) in reference.items()}
    plan = Plan(gs.graphs, examples, fixed, sparse and gs.stores_sparse,
                {k: v for k, v in options.items() if gs.takes_options}, card=card)
    ctx = SetContext(fmt, runtime, plan, stem, out_dir, check_inputs, reference)
    records: list[dict[str, Any]] = []
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}.{fmt.name}.staging-", dir=out_dir))
    try:
        checked: list[tuple[str, list[Written], dict]] = []
        precisions = fmt.precisions(int8, options)
        precisions = precisions[:1] + [p for p in precisions[1:] if p not in skip]
        for precision in precisions:
            names = {g: gs.file_name(stem, fmt, precision, g) for g in gs.graphs}
            try:
                written = fmt.write(plan, precision, {g: staging / n for g, n in names.items()})
                if plan.card is not None:
                    for path in dict.fromkeys(w.path for w in written):  # a file shared by graphs: once
                        fmt.annotate(path, plan.card, precision)
                checked.append((precision, written, _check_precision(ctx, gs, precision, written)))
            except ExportError as e:
                e.precision = precision  # the caller may keep the other precisions' files (ExportFailures.refused)
                failures.append(e)
                if precision == precisions[0]:
                    break  # every other precision is made from the float files
        for precision, written, checks in checked:
            moved = [Written(w.graph, _into_place(w.path, out_dir), w.signature, w.storage) for w in written]
            records += gs.records(ctx, precision, moved, checks)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return records


def _into_place(staged: Path, out_dir: Path) -> Path:
    """Rename a checked file (or package folder) into out_dir, replacing an older one only now."""
    final = out_dir / staged.name
    if not staged.exists():  # a file shared by several graphs, already moved
        return final
    if final.is_dir():  # a folder cannot be renamed over a non-empty one: move the old one aside first
        old = staged.with_name(staged.name + ".old")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(staged, final)
    return final
