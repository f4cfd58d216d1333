"""A teacher that masks classes (logit −inf): the KD term stays finite and right."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.core import Step
from lightning_kd.methods import KD, kd_loss

INF = float("inf")


def test_kd_loss_with_a_masked_teacher_class_matches_hand_computation():
    # Row 1: teacher softmax([0, 0, −inf]/2) = [1/2, 1/2, 0], student uniform: KL = ln(1.5).
    # Row 2: teacher softmax([2, −inf, 0]/2) = [e/(e+1), 0, 1/(e+1)], student softmax([0, 2, 0]/2).
    s = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    t = torch.tensor([[0.0, 0.0, -INF], [2.0, -INF, 0.0]])
    e = math.e
    p2, q2 = [e / (e + 1), 1 / (e + 1)], [1 / (e + 2), 1 / (e + 2)]  # the classes the teacher keeps
    expected = (math.log(1.5) + sum(p * math.log(p / q) for p, q in zip(p2, q2))) / 2 * 2.0**2
    assert kd_loss(s, t, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_masked_class_adds_nothing_and_gradients_stay_finite():
    torch.manual_seed(0)
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5)
    t[:, 1] = -INF
    loss = kd_loss(s, t, 4.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # The same as a teacher whose logit is merely very low there (probability 0 in float32).
    s_low = s.detach().clone().requires_grad_()
    low = kd_loss(s_low, t.nan_to_num(neginf=-1e4), 4.0)
    low.backward()
    torch.testing.assert_close(loss, low)
    torch.testing.assert_close(s.grad, s_low.grad)


def test_a_nan_teacher_still_gives_nan():
    t = torch.tensor([[0.0, float("nan"), -INF]])
    assert torch.isnan(kd_loss(torch.zeros(1, 3), t, 4.0))


def test_kd_module_term_is_finite_with_a_masked_teacher():
    module = KD(student="resnet8", teacher="resnet8", num_classes=3, temperature=1.0, ce_weight=0.0,
                kd_weight=1.0)
    step = Step(torch.zeros(1), torch.tensor([0]), torch.zeros(1, 3), torch.tensor([[0.0, 0.0, -INF]]))
    assert module.loss_terms(step)["kd"].item() == pytest.approx(math.log(1.5), rel=1e-6)
