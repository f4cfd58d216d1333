"""FitNet, AB, FT, NST, PKT, RKD and CC losses against loops, numpy or closed forms; their heads' shapes.

Nothing here calls the reference code: values are recomputed independently on tiny tensors (float64).
"""
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_kd.methods.ab import ABConnectors, ab_layer_loss, ab_loss
from lightning_kd.methods.cc import LinearEmbed, cc_kernel_loss, cc_loss, correlation_matrix
from lightning_kd.methods.fitnet import ConvReg, fitnet_loss
from lightning_kd.methods.ft import Paraphraser, Translator, ft_factor, ft_loss, paraphraser_loss
from lightning_kd.methods.nst import nst_loss
from lightning_kd.methods.pkt import pkt_loss
from lightning_kd.methods.rkd import rkd_angle_loss, rkd_distance_loss, rkd_loss


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# FitNet


def test_fitnet_loss_is_the_mean_squared_difference():
    s, t = randn(2, 3, 2, 2, seed=1), randn(2, 3, 2, 2, seed=2)
    expected = sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist())) / 24
    assert fitnet_loss(s, t).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "student, teacher, conv, kernel",
    [
        ((16, 32, 32), (32, 16, 16), nn.Conv2d, (3, 3)),  # student twice as large: halve
        ((16, 16, 16), (32, 32, 32), nn.ConvTranspose2d, (4, 4)),  # half as large: transpose
        ((16, 8, 8), (64, 8, 8), nn.Conv2d, (1, 1)),  # same size: 1x1
        ((32, 9, 9), (16, 6, 6), nn.Conv2d, (4, 4)),  # larger: valid convolution
        ((8, 6, 10), (4, 6, 4), nn.Conv2d, (1, 7)),  # not square
    ],
)
def test_conv_reg_maps_the_student_shape_to_the_teacher_shape(student, teacher, conv, kernel):
    regressor = ConvReg(student, teacher)
    assert type(regressor.conv) is conv and regressor.conv.kernel_size == kernel
    out = regressor(torch.randn(3, *student))
    assert out.shape == (3, *teacher)
    assert out.min() >= 0  # ReLU
    assert ConvReg(student, teacher, use_relu=False)(torch.randn(3, *student)).min() < 0


@pytest.mark.parametrize(
    "student, teacher, message",
    [
        ((8, 4, 4), (8, 16, 16), "only when the student is twice, half or at least as large"),
        ((8, 8, 8), (8, 6, 10), "only when the student is twice, half or at least as large"),
        ((8, 8, 16), (8, 4, 4), "would output (8, 4, 8), not the teacher's (8, 4, 4)"),
        ((2, 8, 8, 8), (8, 4, 4), "student_shape must be a feature map shape (C, H, W)"),
        ((8, 0, 4), (8, 4, 4), "student_shape must be a feature map shape (C, H, W)"),
    ],
)
def test_conv_reg_refuses_shapes_it_cannot_map(student, teacher, message):
    with pytest.raises(ValueError) as error:
        ConvReg(student, teacher)
    assert message in str(error.value)


def test_fitnet_gradient_reaches_student_and_regressor():
    regressor = ConvReg((4, 8, 8), (6, 4, 4))
    student = torch.randn(2, 4, 8, 8, requires_grad=True)
    fitnet_loss(regressor(student), torch.randn(2, 6, 4, 4)).backward()
    assert student.grad.abs().sum() > 0 and regressor.conv.weight.grad.abs().sum() > 0


def test_fitnet_loss_refuses_unequal_shapes():
    with pytest.raises(ValueError, match="shapes must be equal"):
        fitnet_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))


# AB


def hand_ab(s, t, margin):
    total = 0.0
    for a, b in zip(s.flatten().tolist(), t.flatten().tolist()):
        total += max(margin - a, 0.0) ** 2 if b > 0 else max(margin + a, 0.0) ** 2
    return total


def test_ab_layer_loss_matches_the_hinge_squared_sum():
    s = torch.tensor([[2.0, 0.5, -0.5, -3.0, 1.0, -1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 1.0, -1.0, -1.0, 0.0, 2.0, 0.0]], dtype=torch.float64)
    # per entry: 0, 0.25, 0.25, 0, (1+1)^2 = 4 (teacher 0 is "off"), (1+1)^2 = 4, 1
    assert ab_layer_loss(s, t, 1.0).item() == pytest.approx(9.5)
    assert ab_layer_loss(s, t, 1.0).item() == pytest.approx(hand_ab(s, t, 1.0))


def test_ab_loss_weights_layers_by_powers_of_two_over_batch():
    s = [randn(3, 2, 4, 4, seed=1), randn(3, 4, 2, 2, seed=2), randn(3, 8, 1, 1, seed=3)]
    t = [randn(3, 2, 4, 4, seed=4), randn(3, 4, 2, 2, seed=5), randn(3, 8, 1, 1, seed=6)]
    expected = sum(w * hand_ab(a, b, 0.5) for w, a, b in zip([0.25, 0.5, 1.0], s, t)) / 3 * 3 / 1000
    assert ab_loss(s, t, margin=0.5).item() == pytest.approx(expected, rel=1e-12)


def test_ab_loss_is_zero_when_the_student_is_beyond_the_margin_on_the_teachers_side():
    t = randn(2, 3, 4, 4)
    s = torch.where(t > 0, 1.5, -1.5)
    assert ab_loss([s], [t]).item() == 0.0
    s.requires_grad_(True)
    flipped = -s
    ab_loss([flipped], [t]).backward()
    assert s.grad.abs().sum() > 0


def test_ab_connectors_keep_equal_shapes_and_map_the_others():
    connectors = ABConnectors([(16, 32, 32), (32, 16, 16)], [(16, 32, 32), (64, 8, 8)])
    assert isinstance(connectors.connectors[0], nn.Identity)
    assert isinstance(connectors.connectors[1], ConvReg) and not connectors.connectors[1].use_relu
    out = connectors([torch.randn(2, 16, 32, 32), torch.randn(2, 32, 16, 16)])
    assert [o.shape for o in out] == [(2, 16, 32, 32), (2, 64, 8, 8)]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ab_loss([torch.zeros(1, 2)], [torch.zeros(1, 3)]), "shapes must be equal"),
        (lambda: ab_loss([torch.zeros(1, 2)], []), "one teacher layer per student layer"),
        (lambda: ab_layer_loss(torch.zeros(1, 2), torch.zeros(1, 2), -1.0), "margin must lie in [0.0"),
        (lambda: ABConnectors([(1, 2, 2)], []), "one teacher shape per student shape"),
        (lambda: ABConnectors([(1, 2, 2)], [(1, 2)]), "teacher shape must be a feature map shape"),
    ],
)
def test_ab_refuses_bad_input(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)


# FT


def np_factor(f):
    a = (f**2).mean(axis=1).reshape(f.shape[0], -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_ft_loss_matches_numpy():
    s, t = randn(2, 3, 2, 2, seed=1), randn(2, 5, 2, 2, seed=2)
    difference = np_factor(s.numpy()) - np_factor(t.numpy())
    assert ft_loss(s, t).item() == pytest.approx(np.abs(difference).mean(), rel=1e-12)
    assert ft_loss(s, t, p=2).item() == pytest.approx((difference**2).mean(), rel=1e-12)
    assert ft_factor(s).numpy() == pytest.approx(np_factor(s.numpy()), rel=1e-12)


def test_ft_loss_pools_the_larger_factor_to_the_smaller():
    s, t = randn(2, 3, 4, 4, seed=1), randn(2, 5, 2, 2, seed=2)
    pooled = s.numpy().reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))  # 2x2 blocks
    expected = np.abs(np_factor(pooled) - np_factor(t.numpy())).mean()
    assert ft_loss(s, t).item() == pytest.approx(expected, rel=1e-12)
    assert ft_loss(t, s).item() == pytest.approx(expected, rel=1e-12)


def test_paraphraser_and_translator_shapes():
    paraphraser = Paraphraser(32)
    factor, reconstruction = paraphraser(torch.randn(2, 32, 8, 8))
    assert factor.shape == (2, 16, 8, 8) and reconstruction.shape == (2, 32, 8, 8)
    assert paraphraser.encode(torch.randn(2, 32, 8, 8)).shape == (2, 16, 8, 8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in paraphraser.modules())
    translator = Translator(16, 32)
    assert translator(torch.randn(2, 16, 4, 4)).shape == (2, 16, 4, 4)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in translator.modules()) == 3
    assert Paraphraser(10, rate=0.25).encode(torch.randn(1, 10, 2, 2)).shape == (1, 2, 2, 2)


def test_paraphraser_loss_is_the_mean_squared_error_and_ft_gradient_reaches_the_translator():
    x, y = randn(2, 3, 2, 2, seed=1), randn(2, 3, 2, 2, seed=2)
    assert paraphraser_loss(x, y).item() == pytest.approx(((x - y) ** 2).sum().item() / 24, rel=1e-12)
    translator, paraphraser = Translator(4, 8), Paraphraser(8)
    student = torch.randn(2, 4, 4, 4, requires_grad=True)
    with torch.no_grad():
        factor_t = paraphraser.encode(torch.randn(2, 8, 4, 4))
    ft_loss(translator(student), factor_t).backward()
    assert student.grad.abs().sum() > 0 and translator.encoder[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ft_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)), "ft_loss needs (B, C, H, W)"),
        (lambda: ft_loss(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4)), "of one batch"),
        (lambda: ft_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), p=0), "p must lie in (0.0"),
        (lambda: paraphraser_loss(torch.zeros(1, 2), torch.zeros(1, 3)), "shapes must be equal"),
        (lambda: Paraphraser(1), "has int(1·0.5) = 0 channels"),
        (lambda: Translator(0, 8), "student_channels must be a positive int"),
        (lambda: Translator(4, 8, rate=0.0), "rate must lie in (0.0"),
    ],
)
def test_ft_refuses_bad_input(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)


# NST


def hand_mmd(s, t):
    """Per-sample MMD² of channel vectors under (xᵀy)², averaged over the batch, by loops."""
    total = 0.0
    for b in range(s.shape[0]):
        xs = [v / np.linalg.norm(v) for v in s[b].reshape(s.shape[1], -1)]
        xt = [v / np.linalg.norm(v) for v in t[b].reshape(t.shape[1], -1)]
        k = lambda u, v: float(u @ v) ** 2  # noqa: E731
        total += (
            sum(k(u, v) for u in xt for v in xt) / len(xt) ** 2
            + sum(k(u, v) for u in xs for v in xs) / len(xs) ** 2
            - 2 * sum(k(u, v) for u in xs for v in xt) / (len(xs) * len(xt))
        )
    return total / s.shape[0]


def test_nst_loss_matches_loops():
    s, t = randn(2, 3, 2, 2, seed=1), randn(2, 4, 2, 2, seed=2)
    assert nst_loss(s, t).item() == pytest.approx(hand_mmd(s.numpy(), t.numpy()), rel=1e-12)


def test_nst_loss_pools_and_vanishes_for_equal_distributions():
    s, t = randn(2, 3, 4, 4, seed=1), randn(2, 4, 2, 2, seed=2)
    pooled = s.numpy().reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))
    assert nst_loss(s, t).item() == pytest.approx(hand_mmd(pooled, t.numpy()), rel=1e-12)
    # The same channels in another order and scale: the same distribution of normalised patterns.
    assert nst_loss(3 * t[:, [2, 0, 3, 1]], t).item() == pytest.approx(0.0, abs=1e-12)


def test_nst_gradient_reaches_the_student_and_the_teacher_only_through_the_cross_term():
    s, t = randn(2, 3, 2, 2, seed=1).requires_grad_(True), randn(2, 4, 2, 2, seed=2).requires_grad_(True)
    nst_loss(s, t).backward()
    assert s.grad.abs().sum() > 0
    t2 = t.detach().clone().requires_grad_(True)
    normalise = lambda f: torch.nn.functional.normalize(f.flatten(2), dim=2)  # noqa: E731
    cross = (normalise(s.detach()) @ normalise(t2).transpose(1, 2)).pow(2).mean()
    (-2 * cross).backward()
    assert torch.allclose(t.grad, t2.grad, atol=1e-14)


def test_nst_refuses_bad_input():
    with pytest.raises(ValueError, match=r"nst_loss needs \(B, C, H, W\)"):
        nst_loss(torch.zeros(2, 3), torch.zeros(2, 3))


# PKT


def hand_pkt(s, t, eps=1e-7):
    def probabilities(x):
        x = [[v / (math.sqrt(sum(w * w for w in row)) + eps) for v in row] for row in x]
        k = [[(sum(a * b for a, b in zip(u, v)) + 1) / 2 for v in x] for u in x]
        return [[v / sum(row) for v in row] for row in k]

    p, q = probabilities(t), probabilities(s)
    n = len(s)
    return sum(p[i][j] * math.log((p[i][j] + eps) / (q[i][j] + eps)) for i in range(n) for j in range(n)) / n**2


def test_pkt_loss_matches_loops():
    s, t = randn(3, 4, seed=1), randn(3, 6, seed=2)
    assert pkt_loss(s, t).item() == pytest.approx(hand_pkt(s.tolist(), t.tolist()), rel=1e-10)


def test_pkt_loss_is_zero_for_proportional_features_and_flows_to_the_student():
    t = randn(4, 5)
    assert pkt_loss(2 * t, t).item() == pytest.approx(0.0, abs=1e-9)
    s = randn(4, 3, 1, 1, seed=3).requires_grad_(True)  # pooled maps are flattened
    loss = pkt_loss(s, t)
    loss.backward()
    assert loss.item() > 0 and s.grad.abs().sum() > 0


def test_pkt_refuses_bad_input():
    with pytest.raises(ValueError, match="of one batch"):
        pkt_loss(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="eps must lie in"):
        pkt_loss(torch.zeros(3, 4), torch.zeros(3, 4), eps=-1.0)


# RKD


def hand_rkd(s, t):
    def distances(x):
        d = [[math.dist(u, v) for v in x] for u in x]
        mean = np.mean([v for i, row in enumerate(d) for j, v in enumerate(row) if i != j])
        return [[v / mean for v in row] for row in d]

    def angles(x):
        x = np.asarray(x)
        n = len(x)
        out = np.zeros((n, n, n))
        for i, j, k in itertools.product(range(n), repeat=3):
            a, b = x[j] - x[i], x[k] - x[i]
            if j != i and k != i:
                out[i, j, k] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        return out

    ds, dt = distances(s), distances(t)
    n = len(s)
    distance = sum(huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    angle = np.vectorize(huber)(angles(s) - angles(t)).mean()
    return distance, angle


def test_rkd_losses_match_loops():
    s, t = randn(4, 3, seed=1), randn(4, 5, seed=2)
    distance, angle = hand_rkd(s.tolist(), t.tolist())
    assert rkd_distance_loss(s, t).item() == pytest.approx(distance, rel=1e-10)
    assert rkd_angle_loss(s, t).item() == pytest.approx(angle, rel=1e-10)
    assert rkd_loss(s, t).item() == pytest.approx(25 * distance + 50 * angle, rel=1e-10)
    assert rkd_loss(s, t, distance_weight=1.0, angle_weight=0.0).item() == pytest.approx(distance, rel=1e-10)


def test_rkd_loss_is_zero_for_a_scaled_rotated_translated_copy():
    t = randn(5, 4)
    rotation, _ = torch.linalg.qr(randn(4, 4, seed=7))
    s = 3.0 * t @ rotation + randn(1, 4, seed=8)
    assert rkd_loss(s, t).item() == pytest.approx(0.0, abs=1e-10)


def test_rkd_gradient_reaches_the_student_only():
    s, t = randn(4, 3, seed=1).requires_grad_(True), randn(4, 5, seed=2).requires_grad_(True)
    rkd_loss(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: rkd_loss(torch.zeros(1, 3), torch.zeros(1, 3)), "same B ≥ 2"),
        (lambda: rkd_distance_loss(torch.zeros(3, 3), torch.zeros(2, 3)), "same B ≥ 2"),
        (lambda: rkd_loss(torch.zeros(3, 3), torch.zeros(3, 3), angle_weight=-1.0), "angle_weight must lie"),
    ],
)
def test_rkd_refuses_bad_input(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)


# CC


def test_cc_loss_matches_loops():
    s, t = randn(4, 3, seed=1), randn(4, 3, seed=2)
    d = (s - t).abs().tolist()
    expected = sum(sum(a * b for a, b in zip(d[i], d[i + 1])) for i in range(3)) / 3
    assert cc_loss(s, t).item() == pytest.approx(expected, rel=1e-12)


def test_cc_kernel_loss_matches_loops_and_converges_to_the_gaussian_kernel():
    s, t = randn(3, 4, seed=1), randn(3, 6, seed=2)
    gamma = 0.4

    def psi(x, order):
        x = [row / np.linalg.norm(row) for row in x.numpy()]
        return np.array([[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * float(u @ v) ** p
                              for p in range(order + 1)) for v in x] for u in x])

    expected = ((psi(s, 2) - psi(t, 2)) ** 2).mean()
    assert cc_kernel_loss(s, t).item() == pytest.approx(expected, rel=1e-12)
    # Many Taylor terms: the exact Gaussian RBF exp(−γ‖x − y‖²) of the normalised embeddings.
    x = torch.nn.functional.normalize(s, dim=1)
    assert torch.allclose(correlation_matrix(s, gamma, 40), torch.exp(-gamma * torch.cdist(x, x) ** 2), atol=1e-12)


def test_cc_gradient_and_embedding():
    embed_s, embed_t = LinearEmbed(8), LinearEmbed(16)
    f_s = torch.randn(4, 8, 1, 1, requires_grad=True)
    e_s, e_t = embed_s(f_s), embed_t(torch.randn(4, 16))
    assert e_s.shape == e_t.shape == (4, 128)
    cc_loss(e_s, e_t).backward()
    assert f_s.grad.abs().sum() > 0
    assert embed_s.linear.weight.grad.abs().sum() > 0 and embed_t.linear.weight.grad.abs().sum() > 0  # both train


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: cc_loss(torch.zeros(4, 3), torch.zeros(4, 5)), "two (B, D) tensors of one shape with B ≥ 2"),
        (lambda: cc_loss(torch.zeros(1, 3), torch.zeros(1, 3)), "two (B, D) tensors of one shape with B ≥ 2"),
        (lambda: cc_kernel_loss(torch.zeros(4, 3), torch.zeros(3, 3)), "of one batch"),
        (lambda: cc_kernel_loss(torch.ones(2, 3), torch.ones(2, 3), order=1.5), "order must be a whole number"),
        (lambda: cc_kernel_loss(torch.ones(2, 3), torch.ones(2, 3), gamma=-1.0), "gamma must lie in [0.0"),
        (lambda: LinearEmbed(0), "in_features must be a positive int"),
    ],
)
def test_cc_refuses_bad_input(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)
