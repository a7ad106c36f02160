"""The runtime contract, for every registered runtime: open a file of its format, run it with the feeds any caller
has (int64 token ids, more rows than a fixed batch), get every output by name, time it where timing means something,
and turn a file that is not a model into one clear error."""

import numpy as np
import pytest
import torch

from pocketformer.errors import TargetError
from pocketformer.export import FORMATS, export
from pocketformer.targets.runtime import RUNTIMES, Runtime, Session, discover, runtime_for_format

RUNTIME_NAMES = sorted(discover())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One fp32 file per runtime, of a tiny classifier, fixed at batch 1 x 16 tokens."""
    from conftest import text_inputs, tiny_model

    model = tiny_model("text", labels=("a", "b", "c"))
    inputs = text_inputs(batch=3, seq=12)
    out = tmp_path_factory.mktemp("files")
    paths = {}
    for name in RUNTIME_NAMES:
        rt = RUNTIMES[name]
        (record,) = [r for r in export(model, out / name, "tiny", inputs, rt.format, rt, int8=False,
                                       static_shape=(1, 16)) if r["precision"] == "fp32"]
        paths[name] = out / name / record["file"]
    return model, inputs, paths


@pytest.mark.parametrize("name", RUNTIME_NAMES)
def test_runtime_declares_itself(name):
    rt = RUNTIMES[name]
    assert isinstance(rt, Runtime) and rt.name == name and rt.format in FORMATS
    assert rt.version() and rt.execution() and isinstance(rt.measures_latency, bool)
    assert runtime_for_format(rt.format).format == rt.format


@pytest.mark.parametrize("name", RUNTIME_NAMES)
def test_session_runs_int64_feeds_in_chunks_of_the_fixed_batch(name, files):
    model, inputs, paths = files
    session = RUNTIMES[name].open(paths[name], 1)
    assert isinstance(session, Session)
    assert session.input_names == model.input_names and session.outputs
    assert session.static_batch == 1 and session.static_seq == 16
    fitted = model.io.fit(inputs, {"sequence": 16})  # 3 rows for a batch-1 file: three chunks
    outputs = session.run({n: t.numpy() for n, t in zip(model.input_names, fitted)})  # int64 ids
    assert set(outputs) == set(session.outputs)
    with torch.no_grad():
        want = model(*fitted).numpy()
    got = outputs[session.outputs[0]]
    assert got.shape == want.shape
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("name", RUNTIME_NAMES)
def test_feeds_of_the_wrong_shape_are_one_clear_error(name, files):
    model, inputs, paths = files
    session = RUNTIMES[name].open(paths[name], 1)
    with pytest.raises(TargetError, match="shape"):
        session.run({n: t.numpy() for n, t in zip(model.input_names, model.io.fit(inputs, {"sequence": 9}))})
    with pytest.raises(TargetError, match="feed"):
        session.run({"nothing": np.zeros((1, 16), dtype=np.int64)})


@pytest.mark.parametrize("name", RUNTIME_NAMES)
def test_benchmark_times_where_timing_means_something(name, files):
    model, inputs, paths = files
    rt = RUNTIMES[name]
    session = rt.open(paths[name], 1)
    feeds = {n: t[:1].numpy() for n, t in zip(model.input_names, model.io.fit(inputs, {"sequence": 16}))}
    if rt.measures_latency:
        times = rt.benchmark(session, feeds, warmup=1, repeats=3)
        assert len(times) == 3 and all(t > 0 for t in times)
    else:
        with pytest.raises(TargetError):
            rt.benchmark(session, feeds, warmup=0, repeats=3)


@pytest.mark.parametrize("name", RUNTIME_NAMES)
def test_a_file_that_is_not_a_model_is_one_clear_error(name, tmp_path):
    rt = RUNTIMES[name]
    garbage = tmp_path / f"garbage{FORMATS[rt.format].extension}"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(TargetError):
        rt.open(garbage, 1)


@pytest.mark.parametrize("name", [n for n in RUNTIME_NAMES if RUNTIMES[n].measures_latency])
def test_the_latency_probe_loads_only_the_runtime(name):
    """The probe's peak memory is the artifact's and its runtime's: importing the runtime's module (as the probe
    does) must not pull in torch or the exporters."""
    import subprocess
    import sys

    module = type(RUNTIMES[name]).__module__
    code = (f"import sys, importlib; importlib.import_module({module!r}); import pocketformer.targets.probe; "
            "print(sorted(m for m in ('torch', 'pocketformer.export', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
