"""The pruned real MiniLM reaches all three formats, and each artifact runs here and matches PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import EXPORTERS

pytestmark = pytest.mark.slow

FLOORS = {"fp32": 0.999, "fp16": 0.99, "int8-weight": 0.99, "int8": 0.99}


@pytest.fixture(scope="module")
def pruned_minilm(minilm_path, tmp_path_factory):
    from pocketformer.compress import Context
    from pocketformer.compress.prune import Prune, PruneConfig
    from pocketformer.data import Encoder, load_dataset
    from pocketformer.models import import_hf

    model, _ = import_hf(minilm_path, check_parity=False)  # parity on import: test_importers
    encoder = Encoder(minilm_path, max_len=128)
    train = load_dataset("rotten_tomatoes", "train").head(32)
    ctx = Context(teacher=model, train=train, validation=train, encoder=encoder, batch_size=16)
    model = Prune(PruneConfig(layers=2, heads=0.25, ffn=0.5, importance="magnitude",
                              calibration_examples=16)).apply(model, ctx).model
    test = load_dataset("rotten_tomatoes", "test")
    return model, encoder.encode(test, np.arange(4)), tmp_path_factory.mktemp("minilm-formats")


@pytest.mark.parametrize("fmt", ["onnx", "tflite", "coreml"])
def test_pruned_minilm_exports_and_runs_with_parity(pruned_minilm, fmt):
    model, inputs, out = pruned_minilm
    records = EXPORTERS[fmt](model, out, "pruned", inputs, int8=True)
    by_precision = {r["precision"]: r["parity_vs_pytorch"]["cosine"] for r in records}
    assert "fp32" in by_precision and any(p.startswith("int8") for p in by_precision)
    for precision, cosine in by_precision.items():
        assert cosine >= FLOORS[precision], (fmt, precision, cosine)
    for r in records:
        assert (out / r["file"]).exists()
