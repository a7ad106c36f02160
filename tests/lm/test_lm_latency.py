"""Decode and prefill latency tables of a language model (targets/lm_latency.py), measured on ONNX Runtime for a
tiny random Llama: both built from the same exported files and cached; they predict by query + key-value heads and
FFN neurons per layer, read back in the encoder tables' format, `pocketformer profile` shows them, and a family they
were not measured for is refused. (One timing round and two calibration models keep it short; the figures are not
judged here: speed claims live in benchmarks/.)"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from pocketformer.errors import TargetError
from pocketformer.latency import read_table, write_table
from pocketformer.models import load_any
from pocketformer.targets import get_profile

from conftest import cli_command
from .tiny_lms import save_tiny_lm


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    import yaml

    from pocketformer.targets.lm_latency import check_lm_tables, lm_tables_for

    root = tmp_path_factory.mktemp("lm-latency")
    save_tiny_lm("llama", root / "tiny-llama")
    (root / "ort.yaml").write_text(yaml.safe_dump({
        "name": "tiny-ort", "format": "onnx", "runtime": "onnxruntime", "threads": 1, "this_host": True,
        "language_models": {"precisions": ["fp32"], "prompt_tokens": 24, "new_tokens": 6, "warmup": 0, "repeats": 1,
                            "prefills": 2}}))
    model, _ = load_any(root / "tiny-llama")
    profile = get_profile(str(root / "ort.yaml"))
    with pytest.MonkeyPatch.context() as mp:  # this module's own cache, which the CLI test reads too
        mp.setenv("POCKETFORMER_CACHE", str(root / "cache"))
        built = lm_tables_for(profile, model.config, "fp32", calibration_models=2, rounds=1)
        check = check_lm_tables(built, profile, model.config, n=1, rounds=1)
    return root, model, profile, built, check


def test_both_tables_span_the_models_widths(tables):
    _, _, _, built, check = tables
    assert set(built) == {"decode", "prefill"}
    for measure, table in built.items():
        assert table.measure == measure and table.seq_len == 24 and table.runtime == "onnxruntime"
        # tiny Llama: 2 key-value groups of 2 query heads (units 2..6), 128 FFN neurons
        assert table.attention.points == [2, 3, 4, 6] and table.ffn.points == [64, 128]
        assert table.attention.ms[0] == 0 and table.ffn.ms[0] == 0  # costs beyond the smallest layer
        assert table.family["kind"] == "causal_lm" and table.family["tie_embeddings"] is True
        assert table.calibration.models == 2 and table.calibration.scale > 0
        for curve in (table.attention, table.ffn):  # more units never cost less: a measured dip is noise
            assert curve.ms == sorted(curve.ms)
        assert table.predict([(6, 128)] * 2) >= table.predict([(6, 64), (2, 128)]) >= table.predict([(2, 64)])
        assert check[measure]["models"] == 1 and check[measure]["shapes"][0]["measured_ms"] > 0


def test_tables_read_back_and_the_cli_shows_the_cached_ones(tables):
    root, _, _, built, _ = tables
    for measure, table in built.items():
        write_table(table, root / f"{measure}.json")
        assert read_table(root / f"{measure}.json").to_json() == table.to_json()
    proc = subprocess.run(cli_command("profile", "--target", "ort.yaml", "--model", "tiny-llama", "--json",
                                      "tables.json"), cwd=root, capture_output=True, text=True,
                          env={**os.environ, "POCKETFORMER_CACHE": str(root / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decode after a 24-token prompt, fp32" in proc.stdout and "prefill of 24 tokens, fp32" in proc.stdout
    assert "attention, ms per layer by query + key-value heads (beyond the smallest): 2: 0.000" in proc.stdout
    saved = json.loads((root / "tables.json").read_text())["tables"]
    assert saved == {m: t.to_json() for m, t in built.items()}  # the cache, not a new measurement


def test_a_table_refuses_another_family(tables):
    _, model, _, built, _ = tables
    family = dict(built["decode"].family, hidden=model.spec.hidden * 2)
    with pytest.raises(TargetError, match="another model family"):
        built["decode"].check_family(family, "this model")
