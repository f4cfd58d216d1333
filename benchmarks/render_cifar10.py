"""Render the results of ``benchmarks/cifar10_protocol.py``: a markdown table and a plot.

    python benchmarks/render_cifar10.py [--results benchmarks/results/cifar10_cpu.json]
                                        [--markdown benchmarks/results/cifar10_cpu.md]
                                        [--plot benchmarks/results/cifar10_cpu.png]

The table has one row per method (and student/teacher pair): top-1 on the test images after the last epoch, as
mean ± standard deviation over the seeds that finished, the difference from the Baseline of the same student, and
whether that difference is beyond the run-to-run noise. The noise sigma is the pooled standard deviation of the
methods run with several seeds; a difference counts as beyond the noise when it exceeds two standard errors,
2·sigma·sqrt(1/n + 1/n_Baseline). The markdown is printed and written; the plot has two panels: top-1 per method
with the seeds and their spread, and top-1 against the images the teacher was asked about (KD, UNIX KD, and
Active Mixup after each query round).

Results of the ``cpu-cifar10-scarce`` profile (records naming their ``control``) get a table of claims instead: each
method against its paper's control (Baseline of the same student, KD for UNIX KD, random mixes for Active Mixup),
held when the difference is above the noise band, with the final training and test losses; a table of the
diagnosis grids (records naming their ``grid``: one hyper-parameter of a method changed, at one seed) beside the
method's own run; and a second plot (``<plot>_curves.png``) of the training and test loss curves, with the pilot's
(``--pilot``) when given. Grid runs stay out of the claims table, the noise and the plots.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER_AXIS_METHODS = ("kd", "unix", "active_mixup", "active_mixup_random")


def percent(value: float) -> float:
    return 100.0 * value


def group_runs(runs: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Records by (method, student, teacher), groups in the order of their first record, records by seed."""
    groups = defaultdict(list)
    for record in runs:
        groups[(record["method"], record["student"], record.get("teacher") or "")].append(record)
    return {key: sorted(records, key=lambda r: r["seed"]) for key, records in groups.items()}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def pooled_std(groups: dict[tuple, list[dict]]) -> tuple[float, int]:
    """Pooled standard deviation (percentage points) of the groups with several seeds, and its degrees of freedom."""
    squares, freedom = 0.0, 0
    for records in groups.values():
        if len(records) > 1:
            values = [percent(r["val_acc1"]) for r in records]
            squares += (len(values) - 1) * statistics.variance(values)
            freedom += len(values) - 1
    return (math.sqrt(squares / freedom), freedom) if freedom else (float("nan"), 0)


def baseline_of(groups: dict[tuple, list[dict]], student: str) -> list[dict]:
    return next((records for (method, s, _), records in groups.items() if method == "baseline" and s == student), [])


def noise_verdict(delta: float, n: int, n_baseline: int, sigma: float) -> str:
    if math.isnan(sigma) or n_baseline == 0:
        return "?"
    band = 2 * sigma * math.sqrt(1 / n + 1 / n_baseline)
    if abs(delta) <= band:
        return f"within noise (±{band:.2f})"
    return f"{'above' if delta > 0 else 'below'} (±{band:.2f})"


def notes(method: str, records: list[dict], baseline_epochs) -> str:
    """What a row needs besides its accuracy: other outputs, efficiency figures, a different schedule."""
    last = records[-1]
    extra = last.get("extra", {})
    parts = []
    if baseline_epochs is not None and last["epochs"] != baseline_epochs:
        parts.append(f"{last['epochs']} epochs")
    peers = [f"{percent(v):.2f}" for k, v in sorted(extra.items())
             if k.startswith("val/acc1/peer_") and k != "val/acc1/peer_0"]
    if peers:
        parts.append("other peer " + " / ".join(peers))
    exits = [f"{percent(v):.2f}" for k, v in sorted(extra.items()) if k.startswith("val/acc1/exit_")]
    if exits:
        parts.append(f"exits {' / '.join(exits)}, ensemble {percent(extra['val/acc1/ensemble']):.2f}")
    if "unix/computation_vs_kd" in extra:
        parts.append(f"computation {100 * extra['unix/computation_vs_kd']:.1f}% of KD's")
    if last.get("accuracy_vs_queries"):
        curve = ", ".join(f"{q:,}: {percent(a):.2f}" for q, a in last["accuracy_vs_queries"])
        parts.append(f"top-1 after each round (queries: %) {curve}")
    if method == "tfkd_self":
        parts.append("teacher: the Baseline student of the same seed")
    return "; ".join(parts)


def describe(protocol: dict) -> str:
    if protocol.get("profile") != "cpu-cifar10":
        return f"Profile {protocol.get('profile')}: {protocol.get('schedule', '')}."
    fraction = protocol["train_fraction"]
    data = "all training batches" if fraction == 1 else f"{fraction:g} of the training batches"
    return (
        f"CIFAR-10 (an ImageFolder tree of its training and test images), teacher {protocol['teacher']} trained with "
        f"Baseline for {protocol['teacher_epochs']} epochs, every method training {protocol['student']} for "
        f"{protocol['epochs']} epochs ({data} per epoch, batch {protocol['batch_size']}, {protocol['optimizer']}). "
        "Top-1 on all the test images after the last epoch."
    )


def render_markdown(results: dict, plot_link: str | None) -> str:
    groups = group_runs(results["runs"])
    sigma, freedom = pooled_std(groups)
    several_students = len({student for (m, student, _) in groups if m != "teacher"}) > 1
    lines = [describe(results["protocol"]), ""]
    lines.append("| Method | Seeds | Top-1 (%) | Δ vs Baseline | vs noise | Teacher images | CPU min/run (wall) | Notes |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for (method, student, teacher), records in groups.items():
        values = [percent(r["val_acc1"]) for r in records]
        mean, std = mean_std(values)
        accuracy = f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"
        label = records[0]["label"]
        if method == "teacher":
            label = f"{label} ({student})"
        elif several_students:
            label = f"{label} ({teacher + ' → ' if teacher else ''}{student})"
        baseline = baseline_of(groups, student)
        delta = verdict = ""
        if method not in ("baseline", "teacher") and baseline:
            difference = mean - statistics.fmean(percent(r["val_acc1"]) for r in baseline)
            delta, verdict = f"{difference:+.2f}", noise_verdict(difference, len(values), len(baseline), sigma)
        images = records[-1].get("teacher_images") or 0
        cpu, wall = (statistics.fmean(r[key] for r in records) / 60 for key in ("cpu_s", "wall_s"))
        baseline_epochs = baseline[0]["epochs"] if baseline and method != "teacher" else None
        seeds = ", ".join(str(r["seed"]) for r in records)
        lines.append(
            f"| {label} | {seeds} | {accuracy} | {delta} | {verdict} | {f'{images:,}' if images else '—'} "
            f"| {cpu:.0f} ({wall:.0f}) | {notes(method, records, baseline_epochs)} |"
        )
    runs = results["runs"]
    cpu_hours, wall_hours = (sum(r[key] for r in runs) / 3600 for key in ("cpu_s", "wall_s"))
    lines += ["", noise_statement(groups, sigma, freedom),
              "", f"Finished runs: {len(runs)}, {cpu_hours:.1f} CPU-hours ({wall_hours:.1f} hours of wall time) in all."]
    if plot_link:
        lines += ["", f"![Top-1 per method, and against the images the teacher was asked about]({plot_link})"]
    return "\n".join(lines) + "\n"


def noise_statement(groups: dict[tuple, list[dict]], sigma: float, freedom: int) -> str:
    if not freedom:
        return "Run-to-run noise: not measured yet (no method has finished with two seeds or more)."
    several = ", ".join(f"{records[0]['label']} ({len(records)})" for records in groups.values() if len(records) > 1)
    text = (
        f"Run-to-run noise: sigma = {sigma:.2f} points, the pooled standard deviation over seeds of {several}. "
        "A difference from the Baseline is beyond the noise when it exceeds 2·sigma·sqrt(1/n + 1/n_Baseline), "
        "n the seeds of each."
    )
    for (method, student, _), records in groups.items():
        baseline = baseline_of(groups, student)
        if method == "kd" and baseline:
            kd, base = (statistics.fmean(percent(r["val_acc1"]) for r in rs) for rs in (records, baseline))
            error = sigma * math.sqrt(1 / len(records) + 1 / len(baseline))
            text += (
                f" KD − Baseline ({student}): {kd - base:+.2f} points, {(kd - base) / error:.1f} standard errors "
                f"({len(records)} vs {len(baseline)} seeds)."
            )
    return text


def is_scarce(results: dict) -> bool:
    return (results.get("protocol") or {}).get("profile") == "cpu-cifar10-scarce"


def control_of(groups: dict[tuple, list[dict]], method: str, control: str, student: str) -> tuple[tuple, list[dict]]:
    """The control group of a claim: the control method's runs with the same student (resnet20 alone for BYOT)."""
    for key, records in groups.items():
        if key[0] == control and records[0]["student"] == student:
            return key, records
    return (control, student, ""), []


def mean_of(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.fmean(values) if values else float("nan")


# Claims of parity (the control's accuracy at a lower cost) rather than of a gain over the control.
PARITY_CLAIMS = {"unix": "unix/computation_vs_kd"}


def claim_verdict(method: str, difference: float, band: float, records: list[dict]) -> str:
    """``held`` when the difference from the control is above the noise band; for a parity claim (UNIX KD: KD's
    accuracy for less teacher computation), when it is not below it and the computation is lower."""
    if math.isnan(band):
        return "?"
    if method in PARITY_CLAIMS:
        ratio = statistics.fmean(r["extra"].get(PARITY_CLAIMS[method], float("nan")) for r in records)
        held = difference >= -band and ratio < 1
        return f"{'held' if held else 'not held'}, at {100 * ratio:.0f}% of the control's computation"
    return "held" if difference > band else "not held"


def claim_runs(results: dict) -> dict:
    """The results without the diagnosis grids' runs."""
    return {**results, "runs": [record for record in results["runs"] if "grid" not in record]}


def setting_text(values: dict) -> str:
    """``beta = 10, peers = [resnet8, resnet8]``: numbers in their shortest form, lists in brackets."""
    def text(value) -> str:
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(text(item) for item in value) + "]"
        return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

    return ", ".join(f"{key} = {text(value)}" for key, value in values.items())


def loss_terms(record: dict) -> str:
    """The method's own training loss terms (epoch means) at the last epoch, when the record has them."""
    terms = {key[len("train/loss_"):-len("_epoch")]: value for key, value in record["extra"].items()
             if key.startswith("train/loss_") and key.endswith("_epoch")}
    return ", ".join(f"{name} {value:.3f}" for name, value in terms.items()) or "—"


def render_grids(results: dict) -> str:
    """The diagnosis grids: each method's run at its config's values beside its runs with one hyper-parameter
    changed, at the same seed, against the Baseline of that seed; with the top-1 of the teacher each run read (a
    teacher retrained in a later session, on another machine, is another network)."""
    points = [record for record in results["runs"] if "grid" in record]
    if not points:
        return ""
    others = {(record["method"], record["seed"], record["student"]): record
              for record in results["runs"] if "grid" not in record}
    lines = [
        "Diagnosis grids: one hyper-parameter of a claim's method changed, the rest of its run as in the table "
        "above (same seed, data and schedule; the teacher's top-1 is shown: a teacher retrained in a later session "
        "is another network). Δ is against the claim's control at the same seed (the same student alone; random mixes "
        "for Active Mixup).", "",
        "| Method | Setting | Seed | Teacher top-1 (%) | Top-1 (%) | Δ vs control (same seed) | Train loss "
        "| Its terms at the end | Test loss (min → final) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for point in points:
        method, seed, student = point["grid"]["method"], point["seed"], point["student"]
        default = others.get((method, seed, student))
        if default is not None and default not in rows:
            rows.append(default)
        rows.append(point)
    config_values = defaultdict(dict)  # each method's config values of every argument its grid changes
    for point in points:
        config_values[point["grid"]["method"]].update(point["grid"]["config"])
    for record in rows:
        grid = record.get("grid")
        setting = setting_text(grid["changes"]) if grid else f"config: {setting_text(config_values[record['method']])}"
        label = record["label"].split(",")[0]
        control = others.get((record["control"], record["seed"], record["student"]))
        accuracy = percent(record["val_acc1"])
        delta = f"{accuracy - percent(control['val_acc1']):+.2f}" if control else "not run"
        minimum = min(p["val_loss"] for p in record["curve"])
        teacher = f"{percent(record['teacher_val_acc1']):.2f}" if record.get("teacher_val_acc1") else "—"
        lines.append(f"| {label} | {setting} | {record['seed']} | {teacher} | {accuracy:.2f} | {delta} "
                     f"| {record['final_train_loss']:.3f} | {loss_terms(record)} "
                     f"| {minimum:.2f} → {record['final_val_loss']:.2f} |")
    return "\n".join(lines) + "\n"


def render_claims(results: dict, plot_link: str | None) -> str:
    """The scarce profile's table: every claim against its control, held or not beyond the noise; then the
    diagnosis grids."""
    grids, every_run = render_grids(results), results["runs"]
    results = claim_runs(results)
    protocol, groups = results["protocol"], group_runs(results["runs"])
    sigma, freedom = pooled_std(groups)
    lines = [
        f"CIFAR-10, {protocol['per_class']} training images per class ({10 * protocol['per_class']:,} in all, the "
        f"list `{protocol['subset']}`), {protocol['epochs']} epochs (batch {protocol['batch_size']}, "
        f"{protocol['optimizer']}), validated every {protocol['val_every']} epochs; teacher resnet20 trained alone on "
        "the same subset (seed 0). Top-1 on all the test images after the last epoch, mean ± std over seeds.", "",
        "| Claim | Control | Student | Seeds | Top-1 (%) | Control top-1 (%) | Δ | Noise band (2 s.e.) | Held? "
        "| Train loss | Test loss (min → final) | CPU min/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, student, teacher), records in groups.items():
        control = records[0].get("control")
        if method == "teacher":
            continue
        values = [percent(r["val_acc1"]) for r in records]
        mean, std = mean_std(values)
        accuracy = f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"
        minimum = statistics.fmean(min(p["val_loss"] for p in r["curve"]) for r in records)
        losses = f"{mean_of(records, 'final_train_loss'):.3f}", f"{minimum:.2f} → {mean_of(records, 'final_val_loss'):.2f}"
        cpu = statistics.fmean(r["cpu_s"] for r in records) / 60
        seeds = ", ".join(str(r["seed"]) for r in records)
        if control is None:
            lines.append(f"| {records[0]['label']} (control) | — | {student} | {seeds} | {accuracy} | | | | "
                         f"| {losses[0]} | {losses[1]} | {cpu:.0f} |")
            continue
        (_, _, _), controls = control_of(groups, method, control, student)
        label_control = controls[0]["label"] if controls else control
        if not controls:
            lines.append(f"| {records[0]['label']} | {label_control} | {student} | {seeds} | {accuracy} | not run "
                         f"| | | | {losses[0]} | {losses[1]} | {cpu:.0f} |")
            continue
        control_values = [percent(r["val_acc1"]) for r in controls]
        control_mean, control_std = mean_std(control_values)
        difference = mean - control_mean
        band = 2 * sigma * math.sqrt(1 / len(values) + 1 / len(control_values)) if freedom else float("nan")
        held = claim_verdict(method, difference, band, records)
        if len(values) < 3 or len(control_values) < 3:
            held += f" ({len(values)} vs {len(control_values)} seeds)"
        control_text = f"{control_mean:.2f} ± {control_std:.2f}" if len(control_values) > 1 else f"{control_mean:.2f}"
        lines.append(f"| {records[0]['label']} | {label_control} | {student} | {seeds} | {accuracy} | {control_text} "
                     f"| {difference:+.2f} | ±{band:.2f} | {held} | {losses[0]} | {losses[1]} | {cpu:.0f} |")
    cpu_hours = sum(r["cpu_s"] for r in every_run) / 3600
    noise = (f"Noise: sigma = {sigma:.2f} points, the pooled standard deviation over seeds of every method run with "
             f"several ({freedom} degrees of freedom); a claim holds when its Δ exceeds 2·sigma·sqrt(1/n + "
             "1/n_control) (UNIX KD's, KD's accuracy at less teacher computation: when Δ is not below minus that "
             "band and the computation is lower)." if freedom else "Noise: not measured yet (no method has two seeds).")
    lines += ["", noise, "", f"Finished runs: {len(every_run)}, {cpu_hours:.1f} CPU-hours in all."]
    if grids:
        lines += ["", grids.rstrip("\n")]
    if plot_link:
        stem, ext = os.path.splitext(plot_link)
        lines += ["", f"![Top-1 per method]({plot_link})", "", f"![Loss curves]({stem}_curves{ext})"]
    return "\n".join(lines) + "\n"


def render_curves(results: dict, path: str, pilot: dict | None) -> None:
    """Training and test loss against epochs: the Baselines of each seed, every method at its first seed, and the
    pilot's runs when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(results["runs"])
    panels = 3 if pilot else 2
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.5))
    baselines, methods = axes[0], axes[1]
    for (method, student, _), records in groups.items():
        if records[0].get("control") is None and not method.startswith("active_mixup"):
            for record in records:
                epochs = [p["epoch"] + 1 for p in record["curve"]]
                line, = baselines.plot(epochs, [p["train_loss"] for p in record["curve"]], "--", lw=1)
                baselines.plot(epochs, [p["val_loss"] for p in record["curve"]], "-", color=line.get_color(),
                               label=f"{record['label']} {student} seed {record['seed']}")
        elif not method.startswith("active_mixup"):
            record = records[0]
            methods.plot([p["epoch"] + 1 for p in record["curve"]], [p["val_loss"] for p in record["curve"]],
                         label=f"{record['label']} ({student})", lw=1)
    baselines.set_title("Students alone: training (dashed) and test (solid) loss")
    methods.set_title("Test loss of every method (first seed)")
    if pilot:
        for run in pilot["runs"]:
            epochs = [p["epoch"] + 1 for p in run["curve"]]
            line, = axes[2].plot(epochs, [p["train_loss"] for p in run["curve"]], "--", lw=1)
            axes[2].plot(epochs, [p["val_loss"] for p in run["curve"]], "-", color=line.get_color(), label=run["label"])
        axes[2].set_title("Pilot: Baseline resnet8, training (dashed) and test (solid) loss")
    for axis in axes:
        axis.set_xlabel("epoch")
        axis.set_ylabel("cross-entropy")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def render_plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(results["runs"])
    figure, (per_method, per_image) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1.1, 1]})
    rows = [(key, records) for key, records in groups.items()]
    several_students = len({student for (m, student, _) in groups if m != "teacher"}) > 1
    for position, ((method, student, teacher), records) in enumerate(rows):
        values = [percent(r["val_acc1"]) for r in records]
        mean, std = mean_std(values)
        colour = "tab:grey" if method == "teacher" else "tab:red" if method == "baseline" else "tab:blue"
        per_method.scatter(values, [position] * len(values), s=14, color=colour, alpha=0.5, zorder=2)
        per_method.errorbar(mean, position, xerr=0 if math.isnan(std) else std, fmt="o", color=colour, capsize=4,
                            zorder=3)
    labels = [
        f"{records[0]['label']} ({student})" if method == "teacher" or several_students else records[0]["label"]
        for (method, student, _), records in rows
    ]
    per_method.set_yticks(range(len(rows)), labels)
    per_method.invert_yaxis()
    for (method, student, _), records in rows:
        if method == "baseline" and not several_students:
            values = [percent(r["val_acc1"]) for r in records]
            mean, std = mean_std(values)
            per_method.axvline(mean, color="tab:red", lw=0.8, ls="--")
            if not math.isnan(std):
                per_method.axvspan(mean - std, mean + std, color="tab:red", alpha=0.1, lw=0)
    per_method.set_xlabel("top-1 (%) on the test images; dots: seeds, bars: ±1 std over seeds")
    per_method.set_title("Top-1 per method")
    per_method.grid(axis="x", alpha=0.3)

    plotted = False
    for (method, student, _), records in groups.items():
        if method not in TEACHER_AXIS_METHODS:
            continue
        label = records[0]["label"] + (f" ({student})" if several_students else "")
        if method.startswith("active_mixup"):  # its accuracy after each round of queries (and its random control's)
            for record in records:
                queries, accuracy = zip(*record["accuracy_vs_queries"]) if record["accuracy_vs_queries"] else ((), ())
                per_image.plot(queries, [percent(a) for a in accuracy], "o-", label=f"{label}, after each round")
        else:
            values = [percent(r["val_acc1"]) for r in records]
            mean, std = mean_std(values)
            per_image.errorbar(records[-1]["teacher_images"], mean, yerr=0 if math.isnan(std) else std, fmt="s",
                               capsize=4, label=label)
        plotted = True
    for (method, student, _), records in groups.items():
        if method in ("baseline", "teacher") and not several_students:
            mean = statistics.fmean(percent(r["val_acc1"]) for r in records)
            name = "Baseline, no teacher" if method == "baseline" else f"Teacher ({student})"
            per_image.axhline(mean, color="tab:red" if method == "baseline" else "tab:grey", ls="--", lw=0.8,
                              label=name)
    if plotted:
        per_image.set_xscale("log")
    per_image.set_xlabel("images the teacher was asked about in training (log scale)")
    per_image.set_ylabel("top-1 (%)")
    per_image.set_title("Top-1 against teacher images")
    per_image.grid(alpha=0.3)
    per_image.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks/results/cifar10_cpu.json"))
    parser.add_argument("--markdown", help="default: the results' path ending in .md")
    parser.add_argument("--plot", help="default: the results' path ending in .png")
    parser.add_argument("--pilot", help="scarce profile: the pilot's curves (JSON), plotted beside the runs'")
    args = parser.parse_args(argv)
    stem = os.path.splitext(args.results)[0]
    markdown_path, plot_path = args.markdown or stem + ".md", args.plot or stem + ".png"
    with open(args.results) as file:
        results = json.load(file)
    render_plot(claim_runs(results), plot_path)
    link = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(markdown_path)))
    if is_scarce(results):
        pilot = None
        if args.pilot:
            with open(args.pilot) as file:
                pilot = json.load(file)
        render_curves(claim_runs(results), os.path.splitext(plot_path)[0] + "_curves.png", pilot)
        markdown = render_claims(results, link)
    else:
        markdown = render_markdown(results, link)
    with open(markdown_path, "w") as file:
        file.write(markdown)
    print(markdown, end="")


if __name__ == "__main__":
    main()
