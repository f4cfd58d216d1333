"""OFD (and ReviewKD) on the method-author API: owned heads sized in __init__, the full objective against the pure
losses applied by hand to the hooked features, margins from the right teacher BatchNorms, gradients to the student
and the heads (never the teacher), and clear argument errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_kd.methods import (
    OFD,
    OFDConnector,
    ReviewKD,
    ReviewKDFusion,
    hcl_loss,
    kd_loss,
    margin_from_batchnorm,
    ofd_loss,
    producing_batchnorm,
)
from lightning_kd.models import get_model

pytestmark = pytest.mark.filterwarnings("ignore:.*no teacher_ckpt given")

STUDENT_PREACTS = ["layer1.0.preact", "layer2.0.preact", "layer3.0.preact"]
TEACHER_PREACTS = ["layer1.2.preact", "layer2.2.preact", "layer3.2.preact"]
TEACHER_BNS = ["layer1.2.bn2", "layer2.2.bn2", "layer3.2.bn2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on several competing for a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_teacher(name: str = "resnet20", num_classes: int = 10) -> torch.nn.Module:
    """A zoo teacher whose BatchNorms have random affine parameters (the initial 1 and 0 give every channel the same
    margin) and running statistics from one batch of noise (as a trained teacher has its own)."""
    torch.manual_seed(1)
    teacher = get_model(name, num_classes)
    with torch.no_grad():
        for module in teacher.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.2, 1.5)
                module.bias.uniform_(-1.0, 1.0)
                module.momentum = None
        teacher.train()(torch.randn(16, 3, 32, 32))
    return teacher.eval()


def ofd(**kwargs) -> OFD:
    return OFD(**{"student": "resnet8", "teacher": random_teacher(), "num_classes": 10, **kwargs})


def hooked_step(module, batch: int = 4):
    """One forward step outside a Trainer (``setup`` registers the feature hooks), and its float32 terms."""
    module.setup("validate")
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    step = module.forward_step(x, y)
    return step, module.loss_terms(step.float())


# ----------------------------------------------------------------------------------------------------------- OFD


def test_ofd_default_layers_connectors_and_margins_from_the_teacher_bns():
    module = ofd()
    assert module.student_layers == STUDENT_PREACTS and module.teacher_layers == TEACHER_PREACTS
    assert module.teacher_bn_layers == TEACHER_BNS
    assert len(module.connectors) == 3 and all(isinstance(c, OFDConnector) for c in module.connectors)
    for connector, channels in zip(module.connectors, (16, 32, 64)):
        assert (connector.conv.in_channels, connector.conv.out_channels) == (channels, channels)
        assert connector.conv.kernel_size == (1, 1)
    bns = dict(module.teacher.named_modules())
    for margin, name in zip(module.margins, TEACHER_BNS):
        expected = margin_from_batchnorm(bns[name])
        assert torch.equal(margin, expected)
        assert (margin <= 0).all() and margin.unique().numel() > 1  # per channel, from the randomised BN
    # buffers: checkpointed, not trained, moved with the module
    state = module.state_dict()
    assert all(torch.equal(state[f"margin_{i}"], m) for i, m in enumerate(module.margins))
    assert not any("margin" in name for name, _ in module.named_parameters())
    module.double()
    assert all(m.dtype == torch.float64 for m in module.margins)


@pytest.mark.parametrize(
    "network, expected",
    [
        ("resnet8x4", ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"]),
        ("wrn_16_2", ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]),
        ("vgg8", ["block1.1", "block2.1", "block3.1", "block4.1"]),
        ("ResNet50", ["layer1.2.bn3", "layer2.3.bn3", "layer3.5.bn3", "layer4.2.bn3"]),
        ("MobileNetV2", ["blocks.1.1.conv.7", "blocks.2.2.conv.7", "blocks.4.2.conv.7", "blocks.6.0.conv.7"]),
    ],
)
def test_producing_batchnorm_of_every_zoo_family(network, expected):
    model = get_model(network, 10)
    assert [producing_batchnorm(model, name) for name in model.preact_names] == expected


def test_the_objective_is_ce_plus_kd_plus_beta_times_the_weighted_ofd_terms():
    module = ofd(beta=0.01, kd_weight=0.5)
    step, terms = hooked_step(module)
    assert set(terms) == {"ce", "kd", "ofd"}
    assert set(step.student_features) == set(STUDENT_PREACTS)
    assert set(step.teacher_features) == set(TEACHER_PREACTS)
    bns = dict(module.teacher.named_modules())
    expected = 0.0
    for i, (s, t, bn) in enumerate(zip(STUDENT_PREACTS, TEACHER_PREACTS, TEACHER_BNS)):
        connector = module.connectors[i]
        connected = connector.bn(connector.conv(step.student_features[s]))
        margin = margin_from_batchnorm(bns[bn])
        expected = expected + ofd_loss(connected, step.teacher_features[t], margin) / 2 ** (2 - i)
    assert terms["ofd"].item() == pytest.approx(0.01 * expected.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(step.student_logits, step.targets).item(), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(
        0.5 * kd_loss(step.student_logits, step.teacher_logits, 4.0).item(), rel=1e-6
    )


def test_the_hooked_features_are_the_pre_relu_stage_outputs_of_the_eval_mode_teacher():
    module = ofd()
    step, _ = hooked_step(module)
    assert not module.teacher.training
    for name in TEACHER_PREACTS:
        assert (step.teacher_features[name] < 0).any()  # before the ReLU
    teacher = module.teacher
    with torch.no_grad():  # the last residual sum of layer3, recomputed by hand with running statistics
        x = teacher.relu(teacher.bn1(teacher.conv1(step.inputs)))
        x = teacher.layer2(teacher.layer1(x))
        x = teacher.layer3[1](teacher.layer3[0](x))
        block = teacher.layer3[2]
        expected = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))) + x
    assert torch.allclose(step.teacher_features["layer3.2.preact"], expected, atol=1e-5)


def test_gradients_reach_the_student_and_the_connectors_never_the_teacher():
    module = ofd()
    module.train()
    assert not module.teacher.training  # the library's rule: the teacher stays in eval mode
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    _, terms = hooked_step(module)
    terms["ofd"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.connectors.parameters())
    assert module.student.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert module.student.fc.weight.grad is None  # the OFD term alone does not reach the classifier
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in module.teacher.state_dict().items())
    optimised = {id(p) for p in module.trainable_parameters(module.stage)}
    assert all(id(p) in optimised for p in module.connectors.parameters())
    assert not any(id(p) in optimised for p in module.teacher.parameters())


def test_layer_lists_of_different_lengths_are_aligned_on_their_last_entries():
    module = OFD(student="ShuffleV1", teacher="vgg13", num_classes=10)
    assert module.teacher_layers == ["block2.4", "block3.4", "block4.4"]  # vgg13's last three of four
    assert len(module.student_layers) == 3 and module.teacher_bn_layers == module.teacher_layers


def test_explicit_teacher_bn_layers_are_used():
    module = ofd(teacher_bn_layers=["layer1.2.bn2", "layer2.2.bn2", "layer3.1.bn2"])
    bns = dict(module.teacher.named_modules())
    assert torch.equal(module.margins[2], margin_from_batchnorm(bns["layer3.1.bn2"]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"connector_kernel_size": 2}, "odd"),
        ({"connector_kernel_size": 0}, "connector_kernel_size"),
        ({"teacher_bn_layers": ["layer1.2.bn2"]}, "one teacher BatchNorm per teacher layer"),
        ({"teacher_bn_layers": ["layer1.2.bn2", "layer2.2.bn2", "layer3.2.conv2"]}, "no affine BatchNorm"),
        ({"teacher_bn_layers": ["layer1.2.bn2", "layer2.2.bn2", "layer2.2.bn1"]}, "no single BN"),
        ({"student_layers": ["fc"], "teacher_layers": ["fc"]}, "C, H, W"),
        ({"student_layers": ["layer1.0.preact"]}, "pairs"),
    ],
)
def test_bad_arguments_raise_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ofd(**kwargs)


def test_a_teacher_layer_without_a_producing_bn_raises_one_clear_error():
    with pytest.raises(ValueError, match="teacher_bn_layers"):
        OFD(student="resnet8", teacher="ShuffleV2", num_classes=10)  # preact concatenates a pass-through half
    with pytest.raises(ValueError, match="teacher_bn_layers"):
        ofd(student_layers=["layer3"], teacher_layers=["layer3.2.conv2"])


# ------------------------------------------------------------------------------------------------------- ReviewKD

REVIEW_STUDENT = ["layer1", "layer2", "layer3", "fc:input"]
REVIEW_TEACHER = TEACHER_PREACTS + ["fc:input"]


def reviewkd(**kwargs) -> ReviewKD:
    return ReviewKD(**{"student": "resnet8", "teacher": random_teacher(), "num_classes": 10, **kwargs})


def at_epoch(monkeypatch, epoch: int) -> None:
    """``current_epoch`` as a Trainer would report it (counted from 0)."""
    monkeypatch.setattr(ReviewKD, "current_epoch", property(lambda self: epoch))


def test_reviewkd_default_layers_and_fusion_sized_from_the_shapes():
    module = reviewkd()
    assert module.student_layers == REVIEW_STUDENT and module.teacher_layers == REVIEW_TEACHER
    assert isinstance(module.fusion, ReviewKDFusion)
    shapes = [(16, 32, 32), (32, 16, 16), (64, 8, 8), (64, 1, 1)]
    assert module.fusion.student_shapes == shapes and module.fusion.teacher_shapes == shapes
    assert module.fusion.mid_channels == 64  # min(512, pooled student channels)
    # VGG: the student's five stage ends + pooled vector are cut to the teacher's four pre-activations + pooled
    vgg = ReviewKD(student="vgg8", teacher="vgg13", num_classes=10)
    assert vgg.student_layers == ["block1", "block2", "block3", "block4", "classifier:input"]
    assert vgg.teacher_layers == ["block1.4", "block2.4", "block3.4", "block4.4", "classifier:input"]


def test_the_objective_is_ce_plus_warmed_up_lambda_times_hcl_of_the_fused_features(monkeypatch):
    module = reviewkd(beta=0.6, kd_weight=0.5, mid_channels=24)
    at_epoch(monkeypatch, 4)  # the fifth epoch: factor 5/20
    step, terms = hooked_step(module)
    assert set(terms) == {"ce", "kd", "reviewkd"}
    assert set(step.student_features) == set(REVIEW_STUDENT) and set(step.teacher_features) == set(REVIEW_TEACHER)
    # the authors' forward spelled out: ABFs deepest first, each fusing the deeper residual
    student = [step.student_features[name] for name in REVIEW_STUDENT]
    student[-1] = student[-1][:, :, None, None]
    teacher = [step.teacher_features[name] for name in REVIEW_TEACHER]
    teacher[-1] = teacher[-1][:, :, None, None]
    outputs, residual = [], None
    for feature, abf, target in zip(student[::-1], module.fusion.abfs, teacher[::-1]):
        out, residual = abf(feature, residual, tuple(target.shape[-2:]))
        outputs.insert(0, out)
    expected = 0.6 * (5 / 20) * hcl_loss(outputs, teacher)
    assert terms["reviewkd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(step.student_logits, step.targets).item(), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(
        0.5 * kd_loss(step.student_logits, step.teacher_logits, 4.0).item(), rel=1e-6
    )


@pytest.mark.parametrize("epoch, factor", [(0, 1 / 20), (9, 0.5), (19, 1.0), (200, 1.0)])
def test_the_warm_up_counts_epochs_from_one(monkeypatch, epoch, factor):
    module = ReviewKD(student="resnet8", teacher="resnet14", num_classes=10)
    at_epoch(monkeypatch, epoch)
    assert module.warmup_factor() == pytest.approx(factor)
    assert ReviewKD(student="resnet8", teacher="resnet14", num_classes=10, warmup_epochs=0).warmup_factor() == 1.0


def test_reviewkd_gradients_reach_the_student_and_the_fusion_never_the_teacher():
    module = reviewkd()
    module.train()
    assert not module.teacher.training
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    _, terms = hooked_step(module)
    terms["reviewkd"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.fusion.parameters())
    assert module.student.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in module.teacher.state_dict().items())
    optimised = {id(p) for p in module.trainable_parameters(module.stage)}
    assert all(id(p) in optimised for p in module.fusion.parameters())
    assert not any(id(p) in optimised for p in module.teacher.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": 0.0}, "beta"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"mid_channels": 0}, "mid_channels"),
        ({"student_layers": ["layer1", "fc:input"]}, "pairs"),
    ],
)
def test_reviewkd_bad_arguments_raise_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        reviewkd(**kwargs)
