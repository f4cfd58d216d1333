"""Tf-KD (Yuan et al., CVPR 2020): LSR, Tf-KD self and Tf-KD reg against hand computations, bad input, CLI fits."""
import math
import os

import pytest
import torch

from conftest import REPO, data_args, state_hash, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.core import Step
from lightning_kd.methods import (
    LabelSmoothing,
    TfKDReg,
    TfKDSelf,
    label_smoothing_loss,
    tfkd_reg_loss,
    tfkd_self_loss,
    virtual_teacher,
)
from lightning_kd.models import get_model

STUDENT = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.5]]
TEACHER = [[2.0, 1.0, 0.0, 0.5], [1.0, 1.0, 1.0, -2.0]]
LABELS = [2, 0]
# The virtual teacher before softening for K=4, a=0.7: 0.7 on the label, (1-0.7)/3 = 0.1 elsewhere.
P_D = [[0.1, 0.1, 0.7, 0.1], [0.7, 0.1, 0.1, 0.1]]


def softmax(values, temperature=1.0):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def hand_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def power_normalised(p, temperature):
    """p^(1/T) renormalised: what softmax(log p / T) must equal."""
    powered = [pi ** (1 / temperature) for pi in p]
    return [x / sum(powered) for x in powered]


# --- the virtual teacher -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "soften, expected",
    [
        # authors' code: softmax(p^d / T) with T=2, i.e. exp(0.35) against exp(0.05) three times
        ("probabilities", [softmax(row, 2.0) for row in P_D]),
        ("logits", [power_normalised(row, 2.0) for row in P_D]),
    ],
)
def test_virtual_teacher_matches_hand_computation(soften, expected):
    got = virtual_teacher(torch.tensor(LABELS), 4, correct_prob=0.7, temperature=2.0, soften=soften)
    assert got.shape == (2, 4)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(2))
    assert got.argmax(dim=1).tolist() == LABELS


def test_virtual_teacher_conventions_on_the_authors_setting():
    """K=100, a=0.99, T=20: dividing probabilities by T leaves the target nearly uniform (the code's quirk)."""
    targets = torch.tensor([7])
    by_probabilities = virtual_teacher(targets, 100, 0.99, 20.0, "probabilities")[0]
    by_logits = virtual_teacher(targets, 100, 0.99, 20.0, "logits")[0]
    off = 0.01 / 99
    true_by_probabilities = math.exp(0.99 / 20) / (math.exp(0.99 / 20) + 99 * math.exp(off / 20))
    true_by_logits = 0.99 ** (1 / 20) / (0.99 ** (1 / 20) + 99 * off ** (1 / 20))
    assert by_probabilities[7].item() == pytest.approx(true_by_probabilities, rel=1e-5)
    assert by_logits[7].item() == pytest.approx(true_by_logits, rel=1e-5)
    assert 0.0100 < true_by_probabilities < 0.0106 < true_by_logits  # both close to uniform 1/100 at T=20
    assert by_probabilities.argmax().item() == by_logits.argmax().item() == 7


def test_virtual_teacher_with_certain_label_is_one_hot_in_logits_convention():
    got = virtual_teacher(torch.tensor([1, 3]), 5, correct_prob=1.0, temperature=4.0, soften="logits")
    torch.testing.assert_close(got, torch.eye(5)[[1, 3]])
    loss = tfkd_reg_loss(torch.randn(2, 5), torch.tensor([1, 3]), 1.0, 4.0, "logits", "batchmean")
    assert torch.isfinite(loss)


# --- the losses ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction, divisor", [("mean", 2 * 4), ("batchmean", 2)])
@pytest.mark.parametrize("soften", ["probabilities", "logits"])
def test_tfkd_reg_loss_matches_hand_computation(soften, reduction, divisor):
    T = 2.0
    if soften == "probabilities":  # authors' code: target softmax(p^d/T), student at T=1, no T²
        kl = sum(hand_kl(softmax(p, T), softmax(s)) for p, s in zip(P_D, STUDENT))
    else:  # KD convention: target (p^d)^(1/T) renormalised, student softmax(s/T), times T²
        kl = T**2 * sum(hand_kl(power_normalised(p, T), softmax(s, T)) for p, s in zip(P_D, STUDENT))
    got = tfkd_reg_loss(torch.tensor(STUDENT), torch.tensor(LABELS), 0.7, T, soften, reduction)
    assert got.item() == pytest.approx(kl / divisor, rel=1e-6)


@pytest.mark.parametrize("reduction, divisor", [("mean", 2 * 4), ("batchmean", 2)])
def test_tfkd_self_loss_matches_hand_computation(reduction, divisor):
    T = 3.0
    kl = sum(hand_kl(softmax(t, T), softmax(s, T)) for s, t in zip(STUDENT, TEACHER))
    got = tfkd_self_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), T, reduction)
    assert got.item() == pytest.approx(T**2 * kl / divisor, rel=1e-6)


def test_tfkd_self_loss_is_zero_for_an_identical_copy():
    logits = torch.randn(4, 10)
    assert tfkd_self_loss(logits, logits, 6.0).item() == pytest.approx(0.0, abs=1e-6)


def test_label_smoothing_loss_matches_hand_computation():
    s, eps = [1.0, 2.0, 0.5], 0.3
    smoothed = [eps / 3, 1 - eps + eps / 3, eps / 3]  # (1-ε)·one_hot(1) + ε/K
    expected = -sum(q * math.log(p) for q, p in zip(smoothed, softmax(s)))
    assert label_smoothing_loss(torch.tensor([s]), torch.tensor([1]), eps).item() == pytest.approx(expected, rel=1e-6)
    assert label_smoothing_loss(torch.tensor([s]), torch.tensor([1]), 0.0).item() == pytest.approx(
        -math.log(softmax(s)[1]), rel=1e-6
    )


# --- the modules ---------------------------------------------------------------------------------------------
def test_tfkd_reg_module_weights_its_terms_and_has_no_teacher():
    module = TfKDReg(student="resnet8", num_classes=4, correct_prob=0.7, temperature=2.0, ce_weight=0.75,
                     kd_weight=0.25,
                     multiplier=3.0, soften="logits", reduction="batchmean")
    assert module.teacher is None
    terms = module.loss_terms(Step(torch.zeros(2), torch.tensor(LABELS), torch.tensor(STUDENT)))
    ce = -sum(math.log(softmax(s)[y]) for s, y in zip(STUDENT, LABELS)) / 2
    kl = 4.0 * sum(hand_kl(power_normalised(p, 2.0), softmax(s, 2.0)) for p, s in zip(P_D, STUDENT)) / 2
    assert set(terms) == {"ce", "reg"}
    assert terms["ce"].item() == pytest.approx(0.75 * ce, rel=1e-6)
    assert terms["reg"].item() == pytest.approx(0.25 * 3.0 * kl, rel=1e-6)


def test_tfkd_self_module_weights_its_terms():
    module = TfKDSelf(student="resnet8", teacher="resnet8", num_classes=4, temperature=3.0, ce_weight=0.2,
                      kd_weight=0.8,
                      multiplier=5.0, reduction="mean")
    step = Step(torch.zeros(2), torch.tensor(LABELS), torch.tensor(STUDENT), torch.tensor(TEACHER))
    terms = module.loss_terms(step)
    ce = -sum(math.log(softmax(s)[y]) for s, y in zip(STUDENT, LABELS)) / 2
    kl = 9.0 * sum(hand_kl(softmax(t, 3.0), softmax(s, 3.0)) for s, t in zip(STUDENT, TEACHER)) / 8
    assert terms["ce"].item() == pytest.approx(0.2 * ce, rel=1e-6)
    assert terms["kd"].item() == pytest.approx(0.8 * 5.0 * kl, rel=1e-6)


def test_label_smoothing_module_has_one_term():
    module = LabelSmoothing(student="resnet8", num_classes=3, epsilon=0.3)
    terms = module.loss_terms(Step(torch.zeros(1), torch.tensor([1]), torch.tensor([[1.0, 2.0, 0.5]])))
    smoothed = [0.1, 0.8, 0.1]
    expected = -sum(q * math.log(p) for q, p in zip(smoothed, softmax([1.0, 2.0, 0.5])))
    assert list(terms) == ["lsr"]
    assert terms["lsr"].item() == pytest.approx(expected, rel=1e-6)


# --- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"correct_prob": 0.1}, "correct_prob must lie in (0.1, 1.0], got 0.1"),  # 1/K: no peak on the label
        ({"correct_prob": 0.05}, "correct_prob must lie in (0.1, 1.0], got 0.05"),
        ({"correct_prob": 1.01}, "correct_prob must lie in (0.1, 1.0], got 1.01"),
        ({"temperature": 0.0}, "temperature must lie in (0.0"),
        ({"alpha": 1.5}, "alpha must lie in [0.0, 1.0], got 1.5"),
        ({"kd_weight": -1.0}, "kd_weight must lie in [0.0, inf], got -1.0"),
        ({"multiplier": -1.0}, "multiplier must lie in [0.0, inf], got -1.0"),
        ({"soften": "student"}, "soften must be one of 'probabilities', 'logits'; got 'student'"),
        ({"reduction": "sum"}, "reduction must be one of 'mean', 'batchmean'; got 'sum'"),
    ],
)
def test_tfkd_reg_rejects_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError) as error:
        TfKDReg(student="resnet8", num_classes=10, **kwargs)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature must lie in (0.0"),
        ({"alpha": -0.1}, "alpha must lie in [0.0, 1.0], got -0.1"),
        ({"ce_weight": -0.1}, "ce_weight must lie in [0.0, inf], got -0.1"),
        ({"multiplier": -2.0}, "multiplier must lie in [0.0, inf], got -2.0"),
        ({"reduction": "none"}, "reduction must be one of 'mean', 'batchmean'; got 'none'"),
    ],
)
def test_tfkd_self_rejects_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError) as error:
        TfKDSelf(student="resnet8", teacher="resnet8", num_classes=10, **kwargs)
    assert message in str(error.value)


@pytest.mark.parametrize("epsilon", [-0.1, 1.5])
def test_label_smoothing_rejects_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match=rf"epsilon must lie in \[0.0, 1.0\], got {epsilon}"):
        LabelSmoothing(student="resnet8", num_classes=10, epsilon=epsilon)


def test_pure_functions_reject_unknown_conventions():
    with pytest.raises(ValueError, match="soften must be one of"):
        virtual_teacher(torch.tensor([0]), 3, 0.9, 2.0, soften="teacher")
    with pytest.raises(ValueError, match="reduction must be one of"):
        tfkd_self_loss(torch.zeros(1, 3), torch.zeros(1, 3), 2.0, reduction="sum")


def test_teacher_presence_is_checked():
    with pytest.raises(ValueError, match="TfKDReg trains without a teacher"):
        TfKDReg(student="resnet8", teacher="resnet8", num_classes=10)
    with pytest.raises(ValueError, match="TfKDSelf needs a teacher"):
        TfKDSelf(student="resnet8", num_classes=10)


@pytest.mark.parametrize(
    "student, teacher",
    [
        ("resnet8", "resnet14"),  # both names: compared by name (same ResNet class, other depth)
        (lambda: get_model("resnet8", 10), "wrn_16_1"),  # a module: compared by class
    ],
)
def test_tfkd_self_warns_that_another_architecture_is_plain_kd(student, teacher):
    student = student() if callable(student) else student
    message = r"the teacher \((resnet14|WideResNet)\) is not the student's architecture.*plain KD"
    with pytest.warns(UserWarning, match=message):
        TfKDSelf(student=student, teacher=teacher, num_classes=10)


@pytest.mark.parametrize("student", ["resnet8", lambda: get_model("resnet8", 10)])
def test_tfkd_self_with_its_own_architecture_does_not_warn(student, recwarn):
    TfKDSelf(student=student() if callable(student) else student, teacher="resnet8", num_classes=10)
    assert not [w for w in recwarn if "plain KD" in str(w.message)]


# --- through the CLI -----------------------------------------------------------------------------------------
SMALL_STUDENT = ["--model.init_args.student=resnet8"]  # the configs' own networks fit in test_cli.py


def config(path):
    return f"--config={os.path.join(REPO, 'configs', 'cifar100', path)}"


def test_tfkd_reg_fits_with_no_teacher_through_the_cli(tiny_cifar100, tmp_path):
    cli = cli_main(["fit", config("tfkd_reg/resnet8x4.yaml"), *data_args(tiny_cifar100, batch_size=4),
                    *trainer_args(tmp_path), *SMALL_STUDENT])
    assert cli.model.teacher is None
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_reg"])
    assert "val/teacher_acc1" not in cli.trainer.callback_metrics
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert not [k for k in saved if k.startswith("teacher.")]


def test_tfkd_self_two_steps_distil_from_the_first_run(tiny_cifar100, tmp_path, recwarn):
    step1 = cli_main(["fit", config("tfkd_self/resnet8x4.yaml"), *data_args(tiny_cifar100, batch_size=4),
                      *trainer_args(tmp_path / "step1"), *SMALL_STUDENT])
    step2 = cli_main(["fit", config("tfkd_self/resnet8x4-resnet8x4.yaml"), *data_args(tiny_cifar100, batch_size=4),
                      *trainer_args(tmp_path / "step2"), *SMALL_STUDENT, "--model.init_args.teacher=resnet8",
                      f"--model.init_args.teacher_ckpt={tmp_path / 'step1' / 'checkpoints' / 'last.ckpt'}"])
    assert state_hash(step2.model.teacher) == state_hash(step1.model.student)
    assert torch.isfinite(step2.trainer.callback_metrics["train/loss_kd"])
    assert not [w for w in recwarn if "plain KD" in str(w.message)]
