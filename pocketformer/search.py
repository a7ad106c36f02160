"""`pocketformer search`: the fastest model within an accuracy budget on a target, found by a multi-objective Optuna
study over compositions of the stages and their strengths.

Each trial is a plain recipe: the recipe's model, data and `prepare`, then the stages a sample chose (with the
settings it drew from each stage's declared or given ranges), exported to the target's format at every searched
precision. A trial runs `pipeline.compress` (stages shared with earlier trials, the fine-tune first among them, come
from the stage cache), predicts each precision's latency from the target's latency tables, exports (each file checked
against PyTorch), and scores each file in the target's runtime on the validation split: one trained model, a point
per precision (the training is the cost; another precision's file costs seconds). A precision whose file the export's
parity check refuses is left out of the trial with its reason; the trial fails only when no file is left. The study
learns each trial's best point (its fastest file within every budget, else the one least over them: `told`): the
accuracy drop, the latency (the table's prediction, or, when no table covers the file, its latency measured between
batches on the study's scale: `on_study_scale`) and the file size are its objectives, the budgets the sampler's
constraints. The Pareto front, the measurements and the choice are over every point of every trial.

Resumable and never empty-handed:
  - the study lives in OUT/study.db (Optuna's RDB storage on SQLite) and each trial's record in OUT/trials/N/trial.json
    as soon as it ends; a killed search started again re-runs only the trials that had not ended;
  - the sampler holds no state of its own: before every ask it is made anew, seeded by the search's seed and the
    trial's number, so its draws depend only on the stored trials (a resumed search continues exactly as one that
    never stopped, and a Ray cluster draws what local processes draw);
  - trials are asked and told in batches of `parallel`, in trial order, so where a trial ran cannot change the study;
  - a failed trial (a stage error, an export refused by its parity check) is recorded with its reason.

At the end the Pareto front (and the fastest predicted trials within budget) are measured on the target's runtime,
one file at a time in fresh processes; the fastest measured model within budget is chosen, its drop is confirmed on
the test split with a paired (McNemar) interval, and its recipe is written as OUT/chosen.yaml, which `pocketformer
run` reproduces. With no model within budget the nearest misses are reported.

Output folder (default runs/NAME-search):
  study.db, search.json, report.md, pareto-TARGET.png, chosen.yaml
  reference/   the reference model (the recipe's prepare stages), its file on the target and its outputs
  trials/N/    each trial's run folder (compress.json, model/, artifacts/), trial.json and log.txt
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from .errors import PocketformerError, RecipeError, TargetError
from .progress import info
from .recipe import BUILTIN_MODELS, MADE_MODELS, SEARCHED, Recipe, SearchSpec, parse_recipe, searched_range
from .store import cache_root, digest, fingerprint, output_folder, read_json_file, versions, write_json

STUDY_FILE, STUDY_NAME = "study.db", "pocketformer-search"
SEARCH_FILE, TRIAL_FILE, CHOSEN_FILE = "search.json", "trial.json", "chosen.yaml"
OBJECTIVES = ("accuracy_drop", "latency_ms", "size_mb")  # all minimised
LATENCY_RESOURCE = "pocketformer_latency"  # the Ray resource latency is measured on: one unit, so one file at a time
MEASURE_ROUNDS = 2  # fresh-process p50s per measured file, files taken in turn; the lowest is kept
FINAL = ("complete", "pruned", "failed")
# a file's own fields in a trial record's `points` (told() copies the best one's to the record's top level)
POINT_FIELDS = ("precision", "artifact", "size_mb", "validation", "accuracy_drop", "predicted_ms", "measured_ms",
                "study_ms", "reference_measured_ms", "parity_vs_pytorch", "no_prediction")
ANCHOR_FILE = "latency-anchor.json"  # in reference/: the reference's latency on the study's scale, when no fp32 table


# -- the space: params <-> trial recipes ---------------------------------------------------------------------------

def stage_ranges(spec: SearchSpec) -> list[tuple[str, dict[str, Any], dict[str, dict], bool]]:
    """Each candidate stage as (name, fixed settings, searched ranges, optional)."""
    from .compress import REGISTRY

    out = []
    for item in spec.stages:
        (name, cfg), = item.items()
        cfg = dict(cfg or {})
        optional = cfg.pop("optional", False)
        declared = REGISTRY[name].search_space()
        fixed, ranges = {}, {}
        for key, value in cfg.items():
            rng = declared[key] if value == SEARCHED else searched_range(value)
            (ranges if rng is not None else fixed)[key] = rng if rng is not None else value
        out.append((name, fixed, ranges, optional))
    return out


def sample(trial, spec: SearchSpec) -> dict[str, Any]:
    """Draw one composition: `i.stage.use` for optional stages, `i.stage.setting` for searched settings. Settings of
    a stage left out are not drawn. (The precision is not drawn: a trial scores every searched one.)"""
    for i, (name, _, ranges, optional) in enumerate(stage_ranges(spec)):
        if optional and not trial.suggest_categorical(f"{i}.{name}.use", [True, False]):
            continue
        for key, rng in ranges.items():
            pname = f"{i}.{name}.{key}"
            if "choices" in rng:
                trial.suggest_categorical(pname, [c if isinstance(c, (bool, int, float, str)) or c is None
                                                  else yaml.safe_dump(c) for c in rng["choices"]])
            elif isinstance(rng["low"], int) and isinstance(rng["high"], int) and not isinstance(rng.get("step", 1),
                                                                                                   float):
                trial.suggest_int(pname, rng["low"], rng["high"], step=int(rng.get("step") or 1),
                                  log=bool(rng.get("log")))
            else:
                trial.suggest_float(pname, float(rng["low"]), float(rng["high"]), step=rng.get("step"),
                                    log=bool(rng.get("log")))
    return dict(trial.params)


def trial_stages(spec: SearchSpec, params: dict[str, Any], folder: Optional[Path] = None) -> list[dict[str, Any]]:
    """The recipe stages a trial's params stand for; a setting naming a file in `folder` (the recipe's) is made
    absolute, so the recipe reads the same from anywhere."""
    stages = []
    for i, (name, fixed, ranges, optional) in enumerate(stage_ranges(spec)):
        if optional and not params.get(f"{i}.{name}.use", False):
            continue
        cfg = dict(fixed)
        for key, rng in ranges.items():
            value = params[f"{i}.{name}.{key}"]
            if "choices" in rng and isinstance(value, str) and not any(value == c for c in rng["choices"]):
                value = yaml.safe_load(value)  # a choice that is a list or mapping, stored as YAML text
            cfg[key] = value
        if folder is not None:
            cfg = {k: str((folder / v).resolve()) if isinstance(v, str) and v and (folder / v).is_file() else v
                   for k, v in cfg.items()}
        stages.append({name: cfg})
    return stages


def trial_recipe(recipe: Recipe, spec: SearchSpec, target: str, params: dict[str, Any], precisions: list[str],
                 fmt: str, name: str) -> dict[str, Any]:
    """The plain recipe of a trial whose files are `precisions` (a trial: every searched one; the chosen model's
    recipe: its own): what `pocketformer run` reproduces."""
    base = recipe.model_dump(exclude={"search", "stages", "export", "targets", "output", "name"})
    # paths as absolute ones: the recipe is read again from elsewhere (a worker, chosen.yaml in the search folder)
    if recipe.model not in (*BUILTIN_MODELS, *MADE_MODELS):
        base["model"] = str(recipe.resolve_model().resolve())
    data = recipe.resolve_data()
    base["data"] = str(Path(data).resolve()) if data.endswith((".csv", ".jsonl")) else data
    folder = Path(recipe.source_path).parent if recipe.source_path else None
    if target.endswith((".yaml", ".yml")):
        target = str(Path(target).resolve())
    from .export import FORMATS

    # the files it is judged by (and the float file the others are made from), not every precision the format has
    keep = {*precisions, FORMATS[fmt].float_precisions[0]}
    int8 = any(p != "fp32" for p in precisions)
    skip = [f"{fmt}.{p}" for p in FORMATS[fmt].precisions(int8, {}) if p not in keep]
    return {"name": name, **base, "stages": trial_stages(spec, params, folder),
            "export": {"formats": [fmt], "baseline_formats": [fmt], "int8": int8, "skip": skip},
            "targets": [target]}


def describe_params(spec: SearchSpec, params: dict[str, Any]) -> str:
    """`prune speedup=3.25 -> distill max_examples=3000 @ int8`."""
    parts = []
    for item in trial_stages(spec, params):
        (name, cfg), = item.items()
        searched = [k for k in cfg if any(p.endswith(f".{name}.{k}") for p in params)]
        parts.append(name + "".join(f" {k}={cfg[k]:g}" if isinstance(cfg[k], float) else f" {k}={cfg[k]}"
                                    for k in searched))
    return " -> ".join(parts or ["(no stage)"])


# -- one trial (in a worker process or a Ray task) ----------------------------------------------------------------

def predict_latency(model, profile, precision: str, table_file: Optional[str]) -> tuple[Optional[float], str]:
    """(the table's latency for the model, or None, and why none). Only the table the driver measured before any
    trial (`table_file`): a trial never measures one, since it would be timed while other trials train (a table
    measured so predicted a 3.25x-pruned int8 file at 18.9 ms, its fp32 file at 6.8); with no table the file is
    measured between batches, when no trial runs."""
    from .targets.latency import shapes_of, table_for

    if table_file is None:
        return None, f"no {precision} latency table (the reference's could not be measured)"
    try:
        shapes = shapes_of(model)
        table = table_for(profile, model.config, precision, Path(table_file))  # the file, read and its family checked
        return float(table.predict(shapes)), ""
    except PocketformerError as e:
        return None, e.problem


def run_trial(job: dict[str, Any]) -> dict[str, Any]:
    """Compress, predict, export and score one trial; returns (and writes to trial.json) its record. Never raises
    for a problem of the trial itself: the record says `failed` and why."""
    out = Path(job["dir"])
    out.mkdir(parents=True, exist_ok=True)
    if job.get("cache"):
        os.environ["POCKETFORMER_CACHE"] = job["cache"]
    log = open(out / "log.txt", "a", encoding="utf-8")
    saved = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    start = time.time()
    record = {k: job[k] for k in ("number", "params", "recipe", "precisions")}
    try:
        record.update(_score(job, out))
    except PocketformerError as e:
        record.update(status="failed", reason=e.problem)
    except Exception as e:  # a trial's own failure is a result of the search, never the search's end
        record.update(status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log.close()
    record["seconds"] = round(time.time() - start, 1)
    record["ended_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record["host"] = os.uname().nodename
    write_json(out / TRIAL_FILE, record)
    return record


def _score(job: dict[str, Any], out: Path) -> dict[str, Any]:
    import torch

    from . import pipeline
    from .data import Encoder, load_dataset
    from .export import ExportFailures
    from .export.base import artifact_size
    from .models import load
    from .targets import get_profile, with_confidence
    from .targets.validate import accuracy_drop, predict_artifact

    torch.set_num_threads(job["threads"])
    recipe = parse_recipe(job["recipe"], job["source"])
    profile = with_confidence(get_profile(job["target"]), job["confidence"])
    pipeline.compress(recipe, Path(job["checkpoint"]), out, target=job["target"])
    model, _ = load(out / "model")
    figures: dict[str, Any] = {"params_count": sum(p.numel() for p in model.parameters()), "layers": len(model.layers)}
    predicted = {p: predict_latency(model, profile, p, job["tables"].get(p)) for p in job["precisions"]}
    cap = job.get("max_latency_ms")
    over = {p: ms for p, (ms, _) in predicted.items() if cap is not None and ms is not None and ms > cap * 1.1}
    if len(over) == len(predicted):
        fastest = min(over, key=over.get)
        return {**figures, "status": "pruned",
                "reason": f"predicted {over[fastest]:.2f} ms at best ({fastest}), over the {cap:g} ms budget by "
                          "more than the table's 10%"}
    try:
        records = pipeline.export(out, [profile.format], int8=recipe.export.int8, baseline_formats=[],
                                  skip=tuple(recipe.export.skip))
        refused: dict[str, str] = {}
    except ExportFailures as e:  # a precision's file refused by its check: the trial goes on with the others
        records, refused = e.records, e.refused()
        if not refused:
            raise
    ds = load_dataset(recipe.resolve_data(), "validation", recipe.seed)
    ds = ds.for_model(model.spec.modality, model.spec.head.labels, f"The model in {out}")
    reference = np.load(job["reference"])["validation"]
    encoder = Encoder(out / "model", recipe.max_len)
    points = []
    for precision in job["precisions"]:
        record = next((r for r in records if r["precision"] == precision and r.get("kind") is None), None)
        if record is None or precision in over:
            if record is None and precision not in refused:
                refused[precision] = f"the {profile.format} exporter wrote no {precision} file"
            continue
        path = out / "artifacts" / record["file"]
        output = predict_artifact(path, profile, ds, encoder, desc=f"trial {job['number']} {precision}")
        acc, drop = accuracy_drop(model.task, output, reference, ds.labels, profile)
        ms, why = predicted[precision]
        points.append({"precision": precision, "artifact": str(path), "size_mb": artifact_size(path) / 1e6,
                       "validation": acc, "accuracy_drop": drop.drop, "predicted_ms": ms,
                       "parity_vs_pytorch": record["parity_vs_pytorch"], **({"no_prediction": why} if ms is None
                                                                             else {})})
    if not points:
        raise TargetError("No file of the trial is left: " + "; ".join(f"{p}: {why}" for p, why in refused.items()),
                          "see the trial's log.")
    return {**figures, "status": "complete", "points": points, **({"refused": refused} if refused else {}),
            **({"over_latency_budget": over} if over else {})}


# -- where trials run -----------------------------------------------------------------------------------------------

def measure_files(paths: list[str], target: str, rounds: int = MEASURE_ROUNDS) -> list[Optional[float]]:
    """Each file's latency (ms) on the target's runtime: the lowest of `rounds` p50s, each in a fresh process, the
    files taken in turn (a burst of interference on a shared machine then hits one round, not one file). None for a
    file that does not run, or where the runtime measures no latency here."""
    from .progress import progress_bar
    from .targets import get_profile
    from .targets.latency import measurable
    from .targets.validate import measure_latency

    profile = get_profile(target)
    try:
        measurable(profile)
    except TargetError:
        return [None] * len(paths)
    best: list[Optional[float]] = [math.inf] * len(paths)
    feeds = {p: _feeds_for(Path(p), profile) for p in paths}
    with progress_bar(f"measuring {len(paths)} files on {profile.name}", rounds * len(paths)) as advance:
        for _ in range(rounds):
            for i, p in enumerate(paths):
                if best[i] is not None:
                    try:
                        best[i] = min(best[i], measure_latency(Path(p), profile, feeds[p])["latency_p50_ms"])
                    except TargetError:
                        best[i] = None
                advance()
    return [None if b is None else float(b) for b in best]


def _feeds_for(path: Path, profile) -> dict[str, np.ndarray]:
    """Inputs at the profile's shape for a run's file: its first test examples, as `validate` times them."""
    from .data import Encoder, load_dataset
    from .models import load
    from .store import read_compress
    from .targets.validate import latency_feeds

    run = path.parent.parent
    meta = read_compress(run)
    model, _ = load(run / "model")
    ds = load_dataset(meta["data"], "test", meta["recipe"]["seed"])
    ds = ds.for_model(model.spec.modality, model.spec.head.labels, f"The model in {run}")
    return latency_feeds(model.input_names, ds, Encoder(run / "model", meta["recipe"]["max_len"]), profile)


class LocalTrials:
    """Trials in `parallel` local processes (spawned, so no state leaks from the driver); latency measured by the
    driver itself, between batches, when no trial runs."""

    def __init__(self, parallel: int):
        self.parallel = parallel
        self.pool = None

    def _pool(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.parallel, mp_context=multiprocessing.get_context("spawn"))
        return self.pool

    def run(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from concurrent.futures.process import BrokenProcessPool

        futures = [self._pool().submit(run_trial, job) for job in jobs]
        results = []
        for job, f in zip(jobs, futures):
            try:
                results.append(f.result())
            except BrokenProcessPool as e:  # the process died (killed, out of memory, a runtime's crash)
                self.pool = None
                results.append(died(job, f"the trial's process died ({e})"))
        return results

    def measure(self, paths: list[str], target: str) -> list[Optional[float]]:
        return measure_files(paths, target)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def died(job: dict[str, Any], reason: str) -> dict[str, Any]:
    record = {k: job[k] for k in ("number", "params", "recipe", "precisions")}
    record.update(status="failed", reason=reason)
    write_json(Path(job["dir"]) / TRIAL_FILE, record)
    return record


class RayTrials:
    """Trials as Ray tasks (one CPU each) across a cluster's workers, asked and told by the driver's Optuna study in
    the same batches as LocalTrials, so a seed gives the same study on either. Latency is measured by a task that
    needs the cluster's one `pocketformer_latency` unit, between batches: one file at a time, on one pinned node,
    while no trial runs. The run folder must be on storage every node sees (as for Ray Tune's storage_path)."""

    def __init__(self, address: str, parallel: int):
        try:
            import ray
        except ImportError:
            raise RecipeError("--ray needs Ray, which is not installed.",
                              "pip install 'pocketformer[ray]' (or run the search without --ray).") from None
        self.ray = ray
        if address == "local":
            ray.init(num_cpus=max(parallel, 1), resources={LATENCY_RESOURCE: 1}, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        else:
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except Exception as e:
                # Ray's token authentication is on for a `ray start` that finds ~/.ray/auth_token, and off for a
                # driver given an address unless RAY_AUTH_MODE=token: the refusal is only in the exception's cause
                why = f"{e} {e.__cause__ or ''}".lower()
                hint = ("the cluster uses Ray's token authentication: run the search with RAY_AUTH_MODE=token and "
                        "the cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN)."
                        if "invalidauthtoken" in why or "token authentication" in why
                        else "start it with `ray start --head`, or use `--ray local`.")
                raise RecipeError(f"Cannot join the Ray cluster at {address} ({str(e).splitlines()[0]}).",
                                  hint) from None
            if ray.cluster_resources().get(LATENCY_RESOURCE, 0) < 1:
                ray.shutdown()
                raise RecipeError(f"The Ray cluster at {address} has no {LATENCY_RESOURCE} resource to measure "
                                  "latency on.", f"start the node that measures with `ray start ... --resources="
                                                 f"'{{\"{LATENCY_RESOURCE}\": 1}}'`.")
        self.trial = ray.remote(num_cpus=1, max_retries=0)(run_trial)
        self.measurer = ray.remote(num_cpus=0, resources={LATENCY_RESOURCE: 1}, max_retries=0)(measure_files)

    def run(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        refs = [self.trial.remote(job) for job in jobs]
        results = []
        for job, ref in zip(jobs, refs):
            try:
                results.append(self.ray.get(ref))
            except self.ray.exceptions.RayError as e:  # the worker died, or the task could not run
                results.append(died(job, f"the Ray task failed ({str(e).splitlines()[0]})"))
        return results

    def measure(self, paths: list[str], target: str) -> list[Optional[float]]:
        return self.ray.get(self.measurer.remote(paths, target))

    def close(self) -> None:
        self.ray.shutdown()


# -- the study -----------------------------------------------------------------------------------------------------

def constraints_of(trial) -> list[float]:
    """A stored trial's budget excesses (<= 0: within), as `tell` set them for the sampler."""
    return list(trial.constraints.values())


def sampler_for(seed: int, number: int, startup: int):
    """A sampler whose draws depend on the stored trials alone: made anew, seeded by (seed, trial number)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # the budgets reach it as each trial's constraints (Trial.set_constraint): it favours trials within them
        return optuna.samplers.TPESampler(seed=seed * 1_000_003 + number, n_startup_trials=startup,
                                          multivariate=True, group=True)


def open_study(path: Path, key: str):
    """The search's study in `path` (created if new); a folder holding a search with other settings is refused."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 60}})
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, directions=["minimize"] * len(OBJECTIVES),
                                load_if_exists=True)
    stored = study.user_attrs.get("search_key")
    if stored is None:
        study.set_user_attr("search_key", key)
    elif stored != key:
        raise RecipeError(f"{path.parent} holds a search with other settings (model, data, stages, ranges, "
                          "target or budgets).", "use another output folder (-o), or delete that one to start over.")
    return study


def violations(rec: dict[str, Any], spec: SearchSpec, latency: Optional[float]) -> list[float]:
    """How far over each budget (<= 0: within): drop, latency, size."""
    return [rec["accuracy_drop"] - spec.max_drop,
            (latency - spec.max_latency_ms) if spec.max_latency_ms is not None and latency is not None else 0.0,
            rec["size_mb"] - spec.max_size_mb if spec.max_size_mb is not None else 0.0]


def objective_latency(rec: dict[str, Any]) -> Optional[float]:
    """The latency the study compares: the table's prediction, else the file's measurement on the study's scale."""
    for key in ("predicted_ms", "study_ms", "measured_ms"):
        if rec.get(key) is not None:
            return rec[key]
    return None


def on_study_scale(measured: list[Optional[float]], reference_ms: Optional[float],
                   anchor_ms: Optional[float]) -> list[Optional[float]]:
    """Files measured between batches, on the scale the study compares every latency on: each as a fraction of the
    reference's file measured in the same batch, times the anchor (the reference as the fp32 table predicts it, else
    as first measured). A host's speed drifts (1.5x within one session here): raw measurements taken at different
    times, beside predictions from a table measured at the start, would favour the files measured while it was fast
    (an int8 file measured when the host was slow lost to fp32 predictions 1.5x too fast)."""
    if not reference_ms or not anchor_ms:
        return list(measured)
    return [None if ms is None else ms * anchor_ms / reference_ms for ms in measured]


def excess(rec: dict[str, Any], spec: SearchSpec, latency: Optional[float]) -> float:
    """How far over the budgets, all told: each budget's excess relative to the budget (0: within every one)."""
    scale = [max(spec.max_drop, 0.1), spec.max_latency_ms or 1.0, spec.max_size_mb or 1.0]
    return sum(max(0.0, x) / s for x, s in zip(violations(rec, spec, latency), scale))


def points_of(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """A complete trial's files that have a latency, each as a record of its own: the trial's fields, the file's,
    and `id` (trial/precision)."""
    if rec["status"] != "complete":
        return []
    # the trial's own fields: not those told() copied from its best file, which would stand in for a file's missing
    # ones (a measured_ms only the best file has)
    trial = {k: v for k, v in rec.items() if k not in ("points", "told", *POINT_FIELDS)}
    return [{**trial, **p, "id": f"{rec['number']}/{p['precision']}"} for p in rec.get("points", [])
            if objective_latency(p) is not None]


def told(rec: dict[str, Any], spec: SearchSpec) -> dict[str, Any]:
    """The trial's record with its best file's fields on top (what the study learns from the trial; `told`: its
    precision): the fastest file within every budget, else the one least over them. A complete trial with no
    latency for any file fails."""
    if rec["status"] != "complete":
        return rec
    points = points_of(rec)
    if not points:
        return {**rec, "status": "failed", "reason": "no latency for any file: no table, and the target's runtime "
                                                     "measures none here"}
    within = [p for p in points if excess(p, spec, objective_latency(p)) == 0]
    best = min(within, key=lambda p: (objective_latency(p), p["accuracy_drop"])) if within else \
        min(points, key=lambda p: (excess(p, spec, objective_latency(p)), objective_latency(p)))
    return {**rec, **{k: v for k, v in best.items() if k not in ("id", "number")}, "told": best["precision"]}


def tell(study, rec: dict[str, Any], spec: SearchSpec) -> None:
    import optuna

    rec = told(rec, spec)
    number = rec["number"]
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    trial = optuna.trial.Trial(study, trial_id)
    trial.set_user_attr("status", rec["status"])
    if rec.get("reason"):
        trial.set_user_attr("reason", rec["reason"][:500])
    latency = objective_latency(rec)
    if rec["status"] == "complete" and latency is not None:
        for name, excess in zip(OBJECTIVES, violations(rec, spec, latency)):
            trial.set_constraint(name, excess)
        study.tell(number, [rec["accuracy_drop"], latency, rec["size_mb"]])
    elif rec["status"] == "pruned":
        study.tell(number, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(number, state=optuna.trial.TrialState.FAIL)


def pareto(recs: list[dict[str, Any]], key: str = "number") -> list:
    """The `key`s of the complete records (trials, or their points: key "id") no other beats or equals on every
    objective."""
    points = {r[key]: (r["accuracy_drop"], objective_latency(r), r["size_mb"]) for r in recs
              if r["status"] == "complete" and objective_latency(r) is not None}
    front = []
    for n, p in points.items():
        if not any(q != p and all(a <= b for a, b in zip(q, p)) for m, q in points.items() if m != n):
            front.append(n)
    return sorted(front)


class Search:
    """One search: a recipe, its `search` spec, a target and an output folder."""

    def __init__(self, recipe: Recipe, out_dir: Path, spec: SearchSpec, ray: Optional[str] = None):
        from .targets import get_profile, with_confidence

        self.recipe, self.spec, self.ray = recipe, spec, ray
        self.target = spec.target or next((t.name for t in recipe.target_refs()), "host-ort")
        if self.target.endswith((".yaml", ".yml")):  # workers (Ray's among them) may not share this folder
            self.target = str(Path(self.target).resolve())
        self.profile = with_confidence(get_profile(self.target), spec.confidence)
        self.precisions = spec.precisions or list(self.profile.precisions)
        bad = [p for p in self.precisions if p not in self.profile.precisions]
        if bad:
            raise RecipeError(f"Target {self.profile.name} runs {', '.join(self.profile.precisions)} files, not "
                              f"{bad[0]}.", "set search.precisions to some of those.")
        self.out = output_folder(out_dir, "Search folder").resolve()
        self.threads = spec.threads or max(1, (os.cpu_count() or 1) // spec.parallel)
        self.checkpoint = recipe.resolve_model().resolve()
        self.tables = {p: str(self._relative(f)) for p, f in spec.tables.items()}

    def _relative(self, f: str) -> Path:
        path = Path(f)
        if not path.is_absolute() and self.recipe.source_path:
            path = Path(self.recipe.source_path).parent / path
        return path.resolve()

    @property
    def key(self) -> str:
        """What makes two searches the same search: a folder holding another is refused."""
        spec = self.spec.model_dump(exclude={"trials", "minutes", "measure"})
        return digest({"recipe": self.recipe.model_dump(exclude={"search", "stages", "export", "targets", "output",
                                                                 "name"}),
                       "spec": spec, "target": self.profile.model_dump(), "precisions": self.precisions,
                       # 2: a trial scores every precision (1 drew one per trial): 1's studies cannot go on as 2's
                       "trials": 2})

    # -- the reference ----------------------------------------------------------------------------------------------

    def reference(self) -> dict[str, Any]:
        """The uncompressed model (after the recipe's prepare stages): its outputs on the validation and test splits
        in PyTorch (what every drop is paired against), and its fp32 file on the target."""
        from . import pipeline
        from .data import Encoder, load_dataset
        from .models import load
        from .models.io import weights_sha256
        from .store import read_manifest
        from .train import predict

        ref_dir = self.out / "reference"
        recipe = self.recipe.model_copy(update={"stages": [], "search": None})
        pipeline.compress(recipe, self.checkpoint, ref_dir, target=self.target)
        model, _ = load(ref_dir / "baseline")
        npz = ref_dir / "outputs.npz"
        stamp = {"weights": weights_sha256(model), "data": recipe.resolve_data(), "seed": recipe.seed}
        meta_file = ref_dir / "outputs.json"
        if not (npz.is_file() and meta_file.is_file() and read_json_file(meta_file, "", "") == stamp):
            enc = Encoder(ref_dir / "baseline", recipe.max_len)
            outs = {}
            for split in ("validation", "test"):
                ds = load_dataset(recipe.resolve_data(), split, recipe.seed)
                ds = ds.for_model(model.spec.modality, model.spec.head.labels, f"The model in {self.checkpoint}")
                outs[split] = predict(model, ds, enc).numpy()
                outs[f"{split}_labels"] = np.asarray(ds.labels)
            tmp = npz.with_suffix(".tmp.npz")
            np.savez(tmp, **outs)
            tmp.replace(npz)
            write_json(meta_file, stamp)
        pipeline.export(ref_dir, [], int8=False, baseline_formats=[self.profile.format])
        record = next(r for r in read_manifest(ref_dir / "artifacts") if r["variant"] == "baseline"
                      and r["precision"] == "fp32" and r.get("kind") is None)
        ref = np.load(npz)
        task = model.task
        return {"dir": str(ref_dir), "outputs": str(npz), "artifact": str(ref_dir / "artifacts" / record["file"]),
                "size_mb": (ref_dir / "artifacts" / record["file"]).stat().st_size / 1e6,
                "validation_accuracy": float(task.correct(ref["validation"], ref["validation_labels"]).mean() * 100),
                "test_accuracy": float(task.correct(ref["test"], ref["test_labels"]).mean() * 100),
                "layers": len(model.layers), "config": model.config}

    def tables_ready(self, config) -> dict[str, Any]:
        """Each precision's table measured before any trial (so no two trials measure it at once, and none while
        trials run); what each predicts for the reference."""
        from .targets.latency import shapes_of, table_for

        from .latency import write_table

        out = {}
        for p in self.precisions:
            try:
                table = table_for(self.profile, config, p, Path(self.tables[p]) if p in self.tables else None)
                out[p] = {"predicted_reference_ms": float(table.predict(shapes_of(config))), "digest": table.digest}
                if p not in self.tables:  # the reference's table, spanning its full shape, is what trials predict
                    # with (a pruned model's own would span less, and be measured again, while trials run)
                    path = self.out / "reference" / f"latency-{p}.json"
                    write_table(table, path)
                    self.tables[p] = str(path)
            except PocketformerError as e:
                out[p] = {"none": e.problem}
                info(f"  no latency table for {p}: {e.problem} Trials at {p} are measured instead.")
        return out

    # -- trials -----------------------------------------------------------------------------------------------------

    def job(self, number: int, params: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
        recipe = trial_recipe(self.recipe, self.spec, self.target, params, self.precisions, self.profile.format,
                              f"{self.recipe.name}-trial-{number}")
        return {"number": number, "params": params, "recipe": recipe, "precisions": self.precisions,
                "dir": str(self.out / "trials" / f"{number:04d}"), "source": self.recipe.source_path or "<recipe>",
                "checkpoint": str(self.checkpoint), "target": self.target, "threads": self.threads,
                "confidence": self.spec.confidence, "reference": ref["outputs"], "tables": self.tables,
                "max_latency_ms": self.spec.max_latency_ms, "cache": str(cache_root())}

    def finished(self, number: int) -> Optional[dict[str, Any]]:
        path = self.out / "trials" / f"{number:04d}" / TRIAL_FILE
        try:
            rec = read_json_file(path, "trial record", "") if path.is_file() else {}
        except PocketformerError:  # unreadable: the trial runs again
            return None
        return rec if rec.get("status") in FINAL else None

    def line(self, rec: dict[str, Any]) -> str:
        """A trial (its best file told, then its other files), or a point (a record with an `id`)."""
        rec = rec if "id" in rec else told(rec, self.spec)
        head = f"trial {rec['number']}: {describe_params(self.spec, rec['params'])}"
        if rec["status"] != "complete":
            return f"{head} -> {rec['status'].upper()}: {rec.get('reason', '')}"

        def figures(p):
            lat = objective_latency(p)
            how = "predicted" if p.get("predicted_ms") is not None else \
                "measured, scaled to the reference" if p.get("study_ms") is not None else "measured"
            ok = excess(p, self.spec, lat) == 0
            return (f"{p['precision']}: validation drop {p['accuracy_drop']:+.2f} pts, {lat:.2f} ms {how}, "
                    f"{p['size_mb']:.1f} MB" + (" [within budget]" if ok else ""))

        if "id" in rec:
            return f"{head} @ {figures(rec)}"
        others = [figures(p) for p in points_of(rec) if p["precision"] != rec["told"]]
        refused = [f"{p}: refused" for p in rec.get("refused", {})]
        return f"{head} -> {figures(rec)}" + "".join(f"; {o}" for o in others + refused) + \
            f" ({rec['seconds']:.0f} s)"

    def run(self) -> dict[str, Any]:
        import optuna

        started = time.time()
        info(f"search on {self.profile.name}: at most {self.spec.max_drop:g} pts of accuracy"
             + (f", {self.spec.max_latency_ms:g} ms" if self.spec.max_latency_ms else "")
             + (f", {self.spec.max_size_mb:g} MB" if self.spec.max_size_mb else "")
             + f"; {self.spec.trials} trials, {self.spec.parallel} at a time"
             + (f" on Ray ({self.ray})" if self.ray else " in local processes"))
        ref = self.reference()
        tables = self.tables_ready(ref.pop("config"))
        study = open_study(self.out / STUDY_FILE, self.key)
        executor = RayTrials(self.ray, self.spec.parallel) if self.ray else LocalTrials(self.spec.parallel)
        ran = 0
        try:
            # trials a killed search left running: their records if they ended, else they run again
            pending = []
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                rec = self.finished(t.number)
                if rec is not None:
                    tell(study, rec, self.spec)
                    info(f"{self.line(rec)} (ended before the interruption)")
                else:  # its settings drawn again: the same sampler on the same stored trials draws the same,
                    # and draws any the interruption left undrawn
                    study.sampler = sampler_for(self.recipe.seed, t.number, self.spec.startup_trials)
                    trial = optuna.trial.Trial(study, t._trial_id)
                    pending.append(self.job(t.number, sample(trial, self.spec), ref))
            if pending:
                info(f"resuming: trial{'s' if len(pending) > 1 else ''} {', '.join(str(j['number']) for j in pending)}"
                     " ran when the search stopped; running again")
            while True:
                jobs = pending[:self.spec.parallel]
                pending = pending[len(jobs):]
                if not jobs:
                    if self.spec.minutes is not None and time.time() - started > 60 * self.spec.minutes:
                        info(f"stopping: {self.spec.minutes:g} minutes passed")
                        break
                    total = len(study.get_trials(deepcopy=False))
                    for _ in range(min(self.spec.parallel, self.spec.trials - total)):
                        number = len(study.get_trials(deepcopy=False))
                        study.sampler = sampler_for(self.recipe.seed, number, self.spec.startup_trials)
                        trial = study.ask()
                        jobs.append(self.job(trial.number, sample(trial, self.spec), ref))
                if not jobs:
                    break
                results = executor.run(jobs)
                need = [(r, p) for r in results if r["status"] == "complete" for p in r["points"]
                        if p.get("predicted_ms") is None]
                if need:  # no table covers these files: measured now, while no trial runs, beside the reference
                    anchor = self.anchor(tables, ref, executor)
                    *measured, ref_ms = executor.measure([p["artifact"] for _, p in need] + [ref["artifact"]],
                                                         self.target)
                    for (r, p), ms, study_ms in zip(need, measured, on_study_scale(measured, ref_ms, anchor)):
                        p.update(measured_ms=ms, study_ms=study_ms, reference_measured_ms=ref_ms)
                    for r in {id(r): r for r, _ in need}.values():
                        write_json(self.out / "trials" / f"{r['number']:04d}" / TRIAL_FILE, r)
                for r in sorted(results, key=lambda r: r["number"]):
                    tell(study, r, self.spec)
                    info(self.line(r))
                    ran += 1
            return self.finish(study, executor, ref, tables, time.time() - started, ran)
        finally:
            executor.close()

    def anchor(self, tables: dict[str, Any], ref: dict[str, Any], executor) -> Optional[float]:
        """The reference's latency on the study's scale (on_study_scale): as the fp32 table predicts it, else as
        measured the first time (kept in reference/, so a resumed search keeps its scale)."""
        predicted = tables.get("fp32", {}).get("predicted_reference_ms")
        if predicted:
            return predicted
        path = self.out / "reference" / ANCHOR_FILE
        if path.is_file():
            return read_json_file(path, "latency anchor", "delete it: the search measures the reference again.")["ms"]
        (ms,) = executor.measure([ref["artifact"]], self.target)
        if ms is not None:
            write_json(path, {"ms": ms, "cpu": fingerprint(), "artifact": ref["artifact"]})
        return ms

    # -- the answer -------------------------------------------------------------------------------------------------

    def records(self, study) -> list[dict[str, Any]]:
        recs = []
        for t in study.get_trials(deepcopy=False):
            rec = self.finished(t.number)
            if rec is None:
                rec = {"number": t.number, "params": dict(t.params), "status": "interrupted",
                       "reason": "did not end (the search stopped)"}
            recs.append(told(rec, self.spec))
        return recs

    def finish(self, study, executor, ref: dict[str, Any], tables: dict[str, Any], seconds: float,
               ran: int) -> dict[str, Any]:
        spec = self.spec
        recs = self.records(study)
        for r in recs:
            r["composition"] = describe_params(spec, r["params"])
        points = [p for r in recs for p in points_of(r)]  # every file of every complete trial
        front = pareto(points, key="id")
        within = sorted((p for p in points if excess(p, spec, objective_latency(p)) == 0), key=objective_latency)
        # measured on the target: the front, the fastest predicted within budget, and the reference (ratios in one run)
        to_measure = sorted({*front, *(p["id"] for p in within[:spec.measure])})
        by_id = {p["id"]: p for p in points}
        paths = [by_id[i]["artifact"] for i in to_measure] + [ref["artifact"]]
        info(f"measuring {len(paths)} files on {self.profile.name} (the Pareto front, the fastest within budget and "
             "the reference), one at a time")
        measured = executor.measure(paths, self.target)
        ref["measured_ms"] = measured[-1]
        by_number = {r["number"]: r for r in recs}
        for i, ms in zip(to_measure, measured):
            by_id[i]["measured_ms"] = ms
            trial = by_number[by_id[i]["number"]]
            next(p for p in trial["points"] if p["precision"] == by_id[i]["precision"])["measured_ms"] = ms
        for n in {by_id[i]["number"] for i in to_measure}:
            write_json(self.out / "trials" / f"{n:04d}" / TRIAL_FILE,
                       {k: v for k, v in by_number[n].items() if k not in POINT_FIELDS + ("told", "composition")})

        def final_latency(r):
            return r.get("measured_ms") if r.get("measured_ms") is not None else objective_latency(r)

        candidates = [by_id[i] for i in to_measure if excess(by_id[i], spec, final_latency(by_id[i])) == 0]
        chosen = min(candidates, key=final_latency) if candidates else None
        best = study_best(study, spec)
        wall = float(study.user_attrs.get("wall_seconds", 0.0)) + seconds
        study.set_user_attr("wall_seconds", wall)
        summary: dict[str, Any] = {
            "search": spec.model_dump(), "target": self.profile.model_dump(), "recipe": self.recipe.model_dump(),
            "reference": ref, "tables": tables, "precisions": self.precisions, "trials": recs, "points": points,
            "pareto": front,
            "measured": to_measure, "best_trial": best, "seconds_this_run": round(seconds, 1), "trials_this_run": ran,
            "wall_seconds_all_runs": round(wall, 1),
            "seconds_all_trials": round(sum(r.get("seconds", 0) for r in recs), 1), "versions": versions(),
            "cpu": fingerprint(), "threads_per_trial": self.threads, "parallel": spec.parallel,
            "where": f"ray {self.ray}" if self.ray else "local processes"}
        if chosen is None:
            summary["chosen"] = None
            summary["nearest_misses"] = nearest_misses(points, spec, final_latency)
            info(f"no trial is within budget (of {len(recs)}): nearest misses")
            for r in summary["nearest_misses"]:
                info(f"  {self.line(r)}")
        else:
            summary["chosen"], summary["chosen_id"] = chosen["number"], chosen["id"]
            summary["confirmation"] = self.confirm(chosen, ref)
            chosen_yaml = self.out / CHOSEN_FILE
            text = (f"# Chosen by `pocketformer search` (trial {chosen['number']} of {len(recs)}) on {self.profile.name}:"
                    f" {describe_params(spec, chosen['params'])} @ {chosen['precision']}.\n"
                    f"# `pocketformer run {CHOSEN_FILE}` makes it again (its {chosen['precision']} "
                    f"{self.profile.format} file is the one chosen).\n")
            recipe = trial_recipe(self.recipe, spec, self.target, chosen["params"], [chosen["precision"]],
                                  self.profile.format, f"{self.recipe.name}-chosen")
            from .store import atomic_write_bytes

            atomic_write_bytes(chosen_yaml, (text + yaml.safe_dump(recipe, sort_keys=False)).encode())
            summary["chosen_recipe"] = str(chosen_yaml)
            c = summary["confirmation"]
            speed = (f", {ref['measured_ms'] / chosen['measured_ms']:.2f}x faster than the reference's file "
                     f"({ref['measured_ms']:.2f} ms)" if ref.get("measured_ms") and chosen.get("measured_ms") else "")
            info(f"chosen: trial {chosen['number']}: {describe_params(spec, chosen['params'])} @ "
                 f"{chosen['precision']}: {final_latency(chosen):.2f} ms measured{speed}, {chosen['size_mb']:.1f} MB")
            info(f"  confirmed on the test split: {c['statement']}")
            info(f"  recipe: {chosen_yaml} (`pocketformer run {chosen_yaml}`)")
        write_json(self.out / SEARCH_FILE, summary)
        from .report import write_search_report

        write_search_report(self.out, summary)
        info(f"report: {self.out / 'report.md'}")
        return summary

    def confirm(self, chosen: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
        """The chosen file's drop on the test split, which the search never saw, with its paired interval."""
        from .data import Encoder, load_dataset
        from .models import load
        from .targets.validate import accuracy_drop, predict_artifact
        from .verdict import accuracy_check

        run = Path(chosen["artifact"]).parent.parent
        model, _ = load(run / "model")
        ds = load_dataset(self.recipe.resolve_data(), "test", self.recipe.seed)
        ds = ds.for_model(model.spec.modality, model.spec.head.labels, f"The model in {run}")
        out = predict_artifact(Path(chosen["artifact"]), self.profile, ds, Encoder(run / "model", self.recipe.max_len),
                               desc="confirming on the test split")
        figures, drop = accuracy_drop(model.task, out, np.load(ref["outputs"])["test"], ds.labels, self.profile)
        check = accuracy_check(drop, self.spec.max_drop)
        conf = f"{drop.confidence:.0%}"
        low, high = drop.interval
        statement = {
            "PASS": f"drop {drop.drop:+.2f} pts ({conf} interval {low:+.2f}..{high:+.2f}): within "
                    f"{self.spec.max_drop:g} point{'s' if self.spec.max_drop != 1 else ''} with {conf} confidence",
            "FAIL": f"drop {drop.drop:+.2f} pts ({conf} interval {low:+.2f}..{high:+.2f}): NOT within "
                    f"{self.spec.max_drop:g} (over the budget with {conf} confidence)",
            "INCONCLUSIVE": f"drop {drop.drop:+.2f} pts ({conf} interval {low:+.2f}..{high:+.2f}): "
                            f"{'within' if drop.drop <= self.spec.max_drop else 'over'} {self.spec.max_drop:g} "
                            f"as measured, but NOT confirmed with {conf} confidence ({check.detail.get('reason')})",
        }[check.verdict]
        return {**figures, "examples": drop.n, "verdict": check.verdict, "check": check.to_json(),
                "statement": statement, "within_budget_measured": drop.drop <= self.spec.max_drop}


def study_best(study, spec: SearchSpec) -> Optional[int]:
    """The study's own answer, from what the trials told it: the complete trial within every budget with the least
    latency objective (ties: fewer points lost, then the earlier trial)."""
    import optuna

    best = None
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if all(v <= 0 for v in constraints_of(t)):
            k = (t.values[1], t.values[0], t.number)
            if best is None or k < best[0]:
                best = (k, t.number)
    return None if best is None else best[1]


def nearest_misses(done: list[dict[str, Any]], spec: SearchSpec, latency_of, n: int = 3) -> list[dict[str, Any]]:
    """The complete trials (or points) least over the budgets, each budget's excess relative to the budget."""
    return sorted(done, key=lambda r: (excess(r, spec, latency_of(r)), latency_of(r)))[:n]


def search_spec(recipe: Recipe, **overrides) -> SearchSpec:
    """The recipe's search section with the command line's settings over it (None: not given)."""
    spec = recipe.search or SearchSpec()
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return SearchSpec.model_validate({**spec.model_dump(), **given})
    except Exception as e:
        raise RecipeError(f"Search settings: {str(e).splitlines()[-1].strip()}", "see `pocketformer search --help`.") \
            from None


def default_output(recipe: Recipe) -> Path:
    return Path(recipe.output + "-search") if recipe.output else Path("runs") / f"{recipe.name}-search"


def search(recipe: Recipe, out_dir: Optional[Path] = None, ray: Optional[str] = None, **overrides) -> dict[str, Any]:
    spec = search_spec(recipe, **overrides)
    return Search(recipe, out_dir or default_output(recipe), spec, ray=ray).run()
