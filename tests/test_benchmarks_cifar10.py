"""benchmarks/cifar10_protocol.py end to end on tiny generated data: every run of the protocol through the CLI,
the results file, skipping and resuming, and benchmarks/render_cifar10.py's table and plot."""
import importlib.util
import json
import os
import sys

from conftest import REPO
from tiny_data import write_tiny_image_folder

# The runner's machinery on every kind of run (teacher use, three seeds, a first stage, self-distillation, peers,
# per-sample fields, query rounds); each method's own config is fitted by tests/test_cli.py.
PROTOCOL_METHODS = [
    "teacher", "baseline", "kd", "lsr", "tfkd_self", "tfkd_reg", "at", "sp", "fsp", "cskd", "byot", "msd", "dml",
    "unix", "active_mixup", "fitnet", "crd",
]
TINY_SCHEDULE = [
    "--teacher_epochs", "1", "--epochs", "1", "--batch_size", "16", "--num_workers", "0", "--train_fraction", "0.5",
    "--am_pool", "16", "--am_rounds", "1", "--am_queries", "8", "--am_candidates", "32", "--am_epochs_per_round", "1",
]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_protocol_runs_every_method_skips_resumes_and_renders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the protocol runs from the repository root; the test's directory comes back
    root = write_tiny_image_folder(tmp_path / "data", classes=4, per_class=16, splits=("train", "test"))
    protocol, render = load_script("cifar10_protocol"), load_script("render_cifar10")
    results_path = tmp_path / "results.json"
    arguments = ["--root", root, "--workdir", str(tmp_path / "runs"), "--results", str(results_path), *TINY_SCHEDULE,
                 "--methods", *PROTOCOL_METHODS]

    assert protocol.main(arguments) == 0
    results = json.loads(results_path.read_text())
    runs = {record["name"]: record for record in results["runs"]}
    every_run = protocol.cpu_cifar10_runs(protocol.parse_args(arguments))
    planned = [run.name for run in every_run if not run.on_request and run.method in PROTOCOL_METHODS]
    assert {"ft-s0", "crd-s0", "dkd-s0"} <= {run.name for run in every_run}  # every method has its run
    assert list(runs) == planned and "byot_exit_ce-s0" in {run.name for run in every_run}  # ablations on request
    assert {"teacher", "baseline-s2", "kd-s2", "dml-s0", "active_mixup-s0"} <= set(runs)
    for record in runs.values():
        assert 0.0 <= record["val_acc1"] <= 1.0
        assert record["commands"][0].startswith("lightning-kd fit --config configs/")
        assert record["machines"] == [protocol.machine()] and "torch " in record["machines"][0]
    steps_per_epoch = 2  # 64 training images in batches of 16, half of the batches
    assert runs["kd-s0"]["teacher_images"] == steps_per_epoch * 16
    assert 0 < runs["unix-s0"]["teacher_images"] < runs["kd-s0"]["teacher_images"]
    assert runs["baseline-s0"]["teacher_images"] == 0 and runs["kd-s0"]["teacher_flops"] > 0
    assert runs["fsp-s0"]["epochs"] == 2  # one epoch of FSP alone, then the schedule of the others
    assert [queries for queries, _ in runs["active_mixup-s0"]["accuracy_vs_queries"]] == [16, 24]
    assert "val/acc1/peer_1" in runs["dml-s0"]["extra"]

    # A second call skips every finished run; a run that has a checkpoint but no record resumes from it.
    results["runs"] = [record for record in results["runs"] if record["name"] != "kd-s0"]
    results_path.write_text(json.dumps(results))
    assert protocol.main(arguments) == 0
    rerun = {record["name"]: record for record in json.loads(results_path.read_text())["runs"]}
    assert list(rerun) == planned  # still in the protocol's order
    assert len(rerun["kd-s0"]["commands"]) == 2 and "--ckpt_path" in rerun["kd-s0"]["commands"][-1]
    assert rerun["kd-s0"]["cpu_s"] > 0

    # The teacher's checkpoint is lost (another machine): a run that needs it trains the teacher again first, and
    # a record that a parallel sitting writes meanwhile is kept.
    import shutil

    shutil.rmtree(tmp_path / "runs" / "teacher" / "checkpoints")
    pruned = json.loads(results_path.read_text())
    parallel = next(record for record in pruned["runs"] if record["name"] == "lsr-s0")
    pruned["runs"] = [record for record in pruned["runs"] if record["name"] not in ("kd-s1", "lsr-s0")]
    results_path.write_text(json.dumps(pruned))
    fit = protocol.run_fit

    def fit_while_another_sitting_finishes(argv, run_dir):
        if run_dir.endswith("kd-s1"):
            order = {name: position for position, name in enumerate(planned)}
            protocol.add_record(str(results_path), pruned["protocol"], dict(parallel), order)
        fit(argv, run_dir)

    monkeypatch.setattr(protocol, "run_fit", fit_while_another_sitting_finishes)
    assert protocol.main([*arguments, "--only", "teacher", "kd-s1"]) == 0
    retrained = {record["name"]: record for record in json.loads(results_path.read_text())["runs"]}
    assert list(retrained) == planned
    assert retrained["teacher"]["previous"][0]["val_acc1"] == runs["teacher"]["val_acc1"]
    assert (tmp_path / "runs" / "teacher" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "runs" / "teacher" / protocol.RETRAINING).exists()
    assert retrained["kd-s1"]["finished"] >= retrained["teacher"]["finished"]

    # An ablation runs when named, with its overrides, and is recorded after the protocol's runs.
    assert protocol.main([*arguments, "--only", "byot_exit_ce-s0", "--methods", "byot_exit_ce"]) == 0
    ablated = json.loads(results_path.read_text())["runs"]
    assert [record["name"] for record in ablated] == [*planned, "byot_exit_ce-s0"]
    assert "--model.init_args.ce_weight 1 --model.init_args.kd_weight 0 --model.init_args.beta 0" in ablated[-1]["commands"][0]

    # A sitting with other seeds records its runs after the protocol's, not first.
    assert protocol.main([*arguments, "--methods", "lsr", "--seeds", "1"]) == 0
    reseeded = [record["name"] for record in json.loads(results_path.read_text())["runs"]]
    assert reseeded == [*planned, "byot_exit_ce-s0", "lsr-s1"]

    render.main(["--results", str(results_path)])
    markdown = (tmp_path / "results.md").read_text()
    assert "| KD | 0, 1, 2 |" in markdown and "Run-to-run noise: sigma" in markdown
    assert "| BYOT exits, CE only (α=0, λ=0) | 0 |" in markdown
    assert (tmp_path / "results.png").stat().st_size > 0


def test_a_losss_warm_up_keeps_its_share_of_the_schedule():
    """DKD's and ReviewKD's ramp takes mdistiller's 20 of 240 epochs of any --epochs, not the config's own count;
    DKD's never fewer than 3 (without it, 4 epochs train resnet8 to 52 % instead of 76 %)."""
    protocol = load_script("cifar10_protocol")
    for epochs, dkd, reviewkd in ((4, 3, 0), (24, 3, 2), (60, 5, 5), (240, 20, 20)):
        args = protocol.parse_args(["--root", "data", "--epochs", str(epochs)])
        for method, warmup in (("dkd", dkd), ("reviewkd", reviewkd)):
            _, overrides = protocol.cpu_schedule(method, args)
            assert overrides[overrides.index("--model.init_args.warmup_epochs") + 1] == str(warmup)


SCARCE_METHODS = ["baseline_r20", "baseline", "kd", "tfkd_self", "fsp", "byot", "unix", "active_mixup",
                  "active_mixup_random"]
SCARCE_GRID_POINT = "tfkd_self_T2"  # Tf-KD self at T = 2 instead of its config's 6


def test_scarce_profile_trains_on_the_shipped_subset_against_each_claims_control(tmp_path, monkeypatch):
    """cpu-cifar10-scarce: the subset's list is written once and every run trains on it alone; the records carry
    each method's control, the final losses and the loss curves; BYOT's student is resnet20 (against resnet20
    alone), Active Mixup's pool is the subset and its control spends the same queries on random mixes."""
    monkeypatch.chdir(tmp_path)
    root = write_tiny_image_folder(tmp_path / "data", classes=4, per_class=16, splits=("train", "test"))
    protocol, render = load_script("cifar10_protocol"), load_script("render_cifar10")
    monkeypatch.setattr(protocol, "SUBSETS", str(tmp_path / "subsets"))
    results_path = tmp_path / "scarce.json"
    arguments = ["--profile", "cpu-cifar10-scarce", "--root", root, "--workdir", str(tmp_path / "runs"),
                 "--results", str(results_path), "--per_class", "4", "--epochs", "2", "--val_every", "1",
                 "--batch_size", "8", "--num_workers", "0", "--seeds", "0", "--am_pool", "16", "--am_rounds", "1",
                 "--am_queries", "8", "--am_candidates", "32", "--am_epochs_per_round", "1", "--methods",
                 *SCARCE_METHODS, SCARCE_GRID_POINT]
    assert protocol.main(arguments) == 0

    listing = (tmp_path / "subsets" / "cifar10_train_4_per_class_seed0.txt").read_text().split("\n")
    names = [line for line in listing[1:] if line]
    assert len(names) == 16 and [name.split("/")[0] for name in names] == [f"class_{c:02d}" for c in range(4) for _ in range(4)]
    assert protocol.class_balanced_subset(os.path.join(root, "train"), 4, 0) == names  # the same draw again
    assert protocol.class_balanced_subset(os.path.join(root, "train"), 4, 1) != names

    runs = {record["name"]: record for record in json.loads(results_path.read_text())["runs"]}
    assert list(runs) == [f"{method}-s0" for method in [*SCARCE_METHODS, SCARCE_GRID_POINT]]
    grid_point = runs.pop(f"{SCARCE_GRID_POINT}-s0")
    assert grid_point["grid"] == {"method": "tfkd_self", "setting": "T = 2", "changes": {"temperature": 2.0},
                                  "config": {"temperature": 6.0}}
    assert "--model.init_args.temperature 2.0" in grid_point["commands"][0] and grid_point["control"] == "baseline"
    assert {"train/loss_ce_epoch", "train/loss_kd_epoch"} <= set(grid_point["extra"])  # the method's own terms, for diagnosis
    default_runs = protocol.cpu_cifar10_scarce_runs(protocol.parse_args(["--profile", "cpu-cifar10-scarce"]))
    assert all(run.on_request for run in default_runs if run.grid) and len([r for r in default_runs if r.grid]) == len(protocol.SCARCE_GRIDS)
    controls = {name: record["control"] for name, record in runs.items()}
    assert controls == {"baseline_r20-s0": None, "baseline-s0": None, "kd-s0": "baseline", "tfkd_self-s0": "baseline",
                        "fsp-s0": "baseline", "byot-s0": "baseline_r20", "unix-s0": "kd",
                        "active_mixup-s0": "active_mixup_random", "active_mixup_random-s0": None}
    assert runs["byot-s0"]["student"] == "resnet20" and "--model.init_args.student resnet20" in runs["byot-s0"]["commands"][0]
    steps = 2  # 16 images of the subset, batches of 8: the other 48 training images are left out
    assert runs["kd-s0"]["teacher_images"] == steps * 8 * 2
    assert runs["fsp-s0"]["epochs"] == 3  # a first stage of --val_every epochs, so the last epoch is validated
    for record in runs.values():
        assert record["final_train_loss"] > 0 and record["final_val_loss"] > 0
        assert [point["epoch"] for point in record["curve"]][-1] == record["epochs"] - 1
    assert [queries for queries, _ in runs["active_mixup-s0"]["accuracy_vs_queries"]] == [16, 24]
    assert [queries for queries, _ in runs["active_mixup_random-s0"]["accuracy_vs_queries"]] == [16, 24]
    assert "--model.init_args.selection random" in runs["active_mixup_random-s0"]["commands"][0]
    assert all("--data.train_subset" in record["commands"][0] or "--data.source.train_subset" in record["commands"][0]
               for record in runs.values())

    render.main(["--results", str(results_path)])
    markdown = (tmp_path / "scarce.md").read_text()
    assert "| Claim | Control |" in markdown and "| UNIX KD | KD |" in markdown
    claims, grids = markdown.split("Diagnosis grids")
    assert "T = 2" not in claims  # a grid point is no claim
    assert "| Tf-KD self | config: temperature = 6 | 0 | " in grids and "| Tf-KD self | temperature = 2 | 0 | " in grids
    assert "| ce 0." in grids and ", kd 0." in grids  # the grid point's loss terms
    assert (tmp_path / "scarce.png").stat().st_size > 0 and (tmp_path / "scarce_curves.png").stat().st_size > 0


def test_a_runs_model_arguments_are_its_configs_with_its_overrides():
    protocol = load_script("cifar10_protocol")
    run = protocol.Run("dml-s0", "dml", "DML", "configs/folder/dml/resnet8-resnet8.yaml", 0, 4, overrides=[
        "--model.init_args.peers", '["resnet20"]', "--model.init_args.lr_scheduler.init_args.T_max", "4",
        "--model.init_args.student", "resnet20", "--model.init_args.student", "resnet32"])
    init = run.model_init()
    assert init["peers"] == ["resnet20"] and init["student"] == "resnet32"  # parsed, the last one winning
    assert init["optimizer"]["init_args"]["lr"] == 0.1 and "lr_scheduler.init_args.T_max" not in init


def test_grid_settings_read_as_written():
    render = load_script("render_cifar10")
    assert render.setting_text({"beta": 10.0, "peers": ["resnet8", "resnet8"]}) == "beta = 10, peers = [resnet8, resnet8]"
    assert render.setting_text({"kd_weight": 0.5, "selection": "random"}) == "kd_weight = 0.5, selection = random"
