"""Extra time per training step that AT, SP and FSP add over KD: same models, same batch, on the CPU.

    python benchmarks/feature_overhead.py [--teacher resnet56] [--student resnet20] [--batch 64]
                                          [--warmup 3] [--steps 10] [--threads 1] [--profile]

Each variant runs one optimisation step as ``DistillationModule.training_step`` does (forward of student
and teacher with feature hooks, loss terms in float32, backward, SGD step), without Lightning's logging,
timing each phase. Variants are interleaved round by round, so a busy machine slows them alike; the
first ``--warmup`` rounds are dropped and the median of the rest is reported. ``--profile`` adds, from
torch.profiler, the operators computing each variant's loss terms and the backward nodes it runs
beyond KD's, with their CPU time per step.
Prints one JSON record.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from lightning_kd.methods import AT, FSP, KD, SP
from lightning_kd.models import get_model

def variants() -> dict[str, tuple[type, dict]]:
    """Name -> (method, arguments): KD, each feature method alone and with KD's CE 0.1 + KD 0.9 added."""
    with_kd = {"ce_weight": 0.1, "kd_weight": 0.9}
    return {
        "KD": (KD, {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0}),
        "AT": (AT, {}),
        "SP": (SP, {}),
        "FSP joint": (FSP, {"schedule": "joint"}),
        "AT+KD": (AT, with_kd),
        "SP+KD": (SP, with_kd),
        "FSP joint+KD": (FSP, {"schedule": "joint", **with_kd}),
        "FSP stage 1": (FSP, {}),
        "FSP stage 2": (FSP, {"stage1_epochs": 0}),
    }


def calibrated_teacher(name: str, num_classes: int, batch: int) -> torch.nn.Module:
    """A random teacher with BatchNorm statistics from one batch, so its eval-mode features stay finite."""
    teacher = get_model(name, num_classes)
    for module in teacher.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        teacher.train()(torch.randn(batch, 3, 32, 32))
    return teacher


def training_step(module, optimizer, x, y) -> dict[str, float]:
    """One step; seconds spent in each phase and in total."""
    optimizer.zero_grad(set_to_none=True)
    clock = [time.perf_counter()]
    step = module.forward_step(x, y)
    clock.append(time.perf_counter())
    loss = torch.stack(list(module.loss_terms(step.float()).values())).sum()
    clock.append(time.perf_counter())
    loss.backward()
    clock.append(time.perf_counter())
    optimizer.step()
    clock.append(time.perf_counter())
    names = ("forward_step", "loss_terms", "backward", "optimizer_step")
    return {**{name: end - start for name, start, end in zip(names, clock, clock[1:])}, "total": clock[-1] - clock[0]}


def loss_profile(module, optimizer, x, y, steps: int) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """From torch.profiler, the median over ``steps`` of: the self CPU ms of each operator computing the
    loss terms, and (calls, CPU ms) of each autograd node of the backward pass."""
    forward_runs, backward_runs = [], []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        step = module.forward_step(x, y)
        with profile(activities=[ProfilerActivity.CPU]) as loss_prof:
            loss = torch.stack(list(module.loss_terms(step.float()).values())).sum()
        with profile(activities=[ProfilerActivity.CPU]) as backward_prof:
            loss.backward()
        optimizer.step()
        forward_runs.append({e.key: e.self_cpu_time_total / 1000 for e in loss_prof.key_averages()})
        backward_runs.append({
            e.key: (e.count, e.cpu_time_total / 1000)
            for e in backward_prof.key_averages()
            if e.key.endswith(("Backward0", "Backward1")) and not e.key.startswith("autograd::")
        })
    forward_ms = {op: statistics.median(run.get(op, 0.0) for run in forward_runs) for op in forward_runs[0]}
    backward_nodes = {
        node: (backward_runs[0][node][0], statistics.median(run.get(node, (0, 0.0))[1] for run in backward_runs))
        for node in backward_runs[0]
    }
    return forward_ms, backward_nodes


def top(values: dict[str, float], n: int = 6) -> dict[str, float]:
    """The ``n`` largest positive values, rounded."""
    return {key: round(value, 2) for key, value in sorted(values.items(), key=lambda item: -item[1])[:n] if value > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile_steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared CPU, more threads make step times erratic)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    student = get_model(args.student, args.num_classes)
    teacher = calibrated_teacher(args.teacher, args.num_classes, args.batch)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, args.num_classes, (args.batch,))

    runs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no teacher_ckpt given": the calibrated random teacher is intended
        for name, (method, kwargs) in variants().items():
            module = method(student=copy.deepcopy(student), teacher=copy.deepcopy(teacher),
                            num_classes=args.num_classes, **kwargs)
            module.setup("fit")
            module.train()
            optimizer = torch.optim.SGD(module.student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
            runs[name] = (module, optimizer)

    times = {name: [] for name in runs}
    for round_index in range(args.warmup + args.steps):
        for name, (module, optimizer) in runs.items():
            phases = training_step(module, optimizer, x, y)
            if round_index >= args.warmup:
                times[name].append(phases)

    def median(name: str, phase: str) -> float:
        return statistics.median(t[phase] for t in times[name])

    total = {name: median(name, "total") for name in runs}
    record = {
        "benchmark": "feature_overhead",
        "teacher": args.teacher,
        "student": args.student,
        "batch": args.batch,
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "warmup": args.warmup,
        "steps": args.steps,
        "median_step_s": {name: round(value, 4) for name, value in total.items()},
        "extra_over_kd_s": {name: round(value - total["KD"], 4) for name, value in total.items() if name != "KD"},
        "extra_over_kd_percent": {
            name: round(100 * (value / total["KD"] - 1), 1) for name, value in total.items() if name != "KD"
        },
        "median_phase_ms": {
            name: {phase: round(1000 * median(name, phase), 1) for phase in times[name][0] if phase != "total"}
            for name in runs
        },
    }

    if args.profile:
        profiles = {name: loss_profile(module, optimizer, x, y, steps=args.profile_steps)
                    for name, (module, optimizer) in runs.items()}
        kd_nodes = profiles["KD"][1]
        record["profile_ms_per_step"] = {}
        for name, (forward_ms, nodes) in profiles.items():
            # Backward nodes the variant runs more often than KD (the networks' own nodes run equally often),
            # their CPU time scaled to the extra calls.
            extra = {
                node: ms * (calls - kd_nodes.get(node, (0.0, 0.0))[0]) / calls for node, (calls, ms) in nodes.items()
            }
            record["profile_ms_per_step"][name] = {
                "loss_terms_operators": top(forward_ms),
                "backward_nodes_beyond_kd": top(extra),
            }

    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
