"""How the student relates to its teacher, logged at validation: agreement, KL(teacher ‖ student), calibration."""
import copy
import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd.core import BlackBoxTeacher
from lightning_kd.core.module import distillation_diagnostics
from lightning_kd.methods import KD, Baseline, kd_loss
from lightning_kd.models import get_model


def test_diagnostics_by_hand():
    student = torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0]])  # p = (1/4, 3/4); argmax 0
    teacher = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # p = (1/2, 1/2) (argmax 0 on a tie); argmax 1
    values = distillation_diagnostics(student, teacher)
    assert values["agreement"].tolist() == [0.0, 0.0]
    first = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert values["kl_teacher_student"][0].item() == pytest.approx(first, rel=1e-6)
    assert values["kl_teacher_student"].mean().item() == pytest.approx(kd_loss(student, teacher, 1.0).item(), rel=1e-6)
    same = distillation_diagnostics(teacher, teacher)
    assert same["agreement"].tolist() == [1.0, 1.0] and same["kl_teacher_student"].abs().max() < 1e-7


def validate(module) -> dict:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(24, 3, 32, 32), torch.randint(0, 4, (24,)))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, DataLoader(data, batch_size=8), verbose=False)[0]


def test_a_student_identical_to_its_teacher_agrees_everywhere(tmp_path):
    network = get_model("resnet8", 4)
    torch.save(network.state_dict(), tmp_path / "teacher.pth")
    module = KD(student=copy.deepcopy(network), teacher="resnet8", teacher_ckpt=str(tmp_path / "teacher.pth"),
                num_classes=4)
    metrics = validate(module)
    assert metrics["val/agreement"] == 1.0 and metrics["val/kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["val/ece"] == pytest.approx(metrics["val/teacher_ece"])


def test_another_teacher_disagrees_somewhere_and_the_diagnostics_can_be_switched_off(tmp_path):
    torch.manual_seed(1)
    torch.save(get_model("resnet8", 4).state_dict(), tmp_path / "teacher.pth")
    arguments = {"student": "resnet8", "teacher": "resnet8", "teacher_ckpt": str(tmp_path / "teacher.pth"),
                 "num_classes": 4}
    metrics = validate(KD(**arguments))
    assert 0.0 <= metrics["val/agreement"] <= 1.0 and metrics["val/kl_teacher_student"] > 0.0
    assert 0.0 <= metrics["val/teacher_ece"] <= 1.0
    off = validate(KD(**arguments, kd_diagnostics=False))
    assert "val/agreement" not in off and "val/teacher_ece" not in off and "val/ece" in off


def test_no_teacher_no_teacher_diagnostics_and_a_black_box_is_never_asked():
    assert set(validate(Baseline(student="resnet8", num_classes=4))) >= {"val/ece", "val/acc1"}
    assert "val/agreement" not in validate(Baseline(student="resnet8", num_classes=4))
    black_box = BlackBoxTeacher(get_model("resnet8", 4), budget=0)  # any query would exceed the budget
    module = KD(student="resnet8", teacher=black_box, num_classes=4)
    assert "val/agreement" not in validate(module) and black_box.queries == 0
