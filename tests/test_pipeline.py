"""The pipeline on a tiny BERT with MiniLM's real tokenizer and a 60-row CSV: compress -> export -> validate, the
stage cache, determinism, and paths relative to the recipe."""

import hashlib
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import yaml
import torch

from pocketformer import pipeline, stage_cache
from pocketformer.data import Encoder, load_dataset
from pocketformer.errors import CheckpointError, PocketformerError
from pocketformer.models import load
from pocketformer.models.io import weights_sha256
from pocketformer.recipe import load_recipe, parse_recipe
from pocketformer.report import write_report

STAGES = [{"prune": {"heads": 2, "ffn": 0.25, "importance": "magnitude", "calibration_examples": 16}},
          {"distill": {"epochs": 1, "max_examples": 16, "lr": 1e-3}}]


def text_recipe(checkpoint, data, **overrides):
    fields = dict(name="tiny", model=str(checkpoint), data=str(data), max_len=32, batch_size=16, stages=STAGES)
    fields.update(overrides)
    return parse_recipe(fields)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tokenized_bert, sentiment_csv, fast_profile):
    """One compress -> export (fp32 + int8) -> validate, shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("run") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POCKETFORMER_CACHE", str(tmp_path_factory.mktemp("cache")))
        summary = pipeline.compress(text_recipe(tokenized_bert, sentiment_csv), tokenized_bert, out)
        records = pipeline.export(out, ["onnx"], int8=True)
        rows = pipeline.validate(out, str(fast_profile))
    return out, summary, records, rows


# -- compress ---------------------------------------------------------------------------------------------------------

def test_compress_writes_a_baseline_and_a_smaller_model_that_load(text_run):
    out, _, _, _ = text_run
    baseline, _ = load(out / "baseline")
    model, _ = load(out / "model")
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in baseline.parameters())


def test_compressed_model_has_the_requested_heads_and_neurons_removed(text_run):
    out, _, _, _ = text_run
    layers = load(out / "model")[0].config.layers
    assert sum(s.heads for s in layers) == 8 - 2
    assert all(s.ffn % 8 == 0 for s in layers) and sum(s.ffn for s in layers) < 256


def test_compress_json_reports_each_stage(text_run):
    out, summary, _, _ = text_run
    on_disk = json.loads((out / "compress.json").read_text())
    assert [s["stage"] for s in on_disk["stages"]] == ["prune", "distill"]
    prune = on_disk["stages"][0]
    assert prune["params_after"] < prune["params_before"] and prune["macs_after"] < prune["macs_before"]
    assert on_disk["model"] == summary["model"]


def test_baseline_records_the_import_parity(text_run):
    out, _, _, _ = text_run
    provenance = load(out / "baseline")[1]["provenance"]
    assert provenance["role"] == "baseline"
    assert provenance["input"]["import_parity_max_abs_diff"] <= 1e-4


def test_compressed_checkpoint_carries_the_tokenizer(text_run, tokenized_bert):
    out, _, _, _ = text_run
    assert (out / "model" / "tokenizer.json").read_bytes() == (tokenized_bert / "tokenizer.json").read_bytes()


def test_data_of_the_wrong_modality_is_refused(tmp_path, tokenized_bert):
    with pytest.raises(PocketformerError, match="vision"):
        pipeline.compress(text_recipe(tokenized_bert, "digits", stages=[]), tokenized_bert, tmp_path / "out")


# -- export -----------------------------------------------------------------------------------------------------------

def test_export_writes_fp32_and_int8_for_baseline_and_model(text_run):
    out, _, records, _ = text_run
    assert sorted(r["file"] for r in records) == [f"{v}.{p}.onnx" for v in ("baseline", "model")
                                                   for p in ("fp16", "fp32", "int8", "int8w")]
    manifest = json.loads((out / "artifacts" / "artifacts.json").read_text())
    assert sorted(r["file"] for r in manifest) == sorted(r["file"] for r in records)


def test_exported_records_carry_their_files_sha256_and_size(text_run):
    out, _, records, _ = text_run
    for r in records:
        path = out / "artifacts" / r["file"]
        assert r["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert r["size_bytes"] == path.stat().st_size


def test_exported_model_matches_pytorch_on_real_tokenized_text(text_run, sentiment_csv):
    out, _, _, _ = text_run
    model, _ = load(out / "model")
    ds = load_dataset(str(sentiment_csv), "test")
    ids, mask = Encoder(out / "model", 32).encode(ds, np.arange(len(ds)))
    session = ort.InferenceSession(str(out / "artifacts" / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model(ids, mask).numpy()).max() < 1e-4


def test_export_again_reuses_unchanged_artifacts(text_run):
    out, _, records, _ = text_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "artifacts").glob("*.onnx")}
    again = pipeline.export(out, ["onnx"], int8=True)
    assert sorted(r["sha256"] for r in again) == sorted(r["sha256"] for r in records)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "artifacts").glob("*.onnx")} == before


def test_an_export_that_failed_part_way_is_tried_again_not_reused(text_run, tmp_path):
    """Files kept from an export where another file failed are marked; the same export run again tries again."""
    from pocketformer.store import read_manifest, write_manifest

    out, _, records, _ = text_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    kept = [{**r, "export_failed": ["int8 disagreed"]} for r in read_manifest(copy / "artifacts")]
    write_manifest(copy / "artifacts", kept)
    before = {p.name: p.stat().st_mtime_ns for p in (copy / "artifacts").glob("*.onnx")}
    again = pipeline.export(copy, ["onnx"], int8=True)
    assert not any(r.get("export_failed") for r in again)
    after = {p.name: p.stat().st_mtime_ns for p in (copy / "artifacts").glob("*.onnx")}
    assert before.keys() == after.keys() and all(after[k] != before[k] for k in before)  # written anew


def test_files_made_by_other_exporter_code_are_made_again_not_reused(text_run, tmp_path):
    """An artifact records the hash of the code that made it (exporters, model, checks); after an upgrade or a fix
    to that code, the same export writes the files again instead of serving the old ones."""
    from pocketformer.store import read_manifest, write_manifest

    out, _, _, _ = text_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    old = read_manifest(copy / "artifacts")
    assert all(r["export_code_sha256"] == pipeline.export_code() for r in old)
    write_manifest(copy / "artifacts", [{**r, "export_code_sha256": "0" * 64} for r in old])
    before = {p.name: p.stat().st_mtime_ns for p in (copy / "artifacts").glob("*.onnx")}
    again = pipeline.export(copy, ["onnx"], int8=True)
    assert all(r["export_code_sha256"] == pipeline.export_code() for r in again)
    after = {p.name: p.stat().st_mtime_ns for p in (copy / "artifacts").glob("*.onnx")}
    assert before.keys() == after.keys() and all(after[k] != before[k] for k in before)


def test_export_of_a_folder_never_compressed_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="compress.json"):
        pipeline.export(tmp_path, ["onnx"])


# -- validate ---------------------------------------------------------------------------------------------------------

def test_validate_reports_one_row_per_artifact_of_a_precision_the_target_runs(text_run, fast_profile):
    _, _, records, rows = text_run
    runs = yaml.safe_load(fast_profile.read_text())["precisions"]
    assert sorted(r["file"] for r in rows) == sorted(r["file"] for r in records if r["precision"] in runs)
    assert len(rows) < len(records)  # fp16 and int8 weight-only files are written, but host-ort runs neither


def test_rows_carry_accuracy_latency_memory_size_and_verdicts(text_run):
    _, _, _, rows = text_run
    for row in rows:
        assert 0 <= row["accuracy"] <= 100
        assert 0 < row["latency_p50_ms"] <= row["latency_p90_ms"]
        assert row["peak_rss_mb"] > 0 and row["size_mb"] > 0
        assert set(row["budgets"]) == {"latency_ms", "size_mb", "accuracy_drop"}
        assert row["pass"] == all(c["pass"] for c in row["budgets"].values())


def test_int8_rows_are_smaller_than_fp32_rows(text_run):
    _, _, _, rows = text_run
    size = {r["variant"]: r["size_mb"] for r in rows}
    assert size["model.int8"] < size["model.fp32"] and size["baseline.int8"] < size["baseline.fp32"]


def test_validation_is_written_under_the_targets_name(text_run):
    out, _, _, rows = text_run
    saved = json.loads((out / "validation" / "test-ort.json").read_text())
    assert len(saved["rows"]) == len(rows) and saved["target"]["name"] == "test-ort"


def test_report_lists_every_artifact_and_row(text_run):
    out, _, records, rows = text_run
    report = write_report(out)
    assert len(report["validation"]) == len(rows)
    markdown = (out / "report.md").read_text()
    assert all(r["file"] in markdown for r in records)


def test_validate_without_artifacts_is_an_error_naming_the_fix(text_run, tmp_path, fast_profile):
    out, _, _, _ = text_run
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("artifacts"))
    with pytest.raises(PocketformerError, match="pocketformer export"):
        pipeline.validate(bare, str(fast_profile))


# -- cache and determinism ------------------------------------------------------------------------------------------

def compress_hash(recipe, checkpoint, out):
    summary = pipeline.compress(recipe, checkpoint, out)
    return summary, weights_sha256(load(out / "model")[0])


def test_second_compress_reuses_every_cached_stage_and_the_same_weights(tmp_path, tokenized_bert, sentiment_csv):
    recipe = text_recipe(tokenized_bert, sentiment_csv)
    first, first_hash = compress_hash(recipe, tokenized_bert, tmp_path / "a")
    second, second_hash = compress_hash(recipe, tokenized_bert, tmp_path / "b")
    assert [s["cached"] for s in first["stages"]] == [False, False]
    assert [s["cached"] for s in second["stages"]] == [True, True]
    assert second_hash == first_hash


def test_same_seed_gives_identical_weights_without_the_cache(tmp_path, monkeypatch, tokenized_bert, sentiment_csv):
    recipe = text_recipe(tokenized_bert, sentiment_csv, seed=3)
    hashes = []
    for name in ("one", "two"):
        monkeypatch.setenv("POCKETFORMER_CACHE", str(tmp_path / f"cache-{name}"))
        summary, h = compress_hash(recipe, tokenized_bert, tmp_path / name)
        assert not any(s["cached"] for s in summary["stages"])
        hashes.append(h)
    assert hashes[0] == hashes[1]


def test_another_seed_gives_other_weights(tmp_path, tokenized_bert, sentiment_csv):
    _, a = compress_hash(text_recipe(tokenized_bert, sentiment_csv, seed=0), tokenized_bert, tmp_path / "a")
    _, b = compress_hash(text_recipe(tokenized_bert, sentiment_csv, seed=1), tokenized_bert, tmp_path / "b")
    assert a != b


def test_changed_data_is_not_served_from_the_cache(tmp_path, tokenized_bert, make_csv):
    data = make_csv(tmp_path / "reviews.csv", seed=0)
    recipe = text_recipe(tokenized_bert, data)
    pipeline.compress(recipe, tokenized_bert, tmp_path / "a")
    make_csv(data, seed=1)  # same path, other reviews
    second = pipeline.compress(recipe, tokenized_bert, tmp_path / "b")
    assert [s["cached"] for s in second["stages"]] == [False, False]


def test_a_run_resolves_the_recipes_relative_paths_from_any_directory(tmp_path, monkeypatch, tokenized_bert,
                                                                      make_profile, make_csv, make_recipe):
    project = tmp_path / "project"
    shutil.copytree(tokenized_bert, project / "ckpt")
    make_csv(project / "reviews.csv")
    profile = make_profile("relative", precisions=["fp32"])
    recipe_path = make_recipe("recipe", folder=project, name="rel", model="ckpt", data="reviews.csv", max_len=32,
                              batch_size=16, stages=STAGES[:1], export={"int8": False}, targets=[str(profile)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    report = pipeline.run(load_recipe(recipe_path), tmp_path / "out")
    assert sorted(r["variant"] for r in report["validation"]) == ["baseline.fp32", "model.fp32"]


# -- composition ------------------------------------------------------------------------------------------------------

def test_stages_compose_and_each_reports_params_macs_size_and_accuracy(tokenized_bert, sentiment_csv, tmp_path):
    stages = [STAGES[0], {"lowrank": {"method": "ranks", "ranks": 8}}, STAGES[1],
              {"quantize": {"tolerable_loss": 100, "min_agreement": 0.0}}]
    out = tmp_path / "out"
    summary = pipeline.compress(text_recipe(tokenized_bert, sentiment_csv, stages=stages), tokenized_bert, out)
    reports = summary["stages"]
    assert [r["stage"] for r in reports] == ["prune", "lowrank", "distill", "quantize"]
    for r in reports:
        assert r["params_after"] > 0 and r["macs_after"] > 0 and r["validation_accuracy"] is not None
    assert reports[1]["macs_after"] < reports[1]["macs_before"]
    assert reports[3]["size_bytes_after"] < reports[3]["size_bytes_before"]  # the token table stays fp32
    model, _ = load(out / "model")
    assert model.spec.quantization["bits"] == 8 and model.config.layers[0].linears["fc1"].kind == "lowrank"
    (fp32, _fp16, _int8w, int8) = pipeline.export(out, ["onnx"], int8=True, baseline_formats=[])
    assert fp32["parity_vs_pytorch"]["cosine"] > 0.9999 and int8["size_bytes"] < fp32["size_bytes"]


def test_early_exit_composes_after_pruning_lowrank_and_quantization(tokenized_bert, sentiment_csv, tmp_path):
    """Exit heads (DeeBERT: backbone frozen, so its int8 grid stays) on a pruned, factorized, quantized model; the
    exported segments pass their check against PyTorch."""
    stages = [STAGES[0], {"lowrank": {"method": "ranks", "ranks": 8}}, STAGES[1],
              {"quantize": {"tolerable_loss": 100, "min_agreement": 0.0}},
              {"early_exit": {"exits": "all", "mode": "deebert", "epochs": 1, "max_examples": 32}}]
    recipe = text_recipe(tokenized_bert, sentiment_csv, stages=stages,
                         prepare=[{"finetune": {"epochs": 1, "lr": 1e-3, "max_examples": 32}}])
    out = tmp_path / "out"
    summary = pipeline.compress(recipe, tokenized_bert, out)
    assert [r["stage"] for r in summary["stages"]] == ["prune", "lowrank", "distill", "quantize", "early_exit"]
    model, _ = load(out / "model")
    assert model.spec.exits and model.spec.quantization
    assert any(s.linears for s in model.spec.layers)  # the low-rank factors survive the exit heads
    records = pipeline.export(out, ["onnx"], int8=False, baseline_formats=[])
    seg = next(r for r in records if r.get("kind") == "segments")
    assert seg["parity_vs_pytorch"]["cosine"] > 0.9999


# -- the stage contract in the runner -------------------------------------------------------------------------------

DIGITS = [str(i) for i in range(10)]


def digits_stages(model, stages):
    """run_stages on a tiny ViT and 32 digit images, as compress() calls it for the `stages` section."""
    import copy

    from pocketformer.compress import Context

    recipe = parse_recipe({"model": "m", "data": "digits", "batch_size": 16, "stages": stages})
    ctx = Context(teacher=copy.deepcopy(model).eval(), train=load_dataset("digits", "train").head(32),
                  validation=load_dataset("digits", "validation").head(32), encoder=Encoder(None), batch_size=16)
    key = weights_sha256(model)
    return pipeline.run_stages(copy.deepcopy(model), recipe.build("stages"), ctx, key, recipe, None, "compress",
                               teacher_key=key)


def test_each_stage_reports_only_its_own_details(make_model):
    stages = [{"lowrank": {"method": "ranks", "ranks": 8, "linears": ["q", "k"]}},
              {"dense_sparse": {"rank": 32, "nnz": 4, "linears": ["fc1", "fc2"]}}]
    _, reports, _ = digits_stages(make_model("vision", labels=DIGITS), stages)
    lowrank, dense_sparse = (r["details"] for r in reports)
    assert set(lowrank) == {"linears"} and {d["linear"] for d in lowrank["linears"]} == {"q", "k"}
    assert set(dense_sparse) == {"linears", "relative_error", "stored_params"}
    assert {d["linear"] for d in dense_sparse["linears"]} == {"fc1", "fc2"}


def test_bumping_a_stage_version_runs_it_again_instead_of_reusing_its_cache(make_model, monkeypatch):
    from pocketformer.compress.lowrank import LowRank

    model = make_model("vision", labels=DIGITS)
    stages = [{"lowrank": {"method": "ranks", "ranks": 8}}]
    _, first, key = digits_stages(model, stages)
    _, again, same_key = digits_stages(model, stages)
    monkeypatch.setattr(LowRank, "version", LowRank.version + 1)
    _, bumped, new_key = digits_stages(model, stages)
    assert [first[0]["cached"], again[0]["cached"], bumped[0]["cached"]] == [False, True, False]
    assert key == same_key != new_key


def test_the_versions_of_the_libraries_a_stage_calls_join_its_cache_key(monkeypatch):
    recipe = parse_recipe({"model": "m", "data": "digits", "stages": [{"quantize": {}}]})
    (stage,) = recipe.build("stages")
    key = stage_cache.stage_key(stage, "input", "teacher", recipe, "digits")
    assert stage_cache.stage_key(stage, "input", "teacher", recipe, "digits") == key
    assert stage_cache.stage_key(stage, "input", "another teacher", recipe, "digits") != key
    monkeypatch.setattr(stage_cache, "package_versions", lambda *names: {n: "0.0.0" for n in names})
    assert stage_cache.stage_key(stage, "input", "teacher", recipe, "digits") != key


def test_compress_refuses_what_the_model_cannot_do_before_any_stage_runs(make_model, tmp_path, isolated_cache):
    from pocketformer.errors import RecipeError
    from pocketformer.models import save

    save(make_model("vision"), tmp_path / "embedding")  # no classifier, so no exit heads without finetune
    recipe = parse_recipe({"model": str(tmp_path / "embedding"), "data": "digits",
                           "stages": [{"distill": {"max_examples": 16}}, {"early_exit": {}}]})
    with pytest.raises(RecipeError, match="early_exit .* needs a classifier.*Fix: put finetune before early_exit"):
        pipeline.compress(recipe, tmp_path / "embedding", tmp_path / "out")
    assert not (isolated_cache / "stages").exists() and not (tmp_path / "out").exists()


def test_a_setting_added_later_keeps_earlier_cache_keys_at_its_default():
    """Adding a setting whose default keeps the old behaviour must not discard every cached result: at its default it
    is left out of the key (StageConfig.added_settings); set to anything else, it is in."""
    def key(settings):
        recipe = parse_recipe({"model": "m", "data": "digits", "stages": [{"distill": settings}]})
        (stage,) = recipe.build("stages")
        return stage_cache.stage_key(stage, "input", "teacher", recipe, "digits"), stage.config.key_settings()

    plain, settings = key({"epochs": 1})
    assert "teacher_topk" not in settings and "hidden_norm" not in settings and settings["epochs"] == 1
    assert key({"epochs": 1, "teacher_topk": 0, "hidden_norm": "none"})[0] == plain  # the defaults, said aloud
    assert key({"epochs": 1, "teacher_topk": 16})[0] != plain
    assert key({"epochs": 1, "hidden_norm": "channel"})[0] != plain
    assert key({"epochs": 2})[0] != plain  # a setting that was always there is always in the key
