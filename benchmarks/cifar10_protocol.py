"""Every method of lightning_kd on real data: one teacher, one student, one schedule, results in a JSON file.

    python benchmarks/cifar10_protocol.py --root /path/to/cifar10-jpeg            # the whole CPU protocol
    python benchmarks/cifar10_protocol.py --root ... --only teacher kd-s0          # some runs, by name
    python benchmarks/cifar10_protocol.py --root ... --methods baseline kd --seeds 0 1 2 3
    python benchmarks/cifar10_protocol.py --root ... --dry_run                     # status and commands only
    python benchmarks/cifar10_protocol.py --profile gpu-cifar100 --root data --dry_run

Profiles:

* ``cpu-cifar10`` (default): CIFAR-10 as an ImageFolder tree (``train/`` + ``test/``). The teacher, resnet20, is
  trained once with Baseline for ``--teacher_epochs``; then every method trains resnet8 for ``--epochs`` on the
  configs under ``configs/folder/`` (SGD 0.1, Nesterov, cosine, batch ``--batch_size``): Baseline, KD, label
  smoothing, Tf-KD self (its teacher: the Baseline resnet8 of the same seed) and reg, AT, SP, FSP (one extra epoch
  of its FSP-only first stage, the cosine restarting after it), CS-KD, BYOT, MSD, DML (two resnet8), UNIX KD, and
  Active Mixup on its own axis (a pool of ``--am_pool`` images, ``--am_rounds`` rounds of ``--am_queries`` queries,
  ``--am_epochs_per_round`` epochs each). Baseline and KD run with seeds 0, 1 and 2, the rest with seed 0.
  Ablations (``CPU_ABLATIONS``, e.g. ``byot_exit_ce-s0``: BYOT's exits on the labels alone) run only when named
  by ``--only`` or ``--methods``.
* ``cpu-cifar10-scarce``: where the papers' claims live, the student overfitting: a class-balanced subset of
  CIFAR-10's training images (``--per_class`` of each class, drawn with ``--subset_seed``; the list of file names is
  shipped in ``benchmarks/subsets/`` and written there from ``--root`` when missing), ``--epochs`` (100) epochs,
  validation every ``--val_every`` (5) epochs for the curves. resnet20 alone on the subset (seed 0) is the teacher;
  resnet8 students for every method but BYOT and MSD, whose students are resnet20 (their exits need stages of more
  than one block). Every seed method runs with seeds 0, 1 and 2, each against its paper's control (``control`` in the
  record): the student alone (Baseline of the same network), KD for UNIX KD, and Active Mixup's query budget spent
  on random mixes (``active_mixup_random``) for Active Mixup, whose pool is the subset itself. Diagnosis grids
  (``SCARCE_GRIDS``, e.g. ``at_beta100-s0``: AT with beta = 100) change one hyper-parameter of a method's config and
  run only when named by ``--only`` or ``--methods``, at seed 0 unless ``--seeds`` says otherwise.
* ``gpu-cifar100``: the full CIFAR-100 reference recipe of ``configs/cifar100/`` (240 epochs; RepDistiller's five
  pairs: teachers, students alone, KD, AT, SP, FSP, UNIX; and the configs of the other methods), schedules as the
  configs set them. Not sized for a CPU.

Every run is ``lightning-kd fit`` (LightningCLI, run in this process) on a shipped config plus command-line
overrides: the data root, seed, schedule, where the run writes (``<workdir>/<run name>``) and a CSV logger. A
finished run is recorded at once in ``--results`` (one record per run, in the protocol's order: method, seed,
student, teacher, final ``val/acc1``, final training and validation losses and their curves, epochs, train fraction, teacher images and forward FLOPs, wall and CPU
time, the exact commands) and is skipped later; an unfinished one resumes from its ``last.ckpt`` (``--ckpt_path``). Runs
start in the protocol's order (teachers, every method at the first seed, then the other seeds); a run whose teacher
has not finished waits for a later call. Commands are run from the repository root.

Several sittings may run at once (one per core, each with its own ``--only``) and share one results file: a record is
added under a file lock, re-reading what the others wrote. A finished run whose checkpoint is gone (another machine,
a clean-up) and that a selected run still needs as its teacher is trained again with the same command; its earlier
figures stay in its record under ``previous``, so a retrain shows whether it reproduced them.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import fcntl
import glob
import json
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
import unittest.mock
from typing import Callable, Optional

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE_SEEDS = (0, 1, 2)  # seeds of the methods whose run-to-run noise the table measures
NOISE_METHODS = ("baseline", "kd")
RETRAINING = "retraining"  # marker in the folder of a finished run being trained again (its checkpoint was lost)


@dataclasses.dataclass
class Run:
    """One ``lightning-kd fit``: a config, a seed, a schedule, and the run whose last checkpoint is its teacher."""

    name: str
    method: str
    label: str
    config: str
    seed: int
    epochs: int
    teacher_run: Optional[str] = None
    overrides: list[str] = dataclasses.field(default_factory=list)
    on_request: bool = False  # an ablation: runs only when named by --only or --methods, never by default
    control: Optional[str] = None  # the method this one's claim is measured against (cpu-cifar10-scarce)
    grid: Optional[dict] = None  # a diagnosis grid's point: the method, its changed arguments and their config values

    def model_init(self) -> dict:
        """The config's model arguments, with this run's overrides of them (``--model.init_args.<name> <value>``,
        the last one winning, as on the command line)."""
        init = dict(read_yaml(self.config)["model"]["init_args"])
        prefix = "--model.init_args."
        for flag, value in zip(self.overrides, self.overrides[1:]):
            if flag.startswith(prefix) and "." not in flag[len(prefix):]:
                init[flag[len(prefix):]] = yaml.safe_load(value)
        return init

    @property
    def data_prefix(self) -> str:
        """``data``, or ``data.source`` for a data module built on another (Active Mixup's pool)."""
        return "data.source" if "source" in read_yaml(self.config)["data"].get("init_args", {}) else "data"


def read_yaml(path: str) -> dict:
    with open(os.path.join(REPO, path)) as file:
        return yaml.safe_load(file)


def seeds_of(method: str, seeds: Optional[list[int]]) -> tuple[int, ...]:
    """The seeds a method runs with: ``--seeds`` if given, else three for Baseline and KD and one for the others."""
    if seeds is not None:
        return tuple(seeds)
    return NOISE_SEEDS if method in NOISE_METHODS else NOISE_SEEDS[:1]


def in_protocol_order(teachers: list[Run], methods: list[tuple[str, Callable[[int], list[Run]]]], seeds) -> list[Run]:
    """Teachers first, then every method at its first seed, then the further seeds, methods in table order.

    ``methods`` pairs each method with the function giving its runs at a seed.
    """
    runs = list(teachers)
    per_method = {method: seeds_of(method, seeds) for method, _ in methods}
    for position in range(max(len(s) for s in per_method.values())):
        for method, runs_at in methods:
            if position < len(per_method[method]):
                runs += runs_at(per_method[method][position])
    return runs


# --- cpu-cifar10 --------------------------------------------------------------------------------------------------
CPU_TEACHER = "teacher"

# method -> (table label, config, teacher run: a run name, formatted with the seed)
CPU_METHODS = {
    "baseline": ("Baseline", "configs/folder/baseline/resnet8.yaml", None),
    "kd": ("KD", "configs/folder/kd/resnet20-resnet8.yaml", CPU_TEACHER),
    "lsr": ("Label smoothing", "configs/folder/lsr/resnet8.yaml", None),
    "tfkd_self": ("Tf-KD self", "configs/folder/tfkd_self/resnet8-resnet8.yaml", "baseline-s{seed}"),
    "tfkd_reg": ("Tf-KD reg", "configs/folder/tfkd_reg/resnet8.yaml", None),
    "at": ("AT", "configs/folder/at/resnet20-resnet8.yaml", CPU_TEACHER),
    "sp": ("SP", "configs/folder/sp/resnet20-resnet8.yaml", CPU_TEACHER),
    "fsp": ("FSP", "configs/folder/fsp/resnet20-resnet8.yaml", CPU_TEACHER),
    "dkd": ("DKD", "configs/folder/dkd/resnet20-resnet8.yaml", CPU_TEACHER),
    "dist": ("DIST", "configs/folder/dist/resnet20-resnet8.yaml", CPU_TEACHER),
    "lsd": ("KD + logit standardization", "configs/folder/lsd/resnet20-resnet8.yaml", CPU_TEACHER),
    "fitnet": ("FitNet", "configs/folder/fitnet/resnet20-resnet8.yaml", CPU_TEACHER),
    "nst": ("NST", "configs/folder/nst/resnet20-resnet8.yaml", CPU_TEACHER),
    "pkt": ("PKT", "configs/folder/pkt/resnet20-resnet8.yaml", CPU_TEACHER),
    "rkd": ("RKD", "configs/folder/rkd/resnet20-resnet8.yaml", CPU_TEACHER),
    "cc": ("CC", "configs/folder/cc/resnet20-resnet8.yaml", CPU_TEACHER),
    "ft": ("FT", "configs/folder/ft/resnet20-resnet8.yaml", CPU_TEACHER),
    "crd": ("CRD", "configs/folder/crd/resnet20-resnet8.yaml", CPU_TEACHER),
    "ab": ("AB", "configs/folder/ab/resnet20-resnet8.yaml", CPU_TEACHER),
    "vid": ("VID", "configs/folder/vid/resnet20-resnet8.yaml", CPU_TEACHER),
    "ofd": ("OFD", "configs/folder/ofd/resnet20-resnet8.yaml", CPU_TEACHER),
    "reviewkd": ("ReviewKD", "configs/folder/reviewkd/resnet20-resnet8.yaml", CPU_TEACHER),
    "cskd": ("CS-KD", "configs/folder/cskd/resnet8.yaml", None),
    "byot": ("BYOT", "configs/folder/byot/resnet8.yaml", None),
    "msd": ("MSD", "configs/folder/msd/resnet8.yaml", None),
    "dml": ("DML", "configs/folder/dml/resnet8-resnet8.yaml", None),
    "unix": ("UNIX KD", "configs/folder/unix/resnet20-resnet8.yaml", CPU_TEACHER),
    "active_mixup": ("Active Mixup", "configs/folder/active_mixup/resnet20-resnet8.yaml", CPU_TEACHER),
}

# ablations, run only on request: method -> (table label, config, teacher run, extra overrides)
CPU_ABLATIONS = {
    # BYOT's exits trained on the labels alone: what the auxiliary heads cost the deepest exit without distillation
    "byot_exit_ce": ("BYOT exits, CE only (α=0, λ=0)", "configs/folder/byot/resnet8.yaml", None,
                     ["--model.init_args.ce_weight", "1", "--model.init_args.kd_weight", "0",
                      "--model.init_args.beta", "0"]),
}


# Methods whose loss ramps up over its first epochs: (the share of the schedule it takes, mdistiller's 20 of 240
# epochs; the fewest epochs it ever gets). The configs' warmup_epochs is sized for their own max_epochs, not for
# --epochs. DKD's floor is its folder config's 3 epochs: at 4 epochs with none (its share rounds to 0) resnet8 trained
# to 51.95 % against 75.87 % with 3 (2026-12-07, README), as its terms at full weight outweigh the cross-entropy 5-8x.
WARMUP = {"dkd": (20 / 240, 3), "reviewkd": (20 / 240, 0)}


def cosine_schedule(epochs: int) -> list[str]:
    return ["--trainer.max_epochs", str(epochs), "--model.init_args.lr_scheduler.init_args.T_max", str(epochs)]


def cpu_schedule(method: str, args) -> tuple[int, list[str]]:
    """Epochs of a student run and the overrides that set its schedule (and UNIX's k and b for the batch size)."""
    epochs = args.epochs
    first_stage = {"fsp": "stage1_epochs", "ft": "paraphrase_epochs", "ab": "stage1_epochs"}.get(method)
    if first_stage:  # one epoch of the first stage, then the others' schedule (restarted by the stage change)
        return epochs + 1, [
            "--trainer.max_epochs", str(epochs + 1), f"--model.init_args.{first_stage}", "1",
            "--model.init_args.lr_scheduler.init_args.T_max", str(epochs),
        ]
    if method == "active_mixup":
        per_round, rounds = args.am_epochs_per_round, args.am_rounds
        init = "--model.init_args."
        total = (rounds + 1) * per_round
        return total, [
            "--trainer.max_epochs", str(total), "--trainer.check_val_every_n_epoch", str(per_round),
            f"{init}rounds", str(rounds), f"{init}queries_per_round", str(args.am_queries),
            f"{init}candidates", str(args.am_candidates), f"{init}epochs_per_round", str(per_round),
            f"{init}query_budget", str(args.am_pool + rounds * args.am_queries),
            f"{init}lr_scheduler.init_args.T_0", str(per_round), "--data.pool_size", str(args.am_pool),
        ]
    if method == "unix":  # their k = 3/4 and b = 1/2 of the batch
        keep = ["--model.init_args.keep", str(3 * args.batch_size // 4), "--model.init_args.mix_center",
                str(args.batch_size // 2)]
        return epochs, cosine_schedule(epochs) + keep
    if method in WARMUP:  # the loss's warm-up keeps its share of the schedule, never fewer epochs than its floor
        share, floor = WARMUP[method]
        warmup = max(round(share * epochs), floor)
        return epochs, cosine_schedule(epochs) + ["--model.init_args.warmup_epochs", str(warmup)]
    return epochs, cosine_schedule(epochs)


def cpu_cifar10_runs(args) -> list[Run]:
    teacher = Run(CPU_TEACHER, "teacher", "Teacher", "configs/folder/baseline/resnet20.yaml", 0, args.teacher_epochs,
                  overrides=cosine_schedule(args.teacher_epochs))

    def run_at(method: str, seed: int) -> Run:
        label, config, teacher_run, *extra = CPU_METHODS.get(method) or CPU_ABLATIONS[method]
        epochs, overrides = cpu_schedule(method, args)
        return Run(f"{method}-s{seed}", method, label, config, seed, epochs,
                   teacher_run.format(seed=seed) if teacher_run else None, overrides + (extra[0] if extra else []),
                   on_request=method in CPU_ABLATIONS)

    methods = [(method, lambda seed, method=method: [run_at(method, seed)]) for method in CPU_METHODS]
    ablations = [run_at(method, seed) for method in CPU_ABLATIONS for seed in seeds_of(method, args.seeds)]
    return in_protocol_order([teacher], methods, args.seeds) + ablations


def cpu_cifar10_settings(args) -> dict:
    return {
        "profile": "cpu-cifar10", "teacher": "resnet20", "student": "resnet8", "teacher_epochs": args.teacher_epochs,
        "epochs": args.epochs, "train_fraction": args.train_fraction, "batch_size": args.batch_size,
        "optimizer": "SGD lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4, cosine",
        "active_mixup": {"pool": args.am_pool, "rounds": args.am_rounds, "queries_per_round": args.am_queries,
                         "candidates": args.am_candidates, "epochs_per_round": args.am_epochs_per_round},
    }


def cpu_cifar10_data(run: Run, args) -> list[str]:
    """Data overrides; the train fraction applies to every run but Active Mixup's, whose data is its queries."""
    prefix = run.data_prefix
    fraction = [] if run.method == "active_mixup" else ["--trainer.limit_train_batches", str(args.train_fraction)]
    return [f"--{prefix}.root", args.root, f"--{prefix}.batch_size", str(args.batch_size),
            f"--{prefix}.num_workers", str(args.num_workers), "--data.seed", str(run.seed), *fraction]


# --- cpu-cifar10-scarce -------------------------------------------------------------------------------------------
SCARCE_TEACHER = "baseline_r20-s0"  # resnet20 alone on the subset: the teacher, and BYOT's and MSD's control at seed 0
SUBSETS = os.path.join(REPO, "benchmarks", "subsets")

# method -> (table label, config, teacher run, control method, extra overrides)
SCARCE_METHODS = {
    "baseline_r20": ("Baseline", "configs/folder/baseline/resnet20.yaml", None, None, []),
    "baseline": ("Baseline", "configs/folder/baseline/resnet8.yaml", None, None, []),
    "kd": ("KD", "configs/folder/kd/resnet20-resnet8.yaml", SCARCE_TEACHER, "baseline", []),
    "lsr": ("Label smoothing", "configs/folder/lsr/resnet8.yaml", None, "baseline", []),
    "tfkd_self": ("Tf-KD self", "configs/folder/tfkd_self/resnet8-resnet8.yaml", "baseline-s{seed}", "baseline", []),
    "tfkd_reg": ("Tf-KD reg", "configs/folder/tfkd_reg/resnet8.yaml", None, "baseline", []),
    "at": ("AT", "configs/folder/at/resnet20-resnet8.yaml", SCARCE_TEACHER, "baseline", []),
    "sp": ("SP", "configs/folder/sp/resnet20-resnet8.yaml", SCARCE_TEACHER, "baseline", []),
    "fsp": ("FSP", "configs/folder/fsp/resnet20-resnet8.yaml", SCARCE_TEACHER, "baseline", []),
    "cskd": ("CS-KD", "configs/folder/cskd/resnet8.yaml", None, "baseline", []),
    "byot": ("BYOT", "configs/folder/byot/resnet8.yaml", None, "baseline_r20", ["--model.init_args.student", "resnet20"]),
    "msd": ("MSD", "configs/folder/msd/resnet8.yaml", None, "baseline_r20", ["--model.init_args.student", "resnet20"]),
    "dml": ("DML", "configs/folder/dml/resnet8-resnet8.yaml", None, "baseline", []),
    "unix": ("UNIX KD", "configs/folder/unix/resnet20-resnet8.yaml", SCARCE_TEACHER, "kd", []),
    "active_mixup": ("Active Mixup", "configs/folder/active_mixup/resnet20-resnet8.yaml", SCARCE_TEACHER,
                     "active_mixup_random", []),
    "active_mixup_random": ("Active Mixup's budget on random mixes", "configs/folder/active_mixup/resnet20-resnet8.yaml",
                            SCARCE_TEACHER, None, ["--model.init_args.selection", "random"]),
}


def subset_path(args) -> str:
    return os.path.join(SUBSETS, f"cifar10_train_{args.per_class}_per_class_seed{args.subset_seed}.txt")


def class_balanced_subset(train_dir: str, per_class: int, seed: int) -> list[str]:
    """``per_class`` images of each class folder of ``train_dir`` (paths relative to it), drawn with ``seed``
    from the sorted file names of that class: the same list on any machine holding the same tree."""
    names = []
    for label in sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir()):
        files = sorted(os.listdir(os.path.join(train_dir, label)))
        if len(files) < per_class:
            raise ValueError(f"{train_dir}/{label} has {len(files)} images, fewer than --per_class {per_class}")
        names += [f"{label}/{name}" for name in sorted(random.Random(f"{seed}-{label}").sample(files, per_class))]
    return names


def ensure_subset(args) -> str:
    """The shipped list of the subset's file names; written from ``--root`` when it is not there yet."""
    path = subset_path(args)
    if not os.path.isfile(path):
        names = class_balanced_subset(os.path.join(args.root, "train"), args.per_class, args.subset_seed)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as file:
            file.write(f"# CIFAR-10 training images, {args.per_class} per class, drawn with seed {args.subset_seed} "
                       "(benchmarks/cifar10_protocol.py class_balanced_subset)\n" + "\n".join(names) + "\n")
        log(f"wrote the subset's file list {os.path.relpath(path, REPO)} ({len(names)} images)")
    return os.path.relpath(path, REPO)  # commands name it as the configs, from the repository root


def scarce_schedule(method: str, args) -> tuple[int, list[str]]:
    """Epochs and schedule overrides of a run: ``cpu_schedule``'s, validating every ``--val_every`` epochs (FSP's
    first stage takes ``--val_every`` epochs so that the last epoch is validated), KD diagnostics off."""
    quiet = ["--model.init_args.kd_diagnostics", "false"]
    if method.startswith("active_mixup"):
        epochs, overrides = cpu_schedule("active_mixup", args)
        return epochs, overrides + quiet
    every = ["--trainer.check_val_every_n_epoch", str(args.val_every)]
    if method == "fsp":
        epochs = args.epochs + args.val_every
        return epochs, [
            "--trainer.max_epochs", str(epochs), "--model.init_args.stage1_epochs", str(args.val_every),
            "--model.init_args.lr_scheduler.init_args.T_max", str(args.epochs), *every, *quiet,
        ]
    epochs, overrides = cpu_schedule(method.removesuffix("_r20"), args)
    return epochs, overrides + every + quiet


# Diagnosis grids of the claims that do not hold (issue: "run its key hyper-parameter on a small grid on one seed"):
# grid run -> (method, the setting's label, the model arguments it changes). Reported, never tuned toward a result.
SCARCE_GRIDS = {
    "at_beta10": ("at", "β = 10", {"beta": 10.0}),
    "at_beta100": ("at", "β = 100", {"beta": 100.0}),
    "lsr_epsilon0.05": ("lsr", "ε = 0.05", {"epsilon": 0.05}),
    "lsr_epsilon0.3": ("lsr", "ε = 0.3", {"epsilon": 0.3}),
    "tfkd_self_alpha0.5": ("tfkd_self", "α = 0.5", {"kd_weight": 0.5, "ce_weight": 0.5}),
    "tfkd_self_T2": ("tfkd_self", "T = 2", {"temperature": 2.0}),
    "cskd_lambda2": ("cskd", "λ = 2", {"kd_weight": 2.0}),
    "cskd_lambda4": ("cskd", "λ = 4", {"kd_weight": 4.0}),
    "byot_alpha0.1": ("byot", "α = 0.1", {"kd_weight": 0.1, "ce_weight": 0.9}),
    "byot_alpha0.6": ("byot", "α = 0.6", {"kd_weight": 0.6, "ce_weight": 0.4}),
    "dml_peer_resnet20": ("dml", "peer resnet20", {"peers": ["resnet20"]}),
    "dml_cohort3": ("dml", "three resnet8", {"peers": ["resnet8", "resnet8"]}),
    "tfkd_reg_alpha0.5": ("tfkd_reg", "α = 0.5", {"kd_weight": 0.5, "ce_weight": 0.5}),
    "tfkd_reg_T1": ("tfkd_reg", "T = 1", {"temperature": 1.0}),
    "active_mixup_candidates64000": ("active_mixup", "64,000 candidates", {"candidates": 64000}),
}


def cpu_cifar10_scarce_runs(args) -> list[Run]:
    def run_at(method: str, seed: int) -> Run:
        label, config, teacher_run, control, extra = SCARCE_METHODS[method]
        epochs, overrides = scarce_schedule(method, args)
        return Run(f"{method}-s{seed}", method, label, config, seed, epochs,
                   teacher_run.format(seed=seed) if teacher_run else None, overrides + extra, control=control)

    def grid_run_at(point: str, seed: int) -> Run:
        method, setting, changes = SCARCE_GRIDS[point]
        run = run_at(method, seed)
        config_values = {key: run.model_init()[key] for key in changes}
        changed = [item for key, value in changes.items() for item in (f"--model.init_args.{key}", json.dumps(value))]
        return dataclasses.replace(run, name=f"{point}-s{seed}", method=point, label=f"{run.label}, {setting}",
                                   overrides=run.overrides + changed, on_request=True,
                                   grid={"method": method, "setting": setting, "changes": changes,
                                         "config": config_values})

    methods = [(method, lambda seed, method=method: [run_at(method, seed)]) for method in SCARCE_METHODS]
    seeds = args.seeds if args.seeds is not None else list(NOISE_SEEDS)  # every method: its claim needs the noise
    grids = [grid_run_at(point, seed) for point in SCARCE_GRIDS for seed in seeds_of(point, args.seeds)]
    return in_protocol_order([], methods, seeds) + grids


def cpu_cifar10_scarce_settings(args) -> dict:
    return {
        "profile": "cpu-cifar10-scarce", "teacher": "resnet20", "student": "resnet8 (BYOT, MSD: resnet20)",
        "subset": os.path.relpath(subset_path(args), REPO), "per_class": args.per_class,
        "subset_seed": args.subset_seed, "epochs": args.epochs, "val_every": args.val_every,
        "train_fraction": 1.0, "batch_size": args.batch_size,
        "optimizer": "SGD lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4, cosine",
        "active_mixup": {"pool": args.am_pool, "rounds": args.am_rounds, "queries_per_round": args.am_queries,
                         "candidates": args.am_candidates, "epochs_per_round": args.am_epochs_per_round},
    }


def cpu_cifar10_scarce_data(run: Run, args) -> list[str]:
    prefix = run.data_prefix
    return [f"--{prefix}.root", args.root, f"--{prefix}.train_subset", ensure_subset(args),
            f"--{prefix}.batch_size", str(args.batch_size), f"--{prefix}.num_workers", str(args.num_workers),
            "--data.seed", str(run.seed)]


# --- gpu-cifar100 -------------------------------------------------------------------------------------------------
CIFAR100_PAIRS = [("wrn_40_2", "wrn_16_2"), ("resnet56", "resnet20"), ("resnet110", "resnet32"),
                  ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")]
CIFAR100_PAIR_METHODS = {
    "kd": "KD", "at": "AT", "sp": "SP", "fsp": "FSP", "unix": "UNIX KD", "dkd": "DKD", "dist": "DIST",
    "lsd": "KD + logit standardization", "fitnet": "FitNet", "nst": "NST", "pkt": "PKT", "rkd": "RKD", "cc": "CC",
    "ft": "FT", "crd": "CRD", "ab": "AB", "vid": "VID", "ofd": "OFD", "reviewkd": "ReviewKD",
}
# method -> (label, config, teacher run) of the methods with one config outside the five pairs
CIFAR100_OTHERS = {
    "lsr": ("Label smoothing", "configs/cifar100/lsr/resnet8x4.yaml", None),
    "tfkd_self": ("Tf-KD self", "configs/cifar100/tfkd_self/resnet8x4-resnet8x4.yaml", "tfkd_self_teacher-resnet8x4"),
    "tfkd_reg": ("Tf-KD reg", "configs/cifar100/tfkd_reg/resnet8x4.yaml", None),
    "cskd": ("CS-KD", "configs/cifar100/cskd/resnet32x4.yaml", None),
    "byot": ("BYOT", "configs/cifar100/byot/resnet32x4.yaml", None),
    "msd": ("MSD", "configs/cifar100/msd/resnet32x4.yaml", None),
    "dml": ("DML", "configs/cifar100/dml/resnet32-resnet32.yaml", None),
}


def config_epochs(config: str) -> int:
    return int(read_yaml(config)["trainer"]["max_epochs"])


def gpu_cifar100_runs(args) -> list[Run]:
    def fixed(name: str, method: str, label: str, config: str, seed: int = 0, teacher_run: Optional[str] = None):
        return Run(name, method, label, config, seed, config_epochs(config), teacher_run)

    teachers = [fixed(f"teacher-{t}", "teacher", "Teacher", f"configs/cifar100/baseline/{t}.yaml")
                for t, _ in CIFAR100_PAIRS]
    teachers.append(fixed("tfkd_self_teacher-resnet8x4", "teacher", "Tf-KD self teacher",
                          "configs/cifar100/tfkd_self/resnet8x4.yaml"))
    methods = [("baseline", lambda seed: [
        fixed(f"baseline-{s}-s{seed}", "baseline", "Baseline", f"configs/cifar100/baseline/{s}.yaml", seed)
        for _, s in CIFAR100_PAIRS])]
    for method, label in CIFAR100_PAIR_METHODS.items():
        methods.append((method, lambda seed, method=method, label=label: [
            fixed(f"{method}-{t}-{s}-s{seed}", method, label, f"configs/cifar100/{method}/{t}-{s}.yaml", seed,
                  f"teacher-{t}") for t, s in CIFAR100_PAIRS]))
    for method, (label, config, teacher_run) in CIFAR100_OTHERS.items():
        stem = os.path.splitext(os.path.basename(config))[0]
        methods.append((method, lambda seed, method=method, label=label, config=config, stem=stem, t=teacher_run: [
            fixed(f"{method}-{stem}-s{seed}", method, label, config, seed, t)]))
    return in_protocol_order(teachers, methods, args.seeds)


def gpu_cifar100_settings(args) -> dict:
    return {"profile": "gpu-cifar100", "schedule": "as each config under configs/cifar100/ sets it"}


def gpu_cifar100_data(run: Run, args) -> list[str]:
    return ["--data.root", args.root, "--data.seed", str(run.seed)]


PROFILES = {
    "cpu-cifar10": (cpu_cifar10_runs, cpu_cifar10_settings, cpu_cifar10_data,
                    "data/cifar10-jpeg", "benchmarks/results/cifar10_cpu.json", "runs/cifar10_protocol"),
    "cpu-cifar10-scarce": (cpu_cifar10_scarce_runs, cpu_cifar10_scarce_settings, cpu_cifar10_scarce_data,
                           "data/cifar10-jpeg", "benchmarks/results/cifar10_scarce_cpu.json",
                           "runs/cifar10_scarce_protocol"),
    "gpu-cifar100": (gpu_cifar100_runs, gpu_cifar100_settings, gpu_cifar100_data,
                     "data", "benchmarks/results/cifar100_gpu.json", "runs/cifar100_protocol"),
}


# --- results ------------------------------------------------------------------------------------------------------
def load_results(path: str) -> dict:
    if not os.path.isfile(path):
        return {"protocol": None, "runs": []}
    with open(path) as file:
        return json.load(file)


def add_record(path: str, settings: dict, record: dict, order: dict[str, int]) -> dict:
    """Put ``record`` into the results file (replacing a record of the same run) and return the file's content.

    The file is re-read under an exclusive lock, so sittings running other runs in parallel (one per core, each
    with its own ``--only``) keep each other's records. A replaced record's figures stay under ``previous``.
    """
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(path)
        results["protocol"] = settings
        earlier = [r for r in results["runs"] if r["name"] == record["name"]]
        if earlier:
            keep = ("val_acc1", "wall_s", "cpu_s", "finished")
            record["previous"] = [{k: earlier[0][k] for k in keep}] + earlier[0].get("previous", [])
        runs = [r for r in results["runs"] if r["name"] != record["name"]] + [record]
        results["runs"] = sorted(runs, key=lambda r: order.get(r["name"], len(order)))
        write_atomically(path, results)
    return results


def write_atomically(path: str, results: dict) -> None:
    """Write the JSON to a temporary file beside ``path`` and rename it over ``path``: never a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        json.dump(results, file, indent=1)
        file.write("\n")
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def logged_metrics(run_dir: str) -> list[dict[str, str]]:
    """Rows of every CSV log of a run (one log per sitting), in the order they were written."""
    def version(path: str) -> int:
        return int(os.path.basename(os.path.dirname(path)).split("_")[-1])

    rows = []
    for path in sorted(glob.glob(os.path.join(run_dir, "csv", "version_*", "metrics.csv")), key=version):
        with open(path, newline="") as file:
            rows += [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(file)]
    return rows


def final_values(rows: list[dict[str, str]]) -> dict[str, float]:
    """The last logged value of every metric."""
    return {key: float(value) for row in rows for key, value in row.items()}


def loss_curve(rows: list[dict[str, str]]) -> list[dict[str, float]]:
    """Per validated epoch: the epoch, that epoch's training loss, and the validation loss and top-1."""
    train = {row["epoch"]: float(row["train/loss_epoch"]) for row in rows if "train/loss_epoch" in row}
    return [{"epoch": int(float(row["epoch"])), "train_loss": train.get(row["epoch"]),
             "val_loss": float(row["val/loss"]), "val_acc1": float(row["val/acc1"])}
            for row in rows if "val/acc1" in row and "val/loss" in row]


def result_record(run: Run, run_dir: str, settings: dict, sittings: list[dict]) -> Optional[dict]:
    """The run's record, or ``None`` when its logs do not reach the last epoch's validation."""
    rows = logged_metrics(run_dir)
    validated = [row for row in rows if "val/acc1" in row]
    if not validated or int(float(validated[-1]["epoch"])) != run.epochs - 1:
        return None
    final = final_values(rows)
    init = run.model_init()
    terms = [k for k in final if k.startswith("train/") and k.endswith("_epoch") and k != "train/loss_epoch"]
    extra_keys = sorted(terms) + [k for k in sorted(final) if k.startswith(("val/acc1/", "unix/")) or k == "val/acc5"]
    return {
        "name": run.name,
        "method": run.method,
        "label": run.label,
        "class_path": read_yaml(run.config)["model"]["class_path"],
        "config": run.config,
        "seed": run.seed,
        "student": init["student"],
        "teacher": init.get("teacher"),
        "val_acc1": float(validated[-1]["val/acc1"]),
        "final_train_loss": final.get("train/loss_epoch"),
        "final_val_loss": final.get("val/loss"),
        "curve": loss_curve(rows),
        "control": run.control,
        **({"grid": run.grid} if run.grid else {}),
        "epochs": run.epochs,
        "train_fraction": settings.get("train_fraction", 1.0),
        "teacher_images": int(final["teacher/images"]) if "teacher/images" in final else 0,
        "teacher_flops": final.get("teacher/flops"),
        "teacher_val_acc1": final.get("val/teacher_acc1"),
        "accuracy_vs_queries": [[int(float(row["step"])), float(row["active_mixup/val_acc1"])]
                                for row in rows if "active_mixup/val_acc1" in row],
        "extra": {key: final[key] for key in extra_keys},
        "wall_s": round(sum(s["wall_s"] for s in sittings), 1),
        "cpu_s": round(sum(s["cpu_s"] for s in sittings), 1),
        "commands": [s["command"] for s in sittings],
        "machines": sorted({s["machine"] for s in sittings if "machine" in s}),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }


# --- running ------------------------------------------------------------------------------------------------------
def fit_arguments(run: Run, run_dir: str, teacher_ckpt: Optional[str], data_args: list[str], resume: bool) -> list[str]:
    logger = {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": run_dir, "name": "csv"}}
    argv = ["fit", "--config", run.config, *data_args, "--seed_everything", str(run.seed), *run.overrides,
            "--trainer.default_root_dir", run_dir, "--checkpoint.dirpath", os.path.join(run_dir, "checkpoints"),
            "--trainer.logger", json.dumps(logger), "--trainer.enable_progress_bar", "false"]
    if teacher_ckpt is not None:
        # A resumed run goes on with the teacher its checkpoint holds, even when that teacher was trained again since.
        argv += ["--model.init_args.teacher_ckpt", "null" if resume else teacher_ckpt]
    if resume:
        argv += ["--ckpt_path", os.path.join(run_dir, "checkpoints", "last.ckpt")]
    return argv


def read_sittings(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "sittings.json")
    return json.load(open(path)) if os.path.isfile(path) else []


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the data-loading workers)."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def machine() -> str:
    """The CPU model, cores, torch version and threads: CPU training is bit-reproducible on one kind of machine only,
    so a record says where each of its sittings ran."""
    import torch

    model = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as file:
            model = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def run_fit(argv: list[str], run_dir: str) -> None:
    """``lightning-kd <argv>`` in this process; its command, wall time, CPU time and machine are appended to
    ``sittings.json`` however it ends (an exception, Ctrl-C, SIGTERM)."""
    from lightning_kd.cli import main

    sittings = read_sittings(run_dir)
    start, cpu_start = time.time(), cpu_seconds()
    try:
        with unittest.mock.patch.object(sys, "argv", sys.argv[:1]):  # the CLI reads argv alone, not the runner's
            main(argv)
    finally:
        sittings.append({"command": "lightning-kd " + shlex.join(argv), "wall_s": round(time.time() - start, 1),
                         "cpu_s": round(cpu_seconds() - cpu_start, 1), "machine": machine()})
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "sittings.json"), "w") as file:
            json.dump(sittings, file, indent=1)


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] {message}", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu-cifar10")
    parser.add_argument("--root", help="the data: an ImageFolder tree (cpu-cifar10) or CIFAR-100's download folder")
    parser.add_argument("--workdir", help="where the runs write (one folder per run)")
    parser.add_argument("--results", help="the JSON file of finished runs")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these runs only (names as --dry_run lists)")
    parser.add_argument("--methods", nargs="+", metavar="METHOD", help="run these methods only (e.g. baseline kd)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds of every method (default: 0 1 2 for Baseline "
                        "and KD, 0 for the others)")
    parser.add_argument("--dry_run", action="store_true", help="print each run's status and command, run nothing")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (more make a shared CPU slower)")
    cpu = parser.add_argument_group("cpu-cifar10 and cpu-cifar10-scarce schedules")
    cpu.add_argument("--teacher_epochs", type=int, default=10, help="cpu-cifar10: epochs of the teacher")
    cpu.add_argument("--epochs", type=int, help="epochs of every student run (cpu-cifar10: 4, scarce: 100)")
    cpu.add_argument("--per_class", type=int, default=100, help="scarce: training images of each class")
    cpu.add_argument("--subset_seed", type=int, default=0, help="scarce: the seed drawing the subset")
    cpu.add_argument("--val_every", type=int, default=5, help="scarce: epochs between validations")
    cpu.add_argument("--train_fraction", type=float, default=1.0, help="fraction of the training batches per epoch")
    cpu.add_argument("--batch_size", type=int, default=128)
    cpu.add_argument("--num_workers", type=int, default=1)
    cpu.add_argument("--am_pool", type=int, default=1000, help="Active Mixup: unlabeled images")
    cpu.add_argument("--am_rounds", type=int, default=3, help="Active Mixup: query rounds after the pool's")
    cpu.add_argument("--am_queries", type=int, default=4000, help="Active Mixup: queries per round")
    cpu.add_argument("--am_candidates", type=int, default=16000, help="Active Mixup: pairs scored per round")
    cpu.add_argument("--am_epochs_per_round", type=int, default=8)
    args = parser.parse_args(argv)
    _, _, _, root, results, workdir = PROFILES[args.profile]
    if args.epochs is None:
        args.epochs = 100 if args.profile == "cpu-cifar10-scarce" else 4
    args.root = os.path.abspath(args.root or root)
    args.results = os.path.abspath(args.results or os.path.join(REPO, results))
    args.workdir = os.path.abspath(args.workdir or workdir)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    make_runs, make_settings, data_arguments, *_ = PROFILES[args.profile]
    runs = make_runs(args)
    names = {run.name for run in runs}
    unknown = sorted(set(args.only or []) - names) + sorted(set(args.methods or []) - {run.method for run in runs})
    if unknown:
        print(f"unknown run names or methods: {unknown}; runs: {' '.join(run.name for run in runs)}", file=sys.stderr)
        return 2
    selected = [run for run in runs if (not args.only or run.name in args.only)
                and (not args.methods or run.method in args.methods)
                and (not run.on_request or args.only or args.methods)]

    settings = make_settings(args)
    results = load_results(args.results)
    if results["protocol"] not in (None, settings):
        print(f"{args.results} holds runs of other settings:\n  {results['protocol']}\nnot\n  {settings}\n"
              "Give another --results (and --workdir).", file=sys.stderr)
        return 2
    results["protocol"] = settings

    import torch

    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the interrupted sitting is still recorded
    os.chdir(REPO)  # configs are named relative to the repository
    # records in the protocol's order, whichever --seeds each sitting had: the default runs, then any extra seeds
    default_runs = make_runs(argparse.Namespace(**{**vars(args), "seeds": None}))
    order = {name: position for position, name in enumerate(dict.fromkeys(r.name for r in [*default_runs, *runs]))}
    failed = []
    for run in selected:
        done = {record["name"] for record in load_results(args.results)["runs"]}  # other sittings may have added
        run_dir = os.path.join(args.workdir, run.name)
        last = os.path.join(run_dir, "checkpoints", "last.ckpt")
        teacher_ckpt = None
        if run.teacher_run is not None:
            teacher_ckpt = os.path.join(args.workdir, run.teacher_run, "checkpoints", "last.ckpt")
        needed_by = [other.name for other in selected if other.teacher_run == run.name and other.name not in done]
        retraining = os.path.join(run_dir, RETRAINING)
        if run.name in done and needed_by and (os.path.isfile(retraining) or not os.path.isfile(last)):
            # finished on another machine or before a clean-up, its checkpoint gone: trained again, same command
            status = "resume" if os.path.isfile(retraining) and os.path.isfile(last) else "retrain"
        elif run.name in done:
            status = "done"
        elif run.teacher_run is not None and (run.teacher_run not in done or not os.path.isfile(teacher_ckpt)
                                              or os.path.isfile(os.path.join(args.workdir, run.teacher_run,
                                                                             RETRAINING))):
            status = f"waits for {run.teacher_run}"
        else:
            status = "resume" if os.path.isfile(last) else "new"
        argv = fit_arguments(run, run_dir, teacher_ckpt, data_arguments(run, args), resume=status == "resume")
        if args.dry_run:
            print(f"{run.name:<34} {status:<24} lightning-kd {shlex.join(argv)}")
            continue
        if status == "done" or status.startswith("waits"):
            log(f"{run.name}: {status}")
            continue
        log(f"{run.name}: {status}")
        if status in ("new", "retrain") and os.path.isdir(run_dir):
            shutil.rmtree(run_dir)  # logs of an attempt that left no checkpoint to resume from
        if status == "retrain":
            os.makedirs(run_dir)
            open(os.path.join(run_dir, RETRAINING), "w").close()
        try:
            run_fit(argv, run_dir)
        except (Exception, SystemExit) as error:
            if isinstance(error, SystemExit) and error.code == 143:
                raise
            traceback.print_exc()
            log(f"{run.name}: failed ({type(error).__name__}: {error})")
            failed.append(run.name)
            continue
        record = result_record(run, run_dir, settings, read_sittings(run_dir))
        if record is None:
            log(f"{run.name}: stopped before its last epoch; rerun to resume it")
            failed.append(run.name)
            continue
        results = add_record(args.results, settings, record, order)
        if os.path.isfile(os.path.join(run_dir, RETRAINING)):
            os.remove(os.path.join(run_dir, RETRAINING))
        log(f"{run.name}: val/acc1 {100 * record['val_acc1']:.2f}% in {record['wall_s'] / 60:.1f} min "
            f"({record['cpu_s'] / 60:.1f} CPU-min)")
    if failed:
        log(f"not finished: {' '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
