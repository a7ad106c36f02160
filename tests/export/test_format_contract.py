"""The format contract, for every registered format: a tiny model round-trips through the export loop on the format's
own runtime, every file passes its parity check, describes itself as the model declares, and a converter that writes
the wrong function never leaves a file under a final name."""

import numpy as np
import pytest
import torch

from pocketformer.export import FORMATS, ExportFailures, export
from pocketformer.export.base import Format, format_of
from pocketformer.targets.runtime import get_runtime

FORMAT_NAMES = sorted(FORMATS)
SHAPE = (1, 16)


def classifier(make_model, seed=0):
    return make_model("text", labels=("neg", "pos", "neu"), seed=seed)


@pytest.fixture(scope="module")
def inputs():
    from conftest import text_inputs

    return text_inputs(batch=3, seq=12)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_format_declares_a_runtime_here_that_runs_it(name):
    fmt = FORMATS[name]
    assert isinstance(fmt, Format) and fmt.name == name and fmt.extension.startswith(".")
    runtime = get_runtime(fmt.runtime)
    assert runtime.format == name
    precisions = fmt.precisions(True, {})
    assert precisions[0] == "fp32" and len(set(precisions)) == len(precisions)
    assert set(fmt.precisions(False, {})) <= set(precisions)
    for p in precisions:
        tol = fmt.tolerance(p)
        assert tol.task or tol.min_cosine is not None or tol.max_abs is not None
        assert fmt.fix(p)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_a_tiny_model_round_trips_through_the_loop_on_its_runtime(name, make_model, inputs, tmp_path):
    fmt, model = FORMATS[name], classifier(make_model)
    runtime = get_runtime(fmt.runtime)
    records = export(model, tmp_path, "tiny", inputs, name, runtime, int8=True, static_shape=SHAPE)
    assert [r["precision"] for r in records] == fmt.precisions(True, {})
    for r in records:
        path = tmp_path / r["file"]
        assert path.exists() and format_of(path) == name
        assert list(r["inputs"]) == model.input_names  # the declaration names the file's inputs
        assert r["parity_vs_pytorch"]["examples"] >= 1 and r["parity_execution"] == runtime.execution()
        tol = fmt.tolerance(r["precision"])
        parity = r["parity_vs_pytorch"]
        if tol.task:
            assert model.task.reduced_precision_ok(parity)
        else:
            assert tol.min_cosine is None or parity["cosine"] >= tol.min_cosine
            assert tol.max_abs is None or parity["max_abs_diff"] <= tol.max_abs
        # the file runs on the runtime and gives PyTorch's answer on a fresh example
        feeds = {n: t[:1] for n, t in zip(model.input_names, model.io.fit(inputs, {"sequence": SHAPE[1]}))}
        with torch.no_grad():
            want = model(*feeds.values()).numpy()
        got = runtime.open(path, 1).output({k: v.numpy() for k, v in feeds.items()})
        assert got.shape == want.shape and np.argmax(got) == np.argmax(want)
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_a_converter_that_writes_another_function_fails_and_leaves_nothing(name, make_model, inputs, tmp_path):
    """A format whose converter exports other weights (a real conversion, of the wrong model): the loop's check on
    the real runtime refuses it, and no file of it reaches a final name."""
    fmt, model, other = FORMATS[name], classifier(make_model), classifier(make_model, seed=1)
    from pocketformer.export.loop import GraphSet

    wrong = GraphSet(other, fmt).graphs

    class WrongWeights(type(fmt)):  # no `name` of its own: not registered
        def write(self, plan, precision, paths):
            plan.graphs = wrong
            return super().write(plan, precision, paths)

    with pytest.raises(ExportFailures, match="disagrees with PyTorch"):
        export(model, tmp_path, "tiny", inputs, WrongWeights(), get_runtime(fmt.runtime), int8=False,
               static_shape=SHAPE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_describe_reads_the_declared_inputs_and_outputs(name, make_model, inputs, tmp_path):
    fmt, model = FORMATS[name], make_model("text")  # an embedding model: output `embedding`
    (record,) = export(model, tmp_path, "emb", inputs, name, get_runtime(fmt.runtime), int8=False,
                       static_shape=SHAPE)[:1]
    described = fmt.describe(tmp_path / record["file"])
    assert list(described["inputs"]) == model.input_names
    assert described["ops"] and described["weights"] > 0


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_a_precision_that_fails_to_convert_keeps_the_ones_before_it(name, make_model, inputs, tmp_path):
    """The loop collects a conversion failure of a later precision and still records and keeps the files that
    passed (a quantizer that crashes on int8 costs only the int8 file)."""
    from pocketformer.errors import ExportError

    fmt, model = FORMATS[name], classifier(make_model)
    first = fmt.precisions(True, {})[0]

    class LaterFails(type(fmt)):
        def write(self, plan, precision, paths):
            if precision != first:
                raise ExportError(f"the quantizer crashed on {precision}", "use fp32.")
            return super().write(plan, precision, paths)

    with pytest.raises(ExportFailures, match="the quantizer crashed") as caught:
        export(model, tmp_path, "tiny", inputs, LaterFails(), get_runtime(fmt.runtime), int8=True,
               static_shape=SHAPE)
    assert [r["precision"] for r in caught.value.records] == [first]
    assert len(caught.value.failures) == len(fmt.precisions(True, {})) - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [caught.value.records[0]["file"]]


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_a_file_that_is_not_one_is_one_clear_error_when_described(name, tmp_path):
    from pocketformer.errors import TargetError
    from pocketformer.targets.lint import describe

    garbage = tmp_path / f"garbage{FORMATS[name].extension}"
    if FORMATS[name].extension == ".mlpackage":  # a package is a folder
        garbage.mkdir()
        (garbage / "Manifest.json").write_bytes(b"\x00garbage")
    else:
        garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(TargetError, match="not a readable|not a .mlpackage"):
        describe(garbage, name)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_the_same_model_exported_twice_records_the_same_hashes(name, make_model, inputs, tmp_path):
    """Reproducible artifacts: ONNX and TFLite files are byte-identical; a CoreML package's content hash leaves out
    Manifest.json's random item ids and re-serialises the spec deterministically."""
    fmt, model = FORMATS[name], classifier(make_model)
    hashes = [{r["file"]: r["sha256"] for r in export(model, tmp_path / str(i), "tiny", inputs, name,
                                                     get_runtime(fmt.runtime), int8=False, static_shape=SHAPE)}
              for i in range(2)]
    assert hashes[0] == hashes[1]
