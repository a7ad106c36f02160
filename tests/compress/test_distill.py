"""Recovery distillation: the loss it minimises, and that training on it really lowers that loss."""

import copy

import pytest
import torch

from pocketformer.compress import Context
from pocketformer.compress.distill import Distill, DistillConfig, distill_loss, layer_map
from pocketformer.data import Encoder, load_dataset

DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def digits():
    return {split: load_dataset("digits", split) for split in ("train", "validation")}


def held_out_batch(digits, n=64):
    ds = digits["validation"]
    return (torch.from_numpy(ds.images[:n]),), torch.from_numpy(ds.labels[:n])


def loss_of(student, teacher, batch, cfg):
    with torch.no_grad():
        return float(distill_loss(student.eval(), teacher, *batch, cfg))


def pruned_copy(teacher):
    student = copy.deepcopy(teacher)
    student.keep_heads(0, [0, 1])
    student.keep_neurons(1, list(range(32)))
    return student


@pytest.mark.parametrize("n_student,n_teacher", [(2, 2), (2, 4), (3, 6), (1, 6), (4, 6)])
def test_layer_map_pairs_embeddings_and_ends_at_the_last_teacher_layer(n_student, n_teacher):
    mapping = layer_map(n_student, n_teacher)
    assert len(mapping) == n_student + 1
    assert mapping[0] == 0 and mapping[-1] == n_teacher
    assert mapping == sorted(mapping)


def test_identical_student_has_zero_distillation_loss(make_model, digits):
    teacher = make_model("vision", labels=DIGITS)
    cfg = DistillConfig(kd=1.0, hidden=1.0)
    assert loss_of(copy.deepcopy(teacher), teacher, held_out_batch(digits), cfg) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("labels", [DIGITS, ()], ids=["classifier-kl", "embedding-mse"])
def test_pruned_student_has_positive_distillation_loss(make_model, digits, labels):
    teacher = make_model("vision", labels=labels)
    assert loss_of(pruned_copy(teacher), teacher, held_out_batch(digits), DistillConfig()) > 1e-4


def test_label_term_adds_cross_entropy_on_true_labels(make_model, digits):
    teacher = make_model("vision", labels=DIGITS)
    student = copy.deepcopy(teacher)
    (pixels,), labels = held_out_batch(digits)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(student(pixels), labels)
    got = loss_of(student, teacher, ((pixels,), labels), DistillConfig(kd=0, hidden=0, label=1.0))
    assert got == pytest.approx(float(expected), rel=1e-5)


def test_distillation_lowers_the_distillation_loss(make_model, digits):
    teacher = make_model("vision", labels=DIGITS)
    student = pruned_copy(teacher)
    cfg = DistillConfig(epochs=2, lr=3e-3, max_examples=256)
    batch = held_out_batch(digits)
    before = loss_of(student, teacher, batch, cfg)
    ctx = Context(teacher=teacher, train=digits["train"], validation=digits["validation"], encoder=Encoder(None),
                  batch_size=32)
    result = Distill(cfg).apply(student, ctx)
    assert loss_of(result.model, teacher, batch, cfg) < 0.5 * before
    assert result.details["final_loss"] > 0


def test_distillation_leaves_the_teacher_unchanged(make_model, digits):
    teacher = make_model("vision", labels=DIGITS)
    reference = copy.deepcopy(teacher)
    ctx = Context(teacher=teacher, train=digits["train"], validation=digits["validation"], encoder=Encoder(None),
                  batch_size=32)
    Distill(DistillConfig(epochs=1, lr=3e-3, max_examples=64)).apply(pruned_copy(teacher), ctx)
    for (name, a), b in zip(teacher.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_distillation_is_deterministic_for_a_seed(make_model, digits):
    results = []
    for _ in range(2):
        teacher = make_model("vision", labels=DIGITS)
        ctx = Context(teacher=teacher, train=digits["train"], validation=digits["validation"],
                      encoder=Encoder(None), batch_size=32, seed=5)
        student = Distill(DistillConfig(epochs=1, lr=3e-3, max_examples=64)).apply(pruned_copy(teacher), ctx).model
        results.append(student.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.parametrize("settings", [{"epochs": -1}, {"epochs": 0}, {"lr": 2.0}, {"kd": -0.5}, {"oops": 1}])
def test_out_of_range_or_unknown_settings_are_rejected(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        DistillConfig(**settings)


def test_channel_normalised_hidden_mse_is_not_drowned_by_one_huge_channel(make_model):
    """hidden_norm: channel divides each channel's error by the teacher's variance of it: a channel 1,000x larger
    in both models (an LM's residual outlier) leaves the loss as it was, where the plain MSE becomes that channel."""
    task = make_model("vision", labels=DIGITS).task

    class Hidden:  # a model whose hidden states are given: the loss alone, on known states
        def __init__(self, states):
            self.states, self.task = states, task

        def attention_mask(self, inputs):
            return None

        def encode(self, *inputs, all_hidden=True):
            return self.states[-1], self.states

        def head_output(self, x, mask):
            return x.mean(1)[:, :10]

    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(4, 8, 16, generator=g) for _ in range(3)]
    student = [t + 0.1 * torch.randn(t.shape, generator=g) for t in teacher]
    scale = torch.ones(16)
    scale[0] = 1000.0

    def hidden_loss(norm: str, k: torch.Tensor) -> float:
        cfg = DistillConfig(kd=0.0, hidden=1.0, hidden_norm=norm)
        return float(distill_loss(Hidden([x * k for x in student]), Hidden([x * k for x in teacher]), (None,), None,
                                  cfg))

    assert hidden_loss("channel", scale) == pytest.approx(hidden_loss("channel", torch.ones(16)), rel=1e-4)
    assert hidden_loss("none", scale) > 1000 * hidden_loss("none", torch.ones(16))
