"""Every loss against a hand computation."""
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_kd.core import Step
from lightning_kd.methods import KD, Baseline, kd_loss


def hand_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def softmax(values, temperature):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def test_kd_loss_matches_hand_computation():
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    T = 2.0
    expected = sum(hand_kl(softmax(tr, T), softmax(sr, T)) for sr, tr in zip(s, t)) / 2 * T**2
    got = kd_loss(torch.tensor(s), torch.tensor(t), T)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(4, 10)
    assert kd_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, torch.randn(4, 10), 4.0).item() > 0


def test_kd_module_weights_ce_and_kd_terms():
    module = KD(student="resnet8", teacher="resnet8", num_classes=3, temperature=2.0, ce_weight=0.25,
                kd_weight=0.75)
    s, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[2.0, 1.0, 0.0]])
    y = torch.tensor([1])
    terms = module.loss_terms(Step(torch.zeros(1), y, s, t))
    ce = -math.log(softmax([1.0, 2.0, 0.5], 1.0)[1])
    kl = hand_kl(softmax([2.0, 1.0, 0.0], 2.0), softmax([1.0, 2.0, 0.5], 2.0)) * 4
    assert terms["ce"].item() == pytest.approx(0.25 * ce, rel=1e-6)
    assert terms["kd"].item() == pytest.approx(0.75 * kl, rel=1e-6)


def test_baseline_is_cross_entropy():
    module = Baseline(student="resnet8", num_classes=3)
    s, y = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([2])
    terms = module.loss_terms(Step(torch.zeros(1), y, s))
    assert terms == {"ce": pytest.approx(F.cross_entropy(s, y))}
    assert terms["ce"].item() == pytest.approx(-math.log(softmax([1.0, 2.0, 0.5], 1.0)[2]), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature must lie in (0.0"),
        ({"temperature": -1.0}, "temperature must lie in (0.0"),
        ({"kd_weight": -0.1}, "kd_weight must lie in [0.0, inf], got -0.1"),
        ({"ce_weight": -0.1}, "ce_weight must lie in [0.0, inf], got -0.1"),
        ({"alpha": 1.5}, "alpha must lie in [0.0, 1.0], got 1.5"),  # the deprecated name
        ({"alpha": 0.5, "ce_weight": 0.2}, "KD: alpha is the deprecated form of ce_weight = 1 - alpha"),
    ],
)
def test_kd_rejects_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError) as error:
        KD(student="resnet8", teacher="resnet8", num_classes=10, **kwargs)
    assert message in str(error.value)


def test_step_float_casts_every_floating_tensor():
    half = torch.ones(2, 3, dtype=torch.bfloat16)
    step = Step(half, torch.tensor([0, 1]), half, half, {"a": half}, {"b": half}).float()
    assert step.student_logits.dtype == step.teacher_logits.dtype == torch.float32
    assert step.student_features["a"].dtype == step.teacher_features["b"].dtype == torch.float32
    assert step.targets.dtype == torch.int64
