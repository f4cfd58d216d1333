"""Exact resume from anywhere (issue 17, item 7).

Fault injection: a tiny run checkpoints every step. The same run is SIGKILLed at random steps, each time resumed with
``--ckpt_path`` from the newest checkpoint, and must end with exactly the weights of the uninterrupted run
(``torch.equal``, not close); every checkpoint the interrupted runs wrote must be the uninterrupted run's of the same
step (weights, optimizer, loop progress, random states, loader position). Every run is a forked child of the test
process, which has imported everything already, so a run costs seconds, not a Python start-up.

Below it, the parts: the training loader resumes its epoch where it stopped (any path, paired batches, a DDP rank),
and a resumed fit keeps the data seed of its checkpoint.
"""
from __future__ import annotations

import glob
import itertools
import multiprocessing
import os
import random
import re
import signal

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from conftest import REPO
from lightning_kd.cli import cli_main
from lightning_kd.data import CIFAR10DataModule
from test_determinism import Recorder, rank_loader
from tiny_data import disable_cifar_checksums

KILL_AT = "LIGHTNING_KD_TEST_KILL_AT_STEP"
EPOCHS, STEPS_PER_EPOCH = 2, 4
STEPS = EPOCHS * STEPS_PER_EPOCH
# A kill at step k resumes from the checkpoint of step k - 1 (written at the end of the epoch when step k - 1 was
# an epoch's last: see test_resuming_after_an_epochs_last_batch_checkpoint_keeps_the_loop_state).
KILLABLE = list(range(2, STEPS))
CIFAR_CONFIG = os.path.join(REPO, "configs", "cifar10", "baseline", "resnet20.yaml")
FOLDER_CSKD_CONFIG = os.path.join(REPO, "configs", "folder", "cskd", "resnet8.yaml")


class KillAtStep(pl.Callback):
    """SIGKILL this process at the end of the training step given in the environment (after the optimizer step,
    before the checkpoint of that step is written: callbacks run before ModelCheckpoint)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == int(os.environ.get(KILL_AT, "-1")):
            os.kill(os.getpid(), signal.SIGKILL)


class GlobalRandomNoise(pl.Callback):
    """Perturb every gradient with noise drawn from the global torch, numpy and Python generators: the runs agree only
    if a resume restores those states exactly and data loading draws nothing from them."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        scale = 1e-3 * (1.0 + random.random() + float(np.random.rand()))
        for parameter in pl_module.parameters():
            if parameter.grad is not None:
                parameter.grad.add_(torch.randn_like(parameter.grad), alpha=scale)


def _fit(args: list[str], kill_at: int, weights: str) -> None:
    """The body of one forked run: fit through the CLI, then save the final weights."""
    torch.set_num_threads(1)
    os.environ[KILL_AT] = str(kill_at)
    cli = cli_main(args)
    torch.save(cli.model.state_dict(), weights)


def run(args: list[str], kill_at: int = -1, weights: str = os.devnull) -> int:
    """Run ``lightning-kd fit <args>`` in a forked child; its exit code (``-SIGKILL`` when killed)."""
    child = multiprocessing.get_context("fork").Process(target=_fit, args=(args, kill_at, weights))
    child.start()
    child.join()  # with a timeout it also waits for the child's orphaned DataLoader workers; pytest's timeout guards
    return child.exitcode


def fit_args(config: str, workdir, data: list[str]) -> list[str]:
    return [
        "fit", f"--config={config}", *data, "--trainer.callbacks+=test_resume_exact.GlobalRandomNoise",
        "--trainer.callbacks+=test_resume_exact.KillAtStep", f"--trainer.max_epochs={EPOCHS}",
        f"--trainer.limit_train_batches={STEPS_PER_EPOCH}", "--trainer.limit_val_batches=2",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={workdir}", f"--checkpoint.dirpath={workdir}/checkpoints",
        "--checkpoint.every_n_train_steps=1", "--checkpoint.save_top_k=-1", "--checkpoint.monitor=null",
        "--checkpoint.filename=step{step:03d}", "--checkpoint.save_last=false", "--seed_everything=3",
    ]  # fmt: skip


def checkpoints(workdir) -> dict[int, str]:
    """The step checkpoints of a run, by step."""
    paths = glob.glob(os.path.join(workdir, "checkpoints", "step*.ckpt"))
    return {int(re.search(r"step(\d+)\.ckpt$", path).group(1)): path for path in paths}


def differences(expected, actual, where: str = "") -> list[str]:
    """Where two checkpoint contents differ (tensors by ``torch.equal``)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        return [d for key in expected.keys() | actual.keys()
                for d in differences(expected.get(key), actual.get(key), f"{where}/{key}")]  # fmt: skip
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)) and len(expected) == len(actual):
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{where}[{i}]")]
    if torch.is_tensor(expected) and torch.is_tensor(actual):
        return [] if torch.equal(expected, actual) else [where]
    return [] if type(expected) is type(actual) and expected == actual else [where]


def assert_same_checkpoints(reference, workdir, note: str) -> None:
    """Every step checkpoint in ``workdir`` is the reference run's of that step, but for where it was written."""
    expected = checkpoints(reference)
    for step, path in sorted(checkpoints(workdir).items()):
        ours, theirs = torch.load(path, weights_only=False), torch.load(expected[step], weights_only=False)
        ours.pop("callbacks"), theirs.pop("callbacks")  # the checkpoint callback's state: directories
        for loops in (ours["loops"]["fit_loop"], theirs["loops"]["fit_loop"]):
            # counts the batches of the last validation run in this process (none yet after a resume from the
            # end of an epoch); reset when the next validation starts
            loops.pop("epoch_loop.val_loop.batch_progress")
        differing = differences(theirs, ours)
        assert not differing, f"{note}: the checkpoint of step {step} differs in {differing[:5]}"


def assert_resumes_exactly(config: str, data: list[str], tmp_path, reference, kill_seed: int) -> None:
    kills = sorted(random.Random(kill_seed).sample(KILLABLE, 3))
    workdir = tmp_path / "killed"
    args = fit_args(config, workdir, data)
    for kill in kills:
        assert run(args, kill_at=kill) == -signal.SIGKILL, f"the run was not killed at step {kill}"
        args = fit_args(config, workdir, data) + [f"--ckpt_path={checkpoints(workdir)[kill - 1]}"]
    assert run(args, weights=str(workdir / "final.pt")) == 0
    expected, actual = torch.load(reference / "final.pt"), torch.load(workdir / "final.pt")
    differing = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not differing, f"killed at steps {kills} and resumed: {len(differing)} tensors differ, e.g. {differing[:3]}"
    assert_same_checkpoints(reference, workdir, f"killed at steps {kills} and resumed")


def reference_run(config: str, data: list[str], workdir):
    assert run(fit_args(config, workdir, data), weights=str(workdir / "final.pt")) == 0
    assert sorted(checkpoints(workdir)) == list(range(1, STEPS + 1))
    return workdir


@pytest.fixture(scope="module")
def cifar_data(tiny_cifar10) -> list[str]:
    return [f"--data.root={tiny_cifar10}", "--data.download=false", "--data.batch_size=4", "--data.num_workers=0",
            "--model.init_args.student=resnet8"]  # fmt: skip


@pytest.fixture(scope="module")
def cifar_reference(cifar_data, tmp_path_factory):
    """The uninterrupted CIFAR-10 run: tensor-resident batches (the default where the data fits), no workers."""
    with pytest.MonkeyPatch.context() as monkeypatch:  # set up before the function-scoped autouse fixture
        disable_cifar_checksums(monkeypatch)
        return reference_run(CIFAR_CONFIG, cifar_data, tmp_path_factory.mktemp("cifar_reference"))


def test_cifar_tensor_resident_run_killed_anywhere_resumes_exactly(cifar_data, cifar_reference, tmp_path):
    assert_resumes_exactly(CIFAR_CONFIG, cifar_data, tmp_path, cifar_reference, kill_seed=0)


def test_folder_per_sample_paired_run_with_workers_killed_anywhere_resumes_exactly(tiny_folder, tmp_path):
    """ImageFolder config of CS-KD: class-paired batches, per-sample augmentation in two persistent workers."""
    data = [f"--data.root={tiny_folder}", "--data.batch_size=2", "--data.num_workers=2", "--data.tensor_resident=false"]
    reference = reference_run(FOLDER_CSKD_CONFIG, data, tmp_path / "reference")
    assert_resumes_exactly(FOLDER_CSKD_CONFIG, data, tmp_path, reference, kill_seed=1)


def test_resuming_after_an_epochs_last_batch_checkpoint_keeps_the_loop_state(cifar_data, cifar_reference, tmp_path):
    newest = max(step for step in checkpoints(cifar_reference) if step <= STEPS_PER_EPOCH)
    args = fit_args(CIFAR_CONFIG, tmp_path, cifar_data) + [f"--ckpt_path={checkpoints(cifar_reference)[newest]}"]
    assert run(args, kill_at=STEPS_PER_EPOCH + 3) == -signal.SIGKILL
    assert_same_checkpoints(cifar_reference, tmp_path, f"resumed from the checkpoint of step {newest}")


# --------------------------------------------------------------------------- the parts
def finished(data, loader) -> list[torch.Tensor]:
    """The augmented training batches of ``loader``, finished as in training."""
    return [data.transform_batch(data.on_before_batch_transfer(batch, 0), augment=True)[0] for batch in loader]


@pytest.mark.parametrize(
    "resident, paired, ranks",
    [(True, False, 1), (True, True, 2), (False, False, 2), (False, True, 1)],
    ids=["tensor-resident", "tensor-resident, paired, rank 1 of 2", "per-sample, rank 1 of 2", "per-sample, paired"],
)
def test_the_training_loader_resumes_its_epoch_where_it_stopped(tiny_cifar10, resident, paired, ranks):
    """Per-sample loaders use two workers; ranks as Lightning's DDP makes their loaders."""
    data = CIFAR10DataModule(tiny_cifar10, download=False, batch_size=4, num_workers=0 if resident else 2,
                             tensor_resident=resident, paired_batches=paired, seed=3)  # fmt: skip
    data.setup("fit")

    def loader(epoch):
        made = data.train_dataloader() if ranks == 1 else rank_loader(data, 1, epoch)
        made.batch_sampler.sampler.set_epoch(epoch)
        return made

    whole = finished(data, loader(1))
    stopped = loader(1)
    for _ in itertools.islice(stopped, 3):
        pass
    state = stopped.state_dict()
    assert state == {"epoch": 1, "batches": 3}
    resumed = loader(0)
    resumed.load_state_dict(state)
    batches = iter(resumed)  # made before the epoch is set, as Lightning does on resume
    resumed.batch_sampler.sampler.set_epoch(1)
    rest = finished(data, batches)
    assert len(rest) == len(whole) - 3 and all(torch.equal(a, b) for a, b in zip(rest, whole[3:]))
    assert resumed.state_dict() == {"epoch": 1, "batches": len(whole)}
    other_epoch = loader(2)
    other_epoch.load_state_dict(state)  # a checkpoint of epoch 1 does not shorten epoch 2
    assert len(finished(data, other_epoch)) == len(whole)


def test_a_resumed_fit_keeps_the_data_seed_of_its_checkpoint(tiny_cifar10, tmp_path, monkeypatch):
    def fit(seed, ckpt_path=None) -> Recorder:
        data = CIFAR10DataModule(tiny_cifar10, download=False, batch_size=4, num_workers=0, seed=seed)
        every_step = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=1, save_top_k=-1)
        trainer = pl.Trainer(max_steps=2, limit_val_batches=0, accelerator="cpu", devices=1, logger=False,
                             callbacks=[every_step], enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path)  # fmt: skip
        trainer.fit(module := Recorder(), datamodule=data, ckpt_path=ckpt_path)
        return module

    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    straight = fit(None)  # data seed 3, the run's
    refused = "trained with the data seed 3, this run has 4: run it with --data.init_args.seed 3"
    with pytest.raises(ValueError, match=refused):
        fit(4, tmp_path / "step=1.ckpt")
    monkeypatch.setenv("PL_GLOBAL_SEED", "4")  # the CLI draws a new run seed at every start unless one is set
    resumed = fit(None, tmp_path / "step=1.ckpt")
    assert resumed.trainer.datamodule.seed == 3
    assert all(torch.equal(a, b) for a, b in zip(resumed.batches[-1], straight.batches[-1]))
