"""Black-box teacher, teacher cost, the query pool, Active Mixup and UNIX KD (small networks, tiny CIFAR-10)."""
import csv
import glob
import math
import types

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from torch import nn

from lightning_kd.core import BlackBoxTeacher, NonFiniteLossError, QueryBudgetExceeded, TeacherCost
from lightning_kd.data import CIFAR10DataModule, QueryPoolDataModule, mix_images
from lightning_kd.methods import (
    KD,
    UNIXKD,
    ActiveMixup,
    ActiveMixupRounds,
    least_confident_mixes,
    random_mixes,
    soft_target_loss,
    uncertainty,
    unix_loss_terms,
    unix_mix_weights,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*no teacher_ckpt given", "ignore:.*pool_size=")

MLP_FLOPS = 2 * 3072 * 20 + 2 * 20 * 10  # two linear layers, a multiply-add counted as 2 FLOPs
LINEAR_FLOPS = 2 * 3072 * 10


def small_cnn() -> nn.Module:
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(4, 10))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 20), nn.ReLU(), nn.Linear(20, 10))


def linear() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 10))


def trainer(workdir, epochs: int = 1, steps: int = 2, **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=epochs, limit_train_batches=steps, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu",
        devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=str(workdir), deterministic=True,
    )
    return pl.Trainer(**{**options, **kwargs})


def cifar(root, batch_size: int = 4) -> CIFAR10DataModule:
    return CIFAR10DataModule(root, download=False, batch_size=batch_size, num_workers=0)


def pool_data(root, pool_size: int = 8, augment: bool = True) -> QueryPoolDataModule:
    return QueryPoolDataModule(cifar(root), pool_size=pool_size, augment=augment)


def active_mixup(teacher=None, **kwargs) -> ActiveMixup:
    """Active Mixup of small networks: rounds of 4 queries, one epoch apart."""
    options = dict(queries_per_round=4, epochs_per_round=1, **kwargs)
    return ActiveMixup(student=small_cnn(), teacher=mlp() if teacher is None else teacher, num_classes=10, **options)


def teacher_cost(metrics) -> tuple:
    return metrics["teacher/images"], metrics["teacher/images_epoch"], metrics["teacher/flops"]


# --- BlackBoxTeacher ----------------------------------------------------------------------------
def test_black_box_teacher_answers_logits_and_its_count_survives_the_state_dict():
    network = nn.Linear(3, 4)
    teacher = BlackBoxTeacher(network, budget=5)
    x = torch.randn(3, 3)
    logits = teacher(x)  # log-probabilities: the softmax of the network's own logits at any temperature
    torch.testing.assert_close(logits.softmax(-1), network(x).softmax(-1))
    torch.testing.assert_close((logits / 4).softmax(-1), (network(x) / 4).softmax(-1))
    assert teacher.queries == 3 and not logits.requires_grad
    restored = BlackBoxTeacher(nn.Linear(3, 4))
    restored.load_state_dict(teacher.state_dict())
    assert restored.queries == 3


def test_black_box_budget_is_a_clear_error_and_never_overrun():
    asked = []

    def endpoint(x):  # a remote service answering probabilities, as a list
        asked.append(len(x))
        return [[0.25, 0.75]] * len(x)

    teacher = BlackBoxTeacher(endpoint, budget=5, returns="probabilities")
    torch.testing.assert_close(teacher(torch.zeros(4, 3)).exp(), torch.tensor([[0.25, 0.75]] * 4))
    with pytest.raises(QueryBudgetExceeded, match="4 images already queried, 2 more asked, budget 5"):
        teacher(torch.zeros(2, 3))
    assert teacher.queries == 4 and asked == [4]
    teacher(torch.zeros(1, 3))
    assert teacher.queries == 5


@pytest.mark.parametrize(
    "kwargs, message", [({"budget": -1}, "budget must be >= 0"), ({"returns": "scores"}, "returns must be 'logits'")]
)
def test_black_box_teacher_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlackBoxTeacher(nn.Linear(3, 4), **kwargs)


# --- teacher cost in the base -------------------------------------------------------------------
def test_teacher_forward_counts_images_and_flops_and_reads_black_box_probabilities_as_logits():
    teacher = mlp()
    x = torch.randn(5, 3, 32, 32)
    white = KD(student=small_cnn(), teacher=teacher, num_classes=10)
    logits = white.teacher_forward(x)
    assert (white.teacher_cost.images, white.teacher_cost.flops) == (5, 5 * MLP_FLOPS)

    black = KD(student=small_cnn(), teacher=BlackBoxTeacher(teacher), num_classes=10)
    log_probabilities = black.teacher_forward(x)
    torch.testing.assert_close((log_probabilities / 4).softmax(-1), (logits / 4).softmax(-1))  # same soft targets
    assert black.teacher.queries == 5  # the FLOP probe ran on the network inside, not as a query
    assert (black.teacher_cost.images, black.teacher_cost.flops) == (5, 5 * MLP_FLOPS)

    remote = KD(student=small_cnn(), teacher=BlackBoxTeacher(lambda images: teacher(images)), num_classes=10)
    remote.teacher_forward(x)
    assert (remote.teacher_cost.images, remote.teacher_cost.flops) == (5, None)


def test_teacher_cost_is_logged_per_epoch_and_cumulatively_and_survives_resume(tiny_cifar10, tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = trainer(tmp_path, epochs=1, enable_checkpointing=True, callbacks=[checkpoints])
    first.fit(KD(student=small_cnn(), teacher=mlp(), num_classes=10), datamodule=cifar(tiny_cifar10))
    metrics = first.callback_metrics
    assert teacher_cost(metrics) == (8, 8, 8 * MLP_FLOPS)

    resumed = trainer(tmp_path, epochs=2)
    checkpoint = str(tmp_path / "last.ckpt")  # weights_only=False: the hyper-parameters hold the default optimizer
    module = KD(student=small_cnn(), teacher=mlp(), num_classes=10)
    resumed.fit(module, datamodule=cifar(tiny_cifar10), ckpt_path=checkpoint, weights_only=False)
    assert teacher_cost(resumed.callback_metrics) == (16, 8, 16 * MLP_FLOPS)


def test_a_black_box_meters_every_query_once_on_the_meter_the_module_logs():
    black = KD(student=small_cnn(), teacher=BlackBoxTeacher(mlp(), budget=7), num_classes=10)
    assert black.teacher_cost is black.teacher.cost  # one meter: the module logs what the budget is checked on
    black.teacher_forward(torch.randn(5, 3, 32, 32))
    assert black.teacher.queries == black.teacher_cost.images == 5  # counted once, not by the module and the box
    with pytest.raises(QueryBudgetExceeded, match="5 images already queried, 3 more asked, budget 7"):
        black.teacher_forward(torch.randn(3, 3, 32, 32))
    assert (black.teacher_cost.images, black.teacher_cost.flops) == (5, 5 * MLP_FLOPS)  # nothing asked, nothing counted


def test_teacher_meter_budget_is_checked_before_counting_and_remote_flops_are_uncountable_from_the_start():
    meter = TeacherCost(mlp(), budget=4)
    with pytest.raises(QueryBudgetExceeded, match="0 images already queried, 5 more asked, budget 4"):
        meter.add(torch.zeros(5, 3, 32, 32))
    assert (meter.images, meter.flops) == (0, 0)
    # A remote teacher's FLOPs are None before any query, as after: every process of a DDP run logs the same metrics.
    remote = TeacherCost(lambda images: images)
    assert remote.flops is None
    remote.add(torch.zeros(2, 3))
    remote.clear()
    assert (remote.images, remote.flops, remote.images_logged) == (0, None, 0)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        TeacherCost(mlp(), budget=-1)


def test_black_box_meter_survives_its_state_dict_and_an_old_query_count_loads():
    teacher = BlackBoxTeacher(mlp())
    teacher(torch.randn(3, 3, 32, 32))
    teacher.cost.since_last_report()
    restored = BlackBoxTeacher(mlp())
    restored.load_state_dict(teacher.state_dict())
    assert restored.cost.state_dict() == {"images": 3, "flops": 3 * MLP_FLOPS, "images_logged": 3}
    old = {**teacher.state_dict(), "_extra_state": {"queries": 11}}  # written when the box counted queries itself
    restored.load_state_dict(old)
    assert restored.queries == restored.cost.images == 11


# --- the query pool -----------------------------------------------------------------------------
def test_query_pool_serves_the_labelled_mixes_and_restores_them(tiny_cifar10):
    data = pool_data(tiny_cifar10, pool_size=6, augment=False)
    data.setup("fit")
    source = data.source
    images = [source.train_dataset.dataset[i][0] for i in data.pool_indices.tolist()]
    expected = torch.stack([source.eval_transform()(image) for image in images])
    torch.testing.assert_close(data.pool, expected)
    with pytest.raises(RuntimeError, match="no labelled images yet"):
        data.train_dataloader()

    targets = torch.tensor([[0.1] * 10, [0.0] * 9 + [1.0]])
    data.add(torch.tensor([0, 1]), torch.tensor([2, 1]), torch.tensor([0.3, 1.0]), targets)
    images, labels = next(iter(data.train_dataloader()))
    order = labels[:, -1].argsort()  # the loader shuffles
    torch.testing.assert_close(images[order], torch.stack([0.3 * data.pool[0] + 0.7 * data.pool[2], data.pool[1]]))
    torch.testing.assert_close(labels[order], targets)

    restored = pool_data(tiny_cifar10, pool_size=6)
    restored.setup("fit")
    restored.load_state_dict(data.state_dict())
    assert restored.labelled_count == 2 and restored.additions == 1
    other = QueryPoolDataModule(cifar(tiny_cifar10), pool_size=6, seed=data.seed + 1)
    other.setup("fit")
    with pytest.raises(ValueError, match=f"trained with the data seed {data.seed}, this run has {data.seed + 1}"):
        other.load_state_dict(data.state_dict())
    other = QueryPoolDataModule(cifar(tiny_cifar10), pool_size=5, seed=data.seed)
    other.setup("fit")
    with pytest.raises(ValueError, match="unlabeled pool is not this data module's"):
        other.load_state_dict(data.state_dict())
    with pytest.raises(ValueError, match="pool_size must be an integer >= 2"):
        pool_data(tiny_cifar10, pool_size=1)


# --- Active Mixup -------------------------------------------------------------------------------
def test_soft_target_loss_matches_hand_computation():
    # softmax([0, ln 3]) = [1/4, 3/4]; targets [1/2, 1/2]: -(1/2·ln 1/4 + 1/2·ln 3/4) = 1/2·ln(16/3)
    loss = soft_target_loss(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.5, 0.5]]))
    assert loss.item() == pytest.approx(0.5 * math.log(16 / 3))


class MeanLogit(nn.Module):
    """Logits [mean(x), 0]: its confidence sigmoid(|mean|) is lowest for mixes whose mean is nearest 0."""

    def forward(self, x):
        mean = x.mean(dim=(1, 2, 3))
        return torch.stack([mean, torch.zeros_like(mean)], dim=1)


def test_selection_picks_the_least_confident_mixes_with_their_weights():
    pool = torch.tensor([-1.0, 1.0, 3.0, 5.0]).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    # Candidate pairs, shuffled. Mix means w·a + (1−w)·b at their best w in [0.3, 0.7]:
    # (0,1): 1−2w = 0 at w=0.5; (0,2): 3−4w = 0.2 at w=0.7; (0,3): 5−6w = 0.8 at 0.7; the others are above 1.
    first, second = torch.tensor([1, 0, 2, 0, 1, 0]), torch.tensor([3, 3, 3, 1, 2, 2])
    student = MeanLogit().train()
    chosen, weights = least_confident_mixes(student, pool, first, second, torch.linspace(0.3, 0.7, 11), 3, batch_size=4)
    assert [(first[i].item(), second[i].item()) for i in chosen] == [(0, 1), (0, 2), (0, 3)]
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.7, 0.7]))
    assert student.training  # scored in eval mode, mode restored


def test_random_selection_spends_the_same_queries_on_mixes_drawn_blind(tiny_cifar10, tmp_path, monkeypatch):
    """``selection="random"`` (the paper's random-mixup control): the same rounds and queries, pairs and weights drawn
    at random from the candidates and the weight grid, never scored by the student."""
    weights = torch.linspace(0.3, 0.7, 11)
    torch.manual_seed(0)
    chosen, drawn = random_mixes(6, weights, 4)
    assert len(set(chosen.tolist())) == 4 and set(chosen.tolist()) <= set(range(6))
    assert all(any(torch.isclose(w, weights)) for w in drawn)
    assert len(random_mixes(3, weights, 4)[0]) == 3  # fewer candidates than queries: every candidate

    teacher = small_cnn().eval()
    module = active_mixup(teacher, rounds=2, selection="random")

    def never(*args, **kwargs):
        raise AssertionError("the random control scored candidates with the student")

    monkeypatch.setattr("lightning_kd.methods.active_mixup.least_confident_mixes", never)
    data = pool_data(tiny_cifar10)
    trainer(tmp_path, epochs=3, reload_dataloaders_every_n_epochs=1).fit(module, datamodule=data)
    assert module.teacher.queries == 16 and len(data.targets) == 16  # the active run's budget (see below)
    assert len({(i, j) for i, j in zip(data.first[8:].tolist(), data.second[8:].tolist())}) == 8
    with torch.no_grad():
        answers = teacher(mix_images(data.pool, data.first, data.second, data.weight)).softmax(-1)
    torch.testing.assert_close(data.targets, answers)
    with pytest.raises(ValueError, match="selection must be one of 'least_confident', 'random'; got 'hardest'"):
        active_mixup(selection="hardest")


def test_active_mixup_grows_the_set_each_round_with_the_teachers_probabilities(tiny_cifar10, tmp_path):
    class TrainingSetSize(Callback):
        sizes = []

        def on_train_epoch_start(self, trainer, module):
            self.sizes.append(len(trainer.train_dataloader.dataset))

    teacher = small_cnn().eval()
    module = active_mixup(teacher, rounds=2)
    data = pool_data(tiny_cifar10)
    fit = trainer(tmp_path, epochs=3, reload_dataloaders_every_n_epochs=1, callbacks=[TrainingSetSize()],
                  logger=CSVLogger(tmp_path, name="csv"))
    fit.fit(module, datamodule=data)

    assert TrainingSetSize.sizes == [8, 12, 16]  # the 8 pool images, then 4 mixes a round
    assert module.teacher.queries == 16 and fit.callback_metrics["teacher/images"] == 16
    pairs = {(i, j) for i, j in zip(data.first[8:].tolist(), data.second[8:].tolist())}
    assert len(pairs) == 8 and all(i != j for i, j in pairs)  # 8 different pairs of two pool images
    assert ((data.weight[8:] >= 0.3) & (data.weight[8:] <= 0.7)).all()
    with torch.no_grad():
        answers = teacher(mix_images(data.pool, data.first, data.second, data.weight)).softmax(-1)
    torch.testing.assert_close(data.targets, answers)
    assert [queries for queries, _ in module.query_rounds.accuracy_vs_queries] == [8, 12, 16]
    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / "csv" / "*" / "metrics.csv"))[0])))
    assert [int(row["step"]) for row in rows if row.get("active_mixup/val_acc1")] == [8, 12, 16]


class RecordingWandbLogger(WandbLogger):
    """A WandbLogger whose run only records what is logged to it (no W&B process)."""

    def __init__(self, save_dir):
        super().__init__(save_dir=str(save_dir), offline=True)
        self.logged = []
        config = types.SimpleNamespace(update=lambda *args, **kwargs: None)
        self.run = types.SimpleNamespace(log=self.logged.append, config=config)

    @property
    def experiment(self):
        return self.run


def test_active_mixup_draws_accuracy_against_queries_on_wandb(tiny_cifar10, tmp_path):
    module, logger = active_mixup(rounds=1), RecordingWandbLogger(tmp_path)
    fit = trainer(tmp_path, epochs=2, reload_dataloaders_every_n_epochs=1, logger=logger)
    fit.fit(module, datamodule=pool_data(tiny_cifar10))
    key = "active_mixup/acc1_vs_queries"
    charts = [entry[key] for entry in logger.logged if key in entry]
    assert [[queries for queries, _ in chart.table.data] for chart in charts] == [[8], [8, 12]]
    assert charts[-1].table.data == [list(row) for row in module.query_rounds.accuracy_vs_queries]


def test_active_mixup_plan_beyond_the_budget_fails_before_any_query(tiny_cifar10, tmp_path):
    module = active_mixup(rounds=3, query_budget=19)
    message = r"plans 20 teacher queries \(8 pool images \+ 3 rounds × 4\) but the teacher's query budget is 19"
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, reload_dataloaders_every_n_epochs=1).fit(module, datamodule=pool_data(tiny_cifar10))
    assert module.teacher.queries == 0


class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, module):
        trainer.should_stop = True


def test_active_mixup_resume_keeps_the_query_count_and_the_set(tiny_cifar10, tmp_path):
    def run(workdir, epochs, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        module = active_mixup(rounds=2, query_budget=16)
        data = pool_data(tiny_cifar10)
        fit = trainer(workdir, epochs=epochs, reload_dataloaders_every_n_epochs=1, enable_checkpointing=True,
                      callbacks=[ModelCheckpoint(dirpath=workdir, save_last=True), *callbacks])
        fit.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=False)
        return module, data, fit

    straight, straight_data, _ = run(tmp_path / "a", epochs=3)
    interrupted, _, _ = run(tmp_path / "b", epochs=3, callbacks=[StopAfterFirstEpoch()])
    assert interrupted.teacher.queries == 12
    resumed, resumed_data, fit = run(tmp_path / "b", epochs=3, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert resumed.teacher.queries == straight.teacher.queries == 16 and fit.callback_metrics["teacher/images"] == 16
    for name in ("first", "second", "weight", "targets"):
        torch.testing.assert_close(getattr(resumed_data, name), getattr(straight_data, name))

    shortened, _, _ = run(tmp_path / "c", epochs=1)  # ends where round 1 would be labelled: it is not
    assert shortened.teacher.queries == 8
    extended, _, _ = run(tmp_path / "c", epochs=3, ckpt_path=str(tmp_path / "c" / "last.ckpt"))
    assert extended.teacher.queries == 16


def test_active_mixup_configuration_errors(tiny_cifar10, tmp_path):
    with pytest.raises(ValueError, match=r"mix_range\[1\] must lie in \[0.8, 1.0\]"):
        active_mixup(mix_range=(0.8, 0.2))
    with pytest.raises(ValueError, match="give the query budget once"):
        active_mixup(BlackBoxTeacher(mlp(), budget=10), query_budget=10)
    with pytest.raises(ValueError, match="needs a lightning_kd.data.QueryPoolDataModule"):
        trainer(tmp_path, reload_dataloaders_every_n_epochs=1).fit(active_mixup(), datamodule=cifar(tiny_cifar10))
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        trainer(tmp_path).fit(active_mixup(), datamodule=pool_data(tiny_cifar10))


def test_active_mixup_attaches_its_rounds_and_meters_its_queries_on_the_wrapped_teacher(tiny_cifar10, tmp_path):
    module = active_mixup(rounds=1)
    assert module.configure_callbacks() == [module.query_rounds]
    assert isinstance(module.query_rounds, ActiveMixupRounds)
    assert module.teacher_cost is module.teacher.cost  # the black box wrapped after the base's __init__
    fit = trainer(tmp_path, epochs=2, reload_dataloaders_every_n_epochs=1)  # no callback given by hand
    fit.fit(module, datamodule=pool_data(tiny_cifar10))
    assert module.query_rounds in fit.callbacks
    assert module.teacher.queries == fit.callback_metrics["teacher/images"] == 12


def test_active_mixup_rounds_checkpoint_their_points_and_resume_from_an_old_checkpoint(tiny_cifar10, tmp_path):
    """The points (queries, accuracy) are the callback's checkpoint state; a checkpoint written before the callback
    (the points at the top level, the black box's query count alone) resumes with its points and count."""

    def run(workdir, epochs, ckpt_path=None, callbacks=()):
        module = active_mixup(rounds=2)
        fit = trainer(workdir, epochs=epochs, reload_dataloaders_every_n_epochs=1, enable_checkpointing=True,
                      callbacks=[ModelCheckpoint(dirpath=workdir, save_last=True), *callbacks])
        fit.fit(module, datamodule=pool_data(tiny_cifar10), ckpt_path=ckpt_path, weights_only=False)
        return module, fit

    run(tmp_path, epochs=3, callbacks=[StopAfterFirstEpoch()])
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    points = checkpoint["callbacks"]["ActiveMixupRounds"]["accuracy_vs_queries"]
    assert [queries for queries, _ in points] == [8] and "accuracy_vs_queries" not in checkpoint
    checkpoint["accuracy_vs_queries"] = checkpoint["callbacks"].pop("ActiveMixupRounds")["accuracy_vs_queries"]
    checkpoint["state_dict"]["teacher._extra_state"] = {"queries": 12}
    torch.save(checkpoint, tmp_path / "old.ckpt")

    resumed, fit = run(tmp_path, epochs=3, ckpt_path=str(tmp_path / "old.ckpt"))
    assert [queries for queries, _ in resumed.query_rounds.accuracy_vs_queries] == [8, 12, 16]
    assert resumed.query_rounds.accuracy_vs_queries[0] == tuple(points[0])
    assert resumed.teacher.queries == fit.callback_metrics["teacher/images"] == 16


def test_active_mixup_asks_nothing_for_a_student_gone_non_finite(tiny_cifar10, tmp_path):
    class NonFiniteAtFirstStep(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            module.non_finite.observe(0, ["loss"], torch.tensor([float("nan")]))

    module = active_mixup(rounds=1)
    fit = trainer(tmp_path, epochs=2, reload_dataloaders_every_n_epochs=1, callbacks=[NonFiniteAtFirstStep()])
    with pytest.raises(NonFiniteLossError, match="Non-finite loss at training step 0"):
        fit.fit(module, datamodule=pool_data(tiny_cifar10))
    assert module.teacher.queries == 8  # round 0 only: round 1 was never asked about


# --- UNIX KD ------------------------------------------------------------------------------------
def test_unix_mix_weights_match_the_formula_and_stay_in_range():
    # B=4, b=2, w=10: r/B − 3/8 = −3/8, −1/8, 1/8, 3/8
    expected = [0.5 / (1 + math.exp(-10 * z)) for z in (-0.375, -0.125, 0.125, 0.375)]
    torch.testing.assert_close(unix_mix_weights(4, center=2, sharpness=10.0, lam=0.5), torch.tensor(expected))
    for lam in (0.0, 0.3, 1.0):
        mask = unix_mix_weights(64, center=32, sharpness=10.0, lam=lam)
        assert (mask >= 0).all() and (mask <= lam).all() and (mask.diff() >= 0).all()


def test_uncertainty_measures_match_hand_computation():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]]))
    entropy = [
        -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)),
        -(0.9 * math.log(0.9) + 2 * 0.05 * math.log(0.05)),
    ]
    torch.testing.assert_close(uncertainty(logits), torch.tensor(entropy))
    torch.testing.assert_close(uncertainty(logits, "least_confidence"), torch.tensor([0.5, 0.1]))
    torch.testing.assert_close(uncertainty(logits, "margin"), torch.tensor([-0.2, -0.85]))
    with pytest.raises(ValueError, match="uncertainty must be one of entropy, least_confidence, margin"):
        uncertainty(logits, "variance")


def test_unix_loss_terms_match_hand_computation():
    student, teacher = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])
    mixed = torch.tensor([[0.25, 0.75]])  # (1 − m)·onehot(1) + m·onehot(0), m = 1/4
    terms = unix_loss_terms(student, teacher, mixed, temperature=2.0, kd_weight=1.0, ce_weight=0.5)
    # CE: softmax(s) = [1/4, 3/4] -> 0.75·CE(s, 1) + 0.25·CE(s, 0)
    assert terms["ce"].item() == pytest.approx(0.5 * (0.75 * -math.log(0.75) + 0.25 * -math.log(0.25)))
    # KD at T=2: softmax(s/2) = [1, √3]/(1 + √3), softmax(t/2) = [1/2, 1/2]; T²·KL(t ‖ s)
    q = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]
    assert terms["kd"].item() == pytest.approx(4 * sum(0.5 * math.log(0.5 / qi) for qi in q))


def test_unix_sends_the_k_most_uncertain_images_and_mixes_by_rank():
    module = UNIXKD(student=MeanLogit(), teacher=MeanLogit(), num_classes=2, keep=2, mix_sharpness=0.0)
    x = torch.tensor([0.0, 3.0, -0.5, 2.0]).view(4, 1, 1, 1).expand(4, 1, 2, 2)  # |mean| near 0: most uncertain
    y = torch.tensor([0, 1, 1, 0])
    module.mix_strength = types.SimpleNamespace(sample=lambda: torch.tensor(0.0))  # λ = 0: no mixing
    step = module.forward_step(x, y)
    torch.testing.assert_close(step.inputs, x[[0, 2]])
    torch.testing.assert_close(step.targets, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(step.teacher_logits, MeanLogit()(x[[0, 2]]))

    module.mix_strength = types.SimpleNamespace(sample=lambda: torch.tensor(1.0))  # λ = 1, w = 0: m = 1/2
    step = module.forward_step(x, y)
    partners = 2 * step.inputs - x[[0, 2]]  # each kept image is half itself, half a random partner of the batch
    partner_labels = [y[[torch.equal(p, image) for image in x].index(True)] for p in partners]
    one_hot = torch.eye(2)
    expected = [(one_hot[y[i]] + one_hot[label]) / 2 for i, label in zip([0, 2], partner_labels)]
    torch.testing.assert_close(step.targets, torch.stack(expected))


def test_unix_runs_exactly_k_images_per_step_through_teacher_and_student(tiny_cifar10, tmp_path):
    student, teacher = linear(), mlp()
    calls = {"teacher": [], "student": []}
    teacher.register_forward_pre_hook(lambda m, args: calls["teacher"].append(len(args[0])))
    student.register_forward_pre_hook(lambda m, args: calls["student"].append((len(args[0]), torch.is_grad_enabled())))
    module = UNIXKD(student=student, teacher=teacher, num_classes=10, keep=6, mix_center=4)
    fit = trainer(tmp_path, steps=2, limit_val_batches=0)
    fit.fit(module, datamodule=cifar(tiny_cifar10, batch_size=8))

    assert calls["teacher"] == [1, 6, 6]  # a one-image FLOP probe, then k per step
    assert [size for size, grad in calls["student"] if grad] == [6, 6]  # trained on k
    assert [size for size, grad in calls["student"] if not grad] == [1, 8, 8]  # probe, then scoring all B
    metrics = fit.callback_metrics
    assert metrics["teacher/images"] == 12 and metrics["unix/teacher_images_saved"] == 4
    kd_cost = 16 * (2 * LINEAR_FLOPS + MLP_FLOPS)
    unix_cost = 16 * LINEAR_FLOPS + 12 * (2 * LINEAR_FLOPS + MLP_FLOPS)
    assert metrics["unix/computation_vs_kd"].item() == pytest.approx(unix_cost / kd_cost)


def test_unix_checkpoint_holds_one_count_of_the_teachers_images_and_old_ones_load():
    module = UNIXKD(student=linear(), teacher=mlp(), num_classes=10, keep=6)
    module.forward_step(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["teacher_cost"]["images"] == 6  # the kept images: the teacher's meter, counted there alone
    assert checkpoint["unix_cost"] == [8, module.flops_spent, module.flops_of_kd]
    old = UNIXKD(student=linear(), teacher=mlp(), num_classes=10, keep=6)
    old.on_load_checkpoint({"teacher_cost": checkpoint["teacher_cost"], "unix_cost": [8, 6, 100, 200]})
    assert (old.images_seen, old.teacher_cost.images, old.flops_spent, old.flops_of_kd) == (8, 6, 100, 200)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"keep": 0}, "keep must lie in"), ({"temperature": 0.0}, "temperature must lie in"),
     ({"uncertainty": "variance"}, "uncertainty must be one of")],
)
def test_unix_rejects_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNIXKD(student=linear(), teacher=mlp(), num_classes=10, **kwargs)
