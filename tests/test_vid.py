"""VID on the method-author API: one owned regressor per layer pair sized in __init__, the full objective against
vid_loss applied by hand, gradients to the student and the heads (never the teacher), and clear argument errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_kd.methods import VID, VIDRegressor, kd_loss, vid_loss

PAIR = {"student": "resnet8", "teacher": "resnet14", "num_classes": 10}
pytestmark = pytest.mark.filterwarnings("ignore:.*no teacher_ckpt given")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on several competing for a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hooked_step(module: VID, batch: int = 4):
    """One forward step outside a Trainer (``setup`` registers the feature hooks), and its float32 terms."""
    module.setup("validate")
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    step = module.forward_step(x, y)
    return step, module.loss_terms(step.float())


def randomise_variances(module: VID) -> None:
    """Different α per channel, so the hand computation below checks the per-channel variance, not one constant."""
    with torch.no_grad():
        for regressor in module.regressors:
            regressor.log_scale.uniform_(-1.0, 3.0)


def by_hand(regressor: VIDRegressor, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RepDistiller's VIDLoss.forward spelled out: pool to the smaller map, regress, σ² = softplus(α) + ε."""
    size = (min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3]))
    student, teacher = F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)
    mean = regressor.regressor(student)
    variance = torch.log(1.0 + torch.exp(regressor.log_scale)) + regressor.eps
    return vid_loss(mean, teacher, variance)


def test_default_layers_and_one_regressor_per_pair_sized_from_the_shapes():
    module = VID(**PAIR)
    assert module.student_layers == module.teacher_layers == ["layer1", "layer2", "layer3"]
    assert len(module.regressors) == 3 and all(isinstance(r, VIDRegressor) for r in module.regressors)
    for regressor, channels in zip(module.regressors, (16, 32, 64)):
        convs = [regressor.regressor[i] for i in (0, 2, 4)]
        assert [(c.in_channels, c.out_channels) for c in convs] == [(channels, channels)] * 3
        assert all(c.bias is None for c in convs)
        assert torch.allclose(regressor.variance(), torch.full((channels,), 5.0))  # init_pred_var 5
        # RepDistiller's VIDLoss parameter names, so its state dicts load into each head
        assert set(regressor.state_dict()) == {"regressor.0.weight", "regressor.2.weight", "regressor.4.weight",
                                               "log_scale"}


def test_the_objective_is_ce_plus_kd_plus_beta_times_the_summed_vid_terms():
    module = VID(**PAIR, beta=0.7, kd_weight=0.5)
    randomise_variances(module)
    step, terms = hooked_step(module)
    assert set(terms) == {"ce", "kd", "vid"}
    assert set(step.student_features) == set(step.teacher_features) == {"layer1", "layer2", "layer3"}
    expected = sum(
        by_hand(regressor, step.student_features[name], step.teacher_features[name])
        for regressor, name in zip(module.regressors, ["layer1", "layer2", "layer3"])
    )
    assert terms["vid"].item() == pytest.approx(0.7 * expected.item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(step.student_logits, step.targets).item(), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(
        0.5 * kd_loss(step.student_logits, step.teacher_logits, 4.0).item(), rel=1e-6
    )


def test_pairs_of_different_widths_and_sizes_pool_before_the_regressor():
    module = VID(**PAIR, student_layers=["layer1", "layer2"], teacher_layers=["layer2", "layer3"])
    convs = [(r.regressor[0].in_channels, r.regressor[4].out_channels) for r in module.regressors]
    assert convs == [(16, 32), (32, 64)]
    randomise_variances(module)
    step, terms = hooked_step(module)
    assert set(terms) == {"ce", "vid"}  # RepDistiller: CE 1 + VID 1, no KD
    student, teacher = step.student_features, step.teacher_features
    expected = by_hand(module.regressors[0], student["layer1"], teacher["layer2"]) + by_hand(
        module.regressors[1], student["layer2"], teacher["layer3"]
    )
    assert terms["vid"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradients_reach_the_student_and_every_regressor_parameter_never_the_teacher():
    module = VID(**PAIR)
    _, terms = hooked_step(module)
    sum(terms.values()).backward()
    for regressor in module.regressors:
        for name, parameter in regressor.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        assert regressor.log_scale.grad.abs().sum() > 0  # the variance is learned (RepDistiller), not fixed
    assert module.student.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert module.student.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.teacher.parameters())
    trained = {id(p) for p in module.trainable_parameters(module.stage)}
    assert all(id(p) in trained for p in module.regressors.parameters())
    assert not any(id(p) in trained for p in module.teacher.parameters())


def test_the_vid_term_alone_moves_only_the_student_layers_it_reaches():
    module = VID(**PAIR, ce_weight=0.0, student_layers=["layer2"], teacher_layers=["layer2"])
    _, terms = hooked_step(module)
    assert set(terms) == {"vid"}
    terms["vid"].backward()
    assert module.student.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert module.student.layer3[0].conv1.weight.grad is None and module.student.fc.weight.grad is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": -1.0}, "beta must lie in [0.0"),
        ({"eps": -1e-5}, "eps must lie in [0.0"),
        ({"init_variance": 1e-5}, "init_variance must lie in (1e-05"),
        ({"init_variance": 0.0}, "init_variance must lie in (1e-05"),
        ({"ce_weight": -0.5}, "ce_weight must lie in [0.0"),
        ({"temperature": 0.0}, "temperature must lie in (0.0"),
        ({"student_layers": ["layer1", "layer2"], "teacher_layers": ["layer2"]},
         "VID matches student and teacher layers in pairs"),
        ({"student_layers": ["fc"], "teacher_layers": ["layer3"]},
         "VID regresses (B, C, H, W) feature maps with 1x1 convolutions, but the student layer 'fc' outputs (10,)"),
    ],
)
def test_bad_arguments_are_one_clear_error(kwargs, message):
    with pytest.raises(ValueError) as error:
        VID(**PAIR, **kwargs)
    assert message in str(error.value)
