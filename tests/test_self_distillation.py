"""Self-distillation without a pretrained teacher: CS-KD (+ the class-pair sampler), BYOT, MSD and DML."""
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from conftest import REPO, data_args, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.data import ClassPairBatchSampler, EpochSeededRandomSampler, ImageFolderDataModule
from lightning_kd.export import export_student, load_module
from lightning_kd.methods import BYOT, CSKD, DML, MSD, byot_loss, cskd_loss, dml_loss, msd_loss
from lightning_kd.methods.cskd import check_paired

FOLDER_CSKD = os.path.join(REPO, "configs", "folder", "cskd", "resnet8.yaml")
FOLDER_DML = os.path.join(REPO, "configs", "folder", "dml", "resnet8-wrn_16_1.yaml")
BYOT_CONFIG = os.path.join(REPO, "configs", "cifar100", "byot", "resnet32x4.yaml")
LN3 = math.log(3.0)


def kl(p, q):
    """KL(p ‖ q) of two probability lists, written out."""
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# --------------------------------------------------------------------------- class-pair sampler
TARGETS = [i % 5 for i in range(40)]  # 5 classes of 8 samples


def pair_batches(sampler: ClassPairBatchSampler) -> list[tuple[list[int], list[int]]]:
    return [(batch[: len(batch) // 2], batch[len(batch) // 2 :]) for batch in sampler]


def test_every_pair_shares_a_class_and_every_sample_is_an_anchor_once():
    sampler = ClassPairBatchSampler(EpochSeededRandomSampler(40), batch_size=6, drop_last=False, targets=TARGETS)
    batches = pair_batches(sampler)
    assert len(batches) == len(sampler) == 7 and len(batches[-1][0]) == 4
    anchors = [a for batch, _ in batches for a in batch]
    partners = [p for _, batch in batches for p in batch]
    assert sorted(anchors) == list(range(40)) and sorted(partners) == list(range(40))
    assert all(TARGETS[a] == TARGETS[p] for a, p in zip(anchors, partners))
    assert all(a != p for a, p in zip(anchors, partners))  # 8 per class: a partner is always another sample
    dropped = ClassPairBatchSampler(EpochSeededRandomSampler(40), batch_size=6, drop_last=True, targets=TARGETS)
    assert len(list(dropped)) == len(dropped) == 6


def test_a_two_rank_split_covers_the_data_once():
    shards = []
    for rank in range(2):
        anchors = DistributedSampler(range(40), num_replicas=2, rank=rank, shuffle=True, seed=0)
        batches = pair_batches(ClassPairBatchSampler(anchors, batch_size=4, drop_last=False, targets=TARGETS))
        shards.append({a for batch, _ in batches for a in batch})
        assert all(TARGETS[a] == TARGETS[p] for batch, partners in batches for a, p in zip(batch, partners))
        # each rank pairs within its own shard
        assert {p for _, partners in batches for p in partners} == shards[-1]
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(40))


def test_epochs_differ_and_an_epoch_repeats_exactly():
    sampler = ClassPairBatchSampler(EpochSeededRandomSampler(40), batch_size=8, drop_last=False, targets=TARGETS)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(sum(second, [])) == sorted(sum(first, []))
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_paired_batches_option_of_the_data_modules(tiny_folder):
    data = ImageFolderDataModule(tiny_folder, batch_size=4, num_workers=0, paired_batches=True)
    data.setup()
    x, y = next(iter(data.train_dataloader()))
    assert x.shape[0] == 8 and torch.equal(y[:4], y[4:])
    assert next(iter(data.val_dataloader()))[0].shape[0] == 4  # evaluation stays unpaired


# --------------------------------------------------------------------------- losses by hand
def test_cskd_loss_by_hand():
    logits = torch.zeros(1, 2, requires_grad=True)  # uniform prediction
    pair = torch.tensor([[2 * LN3, 0.0]], requires_grad=True)  # softmax(pair / 2) = (3/4, 1/4)
    loss = cskd_loss(logits, pair, temperature=2.0)
    assert loss.item() == pytest.approx(4 * kl([0.75, 0.25], [0.5, 0.5]), rel=1e-6)
    loss.backward()
    assert pair.grad is None and logits.grad.abs().sum() > 0  # the partner's prediction is a fixed target


def test_byot_loss_by_hand():
    exit_logits = torch.tensor([[[0.0, 0.0]], [[LN3, 0.0]]], requires_grad=True)  # shallow (1/2, 1/2), deep (3/4, 1/4)
    exit_features = torch.tensor([[[1.0, 3.0]], [[0.0, 1.0]]], requires_grad=True)
    terms = byot_loss(exit_logits, exit_features, torch.tensor([0]), ce_weight=0.75, kd_weight=0.25,
                      temperature=1.0, beta=0.1)
    assert terms["ce"].item() == pytest.approx(0.75 * (math.log(2) + math.log(4 / 3)), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(0.25 * kl([0.75, 0.25], [0.5, 0.5]), rel=1e-6)
    assert terms["hint"].item() == pytest.approx(0.1 * (1**2 + 2**2) / 2, rel=1e-6)
    (terms["kd"] + terms["hint"]).backward()
    assert exit_logits.grad[1].abs().sum() == 0 and exit_features.grad[1].abs().sum() == 0  # the deepest teaches
    assert exit_logits.grad[0].abs().sum() > 0 and exit_features.grad[0].abs().sum() > 0


def test_msd_loss_by_hand():
    exit_logits = torch.tensor([[[0.0, 0.0]], [[LN3, 0.0]], [[0.0, LN3]]], requires_grad=True)
    p = [[0.5, 0.5], [0.75, 0.25], [0.25, 0.75]]
    exit_features = torch.tensor([[[1.0]], [[2.0]], [[4.0]]])
    terms = msd_loss(exit_logits, exit_features, torch.tensor([1]), ce_weight=0.5, kd_weight=0.5,
                     temperature=1.0, beta=1.0)
    assert terms["ce"].item() == pytest.approx(0.5 * -(math.log(0.5) + math.log(0.25) + math.log(0.75)), rel=1e-6)
    mutual = sum(kl(p[j], p[i]) for i in range(3) for j in range(3) if j != i) / 2
    assert terms["kd"].item() == pytest.approx(0.5 * mutual, rel=1e-6)
    assert terms["hint"].item() == pytest.approx((4 - 1) ** 2 + (4 - 2) ** 2, rel=1e-6)
    terms["kd"].backward()
    assert exit_logits.grad[2].abs().sum() > 0  # unlike BYOT, the deepest learns from the others too


def test_dml_loss_by_hand():
    logits = torch.tensor([[[0.0, 0.0]], [[LN3, 0.0]], [[0.0, LN3]]], requires_grad=True)
    p = [[0.5, 0.5], [0.75, 0.25], [0.25, 0.75]]
    ce, mean_kl = dml_loss(logits, torch.tensor([0]))
    assert ce.tolist() == pytest.approx([math.log(2), -math.log(0.75), -math.log(0.25)], rel=1e-6)
    expected = [(kl(p[j1], p[k]) + kl(p[j2], p[k])) / 2 for k, (j1, j2) in enumerate([(1, 2), (0, 2), (0, 1)])]
    assert mean_kl.tolist() == pytest.approx(expected, rel=1e-6)
    mean_kl[0].backward()
    assert logits.grad[1:].abs().sum() == 0  # peer 0's term moves peer 0 only


# --------------------------------------------------------------------------- clear errors
@pytest.mark.parametrize(
    "cls, kwargs, pattern",
    [
        (CSKD, {"temperature": 0.0}, "temperature must lie in"),
        (CSKD, {"kd_weight": -1.0}, "kd_weight must lie in"),
        (BYOT, {"alpha": 1.5}, "alpha must lie in"),  # the deprecated name is checked too
        (BYOT, {"kd_weight": -1.0}, "kd_weight must lie in"),
        (BYOT, {"alpha": 0.5, "kd_weight": 0.5}, "alpha is the deprecated form of ce_weight = 1 - alpha"),
        (BYOT, {"stages": ["layer3"]}, "at least 2 stages"),
        (BYOT, {"stages": ["layer1", "fc"]}, r"Stage 'fc' outputs shape \(10,\)"),
        (BYOT, {"stages": ["layer1", "layer9"]}, "Unknown student layer 'layer9'"),
        (MSD, {"beta": -0.1}, "beta must lie in"),
        (MSD, {"feature_weight": 0.1, "beta": 0.2}, "feature_weight is the deprecated name of beta; give beta only"),
        (DML, {"peers": []}, "at least one peer"),
    ],
)
def test_bad_arguments_are_one_clear_error(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(student="resnet8", num_classes=10, **kwargs)


def test_unpaired_batches_fail_at_start_up(tiny_folder, tmp_path):
    check_paired(torch.tensor([1, 2, 1, 2]))
    for targets in ([1, 2, 2, 1], [1, 1, 1]):
        with pytest.raises(ValueError, match="class-paired batches"):
            check_paired(torch.tensor(targets))
    with pytest.raises(ValueError, match="paired_batches: true"):
        cli_main(["fit", f"--config={FOLDER_CSKD}", *data_args(tiny_folder, download=None), *trainer_args(tmp_path),
                  "--data.init_args.paired_batches=false"])


def test_a_single_network_method_has_no_other_deployable():
    with pytest.raises(ValueError, match="deploys one network"):
        CSKD(student="resnet8", num_classes=10).deployable("peer_1")


# --------------------------------------------------------------------------- BYOT / MSD heads
@pytest.mark.parametrize(
    "student, halvings, width",
    [("resnet8", [2, 1], 64), ("resnet18", [3, 2, 1], 512)],  # a CIFAR ResNet and torchvision's (weights=None)
)
def test_byot_heads_fit_any_backbone(student, halvings, width):
    torch.manual_seed(0)
    module = BYOT(student=student, num_classes=10)
    module.setup("fit")
    assert [len(head.bottleneck) for head in module.heads] == halvings
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    step = module.forward_step(x, y)
    exits = len(halvings) + 1
    assert step.outputs["exit_logits"].shape == (exits, 2, 10) and step.outputs["exit_features"].shape == (exits, 2, width)
    assert all(torch.isfinite(term) for term in module.loss_terms(step.float()).values())

    module.eval()
    with torch.no_grad():
        logits, named = module.evaluation_logits(x)
        assert sorted(named) == sorted([f"exit_{k}" for k in range(1, exits + 1)] + ["ensemble"])
        assert module.deployable() is module.student  # the deepest exit needs no head
        first = module.deployable("exit_1")
        torch.testing.assert_close(first(x), named["exit_1"])
    kept = {name.split(".")[0] for name, _ in first.trunk.named_parameters()}
    assert kept == {"conv1", "bn1", "layer1"}  # the early exit leaves the later stages out
    with pytest.raises(ValueError, match="deploys one of the exits"):
        module.deployable("peer_1")


def test_msd_heads_read_a_sampled_block_in_training_and_the_stage_output_else():
    module = MSD(student="resnet20", num_classes=10)
    assert module.branch_points[0] == ["layer1.0", "layer1.1", "layer1.2"]
    features = {name: torch.tensor([float(i)]) for i, name in enumerate(module.student_layers)}
    module.train()
    torch.manual_seed(0)
    seen = {module.exit_inputs(features)[0].item() for _ in range(30)}
    assert seen == {float(module.student_layers.index(name)) for name in module.branch_points[0]}
    module.eval()
    assert module.exit_inputs(features)[0] is features["layer1"]


def test_byot_fit_logs_every_exit_and_exports_an_early_one(tiny_cifar100, tmp_path):
    cli = cli_main(["fit", f"--config={BYOT_CONFIG}", "--model.init_args.student=resnet8",
                    *data_args(tiny_cifar100, batch_size=4), *trainer_args(tmp_path)])
    metrics = cli.trainer.callback_metrics
    assert {"val/acc1", "val/acc1/exit_1", "val/acc1/exit_3", "val/acc1/ensemble", "train/loss_hint"} <= set(metrics)
    assert metrics["val/acc1/exit_3"] == metrics["val/acc1"]  # the deepest exit is the main output
    program = export_student(str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "exit1.pt2"), network="exit_1")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = cli.model.eval().deployable("exit_1")(x)
    torch.testing.assert_close(torch.export.load(program).module()(x), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- DML
def test_dml_peers_of_different_architectures_share_one_optimizer():
    module = DML(student="resnet8", peers=["wrn_16_1"], num_classes=10)
    step = module.forward_step(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert step.outputs["peer_logits"].shape == (2, 2, 10)
    assert set(module.loss_terms(step.float())) == {"ce_peer_0", "kl_peer_0", "ce_peer_1", "kl_peer_1"}
    optimized = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters()}
    assert module.deployable() is module.student and module.deployable("peer_1") is module.peers[0]
    with pytest.raises(ValueError, match="deploys one of the peers"):
        module.deployable("peer_2")


def ddp_fit(config: str, root, workdir, *extra: str) -> None:
    """Fit one whole epoch of the tiny folder (64 images, 8 a batch) with 2 CPU processes through the CLI."""
    args = [a for a in trainer_args(workdir) if not a.startswith("--trainer.limit_train_batches")]
    command = [sys.executable, "-m", "lightning_kd.cli", "fit", f"--config={config}",
               *data_args(root, batch_size=8, download=None), *args, "--trainer.strategy=ddp", "--trainer.devices=2",
               *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stderr + result.stdout
    checkpoint = torch.load(workdir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4  # each rank pairs/trains on its own 32 images: 4 steps, not 8


def test_two_process_ddp_fit_of_cskd_on_cpu(tiny_folder, tmp_path):
    ddp_fit(FOLDER_CSKD, tiny_folder, tmp_path)


def test_two_process_ddp_bf16_fit_of_dml_on_cpu_logs_and_exports_every_peer(tiny_folder, tmp_path):
    ddp_fit(FOLDER_DML, tiny_folder, tmp_path, "--trainer.precision=bf16-mixed",
            "--trainer.logger=pytorch_lightning.loggers.CSVLogger", f"--trainer.logger.init_args.save_dir={tmp_path}")
    header = open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv").readline().strip().split(",")
    assert {"val/acc1", "val/acc1/peer_0", "val/acc1/peer_1", "train/loss_kl_peer_1_epoch"} <= set(header)
    ckpt = str(tmp_path / "checkpoints" / "last.ckpt")
    program = export_student(ckpt, str(tmp_path / "peer1.pt2"), network="peer_1")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = load_module(ckpt).peers[0](x)
    torch.testing.assert_close(torch.export.load(program).module()(x), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="format=state_dict writes the student only"):
        export_student(ckpt, str(tmp_path / "peer1.pth"), format="state_dict", network="peer_1")
