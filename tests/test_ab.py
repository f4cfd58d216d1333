"""AB (Heo et al., AAAI 2019): the objective against a hand computation on hooked pre-activations, the two stages,
a fit of the folder config through the CLI, and argument errors."""
import csv
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO, data_args, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.methods import AB, ABConnectors, ConvReg, kd_loss
from lightning_kd.models import get_model, preact_names

pytestmark = pytest.mark.filterwarnings("ignore:.*no teacher_ckpt given")
PAIR = {"student": "resnet8", "teacher": "resnet14", "num_classes": 10}
WIDE = {"student": "resnet8", "teacher": "resnet8x4", "num_classes": 10}  # connectors are convolutions here


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on several competing for a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def step_of(module, batch=4, seed=0):
    module.setup("fit")
    torch.manual_seed(seed)
    return module.forward_step(torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,)))


def resnet_preacts(network: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """RepDistiller's ``feat[1:-1]`` with ``preact=True`` for a CIFAR ResNet, by a hand-written forward: each stage's
    last residual sum before its ReLU."""
    x = network.relu(network.bn1(network.conv1(x)))
    pre = []
    for layer in (network.layer1, network.layer2, network.layer3):
        for block in layer:
            shortcut = x if block.downsample is None else block.downsample(x)
            p = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))) + shortcut
            x = F.relu(p)
        pre.append(p)
    return pre


def repdistiller_ab(g_s, g_t, margin):
    """RepDistiller's ``ABLoss`` (distiller_zoo/AB.py), summed over its layer list as its ``init`` does."""
    n, bsz = len(g_s), g_s[0].shape[0]
    total = 0.0
    for i, (s, t) in enumerate(zip(g_s, g_t)):
        loss = ((s + margin) ** 2 * ((s > -margin) & (t <= 0)).float()
                + (s - margin) ** 2 * ((s <= margin) & (t > 0)).float())
        total = total + 2 ** (i - n + 1) * loss.abs().sum() / bsz / 1000 * 3
    return total


# --- the objective --------------------------------------------------------------------------------------------
def test_default_layers_are_the_pre_activations_and_connectors_fit_the_shapes():
    module = AB(**WIDE)
    assert module.student_layers == preact_names(module.student)
    assert module.student_layers == ["layer1.0.preact", "layer2.0.preact", "layer3.0.preact"]
    assert module.teacher_layers == preact_names(module.teacher)
    assert all(isinstance(c, ConvReg) and not c.use_relu for c in module.connectors.connectors)
    assert [c.conv.out_channels for c in module.connectors.connectors] == [64, 128, 256]
    same = AB(**PAIR)
    assert all(isinstance(c, nn.Identity) for c in same.connectors.connectors)
    wrn = AB(student="wrn_16_2", teacher="wrn_40_2", num_classes=10)
    assert wrn.student_layers == ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]


def test_stage_one_objective_equals_the_loss_applied_by_hand_to_the_pre_activations():
    module = AB(margin=0.5, beta=2.0, **WIDE)
    step = step_of(module)
    terms = module.loss_terms(step.float())
    assert set(terms) == {"ab"}

    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # the same batch, in the same modes (student training, teacher eval: same BN statistics)
        student = resnet_preacts(module.student, x)
        teacher = resnet_preacts(module.teacher, x)
        connected = [c(f) for c, f in zip(module.connectors.connectors, student)]
    for name, by_hand in zip(module.student_layers, student):
        torch.testing.assert_close(step.student_features[name], by_hand, rtol=0, atol=0, msg=name)
    for name, by_hand in zip(module.teacher_layers, teacher):
        torch.testing.assert_close(step.teacher_features[name], by_hand, rtol=0, atol=0, msg=name)
    expected = 2.0 * repdistiller_ab(connected, teacher, margin=0.5)
    assert terms["ab"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() > 0

    terms["ab"].backward()  # the connectors and the student's body learn; the classifier and the teacher do not
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.connectors.parameters())
    assert module.student.conv1.weight.grad.abs().sum() > 0
    assert module.student.fc.weight.grad is None
    assert all(p.grad is None for p in module.teacher.parameters())


def test_stages_terms_teacher_and_optimizer_parameters(monkeypatch):
    module = AB(stage1_epochs=3, **WIDE)
    first, second = module.training_stages()
    assert (first.name, first.epochs, first.constant_lr, first.teacher) == ("ab", 3, True, True)
    assert (second.name, second.epochs, second.constant_lr, second.teacher) == ("task", None, False, False)
    connector_ids = {id(p) for p in module.connectors.parameters()}
    student_ids = {id(p) for p in module.student.parameters()}
    assert {id(p) for p in module.trainable_parameters(first)} == student_ids | connector_ids
    assert {id(p) for p in module.trainable_parameters(second)} == student_ids

    assert module.needs_teacher_forward()
    monkeypatch.setattr(AB, "current_epoch", 3)
    assert module.stage.name == "task" and not module.needs_teacher_forward()
    step = step_of(module)
    assert step.teacher_logits is None and not step.teacher_features
    terms = module.loss_terms(step.float())
    assert set(terms) == {"ce"}
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(step.student_logits, step.targets).item())

    with_kd = AB(stage1_epochs=3, kd_weight=0.5, ce_weight=0.8, temperature=2.0, **WIDE)
    assert with_kd.needs_teacher_forward()
    step = step_of(with_kd)
    terms = with_kd.loss_terms(step.float())
    assert set(terms) == {"ce", "kd"}
    expected_kd = 0.5 * kd_loss(step.student_logits, step.teacher_logits, 2.0)
    assert terms["kd"].item() == pytest.approx(expected_kd.item(), rel=1e-6)


# --- through the CLI ------------------------------------------------------------------------------------------
class OptimizerLog:
    """Records, at the first batch of each epoch, the optimizer in use, its parameters and learning rate."""

    def __init__(self):
        self.epochs = {}

    def callback(self):
        from pytorch_lightning import Callback

        log = self

        class Record(Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if batch_idx == 0:
                    optimizer = trainer.optimizers[0]
                    log.epochs[trainer.current_epoch] = {
                        "optimizer": id(optimizer),
                        "params": {id(p) for group in optimizer.param_groups for p in group["params"]},
                        "schedulers": len(trainer.lr_scheduler_configs),
                        "fc": module.student.fc.weight.detach().clone(),
                        "conv1": module.student.conv1.weight.detach().clone(),
                    }

        return Record()


def test_folder_config_fits_both_stages_through_the_cli(tiny_folder, tmp_path):
    torch.manual_seed(0)
    teacher_path = tmp_path / "resnet20.pth"
    torch.save(get_model("resnet20", 4).state_dict(), teacher_path)
    cli = cli_main([
        f"--config={os.path.join(REPO, 'configs', 'folder', 'ab', 'resnet20-resnet8.yaml')}",
        *data_args(tiny_folder, batch_size=8, download=None), *trainer_args(tmp_path, steps=2),
        f"--model.init_args.teacher_ckpt={teacher_path}", "--model.init_args.stage1_epochs=1", "--trainer.max_epochs=2",
        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
    ], run=False)
    assert isinstance(cli.model, AB) and cli.model.student_layers == preact_names(cli.model.student)
    teacher_runs = []
    cli.model.teacher.register_forward_hook(
        lambda *_: teacher_runs.append(cli.trainer.current_epoch) if cli.trainer.training else None)
    log = OptimizerLog()
    cli.trainer.callbacks.append(log.callback())
    initial_fc = cli.model.student.fc.weight.detach().clone()
    cli.trainer.fit(cli.model, cli.datamodule)

    assert cli.trainer.global_step == 4
    assert teacher_runs.count(0) >= 2 and teacher_runs.count(1) == 0  # no teacher forward in stage 2
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["train/loss_epoch"]]
    assert [bool(row["train/loss_ab_epoch"]) for row in rows] == [True, False]
    assert [bool(row["train/loss_ce_epoch"]) for row in rows] == [False, True]
    # Stage 1: constant lr, no scheduler; stage 2: a new optimizer with its scheduler.
    stage1, stage2 = log.epochs[0], log.epochs[1]
    assert stage1["schedulers"] == 0 and stage2["schedulers"] == 1
    assert stage1["optimizer"] != stage2["optimizer"]
    assert stage2["params"] == {id(p) for p in cli.model.student.parameters()}
    # The AB stage moved the student's body, not its classifier (no gradient reaches it).
    assert torch.equal(stage2["fc"], initial_fc) and not torch.equal(stage2["conv1"], stage1["conv1"])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


# --- errors -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"margin": -1.0}, "margin must lie in [0.0"),
        ({"beta": 0.0}, "beta must lie in (0.0"),
        ({"stage1_epochs": -1}, "stage1_epochs must lie in [0"),
        ({"ce_weight": 0.0}, "ce_weight or kd_weight must be > 0"),
        ({"kd_weight": -1.0}, "kd_weight must lie in [0.0"),
        ({"student_layers": ["layer1.0.preact"]}, "got 1 student layers ['layer1.0.preact'] and 3 teacher layers"),
        ({"student_layers": ["layer3.0.preact"], "teacher_layers": ["layer1.1.preact"]},
         "AB cannot connect student layer 'layer3.0.preact' (64, 8, 8) to teacher layer 'layer1.1.preact' "
         "(16, 32, 32)"),
        ({"student_layers": ["avgpool"], "teacher_layers": ["layer3.1.preact"]},
         "AB cannot connect student layer 'avgpool' (64, 1, 1)"),
        ({"student_layers": ["fc"], "teacher_layers": ["layer3.1.preact"]},
         "AB cannot connect student layer 'fc' (10,)"),
        ({"student_layers": ["layer9"], "teacher_layers": ["layer3.1.preact"]}, "Unknown student layer 'layer9'"),
        ({"student": "resnet18"}, "ResNet has no default pre-activation layers"),
    ],
)
def test_bad_arguments_are_one_clear_error(kwargs, message):
    with pytest.raises(ValueError) as error:
        AB(**{**PAIR, **kwargs})
    assert message in str(error.value)


def test_connectors_reject_unequal_counts():
    with pytest.raises(ValueError, match="one teacher shape per student shape"):
        ABConnectors([(16, 8, 8)], [])
