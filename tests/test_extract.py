"""Sub-model extraction: prefix weights exactly, width specs and their errors, the bounded Mix'n'Match search,
`pocketformer extract` on a nested run folder (given widths, and a search measured in ONNX Runtime), and the chosen
sub-model's confirmation on the test split (paired drop against the baseline, its interval, a verdict)."""

import pytest
import torch

from pocketformer import pipeline
from pocketformer.data import Encoder, load_dataset
from pocketformer.extract import (SEARCH_EXAMPLES, ExtractError, choose_widths, confirm, extract, nested_choices,
                                  parse_widths, run_extract)
from pocketformer.models import load, save
from pocketformer.models.io import weights_sha256
from pocketformer.recipe import parse_recipe
from pocketformer.store import read_compress
from pocketformer.train import predict
from pocketformer.verdict import paired_drop, verdict_of

DIGITS = [str(i) for i in range(10)]
WIDTHS = [128, 128]  # the tiny models' FFN widths


# -- extraction -----------------------------------------------------------------------------------------------------

def test_extract_returns_the_prefix_weights_exactly(make_model):
    model = make_model("text")
    sub = extract(model, [48, 16])
    for layer, sub_layer, w in zip(model.layers, sub.layers, [48, 16]):
        assert torch.equal(sub_layer.ffn.fc1.weight, layer.ffn.fc1.weight[:w])
        assert torch.equal(sub_layer.ffn.fc1.bias, layer.ffn.fc1.bias[:w])
        assert torch.equal(sub_layer.ffn.fc2.weight, layer.ffn.fc2.weight[:, :w])
        assert torch.equal(sub_layer.ffn.fc2.bias, layer.ffn.fc2.bias)


def test_extract_leaves_the_source_model_whole(make_model):
    model = make_model("text")
    extract(model, [16, 16])
    assert [layer.ffn.width for layer in model.layers] == WIDTHS


def test_extracted_model_is_plain_dense_and_no_longer_nested(make_model):
    model = make_model("text")
    model.spec.nested_ffn = [1.0, 0.5]
    cfg = extract(model, [64, 128]).config
    assert [s.ffn for s in cfg.layers] == [64, 128]
    assert cfg.nested_ffn == [] and all(not s.linears for s in cfg.layers)


@pytest.mark.parametrize("widths", [[64], [64, 64, 64], [0, 64], [64, 129]])
def test_extract_refuses_widths_of_the_wrong_count_or_out_of_range(make_model, widths):
    with pytest.raises(ExtractError):
        extract(make_model("text"), widths)


# -- width specs ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,expected", [("0.5", [64, 64]), ("1", [128, 128]), ("1.0,0.25", [128, 32]),
                                           ("1,40", [128, 40]), ("0.3", [40, 40]), ("96, 0.125", [96, 16])])
def test_width_spec_gives_fractions_or_neuron_counts_per_layer(spec, expected):
    assert parse_widths(spec, WIDTHS) == expected


@pytest.mark.parametrize("spec,mention", [("0.5,0.5,0.5", "2 layers"), ("200", "1..128"), ("0", "1..128"),
                                          ("1.5", "(0, 1]"), ("half", "not a number"), ("12.5", "(0, 1]")])
def test_bad_width_specs_say_what_is_wrong(spec, mention):
    with pytest.raises(ExtractError) as e:
        parse_widths(spec, WIDTHS)
    assert mention in e.value.problem and e.value.fix


def test_nested_choices_follow_the_trained_fractions(make_model):
    model = make_model("text")
    model.spec.nested_ffn = [0.25, 1.0, 0.5]
    assert nested_choices(model) == [[128, 64, 32], [128, 64, 32]]


def test_a_search_on_a_model_never_nested_is_refused(make_model):
    with pytest.raises(ExtractError, match="not nested"):
        nested_choices(make_model("text"))


# -- the bounded search (costs as a plain function of the widths: the file-size model of a dense FFN) ---------------

CHOICES = [[128, 64, 32], [128, 64, 32], [128, 64, 32]]
LABELS = ["1", "0.5", "0.25"]


def search_by_neurons(budget, score=lambda w: float(sum(w))):
    return choose_widths(CHOICES, LABELS, lambda w: {"neurons": float(sum(w))}, lambda c: c["neurons"] <= budget,
                         score)


def test_search_stops_at_the_full_model_when_it_fits():
    chosen, log = search_by_neurons(1000)
    assert chosen == [128, 128, 128] and len(log) == 1


def test_search_mixes_widths_to_keep_more_than_the_uniform_that_fits():
    chosen, log = search_by_neurons(300)  # uniform 0.5 (192) fits, uniform 1 (384) does not
    assert sum(chosen) <= 300 and sum(chosen) > 192
    assert sorted(chosen) == [64, 64, 128]
    assert [r["kind"] for r in log] == ["uniform 1", "uniform 0.5", "mix'n'match", "mix'n'match"]


def test_search_narrows_first_the_layer_whose_narrowing_costs_least():
    # Narrowing layer 0 costs the most quality, so it is the one left wide.
    chosen, _ = search_by_neurons(300, score=lambda w: 10.0 * w[0] + w[1] + w[2])
    assert chosen == [128, 64, 64]


def test_a_search_ranked_once_scores_each_layer_once_and_agrees_when_layers_do_not_interact():
    # Six layers, narrowing each costs its own amount (layer 3 the least, then 0, 5, 1...): the walk ranked once
    # narrows in that order, as the walk rescored at every step does, with one score per layer plus the path's.
    cost = [2.0, 5.0, 6.0, 1.0, 4.0, 3.0]
    calls = []

    def score(w):
        calls.append(list(w))
        return -sum(c * (w[i] < 128) for i, c in enumerate(cost))

    choices, budget = [[128, 64, 32]] * 6, 128 * 6 - 64 * 3  # three layers narrowed to half fit
    picks = {}
    for rescore in (True, False):
        calls.clear()
        picks[rescore], log = choose_widths(choices, LABELS, lambda w: {"neurons": float(sum(w))},
                                            lambda c: c["neurons"] <= budget, score, rescore=rescore)
        picks[rescore, "scores"] = len(calls)
    assert picks[True] == picks[False] == [64, 128, 128, 64, 128, 64]
    assert picks[False, "scores"] == 2 + 6 + 2 < picks[True, "scores"]  # uniforms, one a layer, the path's last two


def test_search_records_every_candidate_and_returns_none_when_nothing_fits():
    chosen, log = search_by_neurons(50)
    assert chosen is None
    assert [r["widths"] for r in log] == [[128] * 3, [64] * 3, [32] * 3] and not any(r["fits"] for r in log)


# -- the command line -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nested_run(tmp_path_factory, make_model):
    """A run folder whose model/ a recipe with the matformer stage wrote (tiny ViT, digits)."""
    work = tmp_path_factory.mktemp("nested-run")
    save(make_model("vision", labels=DIGITS), work / "ckpt")
    recipe = parse_recipe({"name": "nested", "model": str(work / "ckpt"), "data": "digits", "batch_size": 32,
                           "stages": [{"matformer": {"epochs": 1, "max_examples": 64, "lr": 1e-3,
                                                     "importance": "magnitude"}}]})
    pipeline.compress(recipe, work / "ckpt", work / "run")
    return work / "run"


def test_cli_extracts_given_widths_from_a_run_folder(run_cli, nested_run, tmp_path):
    proc = run_cli("extract", nested_run, "-o", tmp_path / "half", "--widths", "0.5")
    assert proc.returncode == 0, proc.stderr
    sub, meta = load(tmp_path / "half")
    source, _ = load(nested_run / "model")
    assert [layer.ffn.width for layer in sub.layers] == [64, 64]
    assert torch.equal(sub.layers[0].ffn.fc1.weight, source.layers[0].ffn.fc1.weight[:64])
    provenance = meta["provenance"]
    assert provenance["widths"] == [64, 64] and provenance["source_nested_ffn"] == [1.0, 0.5, 0.25, 0.125]
    assert provenance["source_weights_sha256"] == weights_sha256(source)
    assert "validation_accuracy" in provenance  # the run's data
    drop = provenance["confirmation"]["drop"]
    assert f"test drop {drop:+.2f} pts" in proc.stdout  # the held-out figure leads, not the validation one


def test_cli_search_measures_candidates_on_the_targets_runtime(run_cli, nested_run, tmp_path, fast_profile):
    proc = run_cli("extract", nested_run, "-o", tmp_path / "fit", "--target", fast_profile, "--latency-ms", "10000")
    assert proc.returncode == 0, proc.stderr
    search = load(tmp_path / "fit")[1]["provenance"]["search"]
    (candidate,) = search["candidates"]  # the full model fits a generous budget: one export, one measurement
    assert candidate["kind"] == "uniform 1" and candidate["fits"] and candidate["latency_p50_ms"] > 0
    assert search["widths"] == [128, 128] and search["budget"] == {"latency_ms": 10000.0}


def assert_one_line_error(proc, *mentions):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in mentions:
        assert word in lines[0]


def test_cli_search_on_a_checkpoint_never_nested_is_one_line(run_cli, make_model, tmp_path, fast_profile):
    save(make_model("vision", labels=DIGITS), tmp_path / "plain")
    proc = run_cli("extract", tmp_path / "plain", "-o", tmp_path / "out", "--target", fast_profile)
    assert_one_line_error(proc, "not nested", "matformer")
    assert not (tmp_path / "out").exists()


def test_cli_wrong_number_of_widths_is_one_line(run_cli, nested_run, tmp_path):
    proc = run_cli("extract", nested_run, "-o", tmp_path / "out", "--widths", "1,0.5,0.5")
    assert_one_line_error(proc, "3 widths", "2 layers")


def test_cli_needs_widths_or_a_target(run_cli, nested_run, tmp_path):
    assert_one_line_error(run_cli("extract", nested_run, "-o", tmp_path / "out"), "--widths", "--target")


# -- confirmation on the test split ---------------------------------------------------------------------------------

def splits_of(run, model):
    seed = read_compress(run)["recipe"]["seed"]
    return [load_dataset("digits", name, seed).for_model("vision", model.spec.head.labels, "the model")
            for name in ("validation", "test")]


def recomputed(sub, reference, ds, confidence):
    enc = Encoder(None)
    ref_out, out = predict(reference, ds, enc).numpy(), predict(sub, ds, enc).numpy()
    return paired_drop(sub.task.correct(ref_out, ds.labels), sub.task.correct(out, ds.labels), confidence)


def test_cli_search_is_confirmed_on_the_test_split_against_the_baseline(run_cli, nested_run, tmp_path, make_profile):
    profile = make_profile(budgets={"latency_ms": 10000, "accuracy_drop": 5, "confidence": 0.9})
    proc = run_cli("extract", nested_run, "-o", tmp_path / "fit", "--target", profile)
    assert proc.returncode == 0, proc.stderr
    c = load(tmp_path / "fit")[1]["provenance"]["confirmation"]
    sub, baseline = load(tmp_path / "fit")[0], load(nested_run / "baseline")[0]
    validation, test = splits_of(nested_run, baseline)
    assert c["reference"] == "baseline" and c["reference_path"] == str((nested_run / "baseline").resolve())
    assert (c["split"], c["examples"], c["budget"], c["confidence"]) == ("test", len(test), 5, 0.9)
    held_out = recomputed(sub, baseline, test, 0.9)
    assert (c["drop"], c["interval"], c["lost"], c["gained"]) == (held_out.drop, list(held_out.interval),
                                                                  held_out.lost, held_out.gained)
    assert c["verdict"] == verdict_of(*c["interval"], 5)
    # The search scored on validation examples; the confirmation's examples are none of them.
    searched = validation.head(SEARCH_EXAMPLES)
    s = c["search_split"]
    assert (s["split"], s["examples"], s["drop"]) == ("validation", len(searched),
                                                      recomputed(sub, baseline, searched, 0.9).drop)
    assert not {x.tobytes() for x in searched.images} & {x.tobytes() for x in test.images}
    assert f"confirmed on {len(test)} test examples against the baseline" in proc.stderr
    assert f"-> {c['verdict']}" in proc.stderr and f"on the {len(searched)} validation examples" in proc.stderr


def test_confirmation_verdict_follows_its_interval_and_the_budget(nested_run):
    model, baseline = load(nested_run / "model")[0], load(nested_run / "baseline")[0]
    validation, test = splits_of(nested_run, baseline)
    sub = extract(model, [32, 32])
    unbudgeted = confirm(sub, baseline, test, Encoder(None), confidence=0.95)
    low, high = unbudgeted["interval"]
    assert unbudgeted["verdict"] is None and unbudgeted["budget"] is None and unbudgeted["search_split"] is None
    for budget, verdict in ((high + 1, "PASS"), (low - 1, "FAIL"), ((low + high) / 2, "INCONCLUSIVE")):
        c = confirm(sub, baseline, test, Encoder(None), budget=budget, confidence=0.95)
        assert (c["verdict"], c["interval"]) == (verdict, [low, high])
    assert c["examples_needed"] and "cannot tell" in c["reason"]


def test_given_widths_take_the_budget_and_confidence_given(nested_run, tmp_path):
    c = run_extract(nested_run, tmp_path / "sub", widths="0.25", max_drop=2.0, confidence=0.8)["confirmation"]
    assert (c["budget"], c["confidence"], c["search_split"]) == (2.0, 0.8, None)
    assert c["verdict"] == verdict_of(*c["interval"], 2.0)


def test_an_embedding_model_is_confirmed_by_cosine_with_the_source(make_model, tmp_path):
    model = make_model("vision")
    model.spec.nested_ffn = [1.0, 0.5]
    save(model, tmp_path / "ckpt")
    c = run_extract(tmp_path / "ckpt", tmp_path / "sub", widths="0.5", data="digits")["confirmation"]
    test = load_dataset("digits", "test", 0)
    sub, source = load(tmp_path / "sub")[0], load(tmp_path / "ckpt")[0]
    enc = Encoder(None)
    cosine = source.task.agreement(predict(sub, test, enc).numpy(), predict(source, test, enc).numpy())
    assert c["reference"] == "source at full width" and c["examples"] == len(test)
    assert c["cosine"] == pytest.approx(cosine) and c["verdict"] is None and "drop" not in c
    with pytest.raises(ExtractError, match="no accuracy"):
        run_extract(tmp_path / "ckpt", tmp_path / "sub2", widths="0.5", data="digits", max_drop=1.0)


def test_without_data_the_provenance_says_nothing_was_confirmed(make_model, tmp_path):
    save(make_model("vision", labels=DIGITS), tmp_path / "ckpt")
    provenance = run_extract(tmp_path / "ckpt", tmp_path / "sub", widths="0.5")
    assert "no data" in provenance["confirmation"]["skipped"]
