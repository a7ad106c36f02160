"""The prune stage on a causal LM: layers, key-value groups, query heads within groups and gated-FFN neurons, by
magnitude or taylor importance on train text, or by the perplexity-driven walk. Units planted dead (their
contribution zeroed) are the ones removed, the loss is then unchanged; the walk keeps a deletion only within its
budget; and `pocketformer run` with a prune stage exports, validates and reports the pruned LM."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from pocketformer.compress import REGISTRY, Context
from pocketformer.compress.lm_prune import mean_loss
from pocketformer.compress.walk import Deletion, replay
from pocketformer.errors import RecipeError
from pocketformer.models import import_hf

from .test_lm_run import cli, run_recipe, write_profiles
from .tiny_lms import save_tiny_lm, text_windows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = save_tiny_lm("llama", tmp_path_factory.mktemp("lm-prune") / "hf")
    model, _ = import_hf(hf)
    windows = text_windows(hf)
    return model, windows


def prune(model, windows, **config):
    stage = REGISTRY["prune"](REGISTRY["prune"].Config.model_validate(config))
    ctx = Context(teacher=copy.deepcopy(model), train=None, validation=None, encoder=None,
                  text={"train": windows, "validation": windows})
    return stage.apply(copy.deepcopy(model), ctx)


def with_dead_neurons(model, layer: int, neurons: list[int]):
    out = copy.deepcopy(model)
    with torch.no_grad():
        ffn = out.layers[layer].ffn
        for lin in (ffn.gate, ffn.up):  # magnitude reads the rows too; taylor reads what reaches the output
            lin.weight[neurons] = 0
        ffn.down.weight[:, neurons] = 0
    return out


def with_dead_group(model, layer: int, group: int):
    out = copy.deepcopy(model)
    attn = out.layers[layer].attn
    g, d = attn.heads // attn.kv_heads, attn.head_dim
    rows = slice(group * g * d, (group + 1) * g * d)
    with torch.no_grad():
        attn.q.weight[rows] = 0
        attn.o.weight[:, rows] = 0
    return out


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_dead_neurons_are_the_ones_removed(tiny, importance):
    model, windows = tiny
    dead = with_dead_neurons(model, 0, list(range(0, 128, 2)))  # 64 of layer 0's 128 neurons
    result = prune(dead, windows, ffn=0.25, importance=importance)  # 64 of the 256 in both layers
    pruned = result.model
    assert [la.ffn.width for la in pruned.layers] == [64, 128]
    torch.testing.assert_close(pruned.layers[0].ffn.down.weight, dead.layers[0].ffn.down.weight[:, 1::2])
    assert result.details["loss_after"] == pytest.approx(result.details["loss_before"], abs=1e-5)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_a_dead_key_value_group_goes_with_its_query_heads(tiny, importance):
    model, windows = tiny
    dead = with_dead_group(model, 1, 0)
    pruned = prune(dead, windows, groups=1, importance=importance).model
    attn = pruned.layers[1].attn
    assert (attn.heads, attn.kv_heads) == (2, 1) and pruned.layers[0].attn.kv_heads == 2
    assert pruned.empty_past()[1][0].shape[1] == 1  # the cache of layer 1 holds one key-value head
    with torch.no_grad():  # what is left computes what the dead model did
        ids = torch.tensor([windows[0]])
        torch.testing.assert_close(pruned(ids), dead(ids), atol=2e-5, rtol=1e-5)


def test_heads_within_groups_keep_the_layout(tiny):
    model, windows = tiny
    pruned = prune(model, windows, heads=0.5, importance="taylor").model
    for layer in pruned.layers:  # one query head of each group's two goes; every group keeps its key-value head
        assert (layer.attn.heads, layer.attn.kv_heads) == (2, 2)


def test_layers_are_scored_by_the_loss_change_when_skipped(tiny):
    """A layer that adds nothing to the residual stream scores exactly 0; the layer removed is the lowest scored
    (on a random model skipping a layer can even lower the loss), and the loss after is the one measured for it."""
    model, windows = tiny
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead.layers[1].attn.o.weight.zero_()
        dead.layers[1].ffn.down.weight.zero_()
    result = prune(dead, windows, layers=1, importance="magnitude")
    scores = result.details["layer_scores"]
    assert scores[1] == pytest.approx(0, abs=1e-6)
    assert result.details["layers_removed"] == [min(range(2), key=lambda i: scores[i])]
    assert len(result.model.layers) == 1
    assert result.details["loss_after"] == pytest.approx(result.details["loss_before"] + min(scores), abs=1e-5)


@pytest.mark.parametrize("config,says", [
    ({"max_drop": 1.0, "importance": "accuracy"}, "does not apply to a decoder-only language model"),
    ({"speedup": 2.0}, "needs a target to measure decode latency on"),
])
def test_settings_for_encoders_only_are_refused_in_one_line(tiny, config, says):
    model, windows = tiny
    with pytest.raises(RecipeError, match=says):
        prune(model, windows, **config)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_perplexity_driven_walk_keeps_a_deletion_only_while_the_budget_holds(tiny):
    model, windows = tiny
    start = mean_loss(model, windows)
    removed = {}
    for pct in (0.5, 20.0):
        result = prune(model, windows, importance="accuracy", max_perplexity_increase=pct)
        walk = result.details["walk"]
        loss = mean_loss(result.model, windows)
        assert math.exp(loss) <= math.exp(start) * (1 + pct / 100) * (1 + 1e-6)
        assert walk["perplexity_after"] == pytest.approx(math.exp(loss), rel=1e-5)
        # the record replays: the deletions kept, made in order on the model before, give the pruned model
        rebuilt = replay(model, [Deletion(d["kind"], d["layer"], tuple(d["keep"])) for d in walk["deletions"]])
        ids = torch.tensor([windows[0]])
        torch.testing.assert_close(rebuilt(ids), result.model(ids))
        removed[pct] = params(model) - params(result.model)
        if pct == 0.5:
            assert walk["tried"] > len(walk["deletions"])  # the tight budget refused something
    assert removed[20.0] > removed[0.5] > 0


def test_the_walk_alone_never_raises_the_loss(tiny):
    model, windows = tiny
    result = prune(model, windows, importance="accuracy")  # tolerance 0: a deletion is kept if the loss holds
    assert mean_loss(result.model, windows) <= mean_loss(model, windows) + 1e-6
    assert result.details["walk"]["deletions"]  # a random model has units whose removal lowers its loss


@pytest.mark.parametrize("caps,shape", [
    ({}, (1, 1, 16)),  # every kind of unit goes, down to what a layer keeps: 1 group of 1 head, 128 / 8 neurons
    ({"groups": 1, "heads": 1, "ffn": 16}, (1, 1, 112)),  # the amounts cap what the walk removes
])
def test_with_room_the_walk_removes_each_kind_of_unit_and_keeps_attention_grouped(tiny, caps, shape):
    model, windows = tiny
    pruned = prune(model, windows, importance="accuracy", max_perplexity_increase=10000, **caps).model
    assert len(pruned.layers) == 1  # the last layer first, then nothing: a model keeps one
    attn = pruned.layers[0].attn
    assert (attn.heads, attn.kv_heads, pruned.layers[0].ffn.width) == shape
    assert pruned.empty_past()[0][0].shape[1] == attn.kv_heads


def test_a_perplexity_budget_is_for_the_walk_on_a_language_model():
    from conftest import tiny_model

    with pytest.raises(ValueError, match="applies to the accuracy-driven walk only"):
        REGISTRY["prune"].Config(max_perplexity_increase=5)
    stage = REGISTRY["prune"](REGISTRY["prune"].Config(importance="accuracy", max_perplexity_increase=5))
    with pytest.raises(RecipeError, match="max_perplexity_increase is a language model's budget"):
        stage.check_model(tiny_model(labels=("a", "b")))


def test_groups_on_an_encoder_are_refused():
    from conftest import tiny_model

    with pytest.raises(RecipeError, match="key-value groups"):
        REGISTRY["prune"](REGISTRY["prune"].Config(groups=1)).apply(tiny_model(labels=("a", "b")), None)


def test_run_compresses_exports_validates_and_extracts_a_language_model(tmp_path):
    """`pocketformer run` with prune, distill and matformer on a tiny Llama: stage reports with validation
    perplexity, the pruned nested model exported and validated against the unpruned baseline, the stages cached on
    a re-run; then `pocketformer extract RUN --widths 0.5` cuts the half width, its test perplexity paired with the
    baseline; `extract --target` searches widths for a decode budget on the target's decode table."""
    from pocketformer.latency import Curve
    from pocketformer.models import load

    save_tiny_lm("llama", tmp_path / "tiny-llama")
    recipe = {"name": "tiny-lm-pruned", "model": "tiny-llama", "data": "botchan", "max_len": 32,
              "stages": [{"prune": {"ffn": 0.5, "groups": 1, "importance": "taylor", "calibration_examples": 8}},
                         {"distill": {"epochs": 1, "max_examples": 16}},
                         {"matformer": {"widths": [1, 0.5], "epochs": 1, "max_examples": 16,
                                        "importance": "magnitude"}}],
              "export": {"formats": ["onnx"], "baseline_formats": [], "int8": False},
              "targets": write_profiles(tmp_path)[:1]}
    out = run_recipe(tmp_path, recipe)
    summary = json.loads((out / "compress.json").read_text())
    prune_report, distill_report, matformer_report = summary["stages"]
    assert prune_report["stage"] == "prune" and prune_report["params_after"] < prune_report["params_before"]
    assert distill_report["stage"] == "distill" and matformer_report["stage"] == "matformer"
    assert matformer_report["validation_perplexity"] == pytest.approx(summary["model"]["validation_perplexity"])
    assert set(matformer_report["details"]["validation_perplexity"]) == {"1", "0.5"}
    assert sum(la["kv_heads"] for la in summary["model"]["layers"]) == 3
    assert sum(la["ffn"] for la in summary["model"]["layers"]) == 128
    report = json.loads((out / "report.json").read_text())
    row = report["validation"][0]
    assert row["file"] == "model.fp32.onnx" and row["token_match"] <= 1.0
    assert row["perplexity"] > 1 and row["perplexity_increase_pct"] != 0  # against the unpruned baseline
    md = (out / "report.md").read_text()
    assert "- compressed: " in md and "| prune | " in md and "| distill | " in md and "| matformer | " in md
    again = cli("run", "recipe.yaml", cwd=tmp_path)  # the stages are cached
    assert again.returncode == 0 and "matformer: reused cached result" in again.stderr + again.stdout

    proc = cli("extract", str(out), "-o", str(tmp_path / "half"), "--widths", "0.5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sub, meta = load(tmp_path / "half")
    assert [la.ffn.width for la in sub.layers] == [32, 32]  # half of the pruned 64 each
    c = meta["provenance"]["confirmation"]
    assert c["reference"] == "baseline" and c["split"] == "test" and c["perplexity"] > 1
    assert c["interval_pct"][0] <= c["perplexity_increase_pct"] <= c["interval_pct"][1]
    assert "test perplexity" in proc.stderr

    # a width search for a decode budget, on the target's decode table (written by hand into the cache here: the
    # measured kind is tests/lm/test_lm_latency.py): FFN neurons cost 1 ms per 32, so the full widths (64, 64) are
    # predicted 2 ms above the half ones, and a budget between them needs at least one layer at half width
    from pocketformer.latency import write_table
    from pocketformer.targets import get_profile
    from pocketformer.targets.lm_latency import lm_table_paths, lm_units

    model, _ = load(out / "model")
    profile = get_profile(str(tmp_path / "ort.yaml"))
    table = decode_table(model, attention_ms=0.1, ffn_ms=1.0).model_copy(update={"ffn": Curve(points=[32, 64],
                                                                                                ms=[0.0, 1.0])})
    for measure, path in lm_table_paths(profile, model.config, "fp32").items():
        write_table(table.model_copy(update={"measure": measure, "target": profile.name}), path)
    full = table.predict(lm_units(model.config))
    proc = cli("extract", str(out), "-o", str(tmp_path / "fit"), "--target", "ort.yaml", "--latency-ms",
               f"{full - 0.5:.4f}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fit, meta = load(tmp_path / "fit")
    search = meta["provenance"]["search"]
    assert search["budget"] == {"decode_ms": pytest.approx(full - 0.5, abs=1e-3)}
    widths = [la.ffn.width for la in fit.layers]
    assert widths == search["widths"] and table.predict(lm_units(fit.config)) <= full - 0.5
    # uniform full width is over budget, half fits, narrowing one layer of the full (Mix'n'Match) fits too
    assert [(c["kind"], c["fits"]) for c in search["candidates"]] == [("uniform 1", False), ("uniform 0.5", True),
                                                                        ("mix'n'match", True)]
    assert widths == max((c for c in search["candidates"] if c["fits"]), key=lambda c: c["score"])["widths"]
    proc = cli("extract", str(out), "-o", str(tmp_path / "none"), "--target", "ort.yaml", "--latency-ms", "0.1",
               cwd=tmp_path)
    assert proc.returncode == 2 and "No nested width meets" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def kl_to(student, teacher, windows) -> float:
    """Mean KL(teacher || student) of the next-token distributions over the windows."""
    with torch.no_grad():
        ids = torch.tensor(windows)
        t, s = teacher(ids).log_softmax(-1), student(ids).log_softmax(-1)
        return float((t.exp() * (t - s)).sum(-1).mean())


def test_distillation_brings_a_pruned_lm_back_towards_the_original(tiny):
    """Recovery distillation on a language model: the pruned student trained on the teacher's next-token
    distributions and hidden states over the train text, with the shared embedding frozen."""
    model, windows = tiny
    pruned = prune(model, windows, ffn=0.75, groups=0.5, importance="magnitude").model
    before = kl_to(pruned, model, windows)
    distill = REGISTRY["distill"](REGISTRY["distill"].Config(epochs=8, lr=1e-3, temperature=1.0))
    ctx = Context(teacher=copy.deepcopy(model), train=None, validation=None, encoder=None, batch_size=4,
                  text={"train": windows, "validation": windows})
    result = distill.apply(copy.deepcopy(pruned), ctx)
    after = kl_to(result.model, model, windows)
    assert after < 0.5 * before, (before, after)
    torch.testing.assert_close(result.model.embed.weight, pruned.embed.weight)  # frozen: it is the tied head too
    assert [la.ffn.width for la in result.model.layers] == [la.ffn.width for la in pruned.layers]


def test_causal_encode_gives_what_forward_computes(tiny):
    model, windows = tiny
    ids = torch.tensor(windows[:2])
    with torch.no_grad():
        last, hidden = model.encode(ids, all_hidden=True)
        torch.testing.assert_close(model.head_output(last), model(ids))
    assert len(hidden) == len(model.layers) + 1 and hidden[-1] is last


def test_quantize_on_a_language_model_is_scored_on_its_text(tiny):
    """The quantize stage on a causal LM: weight-only RTN through neural-compressor, scored by perplexity against
    the float model and refused below the next-token agreement floor; every linear lands on its int grid and the
    tied embedding (the output projection) stays float."""
    from pocketformer.compress.quantize import QuantizationRefused

    model, windows = tiny
    ctx = Context(teacher=copy.deepcopy(model), train=None, validation=None, encoder=None,
                  text={"train": windows, "validation": windows})
    stage = REGISTRY["quantize"](REGISTRY["quantize"].Config(min_agreement=0.9))
    result = stage.apply(copy.deepcopy(model), ctx)
    q = result.model.spec.quantization
    assert q["bits"] == 8 and q["validation_tokens"] == sum(len(w) - 1 for w in windows) and q["agreement"] >= 0.9
    w = result.model.layers[0].ffn.up.weight
    scale = w.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(w / scale, (w / scale).round(), atol=1e-3)  # on the per-channel int8 grid
    torch.testing.assert_close(result.model.embed.weight, model.embed.weight)
    harsh = REGISTRY["quantize"](REGISTRY["quantize"].Config(
        candidates=[{"bits": 2, "group_size": 32}], tolerable_loss=100, min_agreement=0.999))
    with pytest.raises(QuantizationRefused, match="agrees with the float model on only"):
        harsh.apply(copy.deepcopy(model), ctx)


def test_the_quantize_stages_int4_is_carried_exactly_into_onnx_int4(tiny, tmp_path):
    """Group-wise int4 from the quantize stage (symmetric, 32 weights per scale) lands in ONNX's int4 file as the
    same grid: every block kept as the stage left it (no offset products), so ONNX Runtime's 4-bit weights equal
    PyTorch's; the file's logits follow the quantized model's (its head is int8, as in every int4 file)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from pocketformer.targets import export_checked, get_runtime
    from pocketformer.targets.lm import Decoder

    model, windows = tiny
    ctx = Context(teacher=copy.deepcopy(model), train=None, validation=None, encoder=None,
                  text={"train": windows, "validation": windows})
    stage = REGISTRY["quantize"](REGISTRY["quantize"].Config(candidates=[{"bits": 4, "group_size": 32}],
                                                             tolerable_loss=100, min_agreement=0.5))
    quantized = stage.apply(copy.deepcopy(model), ctx).model.eval()
    assert quantized.spec.quantization["bits"] == 4
    ids = torch.tensor([windows[0][:24]] * 2)
    records = export_checked(quantized, tmp_path, "model", quantized.graph_inputs(ids, 16), "onnx", int8=False,
                             int4=True, skip={"fp16"})
    int4 = next(r for r in records if r["precision"] == "int4")
    proto = onnx.load(str(tmp_path / int4["file"]))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 7 * len(quantized.layers)
    assert not [t.name for t in proto.graph.initializer if t.name.endswith("_offsets")]
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    stored = [_dequantized(inits[n.input[1]], inits[n.input[2]]) for n in nbits]
    want_up = quantized.layers[0].ffn.up.weight.detach().numpy()  # layer 0's up projection, found by its values
    assert any(w.shape == want_up.shape and np.abs(w - want_up).max() < 1e-6 for w in stored)
    decoder = Decoder(get_runtime("onnxruntime").open(tmp_path / int4["file"], 1))
    with torch.no_grad():
        want = quantized(torch.tensor([windows[1]]))[0].numpy()
    got = decoder.prefill(windows[1])[0]
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def _dequantized(packed, scales):
    """MatMulNBits' 4-bit weight (N x K/32 x 16 bytes, implicit zero point 8) as floats, N x K."""
    import numpy as np

    low, high = packed & 0x0F, packed >> 4
    codes = np.stack([low, high], -1).reshape(packed.shape[0], -1).astype(np.float32) - 8
    n, k = codes.shape
    return (codes.reshape(n, k // 32, 32) * scales.reshape(n, k // 32, 1)).reshape(n, k)


def decode_table(model, attention_ms: float, ffn_ms: float):
    """A decode table of the tiny Llama's family, written by hand (the measured kind is tests/lm/test_lm_latency.py):
    `attention_ms` per unit (query or key-value head) beyond the smallest, `ffn_ms` per 64 neurons beyond 64."""
    from pocketformer.latency import Curve, LatencyTable
    from pocketformer.targets.lm_latency import lm_family_of

    return LatencyTable(target="hand", runtime="onnxruntime", threads=1, seq_len=24, measure="decode",
                        family=lm_family_of(model.config), base_ms=1.0, layer_ms=0.5,
                        attention=Curve(points=[2, 6], ms=[0.0, 4 * attention_ms]),
                        ffn=Curve(points=[64, 128], ms=[0.0, ffn_ms]))


@pytest.mark.parametrize("expensive", ["ffn", "attention"])
def test_pruning_to_a_decode_latency_removes_what_the_table_says_costs(tiny, expensive):
    """prune's speedup on a language model: units go by calibration loss per millisecond the target's decode table
    says they save, until the predicted step is within budget; the edits give the shapes the prediction assumed."""
    from pocketformer.targets.lm_latency import lm_units

    model, windows = tiny
    table = decode_table(model, attention_ms=2.0 if expensive == "attention" else 0.01,
                         ffn_ms=8.0 if expensive == "ffn" else 0.01)
    stage = REGISTRY["prune"](REGISTRY["prune"].Config(speedup=1.3, round_to=8))
    ctx = Context(teacher=copy.deepcopy(model), train=None, validation=None, encoder=None,
                  text={"train": windows, "validation": windows}, target="hand",
                  latency_table=lambda *_: ("hand", table))
    result = stage.apply(copy.deepcopy(model), ctx)
    pruned, details = result.model, result.details["latency_target"]
    before = table.predict(lm_units(model.config))
    assert details["predicted_before_ms"] == pytest.approx(before)
    assert table.predict(lm_units(pruned.config)) == pytest.approx(details["predicted_after_ms"])
    assert details["reached"] and details["predicted_after_ms"] <= before / 1.3 + 1e-9
    removed = details["removed"]
    # what saves next to nothing is never worth its loss: cheap attention stays whole, or cheap neurons do (a
    # whole layer may go either way: it saves both)
    if expensive == "ffn":
        assert removed["groups"] + removed["head_slots"] == 0 and removed["neurons"] + removed["layers"] > 0
        assert all(la.ffn % 8 == 0 for la in pruned.config.layers)
    else:
        assert removed["neurons"] == 0 and removed["groups"] + removed["head_slots"] + removed["layers"] > 0
    ids = torch.tensor([windows[0]])
    with torch.no_grad():
        assert torch.isfinite(pruned(ids)).all()


def test_a_latency_target_on_a_language_model_chooses_its_own_units():
    cfg = REGISTRY["prune"].Config(speedup=1.5, groups=1)
    from pocketformer.compress import lm_prune

    with pytest.raises(RecipeError, match="choose the groups"):
        lm_prune.check(cfg)
