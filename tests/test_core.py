"""DistillationModule, feature hooks and teacher loading, without a Trainer."""
import hashlib
import os

import pytest
import torch
from torch import nn

from conftest import FIXTURES, state_hash
from lightning_kd.core import DistillationModule, FeatureHooks, Step, load_weights, read_state_dict
from lightning_kd.methods import KD, Baseline
from lightning_kd.models import get_model

COMMUNITY = os.path.join(FIXTURES, "repdistiller_resnet8_c100.pth")


class FeatureMatching(DistillationModule):
    """A method written the way a user would: declare layers, return named terms."""

    needs_teacher = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.student_layers = ["layer3"]
        self.teacher_layers = ["layer3"]

    def loss_terms(self, step: Step):
        s, t = step.student_features["layer3"], step.teacher_features["layer3"]
        return {"ce": nn.functional.cross_entropy(step.student_logits, step.targets), "feat": (s - t).pow(2).mean()}


def test_feature_hooks_capture_and_forget():
    model = get_model("resnet8", num_classes=10)
    hooks = FeatureHooks(model, ["layer1", "layer3"])
    model(torch.randn(2, 3, 32, 32))
    features = hooks.pop()
    assert set(features) == {"layer1", "layer3"}
    assert features["layer1"].shape[-1] == 32 and features["layer3"].shape[-1] == 8
    assert hooks.pop() == {}
    hooks.remove()
    model(torch.randn(2, 3, 32, 32))
    assert hooks.pop() == {}


def test_unknown_layer_names_the_closest_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown student layer 'layer_3'.*Closest valid names: layer3"):
        FeatureHooks(get_model("resnet8", 10), ["layer_3"], owner="student")


def test_declared_layers_reach_the_method_and_gradients_reach_only_the_student():
    module = FeatureMatching(student="resnet8", teacher="resnet20", num_classes=10)
    module.setup("fit")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    step = module.forward_step(x, y)
    assert step.student_features["layer3"].requires_grad
    assert not step.teacher_features["layer3"].requires_grad
    loss = sum(module.loss_terms(step.float()).values())
    loss.backward()
    assert all(p.grad is not None for p in module.student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())


def test_unknown_declared_layer_fails_at_setup():
    module = FeatureMatching(student="resnet8", teacher="resnet8", num_classes=10)
    module.student_layers = ["layer4"]
    with pytest.raises(ValueError, match="Unknown student layer 'layer4'"):
        module.setup("fit")


def test_teacher_stays_in_eval_mode_and_out_of_the_optimizer():
    module = KD(student="resnet8", teacher="resnet20", num_classes=10)
    module.train()
    assert module.student.training and not module.teacher.training
    assert not any(m.training for m in module.teacher.modules())
    optimizer = module.configure_optimizers()["optimizer"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.student.parameters()}
    assert not optimized & {id(p) for p in module.teacher.parameters()}


def test_teacher_forward_keeps_bn_statistics():
    module = KD(student="resnet8", teacher="resnet8", num_classes=10)
    module.train()
    before = state_hash(module.teacher)
    step = module.forward_step(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    sum(module.loss_terms(step.float()).values()).backward()
    assert state_hash(module.teacher) == before


def test_method_without_teacher_and_teacher_requirements():
    with pytest.raises(ValueError, match="KD needs a teacher"):
        KD(student="resnet8", num_classes=10)
    with pytest.raises(ValueError, match="Baseline trains without a teacher"):
        Baseline(student="resnet8", teacher="resnet8", num_classes=10)
    with pytest.raises(ValueError, match=r"teacher_ckpt is set but model.teacher"):
        DistillationModule(student="resnet8", num_classes=10, teacher_ckpt="x.pth")


def test_class_count_disagreement_is_one_clear_error():
    module = Baseline(student=nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 7)), num_classes=10)
    with pytest.raises(ValueError, match="student outputs 7 classes but the data has 10"):
        module.forward_step(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))


def test_teacher_checkpoint_formats(tmp_path):
    reference = get_model("resnet8", 100)
    community = COMMUNITY
    plain = tmp_path / "plain.pth"
    wrapped = tmp_path / "data_parallel.pth"
    state = read_state_dict(community)
    torch.save(state, plain)
    torch.save({f"module.{k}": v for k, v in state.items()}, wrapped)
    load_weights(reference, community)
    for path in (community, plain, wrapped):
        model = get_model("resnet8", 100)
        source = load_weights(model, str(path))
        assert state_hash(model) == state_hash(reference)
        assert source.path == os.path.abspath(path) and source.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_teacher_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Teacher checkpoint not found: 'missing.pth'"):
        KD(student="resnet8", teacher="resnet8", teacher_ckpt="missing.pth", num_classes=100)
    with pytest.raises(ValueError, match=r"key 'fc.weight' has shape \(100, 64\) in the checkpoint but \(10, 64\)"):
        KD(student="resnet8", teacher="resnet8", teacher_ckpt=COMMUNITY, num_classes=10)
    with pytest.raises(ValueError, match=r"does not fit .*key 'layer1.1.conv1.weight' .* is missing"):
        load_weights(get_model("resnet14", 100), COMMUNITY)
    junk = tmp_path / "junk.pth"
    torch.save({"hello": "world"}, junk)
    with pytest.raises(ValueError, match="Unrecognised checkpoint format"):
        load_weights(get_model("resnet8", 100), str(junk))
