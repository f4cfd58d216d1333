"""FitNet on the method-author API: an owned regressor sized in __init__, an optional hint stage, and a run that fits,
resumes exactly across the stage boundary, tests and exports through ``lightning-kd``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import data_args, state_hash, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.export import export_student
from lightning_kd.methods import ConvReg, FitNet, kd_loss
from lightning_kd.models import get_model

pytestmark = pytest.mark.filterwarnings("ignore:.*no teacher_ckpt given")


def test_the_objective_is_ce_plus_beta_times_the_regressed_hint_error():
    module = FitNet(student="resnet8", teacher="resnet20", num_classes=10, beta=100.0, kd_weight=0.5)
    module.setup("fit")
    assert module.student_layers == ["layer2"] and isinstance(module.regressor, ConvReg)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    step = module.forward_step(x, y)
    terms = module.loss_terms(step.float())
    hint = module.regressor(step.student_features["layer2"]) - step.teacher_features["layer2"]
    assert terms["hint"].item() == pytest.approx(100.0 * hint.pow(2).mean().item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(step.student_logits, y).item(), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(0.5 * kd_loss(step.student_logits, step.teacher_logits, 4.0).item())
    sum(terms.values()).backward()
    assert module.regressor.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.teacher.parameters())


def test_the_hint_stage_trains_the_guided_layers_and_regressor_on_the_hint_alone(monkeypatch):
    module = FitNet(student="resnet8", teacher="resnet20", num_classes=10, hint_epochs=2)
    module.setup("fit")
    terms = module.loss_terms(module.forward_step(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])).float())
    assert set(terms) == {"hint"} and module.stage.name == "hint"
    terms["hint"].backward()
    assert module.student.layer1[0].conv1.weight.grad is not None
    assert module.student.layer3[0].conv1.weight.grad is None and module.student.fc.weight.grad is None
    monkeypatch.setattr(FitNet, "current_epoch", 2)
    assert module.stage.name == "distill"


def test_layers_the_regressor_cannot_map_are_one_clear_error():
    with pytest.raises(ValueError, match="FitNet guides one student layer by one teacher layer"):
        FitNet(student="resnet8", teacher="resnet20", num_classes=10, student_layers=["layer1", "layer2"],
               teacher_layers=["layer1", "layer2"])
    with pytest.raises(ValueError, match="ConvReg maps a student map of 8x8 to a teacher map of 32x32"):
        FitNet(student="resnet8", teacher="resnet20", num_classes=10, student_layers=["layer3"],
               teacher_layers=["layer1"])


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet14.pth"
    torch.save(get_model("resnet14", 4).state_dict(), path)
    return str(path)


def fitnet_args(root, workdir, teacher, epochs: int) -> list[str]:
    return [
        "--model=FitNet", "--model.student=resnet8", "--model.teacher=resnet14", f"--model.teacher_ckpt={teacher}",
        "--model.hint_epochs=1", "--data=ImageFolderDataModule", "--data.image_size=32",
        *data_args(root, batch_size=8, download=None), *trainer_args(workdir, steps=2), f"--trainer.max_epochs={epochs}",
    ]


def test_two_stages_fit_resume_exactly_test_and_export(tiny_folder, teacher_file, tmp_path):
    whole = cli_main(["fit", *fitnet_args(tiny_folder, tmp_path / "whole", teacher_file, epochs=2)])
    cli_main(["fit", *fitnet_args(tiny_folder, tmp_path / "parts", teacher_file, epochs=1)])
    last = tmp_path / "parts" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["stage_index"] == 0  # saved with the hint stage's optimizer
    resumed = cli_main(["fit", *fitnet_args(tiny_folder, tmp_path / "parts", teacher_file, epochs=2),
                        f"--ckpt_path={last}"])
    assert state_hash(resumed.model) == state_hash(whole.model)
    assert type(resumed.trainer.lr_scheduler_configs[0].scheduler).__name__ == "MultiStepLR"  # the main stage's

    tested = cli_main(["test", *fitnet_args(tiny_folder, tmp_path / "parts", teacher_file, epochs=2)[:-1],
                       f"--ckpt_path={last}"])
    assert "test/acc1" in tested.trainer.callback_metrics
    out = tmp_path / "student.pth"
    export_student(str(last), str(out), format="state_dict")
    exported = torch.load(out)
    assert exported["model"] == "resnet8" and set(exported["state_dict"]) == set(get_model("resnet8", 4).state_dict())
