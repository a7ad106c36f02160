"""Quantization through neural-compressor: weights on the int grid, the accuracy-aware choice, the refusal floor,
and format-native int8 files that store the same grid."""

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pocketformer.compress import Context
from pocketformer.compress.quantize import Quantize, QuantizationRefused, QuantizeConfig
from pocketformer.data import Encoder, load_dataset
from pocketformer.models.io import load, save

DIGITS = [str(i) for i in range(10)]


def context(model) -> Context:
    return Context(teacher=copy.deepcopy(model).eval(), train=load_dataset("digits", "train"),
                   validation=load_dataset("digits", "validation"), encoder=Encoder(None), batch_size=60)


def classifier(make_model):
    model = make_model("vision", labels=DIGITS)
    with torch.no_grad():  # decisive logits: a random model's near-zero logits flip under any rounding
        model.classifier.out.weight.mul_(30.0)
    return model


def quantize(model, **settings):
    return Quantize(QuantizeConfig(**settings)).apply(copy.deepcopy(model), context(model)).model


@pytest.fixture(scope="module")
def quantized(make_model):
    model = classifier(make_model)
    return model, quantize(model, tolerable_loss=5.0, min_agreement=0.8)


def test_every_linear_weight_lies_on_a_per_row_8_bit_grid(quantized):
    _, q = quantized
    linears = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == q.spec.quantization["linears"] == 13
    for lin in linears:
        w = lin.weight.detach().double()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        steps = w / scale  # neural-compressor keeps scales in fp16: steps are whole numbers to ~1e-2
        assert (steps - steps.round()).abs().max() < 0.05
        assert max(len(torch.unique(row)) for row in lin.weight.detach()) <= 255


def test_the_record_says_what_was_done_and_measured(quantized):
    model, q = quantized
    record = q.spec.quantization
    assert record["scheme"] == "weight_only_rtn" and record["bits"] == 8 and record["group_size"] == -1
    assert record["library"].startswith("neural-compressor 3.")
    assert 0.8 <= record["agreement"] <= 1.0
    assert not model.spec.quantization  # the input model is left as it was


def test_quantized_model_round_trips_through_save_and_load(quantized, make_vision_inputs, tmp_path):
    _, q = quantized
    save(q, tmp_path / "q")
    loaded, _ = load(tmp_path / "q")
    assert loaded.spec.quantization == q.spec.quantization
    inputs = make_vision_inputs(batch=2)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), q(*inputs))


def test_below_the_agreement_floor_is_refused_with_the_figure(make_model):
    with pytest.raises(QuantizationRefused, match=r"agrees with the float model on only 0\.\d+ .* floor 1\.0"):
        quantize(classifier(make_model), candidates=[{"bits": 2}], tolerable_loss=100, min_agreement=1.0)


def test_no_candidate_within_the_tolerable_loss_is_refused(make_model):
    model = classifier(make_model)
    with pytest.raises(QuantizationRefused, match="no quantization candidate stays within 0.0 points"):
        # 2-bit weights cost a random 10-class model accuracy; a zero tolerance cannot be met
        quantize(model, candidates=[{"bits": 2}], tolerable_loss=0.0, min_agreement=0.0, eval_examples=180)


def test_tuning_stops_at_the_first_candidate_within_tolerance(make_model):
    model = classifier(make_model)
    ctx = context(model)
    result = Quantize(QuantizeConfig(candidates=[{"bits": 8}, {"bits": 2}], tolerable_loss=5.0,
                                     min_agreement=0.0)).apply(copy.deepcopy(model), ctx)
    assert [t["config"]["bits"] for t in result.details["trials"]] == [8]
    assert result.model.spec.quantization["bits"] == 8
    assert result.details["quantization"] == result.model.spec.quantization


def test_config_rejects_unsupported_bits():
    with pytest.raises(ValidationError):
        QuantizeConfig(candidates=[{"bits": 5}])


def test_ort_int8_file_stores_exactly_the_quantized_grid(quantized, make_vision_inputs, tmp_path):
    import onnx
    from onnx import numpy_helper

    from pocketformer.export.onnx import export_float, quantize_int8

    _, q = quantized
    export_float(q, tmp_path / "q.fp32.onnx", make_vision_inputs(batch=2))
    quantize_int8(tmp_path / "q.fp32.onnx", tmp_path / "q.int8.onnx")
    tensors = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "q.int8.onnx")).graph.initializer}
    stored = [tensors[n].astype(np.float64) * tensors[n[:-len("_quantized")] + "_scale"].astype(np.float64)
              for n in tensors if n.endswith("_quantized") and tensors[n].ndim == 2]
    rows = {}  # our output channels by input width (the exporter may fuse q, k, v into one matrix)
    for m in q.modules():
        if isinstance(m, torch.nn.Linear):
            rows.setdefault(m.in_features, []).append(m.weight.detach().double().numpy())
    assert len(stored) >= 6
    for w in stored:  # each stored output channel is one of ours: ORT's per-channel int8 of an int8 grid is that grid
        ours = np.concatenate(rows[w.shape[0]])
        diff = np.abs(w.T[:, None, :] - ours[None, :, :]).max(-1).min(-1)
        assert diff.max() < 1e-6 * np.abs(ours).max()


def test_composes_after_lowrank_factors_quantizing_both(make_model):
    from pocketformer.compress.lowrank import LowRank, LowRankConfig
    from pocketformer.models.factorized import LowRankLinear

    model = classifier(make_model)
    model = LowRank(LowRankConfig(method="ranks", ranks=8)).apply(model, context(model)).model.eval()
    q = quantize(model, tolerable_loss=100, min_agreement=0.0)
    fc1 = q.layers[0].ffn.fc1
    assert isinstance(fc1, LowRankLinear) and q.spec.quantization["linears"] == 25  # 12 pairs + classifier
    for w in (fc1.first.weight, fc1.second.weight):
        assert max(len(torch.unique(row)) for row in w.detach()) <= 255


def test_stage_reports_the_stored_size_at_the_quantized_width(quantized):
    from pocketformer.compress.base import describe

    model, q = quantized
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    saved = describe(model, 64)["size_bytes"] - describe(q, 64)["size_bytes"]
    scales = 4 * sum(m.out_features for m in q.modules() if isinstance(m, torch.nn.Linear))
    assert saved == 3 * linear - scales  # 4 bytes -> 1 byte per linear weight, plus one fp32 scale per row
