"""One weighting vocabulary: ce_weight (labels), kd_weight (a teacher's softened targets), beta (the method's own
term). The old names still work for one release, warn, and give the very same objective."""
import pytest
import torch

from lightning_kd.core import Step
from lightning_kd.methods import (
    BYOT, CSKD, FSP, KD, MSD, SP, TfKDReg, TfKDSelf, byot_loss, dist_loss, dkd_loss, msd_loss, rkd_loss,
)

PAIR = {"student": "resnet8", "num_classes": 4}
TEACHER = {**PAIR, "teacher": "resnet8"}


@pytest.mark.parametrize(
    "cls, arguments, old, new",
    [
        (KD, TEACHER, {"alpha": 0.6}, {"ce_weight": 0.4, "kd_weight": 0.6}),
        (TfKDSelf, TEACHER, {"alpha": 0.7}, {"ce_weight": 0.3, "kd_weight": 0.7}),
        (TfKDReg, PAIR, {"alpha": 0.2}, {"ce_weight": 0.8, "kd_weight": 0.2}),
        (BYOT, PAIR, {"alpha": 0.1, "feature_weight": 0.5}, {"ce_weight": 0.9, "kd_weight": 0.1, "beta": 0.5}),
        (MSD, PAIR, {"alpha": 0.4}, {"ce_weight": 0.6, "kd_weight": 0.4}),
        (CSKD, PAIR, {"cls_weight": 3.0}, {"kd_weight": 3.0}),
        (SP, TEACHER, {"gamma": 10.0}, {"beta": 10.0}),
        (FSP, TEACHER, {"fsp_weight": 2.0}, {"beta": 2.0}),
    ],
)
def test_a_deprecated_weight_name_warns_and_sets_the_new_weights(cls, arguments, old, new):
    with pytest.warns(FutureWarning, match="is deprecated and will be removed in the next release"):
        module = cls(**arguments, **old)
    for name, value in new.items():
        assert getattr(module, name) == pytest.approx(value)


def test_kd_given_alpha_computes_the_objective_of_its_new_weights():
    torch.manual_seed(0)
    step = Step(torch.zeros(3), torch.tensor([0, 1, 2]), torch.randn(3, 4), torch.randn(3, 4))
    with pytest.warns(FutureWarning):
        old = KD(**TEACHER, alpha=0.25).loss_terms(step)
    new = KD(**TEACHER, ce_weight=0.75, kd_weight=0.25).loss_terms(step)
    assert old.keys() == new.keys() and all(torch.equal(old[name], new[name]) for name in old)


def test_a_checkpoint_written_with_alpha_loads_with_its_weights(tmp_path):
    with pytest.warns(FutureWarning):
        module = KD(**TEACHER, alpha=0.3)
    assert module.hparams["alpha"] == 0.3  # what an old checkpoint records
    path = tmp_path / "kd.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.5.0"}, path)
    with pytest.warns(FutureWarning):
        loaded = KD.load_from_checkpoint(path, weights_only=False)
    assert (loaded.ce_weight, loaded.kd_weight) == pytest.approx((0.7, 0.3))


@pytest.mark.parametrize(
    "loss, tensors, weights",
    [
        (byot_loss, (torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.tensor([0, 1, 2])), (0.7, 0.3, 3.0, 0.03)),
        (msd_loss, (torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.tensor([0, 1, 2])), (0.7, 0.3, 3.0, 0.03)),
        (dkd_loss, (torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 2])), (1.0, 8.0, 4.0)),
        (dist_loss, (torch.randn(3, 4), torch.randn(3, 4)), (2.0, 2.0, 4.0)),
        (rkd_loss, (torch.randn(3, 4), torch.randn(3, 4)), (25.0, 50.0)),
    ],
)
def test_a_loss_that_weighs_several_terms_takes_its_weights_by_keyword_only(loss, tensors, weights):
    """Two weights given in the wrong order would be another loss and no error: only keywords are taken."""
    with pytest.raises(TypeError, match="positional argument"):
        loss(*tensors, *weights)
