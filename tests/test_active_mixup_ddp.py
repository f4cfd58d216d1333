"""Active Mixup under 2-process DDP on the CPU: the query budget is global and the recorded count is the calls made."""
from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys
import textwrap

import torch

from conftest import REPO, data_args, trainer_args

CONFIG = os.path.join(REPO, "configs", "folder", "active_mixup", "resnet20-resnet8.yaml")
COUNTING_TEACHER = '''
import os

from torch import nn

from lightning_kd.core import BlackBoxTeacher


class CountingBlackBox(BlackBoxTeacher):
    """A black-box teacher that appends the number of images of every query to a file shared by all processes."""

    def __init__(self, log: str, budget: int, num_classes: int = 4):
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes)), budget=budget)
        self.log = log

    def forward(self, x):
        with open(self.log, "a") as handle:
            handle.write(f"{os.getpid()} {len(x)}\\n")
        return super().forward(x)
'''


def ddp_fit(root, workdir, *extra, processes=2, env=None):
    """``lightning-kd fit`` of the folder Active Mixup config on tiny data (a pool of 8 images, one round of 4
    queries after round 0, an epoch a round, 2 steps an epoch), under DDP on ``processes`` CPU processes."""
    command = [
        sys.executable, "-m", "lightning_kd.cli", "fit", f"--config={CONFIG}",
        *data_args(root, batch_size=4, download=None, prefix="data.source"), *trainer_args(workdir, steps=2),
        "--data.pool_size=8", "--model.init_args.teacher_ckpt=null", "--model.init_args.rounds=1",
        "--model.init_args.queries_per_round=4", "--model.init_args.epochs_per_round=1",
        "--trainer.strategy=ddp", f"--trainer.devices={processes}", *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Starting with {processes} processes" in result.stderr + result.stdout
    return torch.load(workdir / "checkpoints" / "last.ckpt", weights_only=False)


def test_two_process_ddp_asks_the_teacher_once_per_image_and_records_every_call(tiny_folder, tmp_path):
    (tmp_path / "counting_teacher.py").write_text(textwrap.dedent(COUNTING_TEACHER))
    log = tmp_path / "teacher_calls.txt"
    planned = 8 + 4  # the pool, then one round
    init_args = f'{{"log": "{log}", "budget": {planned}}}'
    teacher = f'{{"class_path": "counting_teacher.CountingBlackBox", "init_args": {init_args}}}'
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    checkpoint = ddp_fit(
        tiny_folder, tmp_path, f"--model.init_args.teacher={teacher}", "--model.init_args.query_budget=null",
        "--trainer.max_epochs=2", env=env,
    )
    calls = sum(int(line.split()[1]) for line in log.read_text().splitlines())
    recorded = checkpoint["state_dict"]["teacher._extra_state"]["images"]  # the black box's meter
    labelled = len(checkpoint["QueryPoolDataModule"]["targets"])
    assert calls == recorded == labelled == planned  # one query per labelled image, across both processes
    assert checkpoint["teacher_cost"]["images"] == planned


def test_two_process_ddp_resume_counts_the_teachers_images_once(tiny_folder, tmp_path):
    """Round 0 in a first run (one process), round 1 when the run resumes on two: the logged teacher/images (summed
    over the processes) and the query axis of the accuracy are every image asked about, once."""
    ddp_fit(tiny_folder, tmp_path, "--model.init_args.query_budget=12", "--trainer.max_epochs=1", processes=1)
    checkpoint = ddp_fit(
        tiny_folder, tmp_path, "--model.init_args.query_budget=12", "--trainer.max_epochs=2",
        f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", "--trainer.logger=CSVLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    )
    assert checkpoint["state_dict"]["teacher._extra_state"]["images"] == 12
    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / "lightning_logs" / "*" / "metrics.csv"))[0])))
    assert [float(row["teacher/images"]) for row in rows if row.get("teacher/images")] == [12.0]
    # accuracy against every query made: the meters of both processes summed (the second one asked nothing)
    assert [int(row["step"]) for row in rows if row.get("active_mixup/val_acc1")] == [12]
