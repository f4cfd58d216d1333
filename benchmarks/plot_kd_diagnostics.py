"""Plot how a student relates to its teacher over a run, from the run's CSV log (what W&B shows as charts).

    python benchmarks/plot_kd_diagnostics.py --run_dir runs/kd --plot kd_diagnostics.png [--series kd.json]

Reads every ``csv/version_*/metrics.csv`` under ``--run_dir`` (a fit with ``--trainer.logger`` a ``CSVLogger`` whose
``save_dir`` is the run directory and ``name`` is ``csv``, as ``benchmarks/cifar10_protocol.py`` writes them; resumed
sittings add versions) and draws, per validated epoch, two panels:

- top-1 of the student (``val/acc1``) and of the teacher (``val/teacher_acc1``, scored once, at the first validation),
  and their top-1 agreement (``val/agreement``: the share of test images where both predict the same class);
- KL(teacher ‖ student) on the test images (``val/kl_teacher_student``) and the expected calibration error of both
  (``val/ece``, ``val/teacher_ece``).

The last three come from ``kd_diagnostics`` (on by default for methods with a teacher). ``--series`` also writes the
plotted values as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cifar10_protocol import logged_metrics  # noqa: E402  (a sibling script, not a package)

PERCENT_METRICS = {"val/acc1": "student top-1", "val/teacher_acc1": "teacher top-1", "val/agreement": "agreement"}
DIVERGENCE_METRIC = "val/kl_teacher_student"
CALIBRATION_METRICS = {"val/ece": "student ECE", "val/teacher_ece": "teacher ECE"}


def diagnostics_series(run_dir: str) -> list[dict[str, float]]:
    """Per validated epoch (in order; a resumed epoch's later value wins): the epoch and every diagnostic logged."""
    wanted = [*PERCENT_METRICS, DIVERGENCE_METRIC, *CALIBRATION_METRICS]
    by_epoch: dict[int, dict[str, float]] = {}
    for row in logged_metrics(run_dir):
        values = {key: float(row[key]) for key in wanted if key in row}
        if values and "epoch" in row:
            epoch = int(float(row["epoch"]))
            by_epoch.setdefault(epoch, {"epoch": epoch}).update(values)
    if not any(DIVERGENCE_METRIC in point for point in by_epoch.values()):
        raise SystemExit(f"no {DIVERGENCE_METRIC} in the CSV logs under {run_dir}: was the run fitted with a teacher, "
                         "kd_diagnostics on and a CSVLogger saving to <run_dir>/csv?")
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def plot(series: list[dict[str, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(axis, key: str, label: str, scale: float = 1.0, **style) -> None:
        points = [(point["epoch"] + 1, scale * point[key]) for point in series if key in point]
        if points:
            axis.plot(*zip(*points), marker="o", markersize=3, label=label, **style)

    figure, (accuracy, divergence) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in PERCENT_METRICS.items():
        if key == "val/teacher_acc1":  # scored once, at the first validation: the teacher does not change
            teacher = [point[key] for point in series if key in point]
            if teacher:
                accuracy.axhline(100.0 * teacher[0], linestyle="--", color="gray", label=label)
        else:
            curve(accuracy, key, label, 100.0)
    accuracy.set(xlabel="epoch", ylabel="% of the test images", title="accuracy and agreement with the teacher")
    accuracy.legend()
    accuracy.grid(alpha=0.3)
    curve(divergence, DIVERGENCE_METRIC, "KL(teacher ‖ student)", color="black")
    divergence.set(xlabel="epoch", ylabel="KL(teacher ‖ student), nats", title="divergence and calibration")
    calibration = divergence.twinx()
    for (key, label), color in zip(CALIBRATION_METRICS.items(), ("tab:red", "tab:purple")):
        curve(calibration, key, label, color=color, linestyle=":" if key == "val/teacher_ece" else "-")
    calibration.set_ylabel("expected calibration error")
    lines = divergence.get_legend_handles_labels()[0] + calibration.get_legend_handles_labels()[0]
    divergence.legend(lines, [line.get_label() for line in lines])
    divergence.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True, help="the run directory holding csv/version_*/metrics.csv")
    parser.add_argument("--plot", required=True, help="PNG to write")
    parser.add_argument("--series", help="JSON to write the plotted values to")
    parser.add_argument("--title", default="KD diagnostics", help="the figure's title")
    args = parser.parse_args(argv)
    series = diagnostics_series(args.run_dir)
    plot(series, args.plot, args.title)
    if args.series:
        with open(args.series, "w") as file:
            json.dump({"run_dir": args.run_dir, "epochs": series}, file, indent=1)
            file.write("\n")
    last = series[-1]
    print(f"{len(series)} validated epochs; last: " + ", ".join(f"{key} {value:.4f}" for key, value in last.items()
                                                              if key != "epoch"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
