"""AT, SP and FSP: losses against hand computations, layer pairing, schedules, errors, fits through the CLI."""
import csv
import math

import pytest
import torch

from conftest import data_args, state_hash, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.methods import AT, FSP, SP, at_loss, fsp_loss, fsp_matrix, kd_loss, sp_loss
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


def maps(*rows):
    """A (1, C, H, W) tensor from C nested lists of H rows."""
    return torch.tensor([rows], dtype=torch.float32)


# --- losses -------------------------------------------------------------------------------------
def test_at_loss_matches_hand_computation():
    student = maps([[-1.0, 2.0]], [[3.0, 0.0]])  # energies mean_c x^2: [5, 2]
    teacher = maps([[0.0, 1.0]], [[2.0, 1.0]], [[2.0, 2.0]])  # 3 channels: [8/3, 2] -> normalised [0.8, 0.6]
    s = [5 / math.sqrt(29), 2 / math.sqrt(29)]
    expected = ((s[0] - 0.8) ** 2 + (s[1] - 0.6) ** 2) / 2
    assert at_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert at_loss(student, student).item() == pytest.approx(0.0, abs=1e-7)


def test_at_loss_pools_the_larger_attention_map_to_the_smaller():
    student = maps([[1.0, 1.0]])  # 1x2: normalised [1, 1] / sqrt 2
    teacher = maps([[0.0, 2.0, 3.0, 3.0], [2.0, 0.0, 3.0, 3.0]])  # 2x4: energies pooled to 1x2 -> [2, 9]
    t = [2 / math.sqrt(85), 9 / math.sqrt(85)]
    expected = ((1 / math.sqrt(2) - t[0]) ** 2 + (1 / math.sqrt(2) - t[1]) ** 2) / 2
    assert at_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert at_loss(teacher, student).item() == pytest.approx(expected, rel=1e-6)


def test_sp_loss_matches_hand_computation_across_widths():
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(2, 1, 1, 2)  # Q Q^T = [[1, 1], [1, 2]]
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).view(2, 3, 1, 1)  # [[4, 0], [0, 1]] -> identity
    r2, r5 = math.sqrt(2), math.sqrt(5)
    expected = ((1 / r2 - 1) ** 2 + (1 / r2) ** 2 + (1 / r5) ** 2 + (2 / r5 - 1) ** 2) / 4
    assert sp_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_fsp_matrix_matches_hand_computation():
    first = maps([[1.0, 2.0]], [[0.0, 1.0]])
    second = maps([[3.0, 4.0]])
    assert fsp_matrix(first, second).tolist() == [[[5.5], [2.0]]]  # (1*3 + 2*4) / 2, (0*3 + 1*4) / 2


def test_fsp_matrix_pools_the_larger_map_to_the_smaller():
    first = maps([[1.0, 2.0]])
    second = maps([[0.0, 2.0, 4.0, 4.0], [2.0, 0.0, 4.0, 4.0]])  # pooled to 1x2: [1, 4]
    assert fsp_matrix(first, second).tolist() == [[[4.5]]]  # (1*1 + 2*4) / 2
    assert fsp_matrix(second, first).tolist() == [[[4.5]]]


def test_fsp_loss_sums_consecutive_pairs():
    torch.manual_seed(0)
    student = [torch.randn(2, 2, 2, 2) for _ in range(3)]
    teacher = [torch.randn(2, 2, 2, 2) for _ in range(3)]

    def gram(a, b):  # G[n, i, j] = sum_hw a[n, i] * b[n, j] / (H * W), element by element
        return [[[sum(a[n, i, h, w] * b[n, j, h, w] for h in range(2) for w in range(2)).item() / 4
                  for j in range(2)] for i in range(2)] for n in range(2)]

    expected = 0.0
    for k in range(2):
        gs, gt = gram(student[k], student[k + 1]), gram(teacher[k], teacher[k + 1])
        expected += sum((gs[n][i][j] - gt[n][i][j]) ** 2 for n in range(2) for i in range(2) for j in range(2)) / 8
    assert fsp_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)


# --- modules --------------------------------------------------------------------------------------
def step_with_features(module, batch=4):
    module.setup("fit")
    torch.manual_seed(0)
    return module.forward_step(torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,)))


def test_terms_are_weighted_and_kd_is_added_from_the_arguments():
    module = AT(beta=2.0, ce_weight=0.1, kd_weight=0.9, temperature=3.0, **PAIR)
    step = step_with_features(module)
    terms = module.loss_terms(step)
    attention = sum(at_loss(step.student_features[n], step.teacher_features[n]) for n in ("layer1", "layer2", "layer3"))
    assert set(terms) == {"ce", "kd", "at"}
    assert terms["at"].item() == pytest.approx(2.0 * attention.item(), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(0.9 * kd_loss(step.student_logits, step.teacher_logits, 3.0).item())
    assert terms["ce"].item() == pytest.approx(
        0.1 * torch.nn.functional.cross_entropy(step.student_logits, step.targets).item())

    sp = SP(beta=5.0, **PAIR)
    step = step_with_features(sp)
    terms = sp.loss_terms(step)
    assert set(terms) == {"ce", "sp"}
    assert terms["sp"].item() == pytest.approx(5.0 * sp_loss(step.student_features["layer3"],
                                                             step.teacher_features["layer3"]).item(), rel=1e-6)


def test_default_layers_and_explicit_overrides():
    assert AT(student="vgg8", teacher="vgg8", num_classes=10).student_layers == [f"block{i}" for i in range(5)]
    sp = SP(student="wrn_16_2", teacher="resnet14", num_classes=10)
    assert (sp.student_layers, sp.teacher_layers) == (["relu"], ["layer3"])
    sp = SP(student_layers=["block3"], **{**PAIR, "student": "wrn_16_2"})
    assert (sp.student_layers, sp.teacher_layers) == (["block3"], ["layer3"])
    fsp = FSP(student_layers=["relu", "layer1", "layer2"], teacher_layers=["relu", "layer1", "layer2"], **PAIR)
    assert set(step_with_features(fsp).student_features) == {"relu", "layer1", "layer2"}


@pytest.mark.parametrize(
    "method, kwargs",
    [(AT, {"ce_weight": 0.0}), (SP, {"ce_weight": 0.0}), (FSP, {}), (FSP, {"schedule": "joint", "kd_weight": 1.0})],
    ids=["AT", "SP", "FSP-stage1", "FSP-joint-KD"],
)
def test_gradients_reach_only_the_student(method, kwargs):
    module = method(**PAIR, **kwargs)
    terms = module.loss_terms(step_with_features(module).float())
    torch.stack(list(terms.values())).sum().backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert module.student.conv1.weight.grad.abs().sum() > 0
    if "ce" not in terms:  # the feature term alone reaches the first layer, but not the classifier
        assert module.student.fc.weight.grad is None


def test_fsp_two_stage_schedule_and_joint_variant(monkeypatch):
    module = FSP(stage1_epochs=3, **PAIR)
    assert set(module.loss_terms(step_with_features(module))) == {"fsp"}
    monkeypatch.setattr(FSP, "current_epoch", 3)
    assert not module.needs_teacher_forward()
    step = step_with_features(module)
    assert step.teacher_logits is None and not step.teacher_features
    assert set(module.loss_terms(step)) == {"ce"}

    with_kd = FSP(stage1_epochs=3, kd_weight=0.5, **PAIR)
    assert set(with_kd.loss_terms(step_with_features(with_kd))) == {"ce", "kd"}
    joint = FSP(schedule="joint", **PAIR)
    assert set(joint.loss_terms(step_with_features(joint))) == {"ce", "fsp"}


def test_fsp_probe_leaves_the_student_untouched():
    student = get_model(PAIR["student"], PAIR["num_classes"])
    before = state_hash(student)
    module = FSP(**{**PAIR, "student": student})
    assert state_hash(module.student) == before
    assert module.student.training and not module.teacher.training


# --- errors ---------------------------------------------------------------------------------------
def test_unequal_stage_counts_are_one_clear_error():
    with pytest.raises(ValueError, match=r"got 5 student layers \['block0'.*and 3 teacher layers \['layer1'"):
        AT(student="vgg8", teacher="resnet14", num_classes=10)
    with pytest.raises(ValueError, match="non-empty lists of equal length"):
        SP(student_layers=[], teacher_layers=[], **PAIR)


def test_fsp_channel_mismatch_fails_at_construction_naming_layers_and_widths():
    with pytest.raises(ValueError) as error:
        FSP(student="resnet8", teacher="resnet8x4", num_classes=10)
    message = str(error.value)
    assert "student 'layer1' has 16, teacher 'layer1' has 64" in message
    assert "student 'layer3' has 64, teacher 'layer3' has 256" in message


def test_unknown_layer_fails_at_setup():
    with pytest.raises(ValueError, match="Unknown student layer 'layer9'"):
        AT(student_layers=["layer9"], teacher_layers=["layer3"], **PAIR).setup("fit")


@pytest.mark.parametrize(
    "method, kwargs, message",
    [
        (AT, {"beta": -1.0}, "beta must lie in [0.0"),
        (AT, {"p": 0.0}, "p must lie in (0.0"),
        (SP, {"beta": -1.0}, "beta must lie in [0.0"),
        (SP, {"gamma": 1.0, "beta": 2.0}, "SP: gamma is the deprecated name of beta; give beta only"),
        (SP, {"kd_weight": -0.5}, "kd_weight must lie in [0.0"),
        (AT, {"ce_weight": -0.5}, "ce_weight must lie in [0.0"),
        (AT, {"temperature": 0.0}, "temperature must lie in (0.0"),
        (FSP, {"beta": 0.0}, "beta must lie in (0.0"),
        (FSP, {"stage1_epochs": -1}, "stage1_epochs must lie in [0"),
        (FSP, {"schedule": "both"}, "schedule must be one of 'two_stage', 'joint'; got 'both'"),
        (FSP, {"ce_weight": 0.0}, "ce_weight or kd_weight must be > 0"),
        (FSP, {"student_layers": ["layer3"], "teacher_layers": ["layer3"]}, "needs at least two"),
    ],
)
def test_bad_hyper_parameters_are_one_clear_error(method, kwargs, message):
    with pytest.raises(ValueError) as error:
        method(**PAIR, **kwargs)
    assert message in str(error.value)


# --- through the CLI ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet14.pth"
    torch.save(get_model("resnet14", 4).state_dict(), path)
    return str(path)


def method_args(method, root, workdir, teacher_ckpt, *extra):
    return [
        f"--model=lightning_kd.methods.{method}", "--model.student=resnet8", "--model.teacher=resnet14",
        f"--model.teacher_ckpt={teacher_ckpt}", "--data=lightning_kd.data.ImageFolderDataModule",
        *data_args(root, batch_size=8, download=None), "--data.image_size=32", *trainer_args(workdir), *extra,
    ]


def test_at_plus_kd_from_the_command_line(tiny_folder, teacher_ckpt, tmp_path):
    cli = cli_main(["fit", *method_args("AT", tiny_folder, tmp_path, teacher_ckpt, "--model.kd_weight=0.9",
                                       "--model.ce_weight=0.1")])
    assert cli.trainer.global_step == 2
    assert {"train/loss_ce", "train/loss_kd", "train/loss_at"} <= set(cli.trainer.callback_metrics)


def test_fsp_two_stages_through_the_cli(tiny_folder, teacher_ckpt, tmp_path):
    cli = cli_main(method_args(
        "FSP", tiny_folder, tmp_path, teacher_ckpt, "--model.stage1_epochs=1", "--trainer.max_epochs=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
    ), run=False)
    teacher_runs = []
    cli.model.teacher.register_forward_hook(
        lambda *_: teacher_runs.append(cli.trainer.current_epoch) if cli.trainer.training else None)
    cli.trainer.fit(cli.model, cli.datamodule)

    assert cli.trainer.global_step == 4
    assert teacher_runs.count(0) >= 2 and teacher_runs.count(1) == 0  # no teacher forward in stage 2
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["train/loss_epoch"]]
    assert [bool(row["train/loss_fsp_epoch"]) for row in rows] == [True, False]
    assert [bool(row["train/loss_ce_epoch"]) for row in rows] == [False, True]
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        steps = [row for row in csv.DictReader(f) if row["train/loss_step"]]
    # a stage's step values are its own terms only: stage 1's FSP term is not logged again in stage 2
    assert [(bool(row["train/loss_fsp_step"]), bool(row["train/loss_ce_step"])) for row in steps] == [
        (True, False), (True, False), (False, True), (False, True)]
