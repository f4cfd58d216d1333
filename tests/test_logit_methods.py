"""DKD, DIST and logit standardization: each loss against a hand computation (plain Python on small tensors),
their edge cases, their hyper-parameter checks, and each module's objective once on a zoo pair."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.core import Step
from lightning_kd.methods import (
    DIST,
    DKD,
    LogitStandardization,
    dist_loss,
    dist_terms,
    dkd_loss,
    dkd_terms,
    kd_loss,
    logit_standardized_kd_loss,
    standardize,
)

S = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.5], [2.0, 0.0, 0.0, 1.0]]
T = [[2.0, 1.0, 0.0, 0.5], [1.0, 1.0, 1.0, -2.0], [0.5, 3.0, -1.0, 0.0]]
Y = [1, 2, 0]


# --- hand computations: lists and math only ---------------------------------------------------------------
def softmax(row, temperature=1.0):
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def hand_dkd(s_rows, t_rows, targets, temperature):
    """(TCKD, NCKD) from the paper's definitions: binary [p_y, 1 − p_y] and p̂_j = p_j / (1 − p_y), j ≠ y."""
    tckd = nckd = 0.0
    for s, t, y in zip(s_rows, t_rows, targets):
        ps, pt = softmax(s, temperature), softmax(t, temperature)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        non_target_t = [p / (1 - pt[y]) for j, p in enumerate(pt) if j != y]
        non_target_s = [p / (1 - ps[y]) for j, p in enumerate(ps) if j != y]
        nckd += kl(non_target_t, non_target_s)
    n = len(s_rows)
    return tckd / n * temperature**2, nckd / n * temperature**2


def pearson(u, v, eps=1e-8):
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    cu, cv = [x - mu for x in u], [x - mv for x in v]
    dot = sum(a * b for a, b in zip(cu, cv))
    return dot / (math.sqrt(sum(a * a for a in cu)) * math.sqrt(sum(b * b for b in cv)) + eps)


def hand_dist(s_rows, t_rows, temperature):
    """(inter, intra) times τ²: 1 − Pearson per sample (rows) and per class (columns), averaged."""
    ys = [softmax(r, temperature) for r in s_rows]
    yt = [softmax(r, temperature) for r in t_rows]
    inter = sum(1 - pearson(a, b) for a, b in zip(ys, yt)) / len(ys)
    columns = range(len(ys[0]))
    intra = sum(1 - pearson([r[j] for r in ys], [r[j] for r in yt]) for j in columns) / len(ys[0])
    return inter * temperature**2, intra * temperature**2


def zscore(row):
    mean = sum(row) / len(row)
    std = math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1))  # unbiased, as the authors' torch.std
    return [(x - mean) / (std + 1e-7) for x in row]


def hand_ls_kd(s_rows, t_rows, temperature):
    total = sum(kl(softmax(zscore(t), temperature), softmax(zscore(s), temperature)) for s, t in zip(s_rows, t_rows))
    return total / len(s_rows) * temperature**2


def hand_ce(s_rows, targets):
    return sum(-math.log(softmax(s)[y]) for s, y in zip(s_rows, targets)) / len(s_rows)


def tensors():
    return torch.tensor(S, dtype=torch.float64), torch.tensor(T, dtype=torch.float64), torch.tensor(Y)


# --- DKD --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_dkd_terms_match_hand_computation(temperature):
    s, t, y = tensors()
    tckd, nckd = dkd_terms(s, t, y, temperature)
    expected = hand_dkd(S, T, Y, temperature)
    assert tckd.item() == pytest.approx(expected[0], rel=1e-9)
    assert nckd.item() == pytest.approx(expected[1], rel=1e-9)
    assert dkd_loss(s, t, y, alpha=0.5, beta=3.0, temperature=temperature).item() == pytest.approx(
        0.5 * expected[0] + 3.0 * expected[1], rel=1e-9
    )


def test_dkd_parts_recombine_into_hinton_kd_sample_by_sample():
    # The paper's reformulation: KD = TCKD + (1 − p_y^teacher)·NCKD, here against kd_loss (another code path).
    s, t, y = tensors()
    for i in range(len(Y)):
        tckd, nckd = dkd_terms(s[i : i + 1], t[i : i + 1], y[i : i + 1], 2.0)
        weight = 1 - softmax(T[i], 2.0)[Y[i]]
        kd = kd_loss(s[i : i + 1], t[i : i + 1], 2.0)
        assert (tckd + weight * nckd).item() == pytest.approx(kd.item(), rel=1e-9)


def test_dkd_keeps_the_dark_knowledge_of_a_confident_teacher():
    # A teacher sure of the target (p_y ≈ 1): KD's NCKD weight 1 − p_y vanishes, DKD's NCKD does not, and does
    # not depend on the target logit at all.
    s, t, y = tensors()
    confident = t.clone()
    confident[torch.arange(3), y] += 40.0
    tckd, nckd = dkd_terms(s, confident, y, 1.0)
    assert nckd.item() == pytest.approx(dkd_terms(s, t, y, 1.0)[1].item(), rel=1e-12)
    assert nckd.item() > 0.05
    assert kd_loss(s, confident, 1.0).item() == pytest.approx(tckd.item(), rel=1e-9)  # KD ≈ TCKD alone


def test_dkd_stays_finite_when_probabilities_round_to_zero_or_one():
    # mdistiller takes log of a probability that rounds to 0 here and returns inf.
    y = torch.tensor([3, 3])
    student = torch.zeros(2, 10)
    student[0, 3], student[1, 3] = -1000.0, 1000.0
    student.requires_grad_(True)
    teacher = torch.zeros(2, 10)
    teacher[:, 3] = 500.0
    loss = dkd_loss(student, teacher, y)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # Row 0 at T=4: the teacher gives the target probability ≈ 1, the student e^-250 / 9: TCKD ≈ T²·(250 + log 9).
    tckd, _ = dkd_terms(student[:1].detach(), teacher[:1], y[:1], 4.0)
    assert tckd.item() == pytest.approx(16 * (250 + math.log(9)), rel=1e-6)


def test_dkd_module_ramps_the_dkd_term_up_per_epoch(monkeypatch):
    module = DKD(student="resnet8", teacher="resnet8", num_classes=4, alpha=2.0, beta=3.0, temperature=2.0,
                 ce_weight=0.5, warmup_epochs=4)
    s, t, y = tensors()
    tckd, nckd = hand_dkd(S, T, Y, 2.0)
    for epoch, weight in [(0, 0.25), (1, 0.5), (3, 1.0), (10, 1.0)]:
        monkeypatch.setattr(DKD, "current_epoch", property(lambda self, e=epoch: e))
        terms = module.loss_terms(Step(torch.zeros(3), y, s, t))
        assert set(terms) == {"ce", "tckd", "nckd"}
        assert terms["ce"].item() == pytest.approx(0.5 * hand_ce(S, Y), rel=1e-9)
        assert terms["tckd"].item() == pytest.approx(weight * 2.0 * tckd, rel=1e-9)
        assert terms["nckd"].item() == pytest.approx(weight * 3.0 * nckd, rel=1e-9)
    no_ramp = DKD(student="resnet8", teacher="resnet8", num_classes=4, warmup_epochs=0)  # the paper's loss
    monkeypatch.setattr(DKD, "current_epoch", property(lambda self: 0))
    assert no_ramp.warmup() == 1.0


def test_dkd_with_logit_standardization_z_scores_only_the_distillation_term():
    module = DKD(student="resnet8", teacher="resnet8", num_classes=4, temperature=2.0, warmup_epochs=0,
                 logit_standardization=True)
    s, t, y = tensors()
    terms = module.loss_terms(Step(torch.zeros(3), y, s, t))
    tckd, nckd = hand_dkd([zscore(r) for r in S], [zscore(r) for r in T], Y, 2.0)
    assert terms["tckd"].item() == pytest.approx(tckd, rel=1e-7)
    assert terms["nckd"].item() == pytest.approx(8.0 * nckd, rel=1e-7)
    assert terms["ce"].item() == pytest.approx(hand_ce(S, Y), rel=1e-9)


# --- DIST -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dist_terms_match_hand_computation(temperature):
    s, t, _ = tensors()
    inter, intra = dist_terms(s, t, temperature)
    expected = hand_dist(S, T, temperature)
    assert inter.item() == pytest.approx(expected[0], rel=1e-9)
    assert intra.item() == pytest.approx(expected[1], rel=1e-9)
    assert dist_loss(s, t, beta=2.0, gamma=0.5, temperature=temperature).item() == pytest.approx(
        2.0 * expected[0] + 0.5 * expected[1], rel=1e-9
    )


def test_dist_is_zero_for_identical_predictions_and_positive_otherwise():
    s, t, _ = tensors()
    # Not exactly 0: the 1e-8 in ρ's denominator (the authors') weighs against norms of centred probabilities.
    assert dist_loss(s, s).item() == pytest.approx(0.0, abs=1e-6)
    assert all(term.item() > 0 for term in dist_terms(s, t, 4.0))


def test_dist_edge_cases_stay_finite():
    torch.manual_seed(0)
    # A one-class-dominant teacher (probability 1 on one class) and a student with constant logits: the
    # student's centred predictions are 0, so every correlation is 0 and each relation is 1 (times τ²).
    teacher = torch.full((4, 10), -30.0)
    teacher[:, 2] = 30.0
    student = torch.zeros(4, 10, requires_grad=True)
    inter, intra = dist_terms(student, teacher, 2.0)
    (grad,) = torch.autograd.grad(inter + intra, student)
    assert inter.item() == pytest.approx(4.0) and intra.item() == pytest.approx(4.0)
    assert torch.isfinite(grad).all()
    # One sample: no intra-class relation to learn (ρ = 0 for every class, as in the authors' code).
    s, t = torch.randn(1, 10, requires_grad=True), torch.randn(1, 10)
    inter, intra = dist_terms(s, t, 1.0)
    assert intra.item() == pytest.approx(1.0)
    assert torch.isfinite(torch.autograd.grad(inter + intra, s)[0]).all()


# --- logit standardization -------------------------------------------------------------------------------
def test_standardize_is_the_z_score_with_the_unbiased_deviation():
    s, _, _ = tensors()
    expected = [x for row in S for x in zscore(row)]
    assert standardize(s).flatten().tolist() == pytest.approx(expected, rel=1e-12)
    # A constant row has no spread: zeros (a uniform softmax), not NaN.
    assert standardize(torch.full((1, 5), 3.0)).tolist() == [[0.0] * 5]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
def test_logit_standardized_kd_matches_hand_computation(temperature):
    s, t, _ = tensors()
    expected = hand_ls_kd(S, T, temperature)
    assert logit_standardized_kd_loss(s, t, temperature).item() == pytest.approx(expected, rel=1e-9)


def test_logit_standardized_kd_ignores_each_samples_logit_range():
    # The paper's point: only the relations between logits matter, not their shift or scale, per sample.
    s, t, _ = tensors()
    shift, scale = torch.tensor([[5.0], [-3.0], [0.0]]), torch.tensor([[0.1], [7.0], [2.0]])
    teacher_scale = torch.tensor([[30.0], [0.5], [1.0]])
    assert logit_standardized_kd_loss(s * scale + shift, t * teacher_scale - shift, 2.0).item() == pytest.approx(
        logit_standardized_kd_loss(s, t, 2.0).item(), rel=1e-6
    )
    # Without standardization the same change moves Hinton's KD.
    moved = kd_loss(s * scale + shift, t * teacher_scale, 2.0)
    assert moved.item() != pytest.approx(kd_loss(s, t, 2.0).item(), rel=1e-2)


def test_logit_standardization_module_weights_its_terms():
    module = LogitStandardization(student="resnet8", teacher="resnet8", num_classes=4, temperature=3.0,
                                  ce_weight=0.2, kd_weight=5.0)
    s, t, y = tensors()
    terms = module.loss_terms(Step(torch.zeros(3), y, s, t))
    assert terms["ce"].item() == pytest.approx(0.2 * hand_ce(S, Y), rel=1e-9)
    assert terms["kd"].item() == pytest.approx(5.0 * hand_ls_kd(S, T, 3.0), rel=1e-9)


# --- hyper-parameters --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, kwargs, message",
    [
        (DKD, {"temperature": 0.0}, "temperature must lie in (0.0"),
        (DKD, {"alpha": -1.0}, "alpha must lie in [0.0, inf], got -1.0"),
        (DKD, {"beta": -0.5}, "beta must lie in [0.0, inf], got -0.5"),
        (DKD, {"ce_weight": -1.0}, "ce_weight must lie in [0.0, inf], got -1.0"),
        (DKD, {"warmup_epochs": -1}, "warmup_epochs must lie in [0, inf], got -1"),
        (DKD, {"warmup_epochs": 2.5}, "warmup_epochs must be a whole number of epochs, got 2.5"),
        (DIST, {"temperature": -1.0}, "temperature must lie in (0.0"),
        (DIST, {"beta": -1.0}, "beta must lie in [0.0, inf], got -1.0"),
        (DIST, {"gamma": -1.0}, "gamma must lie in [0.0, inf], got -1.0"),
        (DIST, {"ce_weight": -0.1}, "ce_weight must lie in [0.0, inf], got -0.1"),
        (LogitStandardization, {"temperature": 0.0}, "temperature must lie in (0.0"),
        (LogitStandardization, {"ce_weight": -1.0}, "ce_weight must lie in [0.0, inf], got -1.0"),
        (LogitStandardization, {"kd_weight": -9.0}, "kd_weight must lie in [0.0, inf], got -9.0"),
    ],
)
def test_bad_hyper_parameters_are_one_clear_error(method, kwargs, message):
    with pytest.raises(ValueError) as error:
        method(student="resnet8", teacher="resnet8", num_classes=10, **kwargs)
    assert message in str(error.value)


# --- each module's objective on a zoo pair ------------------------------------------------------------------
def test_each_module_objective_on_a_zoo_pair():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 7, 9])
    pair = {"student": "resnet8", "teacher": "resnet14", "num_classes": 10}
    cases = [
        (DKD(**pair, warmup_epochs=0), lambda s, t: {"tckd": hand_dkd(s, t, y.tolist(), 4.0)[0],
                                                      "nckd": 8.0 * hand_dkd(s, t, y.tolist(), 4.0)[1]}, 1.0),
        (DIST(**pair), lambda s, t: dict(zip(["inter", "intra"], [2.0 * v for v in hand_dist(s, t, 4.0)])), 1.0),
        (LogitStandardization(**pair), lambda s, t: {"kd": 9.0 * hand_ls_kd(s, t, 2.0)}, 0.1),
    ]
    for module, expected_terms, ce_weight in cases:
        step = module.forward_step(x, y)
        terms = module.loss_terms(step.float())
        s, t = step.student_logits.double().tolist(), step.teacher_logits.double().tolist()
        expected = {"ce": ce_weight * hand_ce(s, y.tolist()), **expected_terms(s, t)}
        assert set(terms) == set(expected), type(module).__name__
        for name, value in expected.items():
            assert terms[name].item() == pytest.approx(value, rel=1e-4, abs=1e-6), (type(module).__name__, name)
        total = torch.stack(list(terms.values())).sum()
        total.backward()
        grads = [p.grad for p in module.student.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert all(p.grad is None for p in module.teacher.parameters())
