"""`pocketformer search`: its settings, the space it samples, and whole searches on the tiny vision model (8x8 digits,
4 layers of hidden 64) with ONNX Runtime on made-up latency tables, so predicted latencies (and so the study) are
exact: a finished search with a confirmed choice and a recipe `run` reads, a killed search that resumes without
redoing a trial and then matches a search never stopped, and the same search on a two-worker Ray cluster."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from pocketformer.errors import RecipeError
from pocketformer.latency import Curve, LatencyTable, write_table
from pocketformer.recipe import SearchSpec, load_recipe, parse_recipe
from pocketformer.search import (describe_params, nearest_misses, objective_latency, on_study_scale, pareto,
                                 points_of, run_trial, sample, search, told, trial_recipe, trial_stages)

from conftest import cli_command, write_profile

def write_tables(folder: Path) -> dict[str, str]:
    """A made-up table per precision for vit-8x8's family (an input, not a measurement: predictions are exact)."""
    from pocketformer.models import load_any
    from pocketformer.recipe import made_checkpoint
    from pocketformer.targets.latency import family_of

    spec = load_any(made_checkpoint("vit-8x8"))[0].config
    heads, width = spec.layers[0].heads, spec.layers[0].ffn
    files = {}
    for precision, ffn_ms in (("fp32", 3.0), ("int8", 1.5)):
        table = LatencyTable(target="test-ort", runtime="onnxruntime", threads=1, seq_len=16, precision=precision,
                             family=family_of(spec), base_ms=1.0, layer_ms=0.2,
                             attention=Curve(points=[0, heads], ms=[0.0, 2.0]),
                             ffn=Curve(points=[0, width], ms=[0.0, ffn_ms]))
        write_table(table, folder / f"table-{precision}.json")
        files[precision] = str(folder / f"table-{precision}.json")
    return files


def search_writer(folder: Path):
    """write(**search settings) -> a recipe in `folder` for vit-8x8 on digits with a search section over
    latency-targeted pruning (on the made-up table) and an optional short distillation, at fp32 or int8."""
    tables = write_tables(folder)
    profile = write_profile(folder / "test-ort.yaml")

    def write(name: str = "digits", **settings) -> Path:
        search = {"trials": 4, "parallel": 2, "max_drop": 5.0, "startup_trials": 2, "tables": tables,
                  "stages": [{"prune": {"speedup": {"low": 1.2, "high": 2.4, "step": 0.2},
                                        "table": tables["fp32"], "calibration_examples": 64}},
                             {"distill": {"optional": True, "epochs": 1, "max_examples": 200}}],
                  **settings}
        recipe = {"name": name, "model": "vit-8x8", "data": "digits", "seed": 0, "batch_size": 32,
                  "prepare": [{"finetune": {"epochs": 2, "lr": 1.0e-3}}], "targets": [str(profile)],
                  "search": search}
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


@pytest.fixture
def digits_search(tmp_path):
    return search_writer(tmp_path)


@pytest.fixture(scope="module")
def local_search(tmp_path_factory):
    """The default search (4 trials, 2 at a time) run once in local processes: (its recipe, its output folder,
    its summary). The Ray test runs the same recipe on a cluster and compares."""
    folder = tmp_path_factory.mktemp("local-search")
    with pytest.MonkeyPatch.context() as mp:  # this fixture's own cache (the autouse one is per test)
        mp.setenv("POCKETFORMER_CACHE", str(folder / "cache"))
        recipe = search_writer(folder)()
        summary = search(load_recipe(recipe), folder / "out")
    return recipe, folder / "out", summary


# -- settings and space --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stages, problem", [
    ([{"unknown": {}}], "unknown stage 'unknown'"),
    ([{"early_exit": {}}], "ships otherwise"),
    ([{"matformer": {}}], "ships otherwise"),
    ([{"prune": {"speedup": "search"}}], "speedup declares no search range"),
    ([{"prune": {"heads": {"low": 0.5, "high": 0.1}}}], "a range is low <= high"),
    ([{"prune": {"colour": 3}}], "unknown key 'colour'"),
    ([{"distill": {"optional": "maybe"}}], "optional must be true or false"),
    ([], "at least one stage"),
])
def test_a_search_section_with_a_wrong_stage_or_range_is_one_recipe_error(stages, problem):
    with pytest.raises(RecipeError, match=problem):
        parse_recipe({"model": "minilm", "search": {"stages": stages}})


def test_declared_ranges_given_ranges_and_optional_stages_become_the_trials_recipes():
    spec = SearchSpec(stages=[{"prune": {"heads": "search", "ffn": {"low": 0.25, "high": 0.5, "step": 0.25},
                                         "importance": "taylor"}},
                              {"lowrank": {"optional": True, "budget": {"choices": [0.6, 0.8]}}}])
    study = optuna.create_study(directions=["minimize"] * 3, sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        params = sample(trial, spec)
        stages = trial_stages(spec, params)
        prune = stages[0]["prune"]
        assert 0 <= prune["heads"] <= 0.5 and prune["ffn"] in (0.25, 0.5) and prune["importance"] == "taylor"
        assert "precision" not in params  # a trial scores every precision
        if params["1.lowrank.use"]:
            assert stages[1] == {"lowrank": {"budget": params["1.lowrank.budget"]}}
        else:  # a stage left out draws none of its settings
            assert len(stages) == 1 and "1.lowrank.budget" not in params
        seen.add(params["1.lowrank.use"])
        assert describe_params(spec, params).startswith(f"prune heads={prune['heads']:g} ffn=")
        study.tell(trial, [0.0, 1.0, 1.0])
    assert seen == {True, False}
    recipe = parse_recipe({"model": "minilm", "stages": [{"prune": {"heads": 0.1}}], "search": spec.model_dump()})
    plain = trial_recipe(recipe, spec, "host-ort", params, ["fp32", "int8"], "onnx", "t")
    again = parse_recipe(plain)  # a plain recipe, without the search section or the recipe's own stages
    assert again.search is None and again.export.int8 and again.targets == ["host-ort"]
    assert again.stages == trial_stages(spec, params)
    # a trial writes the files it is scored by and no others; the chosen file's recipe, that one alone
    assert "onnx.int8" not in again.export.skip and "onnx.int8-weight" in again.export.skip
    alone = parse_recipe(trial_recipe(recipe, spec, "host-ort", params, ["fp32"], "onnx", "t"))
    assert not alone.export.int8


def test_a_trial_tells_the_study_its_fastest_file_within_budget_else_the_least_over():
    spec = SearchSpec(max_drop=1.0)
    trial = {"number": 3, "params": {}, "status": "complete", "seconds": 1.0,
             "points": [{"precision": "fp32", "accuracy_drop": 0.2, "predicted_ms": 10.0, "size_mb": 60.0},
                        {"precision": "int8", "accuracy_drop": 0.9, "predicted_ms": 4.0, "size_mb": 16.0}]}
    assert told(trial, spec)["told"] == "int8" and told(trial, spec)["predicted_ms"] == 4.0
    assert [p["id"] for p in points_of(trial)] == ["3/fp32", "3/int8"]
    # the told file's fields on the trial do not stand in for another file's: fp32 was not measured
    measured = {**trial, "points": [trial["points"][0], {**trial["points"][1], "measured_ms": 3.5}]}
    assert [p.get("measured_ms") for p in points_of(told(measured, spec))] == [None, 3.5]
    # int8 over the budget: the study learns fp32's figures
    assert told(trial, SearchSpec(max_drop=0.5))["told"] == "fp32"
    # both over: the one least over the budget
    assert told(trial, SearchSpec(max_drop=0.1))["accuracy_drop"] == 0.2
    # both within, under a latency budget only int8 meets
    assert told(trial, SearchSpec(max_drop=1.0, max_latency_ms=5.0))["told"] == "int8"
    # a file without a latency is no point; a trial without any fails
    none = {**trial, "points": [{**trial["points"][0], "predicted_ms": None}]}
    assert points_of(none) == [] and told(none, spec)["status"] == "failed"


def test_files_measured_between_batches_are_compared_on_the_scale_of_the_predictions():
    """The fp32 table was measured at the start; the int8 file (no table) later, when the host ran 1.5x slower: the
    reference's file, measured beside it, says by how much, and the study compares the int8 file as if measured when
    the table was."""
    spec = SearchSpec(max_drop=1.0)
    assert on_study_scale([15.0, None], reference_ms=30.0, anchor_ms=20.0) == [10.0, None]
    assert on_study_scale([15.0], reference_ms=None, anchor_ms=20.0) == [15.0]  # the reference not measured here
    trial = {"number": 0, "params": {}, "status": "complete", "seconds": 1.0,
             "points": [{"precision": "fp32", "accuracy_drop": 0.2, "predicted_ms": 12.0, "size_mb": 60.0},
                        {"precision": "int8", "accuracy_drop": 0.3, "predicted_ms": None, "size_mb": 16.0,
                         "measured_ms": 15.0, "reference_measured_ms": 30.0, "study_ms": 10.0}]}
    best = told(trial, spec)
    assert best["told"] == "int8" and objective_latency(best) == 10.0  # raw, 15 ms would lose to fp32's 12
    assert "study_ms" not in told({**trial, "points": trial["points"][:1]}, spec)  # fp32 alone: nothing scaled


def test_the_pareto_front_and_the_nearest_misses():
    recs = [{"number": i, "status": "complete", "accuracy_drop": d, "predicted_ms": ms, "size_mb": mb}
            for i, (d, ms, mb) in enumerate([(0.5, 10, 50), (1.5, 5, 50), (0.4, 12, 50), (0.6, 11, 60),
                                             (0.5, 10, 50)])]
    recs.append({"number": 5, "status": "failed", "reason": "x"})
    # 3 is beaten by 0 on every objective; 4 equals 0 (neither beats the other: both stay)
    assert pareto(recs) == [0, 1, 2, 4]
    spec = SearchSpec(max_drop=0.3)
    misses = nearest_misses([r for r in recs if r["status"] == "complete"], spec, lambda r: r["predicted_ms"], n=2)
    assert [r["number"] for r in misses] == [2, 0]  # the least over the accuracy budget, then the faster


# -- whole searches ------------------------------------------------------------------------------------------------

def read(out: Path) -> dict:
    return json.loads((out / "search.json").read_text())


def trial_table(summary: dict) -> list[tuple]:
    """What the study learned from each trial: its draw and the three objectives."""
    return [(t["number"], json.dumps(t["params"], sort_keys=True), t["status"], t.get("accuracy_drop"),
             t.get("predicted_ms"), t.get("size_mb")) for t in summary["trials"]]


def test_a_search_chooses_confirms_and_writes_a_recipe_that_run_reads(local_search):
    _, out, summary = local_search
    assert len(summary["trials"]) == 4 and all(t["status"] == "complete" for t in summary["trials"])
    # every trial scored at both precisions: one trained model, two files (where ORT's u8s8 kernels saturate, the
    # int8 file's weights are 7-bit, so its check passes there too)
    assert not any(t.get("refused") for t in summary["trials"])
    assert sorted(p["id"] for p in summary["points"]) == sorted(f"{t['number']}/{p}" for t in summary["trials"]
                                                                for p in ("fp32", "int8"))
    chosen = next(p for p in summary["points"] if p["id"] == summary["chosen_id"])
    assert chosen["number"] == summary["chosen"]
    # within budget on the validation split, and the fastest measured of those measured
    assert chosen["accuracy_drop"] <= 5.0 and chosen["measured_ms"] is not None
    measured = [p for p in summary["points"] if p.get("measured_ms") is not None and p["accuracy_drop"] <= 5.0]
    assert chosen["measured_ms"] == min(p["measured_ms"] for p in measured)
    assert set(summary["pareto"]) <= set(summary["measured"])
    # predictions are the table's: prune met its target on the same table, and int8's table is the faster
    ref_ms = summary["tables"]["fp32"]["predicted_reference_ms"]
    for t in summary["trials"]:
        speedup = t["recipe"]["stages"][0]["prune"]["speedup"]
        fp32, int8 = (next((p for p in t["points"] if p["precision"] == q), None) for q in ("fp32", "int8"))
        assert fp32["predicted_ms"] <= ref_ms / speedup + 1e-6
        if int8 is None:  # refused (above)
            continue
        assert int8["predicted_ms"] < fp32["predicted_ms"]
        # the study learned the trial's best file: the faster one, when within the budget
        if int8["accuracy_drop"] <= 5.0:
            assert t["told"] == "int8" and t["predicted_ms"] == int8["predicted_ms"]
    c = summary["confirmation"]
    assert c["examples"] > 0 and c["discordant"]["lost"] + c["discordant"]["gained"] <= c["examples"]
    assert c["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE") and "pts" in c["statement"]
    assert c["accuracy_drop"] == pytest.approx(c["check"]["value"])
    # the chosen recipe is a plain recipe that names the trial's stages
    again = load_recipe(out / "chosen.yaml")
    assert again.stages == chosen["recipe"]["stages"] and again.search is None
    assert again.export.int8 == (chosen["precision"] != "fp32")
    report = (out / "report.md").read_text()
    assert f"**{chosen['number']} (chosen)**" in report and "Confirmed on the test split" in report
    assert (out / "pareto-test-ort.png").stat().st_size > 0
    for t in summary["trials"]:  # every trial's record on disk, as it ended
        assert json.loads((out / "trials" / f"{t['number']:04d}" / "trial.json").read_text())["status"] == "complete"


def test_a_failed_trial_is_recorded_with_its_reason(digits_search, tmp_path):
    recipe = load_recipe(digits_search(stages=[{"prune": {"speedup": 40.0, "table": str(tmp_path / "table-fp32.json"),
                                                          "calibration_examples": 32}}], trials=1))
    summary = search(recipe, tmp_path / "out")
    (t,) = summary["trials"]
    assert t["status"] == "failed" and "ms" in t["reason"]  # the budget the table cannot reach, named
    assert summary["chosen"] is None and summary["nearest_misses"] == []
    assert "No model within budget" in (tmp_path / "out" / "report.md").read_text()


def test_nothing_within_budget_shows_the_nearest_misses(digits_search, tmp_path):
    summary = search(load_recipe(digits_search(trials=1, parallel=1, max_drop=0.0, max_size_mb=0.01)),
                     tmp_path / "out")
    # the nearest misses are files: the one trial's two
    (trial,) = summary["trials"]
    assert not trial.get("refused")
    files = {"0/fp32", "0/int8"}
    assert summary["chosen"] is None and sorted(m["id"] for m in summary["nearest_misses"]) == sorted(files)
    assert "Nearest misses" in (tmp_path / "out" / "report.md").read_text()


def test_another_search_in_the_same_folder_is_refused(local_search, monkeypatch):
    recipe, out, _ = local_search
    monkeypatch.setenv("POCKETFORMER_CACHE", str(recipe.parent / "cache"))  # the reference comes from the cache
    other = search_writer(recipe.parent)(name="other", max_drop=2.0)
    with pytest.raises(RecipeError, match="holds a search with other settings"):
        search(load_recipe(other), out)


def wait_for(paths: list[Path], proc: subprocess.Popen, timeout: float = 600) -> None:
    end = time.time() + timeout
    while not all(p.is_file() for p in paths):
        assert proc.poll() is None, f"the search ended first: {proc.stdout.read() if proc.stdout else ''}"
        assert time.time() < end, "timed out waiting for trials"
        time.sleep(0.5)


@pytest.mark.slow  # a whole search again, killed and resumed in fresh processes: 174 s on CI's machine
def test_a_killed_search_resumes_without_redoing_finished_trials(local_search, tmp_path):
    """The default search killed (the driver and its trial processes) once its first two trials (the sampler's
    random start-up) have ended, then started again: it runs only the two the sampler chooses, and ends with the
    trials of the search that was never stopped (local_search)."""
    recipe, out, _ = local_search
    whole, killed = read(out), tmp_path / "killed"
    # local_search's cache: the fine-tuned reference's path in it is recorded in every artifact (so in the size the
    # study learns from), and the trials' stages come from it; export and scoring run again
    env = {**os.environ, "POCKETFORMER_CACHE": str(recipe.parent / "cache")}
    proc = subprocess.Popen(cli_command("search", recipe, "-o", killed), start_new_session=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = [killed / "trials" / f"{n:04d}" / "trial.json" for n in (0, 1)]
    wait_for(done, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its trial processes, mid-trial
    proc.wait()
    def ended(p: Path) -> dict:  # a record as the trial ended it (the end of a search adds files' measured_ms)
        record = json.loads(p.read_text())
        return {**record, "points": [{k: v for k, v in f.items() if k != "measured_ms"} for f in record["points"]]}

    before = {p: ended(p) for p in (killed / "trials").glob("*/trial.json")}
    assert len(before) == 2  # trials 2 and 3 run together, for far longer than the kill takes
    rerun = subprocess.run(cli_command("search", recipe, "-o", killed), capture_output=True, text=True, timeout=900,
                           env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    for p, record in before.items():  # finished trials: not run again
        assert ended(p) == record
    resumed = read(killed)
    assert len(resumed["trials"]) == 4 and all(t["status"] == "complete" for t in resumed["trials"])
    assert resumed["trials_this_run"] == 2
    # the sampler carried on as if the search had never stopped
    assert trial_table(resumed) == trial_table(whole)
    assert resumed["best_trial"] == whole["best_trial"]


@pytest.mark.slow  # a three-node cluster and the whole search on it: 149 s on CI's machine; Ray is an extra
def test_the_same_search_on_a_two_worker_ray_cluster_finds_the_same_best_trial(local_search, tmp_path, monkeypatch):
    # Set before Ray is imported (its C++ settings are read then) and inherited by the nodes it starts: no token
    # authentication on either side (a ~/.ray/auth_token left by an earlier ray.init() turns it on for `ray start`
    # but not for a driver given an address), and a connection attempt that gives up in seconds, not minutes.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_gcs_rpc_server_connect_timeout_s", "5")
    monkeypatch.setenv("RAY_py_gcs_connect_timeout_s", "10")
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from pocketformer.search import LATENCY_RESOURCE

    path, _, local = local_search  # 4 trials, 2 at a time
    recipe = load_recipe(path)
    monkeypatch.setenv("POCKETFORMER_CACHE", str(path.parent / "cache"))  # as in the resume test: the same paths
    # The nodes take the machine's own address: on Linux, Ray turns a 127.0.0.1 address given to ray.init into that
    # address, which a node started with node_ip_address 127.0.0.1 (it then listens on loopback only) never answers.
    # The search is given the loopback spelling, as a user on the head's machine would.
    faulthandler.dump_traceback_later(900, exit=True, file=sys.__stderr__)  # a hung cluster ends the run, with stacks
    cluster = Cluster(shutdown_at_exit=True)
    try:
        head = cluster.add_node(num_cpus=0, resources={LATENCY_RESOURCE: 1}, include_dashboard=False)  # it measures
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_gcs_server_port_wait_time_s", "3")  # the driver's connection attempts (the nodes are up)
        on_ray = search(recipe, tmp_path / "ray", ray=f"127.0.0.1:{cluster.address.rsplit(':', 1)[1]}")
        alive = {n["NodeID"]: n for n in cluster.global_state.node_table() if n["Alive"]}
    finally:
        faulthandler.cancel_dump_traceback_later()
        ray.shutdown()
        cluster.shutdown()
    assert on_ray["where"].startswith("ray") and on_ray["best_trial"] is not None
    assert trial_table(on_ray) == trial_table(local)
    assert on_ray["best_trial"] == local["best_trial"]
    # a trial needs a CPU and only the two workers have one (and stayed up), so every trial ran on a worker node
    assert {n.node_id for n in workers} <= set(alive) and len(alive) == 3
    assert [n["Resources"].get("CPU", 0) for n in alive.values()].count(1) == 2
    assert alive[head.node_id]["Resources"].get("CPU", 0) == 0


def test_run_trial_records_a_stage_error_as_a_failed_trial(digits_search, tmp_path):
    path = digits_search()
    recipe = load_recipe(path)
    spec = recipe.search
    params = {"0.prune.speedup": 1.2, "1.distill.use": False}
    plain = trial_recipe(recipe, spec, str(tmp_path / "test-ort.yaml"), params, ["fp32", "int8"], "onnx", "t")
    plain["stages"][0]["prune"]["speedup"] = 1000.0
    rec = run_trial({"number": 0, "params": params, "recipe": plain, "precisions": ["fp32", "int8"],
                     "dir": str(tmp_path / "t0"), "source": str(path), "checkpoint": str(recipe.resolve_model()),
                     "target": str(tmp_path / "test-ort.yaml"), "threads": 1, "confidence": None,
                     "reference": str(tmp_path / "none.npz"), "tables": {}, "max_latency_ms": None,
                     "cache": os.environ["POCKETFORMER_CACHE"]})
    assert rec["status"] == "failed" and rec["reason"]
    assert json.loads((tmp_path / "t0" / "trial.json").read_text())["status"] == "failed"
    assert (tmp_path / "t0" / "log.txt").is_file()


def test_a_precision_its_check_refuses_leaves_the_trial_its_other_files(local_search, tmp_path, monkeypatch):
    """int8 held to fp32's exactness (max abs diff 0): ONNX Runtime's real int8 file fails its check, and the trial
    is complete with its fp32 file, the refusal recorded."""
    from pocketformer.export import FORMATS
    from pocketformer.export.base import Tolerance

    path, out, summary = local_search
    recipe = load_recipe(path)
    monkeypatch.setenv("POCKETFORMER_CACHE", str(path.parent / "cache"))  # the trials' stages, cached
    onnx = FORMATS["onnx"]
    exact = onnx.tolerance
    monkeypatch.setattr(type(onnx), "tolerance", lambda self, precision, plan=None:
                        Tolerance(max_abs=0.0) if precision == "int8" else exact(precision, plan))
    params = summary["trials"][0]["params"]
    plain = trial_recipe(recipe, recipe.search, recipe.targets[0], params, ["fp32", "int8"], "onnx", "t")
    rec = run_trial({"number": 0, "params": params, "recipe": plain, "precisions": ["fp32", "int8"],
                     "dir": str(tmp_path / "t0"), "source": str(path), "checkpoint": str(recipe.resolve_model()),
                     "target": recipe.targets[0], "threads": 1, "confidence": None,
                     "reference": str(out / "reference" / "outputs.npz"), "tables": recipe.search.tables,
                     "max_latency_ms": None, "cache": str(path.parent / "cache")})
    assert rec["status"] == "complete", rec.get("reason")
    assert [p["precision"] for p in rec["points"]] == ["fp32"]
    assert "disagrees with PyTorch" in rec["refused"]["int8"]
    assert told(rec, recipe.search)["told"] == "fp32"


def test_a_trial_without_the_drivers_table_for_a_precision_measures_no_table_itself(local_search, tmp_path,
                                                                                   monkeypatch):
    """The driver had no int8 table (the reference's could not be measured): the trial's int8 file has no
    prediction (the driver measures it between batches, when no trial runs) and the trial measured no table of its
    own, which it would have timed while other trials trained."""
    path, out, summary = local_search
    recipe = load_recipe(path)
    cache = path.parent / "cache"  # the trials' stages, cached
    monkeypatch.setenv("POCKETFORMER_CACHE", str(cache))
    tables_before = set((cache / "latency").glob("*"))
    params = next(t["params"] for t in summary["trials"]  # a trial whose int8 file passed its check
                  if "int8" in [p["precision"] for p in t.get("points", [])])
    plain = trial_recipe(recipe, recipe.search, recipe.targets[0], params, ["fp32", "int8"], "onnx", "t")
    rec = run_trial({"number": 0, "params": params, "recipe": plain, "precisions": ["fp32", "int8"],
                     "dir": str(tmp_path / "t0"), "source": str(path), "checkpoint": str(recipe.resolve_model()),
                     "target": recipe.targets[0], "threads": 1, "confidence": None,
                     "reference": str(out / "reference" / "outputs.npz"),
                     "tables": {"fp32": recipe.search.tables["fp32"]}, "max_latency_ms": None, "cache": str(cache)})
    assert rec["status"] == "complete", rec.get("reason")
    points = {p["precision"]: p for p in rec["points"]}
    assert set(points) == {"fp32", "int8"}, rec.get("refused")
    assert points["fp32"]["predicted_ms"] > 0
    assert points["int8"]["predicted_ms"] is None and "no int8 latency table" in points["int8"]["no_prediction"]
    assert set((cache / "latency").glob("*")) == tables_before
