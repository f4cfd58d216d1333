"""CRD on the method-author API: a memory bank indexed by the batches' sample indices, sized by the linked
training-set size; it fits, resumes exactly, tests and exports through ``lightning-kd``, and its banks stay
identical on every DDP process."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from conftest import data_args, state_hash, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.export import export_student
from lightning_kd.methods import CRD
from lightning_kd.methods.crd import ContrastSampler
from lightning_kd.models import get_model

pytestmark = pytest.mark.filterwarnings("ignore:.*no teacher_ckpt given")
TESTS = os.path.dirname(__file__)


def hand_nce(anchor: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, tau: float) -> torch.Tensor:
    """The NCE loss of one direction, written out: scores against the bank rows, Z from this (first) batch."""
    samples, negatives = bank.shape[0], rows.shape[1] - 1
    scores = torch.stack([torch.exp(bank[rows[b]] @ anchor[b] / tau) for b in range(len(anchor))])
    p = scores / (samples * scores.mean())
    noise = negatives / samples
    log_positive = torch.log(p[:, 0] / (p[:, 0] + noise + 1e-7))
    log_negatives = torch.log(noise / (p[:, 1:] + noise + 1e-7)).sum(1)
    return -(log_positive + log_negatives).mean()


def test_the_objective_is_ce_plus_beta_times_both_nce_terms_and_the_banks_move():
    torch.manual_seed(0)
    module = CRD(student="resnet8", teacher="resnet20", num_classes=10, num_samples=20, num_negatives=6, beta=0.8)
    module.setup("validate")  # the hooks; the sampler is built from the data's labels in a fit
    module.sampler = ContrastSampler(torch.arange(20) % 10, 6)
    assert module.student_layers == ["fc:input"] and module.teacher_layers == ["fc:input"]
    index, y = torch.tensor([0, 5, 7, 12]), torch.tensor([0, 5, 7, 2])
    step = module.forward_step(torch.randn(4, 3, 32, 32), y, {"index": index}).float()
    banks = module.memory.memory_student.clone(), module.memory.memory_teacher.clone()
    rows = module.sampler(index, generator=module.step_generator())
    assert (rows[:, 0] == index).all() and (rows[:, 1:] % 10 != (index % 10)[:, None]).all()  # other classes only

    terms = module.loss_terms(step)
    s = F.normalize(module.embed_student.linear(step.student_features["fc:input"]), dim=1)
    t = F.normalize(module.embed_teacher.linear(step.teacher_features["fc:input"]), dim=1)
    expected = hand_nce(s, banks[1], rows, 0.07) + hand_nce(t, banks[0], rows, 0.07)
    assert terms["crd"].item() == pytest.approx(0.8 * expected.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(step.student_logits, y).item(), rel=1e-6)
    moved = F.normalize(0.5 * banks[0][index] + 0.5 * s.detach(), dim=1)
    torch.testing.assert_close(module.memory.memory_student[index], moved)
    untouched = torch.ones(20, dtype=torch.bool).index_fill_(0, index, False)
    assert torch.equal(module.memory.memory_student[untouched], banks[0][untouched])
    sum(terms.values()).backward()
    assert module.embed_teacher.linear.weight.grad.abs().sum() > 0  # the teacher's embedding learns ...
    assert all(p.grad is None for p in module.teacher.parameters())  # ... the teacher does not


def test_crd_needs_the_training_set_size():
    with pytest.raises(ValueError, match="CRD keeps a memory of every training sample: set model.num_samples"):
        CRD(student="resnet8", teacher="resnet20", num_classes=10)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet14.pth"
    torch.save(get_model("resnet14", 4).state_dict(), path)
    return str(path)


def crd_args(root, workdir, teacher, epochs: int) -> list[str]:
    return [
        "--model=CRD", "--model.student=resnet8", "--model.teacher=resnet14", f"--model.teacher_ckpt={teacher}",
        "--model.num_negatives=8", "--data=ImageFolderDataModule", "--data.image_size=32", "--data.val_split=0.25",
        *data_args(root, batch_size=4, download=None), *trainer_args(workdir, steps=3), f"--trainer.max_epochs={epochs}",
    ]


def test_crd_fits_resumes_exactly_tests_and_exports(tiny_folder, teacher_file, tmp_path):
    whole = cli_main(["fit", *crd_args(tiny_folder, tmp_path / "whole", teacher_file, epochs=2)])
    assert whole.model.num_samples == len(whole.datamodule.train_dataset)
    cli_main(["fit", *crd_args(tiny_folder, tmp_path / "parts", teacher_file, epochs=1)])
    last = tmp_path / "parts" / "checkpoints" / "last.ckpt"
    resumed = cli_main(["fit", *crd_args(tiny_folder, tmp_path / "parts", teacher_file, epochs=2),
                        f"--ckpt_path={last}"])
    assert state_hash(resumed.model) == state_hash(whole.model)  # weights, embeddings, banks and Z
    tested = cli_main(["test", *crd_args(tiny_folder, tmp_path / "parts", teacher_file, epochs=2),
                       f"--ckpt_path={last}"])
    assert "test/acc1" in tested.trainer.callback_metrics
    export_student(str(last), str(tmp_path / "student.pth"), format="state_dict")
    assert torch.load(tmp_path / "student.pth")["model"] == "resnet8"


class SaveBanks(pl.Callback):
    """Each process writes its memory banks at the end of training (used by the DDP test below)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(pl_module.memory.state_dict(), os.path.join(self.directory, f"banks-{trainer.global_rank}.pt"))


def test_the_banks_stay_identical_on_every_ddp_process(tiny_folder, teacher_file, tmp_path):
    command = [
        sys.executable, "-m", "lightning_kd.cli", "fit", *crd_args(tiny_folder, tmp_path, teacher_file, epochs=1),
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.callbacks+=test_crd.SaveBanks",
        f"--trainer.callbacks.directory={tmp_path}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    banks = [torch.load(path) for path in sorted(glob.glob(str(tmp_path / "banks-*.pt")))]
    assert len(banks) == 2
    for name in ("memory_student", "memory_teacher", "normalizers"):
        assert torch.equal(banks[0][name], banks[1][name]), name
    assert (banks[0]["normalizers"] > 0).all()
