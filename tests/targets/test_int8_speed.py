"""int8's speed on this host, measured in the target's runtime and cached once per machine kind."""

from __future__ import annotations

import time

import pytest

from pocketformer import store
from pocketformer.errors import TargetError
from pocketformer.targets import get_profile
from pocketformer.targets.int8_speed import PROBE, Probe, cache_key, cached, int8_speed

# A small BERT-shaped probe: the production one is hidden 384 x 2 layers at the profile's 128 tokens and 50 repeats.
SMALL = Probe(hidden=64, heads=4, head_dim=16, ffn=128, layers=1, vocab_size=100, warmup=1, repeats=6, rounds=1)


@pytest.fixture
def here(make_profile):
    return get_profile(str(make_profile("here-ort", this_host=True, threads=1, seq_len=16)))


def test_measured_once_then_read_from_the_cache(here, isolated_cache):
    assert cached(here, SMALL) is None
    first = int8_speed(here, SMALL)
    assert first["speedup"] == pytest.approx(first["fp32_ms"] / first["int8_ms"]) and first["int8_ms"] > 0
    assert (first["fingerprint"], first["runtime"], first["threads"], first["batch"], first["seq_len"]) == \
        (store.fingerprint(), "onnxruntime", 1, 1, 16)
    files = list((isolated_cache / "latency").iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"  # written whole: no temporary file left beside it
    t0 = time.monotonic()
    assert int8_speed(here, SMALL) == first  # the same figures, not a second measurement
    assert time.monotonic() - t0 < 2


def test_the_cache_key_is_the_machine_kind_runtime_threads_shape_and_probe(here, make_profile):
    key = cache_key(here, SMALL)
    assert (key["fingerprint"], key["runtime"], key["threads"], key["batch"], key["seq_len"]) == \
        (store.fingerprint(), "onnxruntime", 1, 1, 16)
    assert key["runtime_version"]
    two_threads = get_profile(str(make_profile("here-2t", this_host=True, threads=2, seq_len=16)))
    assert cache_key(two_threads, SMALL) != key
    assert cache_key(here, PROBE) != key  # a test's probe is never read as the production figure


def test_a_runtime_that_measures_no_latency_here_cannot_measure_int8(make_profile):
    profile = get_profile(str(make_profile("here-coreml", this_host=True, format="coreml",
                                            runtime="coreml-mil-reference")))
    with pytest.raises(TargetError, match="int8's speed cannot be measured"):
        int8_speed(profile, SMALL)
