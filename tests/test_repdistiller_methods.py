"""NST, PKT, RKD, CC and FT as DistillationModules: each objective against its losses applied by hand to the same
features, gradients (student and owned heads, never the teacher), CC's trained teacher-side embedding, FT's two
stages (unit and through the CLI with its folder config), defaults and argument errors."""
import csv
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from conftest import REPO, data_args, state_hash, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.methods import (
    CC,
    FT,
    NST,
    PKT,
    RKD,
    cc_kernel_loss,
    cc_loss,
    ft_loss,
    kd_loss,
    nst_loss,
    paraphraser_loss,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
)
from lightning_kd.models import get_model

PAIR = {"student": "resnet8", "teacher": "resnet14", "num_classes": 10}
pytestmark = pytest.mark.filterwarnings("ignore:.*no teacher_ckpt given")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on several competing for a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def step_of(module, batch: int = 4):
    """One forward step on random 32x32 images (hooks registered first), in float32 as ``loss_terms`` gets it."""
    module.setup("fit")
    torch.manual_seed(0)
    return module.forward_step(torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))).float()


def ce(step):
    return F.cross_entropy(step.student_logits, step.targets).item()


def ids(parameters):
    return {id(parameter) for parameter in parameters}


# --- each objective against its losses applied by hand ----------------------------------------------
def test_nst_objective_sums_the_mmd_of_every_stage_end():
    module = NST(beta=3.0, kd_weight=0.5, temperature=2.0, **PAIR)
    assert module.student_layers == module.teacher_layers == ["layer1", "layer2", "layer3"]
    step = step_of(module)
    assert step.student_features["layer1"].shape == (4, 16, 32, 32)
    terms = module.loss_terms(step)
    assert set(terms) == {"ce", "kd", "nst"}
    mmd = sum(nst_loss(step.student_features[n], step.teacher_features[n]).item() for n in module.student_layers)
    assert terms["nst"].item() == pytest.approx(3.0 * mmd, rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.5 * kd_loss(step.student_logits, step.teacher_logits, 2.0).item())
    assert terms["ce"].item() == pytest.approx(ce(step))


def test_pkt_objective_on_the_classifier_input():
    module = PKT(beta=7.0, **PAIR)
    assert module.student_layers == module.teacher_layers == ["fc:input"]
    step = step_of(module)
    f_s, f_t = step.student_features["fc:input"], step.teacher_features["fc:input"]
    assert f_s.shape == f_t.shape == (4, 64)
    # the pooled penultimate feature: what the classifier reads
    torch.testing.assert_close(module.student.fc(f_s), step.student_logits)
    torch.testing.assert_close(module.teacher.fc(f_t), step.teacher_logits)
    terms = module.loss_terms(step)
    assert set(terms) == {"ce", "pkt"}
    assert terms["pkt"].item() == pytest.approx(7.0 * pkt_loss(f_s, f_t).item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce(step))


def test_rkd_objective_logs_distance_and_angle_apart():
    module = RKD(beta=2.0, distance_weight=3.0, angle_weight=5.0, **PAIR)
    assert module.student_layers == ["fc:input"]
    step = step_of(module)
    f_s, f_t = step.student_features["fc:input"], step.teacher_features["fc:input"]
    terms = module.loss_terms(step)
    assert set(terms) == {"ce", "rkd_distance", "rkd_angle"}
    assert terms["rkd_distance"].item() == pytest.approx(6.0 * rkd_distance_loss(f_s, f_t).item(), rel=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(10.0 * rkd_angle_loss(f_s, f_t).item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce(step))
    # a zero-weighted part is left out
    assert set(RKD(angle_weight=0.0, **PAIR).loss_terms(step)) == {"ce", "rkd_distance"}
    assert set(RKD(beta=0.0, **PAIR).loss_terms(step)) == {"ce"}


@pytest.mark.parametrize("variant", ["repdistiller", "paper"])
def test_cc_objective_through_both_owned_embeddings(variant):
    module = CC(beta=0.5, embed_dim=16, variant=variant, gamma=0.3, order=3, **PAIR)
    assert (module.embed_s.linear.in_features, module.embed_s.linear.out_features) == (64, 16)
    assert (module.embed_t.linear.in_features, module.embed_t.linear.out_features) == (64, 16)
    step = step_of(module)
    e_s = module.embed_s(step.student_features["fc:input"])
    e_t = module.embed_t(step.teacher_features["fc:input"])
    expected = cc_loss(e_s, e_t) if variant == "repdistiller" else cc_kernel_loss(e_s, e_t, 0.3, 3)
    terms = module.loss_terms(step)
    assert set(terms) == {"ce", "cc"}
    assert terms["cc"].item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce(step))


def test_cc_sizes_each_embedding_from_its_own_network():
    module = CC(student="resnet8", teacher="resnet8x4", num_classes=10)
    assert (module.embed_s.linear.in_features, module.embed_t.linear.in_features) == (64, 256)
    assert module.embed_s.linear.out_features == module.embed_t.linear.out_features == 128


def test_ft_objective_in_each_stage(monkeypatch):
    module = FT(beta=4.0, p=2.0, rate=0.25, paraphrase_epochs=2, **PAIR)
    assert module.student_layers == module.teacher_layers == ["layer3"]
    assert module.paraphraser.encoder[0].in_channels == 64 and module.paraphraser.encoder[-3].out_channels == 16
    assert module.translator.encoder[0].in_channels == 64 and module.translator.encoder[-3].out_channels == 16

    step = step_of(module)  # epoch 0: stage "paraphrase"
    teacher_map = step.teacher_features["layer3"]
    terms = module.loss_terms(step)
    assert set(terms) == {"reconstruction"}
    expected = paraphraser_loss(module.paraphraser(teacher_map)[1], teacher_map)
    assert terms["reconstruction"].item() == pytest.approx(expected.item(), rel=1e-6)

    monkeypatch.setattr(FT, "current_epoch", 2)  # stage "distill"
    step = step_of(module)
    teacher_map = step.teacher_features["layer3"]
    terms = module.loss_terms(step)
    assert set(terms) == {"ce", "ft"}
    expected = ft_loss(module.translator(step.student_features["layer3"]), module.paraphraser.encode(teacher_map), 2.0)
    assert terms["ft"].item() == pytest.approx(4.0 * expected.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce(step))


# --- gradients --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, kwargs, trained_heads",
    [
        (NST, {}, []),
        (PKT, {}, []),
        (RKD, {}, []),
        (CC, {}, ["embed_s", "embed_t"]),
        (FT, {"paraphrase_epochs": 0}, ["translator"]),  # the distill stage from the start
    ],
    ids=["NST", "PKT", "RKD", "CC", "FT"],
)
def test_the_feature_term_reaches_the_student_and_owned_heads_never_the_teacher(method, kwargs, trained_heads):
    module = method(ce_weight=0.0, **PAIR, **kwargs)
    terms = module.loss_terms(step_of(module))
    assert "ce" not in terms
    torch.stack(list(terms.values())).sum().backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert module.student.conv1.weight.grad.abs().sum() > 0
    assert module.student.fc.weight.grad is None  # the feature term alone stops before the classifier
    for head in trained_heads:  # (a convolution's bias before BatchNorm gets a zero gradient: summed over the head)
        grads = [p.grad for p in getattr(module, head).parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, head
    if method is FT:
        assert all(p.grad is None for p in module.paraphraser.parameters())


def test_ft_paraphrase_stage_trains_the_paraphraser_alone_and_leaves_the_student_as_it_is():
    module = FT(**PAIR)
    module.train()
    before = state_hash(module.student)
    step = step_of(module)
    assert state_hash(module.student) == before  # eval mode: no BatchNorm statistic moved
    assert not step.student_logits.requires_grad and module.student.training  # its mode given back
    terms = module.loss_terms(step)
    terms["reconstruction"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.paraphraser.parameters())
    for network in (module.student, module.translator, module.teacher):
        assert all(p.grad is None for p in network.parameters())


# --- CC's teacher-side embedding ----------------------------------------------------------------------
def test_cc_trains_the_teacher_embedding_but_not_the_teacher():
    module = CC(**PAIR)
    module.train()
    trainable = ids(module.trainable_parameters(module.stage))
    assert ids(module.embed_t.parameters()) <= trainable and ids(module.embed_s.parameters()) <= trainable
    assert ids(module.student.parameters()) <= trainable
    assert not ids(module.teacher.parameters()) & trainable
    assert not any(name.startswith("teacher.") for name, p in module.named_parameters() if id(p) in trainable)
    assert not module.teacher.training and module.embed_t.training

    optimizer = module.configure_optimizers()["optimizer"]
    assert ids(p for group in optimizer.param_groups for p in group["params"]) == trainable
    embed_t, teacher = module.embed_t.linear.weight.detach().clone(), state_hash(module.teacher)
    terms = module.loss_terms(step_of(module))
    torch.stack(list(terms.values())).sum().backward()
    optimizer.step()
    assert not torch.equal(module.embed_t.linear.weight, embed_t)
    assert state_hash(module.teacher) == teacher


# --- FT's stages --------------------------------------------------------------------------------------
def test_ft_stages_optimizers_and_paraphraser_mode(monkeypatch):
    module = FT(paraphrase_epochs=2, paraphraser_lr=0.02, **PAIR)
    paraphrase, distill = module.training_stages()
    assert (paraphrase.name, paraphrase.epochs, paraphrase.constant_lr) == ("paraphrase", 2, True)
    assert paraphrase.teacher  # the paraphraser reconstructs the teacher's map
    assert (distill.name, distill.epochs, distill.optimizer, distill.constant_lr) == ("distill", None, None, False)

    first = module.trainable_parameters(paraphrase)
    assert ids(first) == ids(module.paraphraser.parameters())
    optimizer = paraphrase.optimizer(first)  # the module's optimizer (cifar_sgd) at paraphraser_lr
    assert isinstance(optimizer, torch.optim.SGD)
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in optimizer.param_groups] == [(0.02, 0.9, 5e-4)]
    assert FT(paraphraser_lr=None, **PAIR).paraphraser_optimizer(first).param_groups[0]["lr"] == 0.05

    second = ids(module.trainable_parameters(distill))
    assert not second & ids(module.paraphraser.parameters())
    assert not second & ids(module.teacher.parameters())
    assert ids(module.translator.parameters()) | ids(module.student.parameters()) == second

    module.train()
    assert module.paraphraser.training
    monkeypatch.setattr(FT, "current_epoch", 2)
    module.train()
    assert not module.paraphraser.training and module.translator.training and module.student.training
    assert not module.teacher.training
    module.eval()
    module.train()
    assert not module.paraphraser.training


@pytest.fixture(scope="module")
def resnet20_teacher(tmp_path_factory):
    """A random 4-class resnet20 (the folder configs' teacher) with BatchNorm statistics from one batch of noise."""
    torch.manual_seed(0)
    teacher = get_model("resnet20", 4)
    for module in teacher.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        teacher.train()(torch.randn(16, 3, 32, 32))
    path = tmp_path_factory.mktemp("teacher") / "resnet20.pth"
    torch.save(teacher.state_dict(), path)
    return str(path)


class StageRecorder(pl.Callback):
    """At the first batch of every epoch (after the stage's optimizer is built) and at the end of training: the
    stage, the paraphraser's mode, the optimizer's parameters and learning rate, and hashes of the networks."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def snapshot(self, trainer, module) -> dict:
        optimizer = trainer.optimizers[0]
        return {
            "stage": module.stage.name,
            "paraphraser_training": module.paraphraser.training,
            "params": ids(p for group in optimizer.param_groups for p in group["params"]),
            "lr": optimizer.param_groups[0]["lr"],
            **{name: state_hash(getattr(module, name)) for name in ("student", "paraphraser", "translator", "teacher")},
        }

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            self.records.append(self.snapshot(trainer, module))

    def on_train_end(self, trainer, module):
        self.records.append(self.snapshot(trainer, module))


def test_ft_two_stages_through_the_cli(tiny_folder, resnet20_teacher, tmp_path):
    cli = cli_main([
        f"--config={REPO}/configs/folder/ft/resnet20-resnet8.yaml",
        *data_args(tiny_folder, batch_size=8, download=None),
        *trainer_args(tmp_path), f"--model.init_args.teacher_ckpt={resnet20_teacher}",
        "--model.init_args.paraphrase_epochs=1", "--trainer.max_epochs=2",
        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
    ], run=False)
    recorder = StageRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule)
    module = cli.model

    assert cli.trainer.global_step == 4
    paraphrase, distill, end = recorder.records
    assert (paraphrase["stage"], distill["stage"]) == ("paraphrase", "distill")
    # stage 1: the paraphraser alone, at its own constant rate; stage 2: everything but the paraphraser
    assert paraphrase["params"] == ids(module.paraphraser.parameters()) and paraphrase["lr"] == 0.01
    assert not distill["params"] & ids(module.paraphraser.parameters())
    assert ids(module.translator.parameters()) | ids(module.student.parameters()) == distill["params"]
    assert distill["lr"] == pytest.approx(0.1)
    assert paraphrase["paraphraser_training"] and not distill["paraphraser_training"]
    assert not end["paraphraser_training"]
    # what each stage changed
    assert paraphrase["paraphraser"] != distill["paraphraser"] == end["paraphraser"]
    assert paraphrase["student"] == distill["student"] != end["student"]
    assert paraphrase["translator"] == distill["translator"] != end["translator"]
    assert paraphrase["teacher"] == distill["teacher"] == end["teacher"]

    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["train/loss_epoch"]]
    assert [bool(row["train/loss_reconstruction_epoch"]) for row in rows] == [True, False]
    assert [bool(row["train/loss_ce_epoch"]) for row in rows] == [False, True]
    assert [bool(row["train/loss_ft_epoch"]) for row in rows] == [False, True]
    assert all(math.isfinite(float(row["train/loss_epoch"])) for row in rows)


# --- defaults and errors ------------------------------------------------------------------------------
def test_default_layers_follow_each_network():
    assert NST(student="vgg8", teacher="vgg8", num_classes=10).student_layers == [f"block{i}" for i in range(5)]
    assert PKT(student="vgg8", teacher="resnet14", num_classes=10).student_layers == ["classifier:input"]
    rkd = RKD(student="wrn_16_2", teacher="vgg8", num_classes=10)
    assert (rkd.student_layers, rkd.teacher_layers) == (["fc:input"], ["classifier:input"])
    ft = FT(student="wrn_16_2", teacher="resnet14", num_classes=10)
    assert (ft.student_layers, ft.teacher_layers) == (["relu"], ["layer3"])
    assert CC(student_layers=["layer3"], teacher_layers=["layer3"], **PAIR).embed_s.linear.in_features == 64 * 8 * 8


def test_the_defaults_are_repdistillers():
    nst, pkt, rkd, cc, ft = (method(**PAIR) for method in (NST, PKT, RKD, CC, FT))
    assert nst.beta == 50.0 and pkt.beta == 30000.0 and cc.beta == 0.02 and ft.beta == 200.0
    assert (rkd.beta, rkd.distance_weight, rkd.angle_weight) == (1.0, 25.0, 50.0)
    assert (cc.embed_dim, cc.variant) == (128, "repdistiller")
    assert (ft.p, ft.rate, ft.paraphrase_epochs, ft.paraphraser_lr) == (1.0, 0.5, 30, 0.01)
    for module in (nst, pkt, rkd, cc, ft):
        assert (module.ce_weight, module.kd_weight) == (1.0, 0.0)


@pytest.mark.parametrize(
    "method, kwargs, message",
    [
        (NST, {"beta": -1.0}, "beta must lie in [0.0"),
        (NST, {"student_layers": ["fc:input"], "teacher_layers": ["fc:input"]},
         "NST compares the channels of (B, C, H, W) feature maps, but the student layer 'fc:input' outputs (64,)"),
        (NST, {"student_layers": ["layer9"], "teacher_layers": ["layer3"]}, "Unknown student layer 'layer9'"),
        (PKT, {"beta": -1.0}, "beta must lie in [0.0"),
        (PKT, {"student_layers": ["fc:input"], "teacher_layers": []}, "non-empty lists of equal length"),
        (RKD, {"beta": -1.0}, "beta must lie in [0.0"),
        (RKD, {"distance_weight": -1.0}, "distance_weight must lie in [0.0"),
        (RKD, {"angle_weight": -1.0}, "angle_weight must lie in [0.0"),
        (RKD, {"beta": 0.0, "ce_weight": 0.0}, "RKD has nothing to minimise"),
        (CC, {"beta": -0.1}, "beta must lie in [0.0"),
        (CC, {"embed_dim": 0}, "embed_dim must lie in [1"),
        (CC, {"embed_dim": 2.5}, "embed_dim must be a whole number, got 2.5"),
        (CC, {"variant": "kernel"}, "variant must be one of 'repdistiller', 'paper'; got 'kernel'"),
        (CC, {"gamma": -1.0}, "gamma must lie in [0.0"),
        (CC, {"order": -1}, "order must lie in [0"),
        (CC, {"student_layers": ["layer3", "fc:input"], "teacher_layers": ["layer3", "fc:input"]},
         "CC embeds one student feature and one teacher feature"),
        (FT, {"beta": -1.0}, "beta must lie in [0.0"),
        (FT, {"p": 0.0}, "p must lie in (0.0"),
        (FT, {"rate": 0.0}, "rate must lie in (0.0"),
        (FT, {"rate": 0.001}, "a factor of rate 0.001 of 64 channels has int(64·0.001) = 0 channels"),
        (FT, {"paraphrase_epochs": -1}, "paraphrase_epochs must lie in [0"),
        (FT, {"paraphrase_epochs": 1.5}, "paraphrase_epochs must be a whole number"),
        (FT, {"paraphraser_lr": 0.0}, "paraphraser_lr must lie in (0.0"),
        (FT, {"student_layers": ["fc:input"], "teacher_layers": ["fc:input"]},
         "FT paraphrases and translates (B, C, H, W) feature maps, but the student layer 'fc:input' outputs (64,)"),
        (FT, {"student_layers": ["layer2", "layer3"], "teacher_layers": ["layer2", "layer3"]},
         "FT transfers the factor of one student layer and one teacher layer"),
        (FT, {"kd_weight": -0.5}, "kd_weight must lie in [0.0"),
    ],
)
def test_bad_arguments_are_one_clear_error(method, kwargs, message):
    with pytest.raises(ValueError) as error:
        method(**PAIR, **kwargs)
    assert message in str(error.value)


def test_a_method_that_needs_a_teacher_refuses_to_run_without_one():
    for method in (NST, PKT, RKD, CC, FT):
        with pytest.raises(ValueError, match=f"{method.__name__} needs a teacher"):
            method(student="resnet8", num_classes=10)
