"""Property tests of the shape bookkeeping (hypothesis, pinned): whatever heads, neurons and layers are removed, and
whatever ranks, sparsity and nested widths are chosen, the recorded shapes are the modules' shapes, the model runs,
and save -> load round-trips exactly (same config, same weights, same outputs)."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketformer.compress import Context
from pocketformer.compress.dense_sparse import DenseSparse, DenseSparseConfig
from pocketformer.compress.lowrank import LowRank, LowRankConfig
from pocketformer.errors import RecipeError
from pocketformer.extract import extract
from pocketformer.models import CanonicalTransformer, load, save
from pocketformer.models.factorized import linear_shape

from conftest import LAYERS, text_inputs, tiny_config, tiny_model

HEADS, FFN = tiny_config().layers[0].heads, tiny_config().layers[0].ffn
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
NO_DATA = Context(teacher=None, train=None, validation=None, encoder=None)


def assert_consistent(model: CanonicalTransformer) -> None:
    """Every recorded shape is what the modules hold, and the model runs at a shape it declares."""
    cfg = model.config
    assert len(cfg.layers) == len(model.layers)
    for shape, layer in zip(cfg.layers, model.layers):
        attn, ffn = layer.attn, layer.ffn
        assert shape.heads == attn.heads and shape.ffn == ffn.width
        inner = attn.heads * attn.head_dim
        assert (attn.q.out_features, attn.o.in_features, ffn.fc1.out_features, ffn.fc2.in_features) == \
            (inner, inner, ffn.width, ffn.width)
        for name in ("q", "k", "v", "o", "fc1", "fc2"):
            owner = attn if name in "qkvo" else ffn
            assert shape.linears.get(name) == linear_shape(getattr(owner, name))
    rebuilt = CanonicalTransformer(cfg)  # the recorded shapes alone rebuild the same parameter shapes
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(*text_inputs(batch=2, seq=10))
    assert out.shape == (2, model.io.outputs[0].axes[1]) and torch.isfinite(out).all()


def assert_round_trips(model: CanonicalTransformer, folder) -> None:
    save(model, folder)
    again, _ = load(folder)
    assert again.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    inputs = text_inputs(batch=2, seq=10)
    with torch.no_grad():
        assert torch.equal(model(*inputs), again(*inputs))


keeps = st.lists(st.tuples(st.sets(st.integers(0, HEADS - 1), max_size=HEADS),
                           st.sets(st.integers(0, FFN - 1), max_size=FFN)), min_size=LAYERS, max_size=LAYERS)


@SETTINGS
@given(keeps=keeps, drop_layer=st.booleans(), labels=st.booleans())
def test_any_pruning_leaves_consistent_shapes_that_round_trip(keeps, drop_layer, labels, tmp_path_factory):
    model = tiny_model("text", labels=("a", "b") if labels else ())
    for li, (heads, neurons) in enumerate(keeps):
        model.keep_heads(li, sorted(heads))  # every head may go: the layer keeps only its output bias
        model.keep_neurons(li, sorted(neurons))
    if drop_layer:
        model.keep_layers([0])
    assert_consistent(model)
    assert_round_trips(model, tmp_path_factory.mktemp("pruned"))


@SETTINGS
@given(budget=st.floats(0.05, 0.95), heads=st.integers(1, HEADS), neurons=st.integers(8, FFN),
       linears=st.sets(st.sampled_from(["q", "k", "v", "o", "fc1", "fc2"]), min_size=1))
def test_low_rank_after_any_pruning_leaves_consistent_shapes(budget, heads, neurons, linears, tmp_path_factory):
    model = tiny_model("text")
    for li in range(LAYERS):
        model.keep_heads(li, list(range(heads)))
        model.keep_neurons(li, list(range(neurons)))
    try:
        model = LowRank(LowRankConfig(method="budget", budget=budget, linears=sorted(linears))).apply(
            model, NO_DATA).model
    except RecipeError:  # nothing worth factorizing at this budget: refused, and the model untouched
        pass
    assert_consistent(model)
    assert_round_trips(model, tmp_path_factory.mktemp("lowrank"))


@SETTINGS
@given(rank=st.floats(0.1, 1.0), nnz=st.floats(0.05, 1.0), neurons=st.integers(8, FFN))
def test_dense_sparse_leaves_consistent_shapes_that_round_trip(rank, nnz, neurons, tmp_path_factory):
    model = tiny_model("text")
    for li in range(LAYERS):
        model.keep_neurons(li, list(range(neurons)))
    try:
        model = DenseSparse(DenseSparseConfig(rank=rank, nnz=nnz)).apply(model, NO_DATA).model.eval()
    except RecipeError:  # no linear would store fewer weights: refused
        pass
    assert_consistent(model)
    assert_round_trips(model, tmp_path_factory.mktemp("dense-sparse"))


@SETTINGS
@given(widths=st.lists(st.integers(1, FFN), min_size=LAYERS, max_size=LAYERS))
def test_any_extracted_width_mix_is_the_prefix_the_nested_model_runs(widths, tmp_path_factory):
    from pocketformer.compress.matformer import active_widths

    model = tiny_model("text")
    model.spec.nested_ffn = [1.0, 0.5]
    sub = extract(model, widths)
    assert [layer.ffn.width for layer in sub.layers] == widths and sub.spec.nested_ffn == []
    assert_consistent(sub)
    inputs = text_inputs(batch=2, seq=10)
    with torch.no_grad(), active_widths(model, widths):
        assert torch.allclose(sub(*inputs), model(*inputs), atol=1e-6)
    assert_round_trips(sub, tmp_path_factory.mktemp("extracted"))
