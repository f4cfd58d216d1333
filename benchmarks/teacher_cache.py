"""Teacher paid once per sweep (issue 22): three KD students (T = 2, 4, 8) over one teacher with the teacher-output
cache, against the same three runs without it, and the cost of a KD step served from the cache against a Baseline step.

    python benchmarks/teacher_cache.py [--data ROOT [--train_subset FILE] | --per_class 100] [--epochs 2]
        [--batch_size 64] [--teacher resnet20] [--student resnet8] [--teacher_ckpt FILE] [--threads 1] [--rounds 3]
        [--output FILE]

Every run is ``lightning-kd fit`` in this process (``cli_main``) on the shipped configs ``configs/folder/kd/
resnet20-resnet8.yaml`` and ``configs/folder/baseline/resnet20.yaml``, tensor-resident, with no validation (only the
training steps the cache serves are timed) and no logger. Without ``--data`` a generated ImageFolder tree of 10
classes x ``--per_class`` images of 32x32 is used. The teacher is ``--teacher_ckpt`` or a randomly initialised
``--teacher`` (a step's cost does not depend on the weights). Runs, in order: the Baseline student; then for T = 2, 4,
8, KD without the cache and KD with one fresh cache (at T = 2 it fills the cache, at T = 4 and 8 it reads it),
interleaved so that a change in the machine's load hits both sides alike. Per run: wall and CPU seconds (of this
process) of the whole ``cli_main`` call, the teacher's forwards (``teacher/images``), the images served from the cache
and the median seconds of a training step (from one step's end to the next, the data's lookup and augmentation
included; each epoch's first step left out), in wall and in CPU seconds of this process. Then ``--rounds`` rounds of a
Baseline run and a KD run read from the cache, back to back, give the cost of a cached KD step against a Baseline step
on a loaded machine (the median of the rounds' ratios, of wall and of CPU seconds).
Prints one JSON record and writes it to ``--output`` (default
``benchmarks/results/teacher_cache_<date>.json``).
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout

import numpy as np
import pytorch_lightning as pl
import torch

from lightning_kd.cli import cli_main
from lightning_kd.data import ImageFolderDataModule
from lightning_kd.models import get_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KD_CONFIG = os.path.join(REPO, "configs", "folder", "kd", "resnet20-resnet8.yaml")
BASELINE_CONFIG = os.path.join(REPO, "configs", "folder", "baseline", "resnet20.yaml")
TEMPERATURES = (2.0, 4.0, 8.0)


class StepTimer(pl.Callback):
    """Wall and CPU seconds (of this process: on a loaded machine the CPU seconds are the steadier measure of the work
    a step does) from one training step's end to the next one's, within an epoch (its first step left out)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._last = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = (time.perf_counter(), time.process_time())
        if self._last is not None:
            self.seconds.append(now[0] - self._last[0])
            self.cpu_seconds.append(now[1] - self._last[1])
        self._last = now


def generated_folder(directory: str, classes: int = 10, per_class: int = 100, size: int = 32) -> str:
    """An ImageFolder tree (``train/`` and ``test/``) of noisy single-colour PNG images, one colour per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = rng.integers(30, 226, size=(classes, 3))
    for split, count in (("train", per_class), ("test", 10)):
        for c in range(classes):
            folder = os.path.join(directory, split, f"class_{c:02d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = np.clip(colours[c] + rng.normal(0, 16, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.png"))
    return directory


def fit(config: str, overrides: list[str], workdir: str) -> dict:
    """One ``lightning-kd fit`` run: its wall seconds, teacher forwards, images from the cache and step seconds."""
    timer = StepTimer()
    args = [f"--config={config}", *overrides, "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
            f"--trainer.default_root_dir={workdir}", f"--checkpoint.dirpath={workdir}/checkpoints"]
    start, start_cpu = time.perf_counter(), time.process_time()
    with redirect_stdout(io.StringIO()):
        cli = cli_main(args, run=False)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    metrics = cli.trainer.callback_metrics
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "teacher_images": int(metrics["teacher/images"]) if "teacher/images" in metrics else None,
        "images_from_cache": int(metrics.get("teacher/images_from_cache", 0)),
        "steps_timed": len(timer.seconds),
        "step_ms_median": round(1000 * statistics.median(timer.seconds), 2),
        "step_cpu_ms_median": round(1000 * statistics.median(timer.cpu_seconds), 2),
    }


def data_overrides(args: argparse.Namespace, root: str, workdir: str) -> list[str]:
    """The data and schedule of every run: tensor-resident, decoded once into ``workdir``'s decode cache."""
    data = [f"--data.root={root}", f"--data.batch_size={args.batch_size}", "--data.num_workers=0",
            "--data.tensor_resident=true", f"--data.decode_cache={workdir}/decoded",
            f"--trainer.max_epochs={args.epochs}"]
    return data + ([f"--data.train_subset={args.train_subset}"] if args.train_subset else [])


def sweep(args: argparse.Namespace, root: str, teacher_ckpt: str, workdir: str) -> dict[str, dict]:
    """The seven runs: Baseline, KD without the cache at each temperature, KD with one cache at each temperature."""
    data = data_overrides(args, root, workdir)
    students = [f"--model.init_args.student={args.student}"]
    kd = [*students, f"--model.init_args.teacher={args.teacher}", f"--model.init_args.teacher_ckpt={teacher_ckpt}",
          "--model.init_args.kd_diagnostics=false"]
    runs = {"baseline": fit(BASELINE_CONFIG, [*data, *students], f"{workdir}/baseline")}
    cache = [f"--model.init_args.teacher_cache={workdir}/teacher_cache"]
    for temperature in TEMPERATURES:  # interleaved, so that a change in the machine's load hits both sides alike
        for name, extra in ((f"kd_T{temperature:g}_uncached", []), (f"kd_T{temperature:g}_cached", cache)):
            overrides = [*data, *kd, *extra, f"--model.init_args.temperature={temperature}"]
            runs[name] = fit(KD_CONFIG, overrides, f"{workdir}/{name}")
    return runs


def paired_rounds(args: argparse.Namespace, root: str, teacher_ckpt: str, workdir: str) -> list[dict]:
    """``--rounds`` rounds of a Baseline run then a KD run (T = 4) read from the cache the sweep filled: the ratio of
    their median step seconds, each round's two runs back to back so that the machine's load slows them alike."""
    data = data_overrides(args, root, workdir)
    student = f"--model.init_args.student={args.student}"
    kd = [student, f"--model.init_args.teacher={args.teacher}", f"--model.init_args.teacher_ckpt={teacher_ckpt}",
          "--model.init_args.kd_diagnostics=false", f"--model.init_args.teacher_cache={workdir}/teacher_cache"]
    rounds = []
    for number in range(args.rounds):
        baseline = fit(BASELINE_CONFIG, [*data, student], f"{workdir}/round{number}_baseline")
        cached = fit(KD_CONFIG, [*data, *kd], f"{workdir}/round{number}_kd_cached")
        if cached["teacher_images"] != 0:
            raise RuntimeError(f"the paired KD run of round {number} ran the teacher: the cache did not serve it")
        rounds.append({
            "baseline_step_ms": baseline["step_ms_median"], "cached_kd_step_ms": cached["step_ms_median"],
            "ratio": round(cached["step_ms_median"] / baseline["step_ms_median"], 3),
            "baseline_step_cpu_ms": baseline["step_cpu_ms_median"],
            "cached_kd_step_cpu_ms": cached["step_cpu_ms_median"],
            "cpu_ratio": round(cached["step_cpu_ms_median"] / baseline["step_cpu_ms_median"], 3),
        })
    return rounds


def summary(runs: dict[str, dict], rounds: list[dict]) -> dict:
    uncached = [runs[f"kd_T{t:g}_uncached"] for t in TEMPERATURES]
    cached = [runs[f"kd_T{t:g}_cached"] for t in TEMPERATURES]
    baseline_step = runs["baseline"]["step_ms_median"]
    read_steps = [run["step_ms_median"] for run in cached[1:]]
    return {
        "uncached_wall_s": round(sum(run["wall_s"] for run in uncached), 2),
        "cached_wall_s": round(sum(run["wall_s"] for run in cached), 2),
        "uncached_cpu_s": round(sum(run["cpu_s"] for run in uncached), 2),
        "cached_cpu_s": round(sum(run["cpu_s"] for run in cached), 2),
        "teacher_images_uncached": sum(run["teacher_images"] for run in uncached),
        "teacher_images_cached": sum(run["teacher_images"] for run in cached),
        "uncached_kd_step_vs_baseline": round(statistics.median(run["step_ms_median"] for run in uncached)
                                              / baseline_step, 3),
        "cached_read_kd_step_vs_baseline_in_sweep": round(statistics.median(read_steps) / baseline_step, 3),
        "cached_read_kd_step_vs_baseline_paired_median": statistics.median(r["ratio"] for r in rounds),
        "cached_read_kd_step_cpu_vs_baseline_paired_median": statistics.median(r["cpu_ratio"] for r in rounds),
        "target_cached_read_kd_step_vs_baseline": 1.05,
    }


def setting(args: argparse.Namespace) -> dict:
    """What was measured, where: the date, the machine and its load, the data, the networks and the schedule."""
    return {
        "date": str(datetime.date.today()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch "
                   f"thread(s), load average {os.getloadavg()[0]:.2f} at the end",
        "data": args.data or f"generated: 10 classes x {args.per_class} images, 32x32",
        "train_subset": args.train_subset,
        "teacher": f"{args.teacher} ({args.teacher_ckpt or 'random initialisation'})",
        "student": args.student,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="an ImageFolder root (train/ and test/ or val/); default: generated images")
    parser.add_argument("--per_class", type=int, default=100, help="images per class of the generated data")
    parser.add_argument("--train_subset", help="the training images to use, one path relative to train/ a line")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--teacher_ckpt", help="the teacher's weights; default: a randomly initialised --teacher")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rounds", type=int, default=3, help="paired Baseline / cached KD rounds for the step cost")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results",
                                                         f"teacher_cache_{datetime.date.today()}.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        root = args.data or generated_folder(os.path.join(workdir, "images"), per_class=args.per_class)
        teacher_ckpt = args.teacher_ckpt
        if teacher_ckpt is None:
            teacher_ckpt = os.path.join(workdir, "teacher.pt")
            classes = len(os.listdir(os.path.join(root, "train")))
            torch.manual_seed(0)
            torch.save(get_model(args.teacher, num_classes=classes).state_dict(), teacher_ckpt)
        # Decode the splits once (into the decode cache every run then loads), so that no timed run pays it.
        ImageFolderDataModule(root, num_workers=0, tensor_resident=True, decode_cache=f"{workdir}/decoded",
                              train_subset=args.train_subset).setup("fit")
        runs = sweep(args, root, teacher_ckpt, workdir)
        rounds = paired_rounds(args, root, teacher_ckpt, workdir)
    command = "python benchmarks/teacher_cache.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"benchmark": "teacher_cache", "command": command,
              **setting(args), "runs": runs, "paired_rounds": rounds, "summary": summary(runs, rounds)}
    text = json.dumps(record, indent=1)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        file.write(text + "\n")
    return record


if __name__ == "__main__":
    main()
