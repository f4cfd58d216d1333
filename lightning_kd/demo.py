"""``lightning-kd demo``: distillation end to end on one short schedule, ending with a comparison.

Trains a teacher with :class:`~lightning_kd.methods.Baseline`, then the same student twice — alone and
with Hinton KD from that teacher — and prints their validation accuracies. CIFAR-10 is downloaded by
default; ``--root`` points it at any ImageFolder tree instead (no network needed).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import pytorch_lightning as pl
import torch

from lightning_kd.core import RunCheckpoint
from lightning_kd.data import CIFAR10DataModule, ImageFolderDataModule
from lightning_kd.methods import KD, Baseline


def _fit(module: pl.LightningModule, data: pl.LightningDataModule, epochs: int, workdir: str, limit: float) -> tuple[str, float]:
    # A demo starts over: a new demo replaces the checkpoints of the previous one.
    checkpoint = RunCheckpoint(dirpath=os.path.join(workdir, "checkpoints"), save_last=True, overwrite=True)
    trainer = pl.Trainer(
        max_epochs=epochs, default_root_dir=workdir, callbacks=[checkpoint], limit_train_batches=limit,
        logger=pl.loggers.CSVLogger(workdir, name=""), enable_model_summary=False,
    )
    trainer.fit(module, data)
    return checkpoint.last_model_path, trainer.callback_metrics["val/acc1"].item()


def run_demo(
    root: Optional[str] = None,
    teacher: str = "resnet20",
    student: str = "resnet8",
    epochs: int = 15,
    batch_size: int = 128,
    lr: float = 0.1,
    train_fraction: float = 1.0,
    num_workers: int = 4,
    workdir: str = "runs/demo",
    seed: int = 0,
) -> dict[str, float]:
    """Teacher, student alone, student with KD on one schedule; returns and prints validation top-1.

    Args:
        root: an ImageFolder root (``train/`` + ``val/`` or ``test/``); default: CIFAR-10, downloaded to ``data/``.
        teacher: teacher architecture (any lightning_kd model name).
        student: student architecture.
        epochs: epochs for each of the three runs (SGD with cosine decay).
        batch_size: batch size.
        lr: initial learning rate.
        train_fraction: fraction of the training batches used per epoch (for a quicker look).
        num_workers: data-loading workers.
        workdir: where checkpoints and CSV logs go.
        seed: seed of all three runs.
    """
    data_args = {"batch_size": batch_size, "num_workers": num_workers, "seed": seed}
    data = ImageFolderDataModule(root, **data_args) if root else CIFAR10DataModule("data", **data_args)
    optimizer = functools.partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)
    common = {"num_classes": data.num_classes, "optimizer": optimizer, "lr_scheduler": schedule}

    results = {}
    pl.seed_everything(seed)
    teacher_ckpt, results[f"teacher {teacher}"] = _fit(
        Baseline(student=teacher, **common), data, epochs, os.path.join(workdir, "teacher"), train_fraction
    )
    pl.seed_everything(seed)
    _, results[f"{student} alone"] = _fit(
        Baseline(student=student, **common), data, epochs, os.path.join(workdir, "student"), train_fraction
    )
    pl.seed_everything(seed)
    _, results[f"{student} + KD"] = _fit(
        KD(student=student, teacher=teacher, teacher_ckpt=teacher_ckpt, **common),
        data, epochs, os.path.join(workdir, "kd"), train_fraction,
    )
    print(f"\nValidation top-1 after {epochs} epochs each:")
    for name, accuracy in results.items():
        print(f"  {name:<24} {100 * accuracy:6.2f}%")
    return results


def demo_cli(argv: list[str]) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="lightning-kd demo", description=run_demo.__doc__)
    parser.add_function_arguments(run_demo, as_positional=False)
    run_demo(**parser.parse_args(argv).as_dict())
