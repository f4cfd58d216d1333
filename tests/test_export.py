"""``lightning-kd export`` of a method defined outside the library; exported files are ordinary files."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO, data_args, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.export import export_student
from lightning_kd.models import get_model

KD_CONFIG = os.path.join(REPO, "configs", "folder", "kd", "resnet20-resnet8.yaml")
USER_MODULE = "user_kd_method"  # a module of the user's, importable from a directory of theirs
USER_METHOD = '''
"""KD whose deployed network is the student followed by a calibration layer trained on the labels."""
import torch.nn.functional as F
from torch import nn

from lightning_kd.methods import KD


class CalibratedKD(KD):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calibration = nn.Linear(self.num_classes, self.num_classes)

    def loss_terms(self, step):
        terms = super().loss_terms(step)
        terms["calibration"] = F.cross_entropy(self.calibration(step.student_logits.detach()), step.targets)
        return terms

    def deployable(self, name=None):
        return nn.Sequential(super().deployable(name), self.calibration)
'''


@pytest.fixture(scope="module")
def user_method_run(tiny_folder, tmp_path_factory):
    """A fit of ``user_kd_method.CalibratedKD`` (module on sys.path only during the fit): its directory,
    its last checkpoint and the deployed network's logits on a fixed input."""
    user_dir = tmp_path_factory.mktemp("user_code")
    (user_dir / f"{USER_MODULE}.py").write_text(textwrap.dedent(USER_METHOD))
    workdir = tmp_path_factory.mktemp("run")
    teacher = str(workdir / "teacher.pth")
    torch.save(get_model("resnet20", 4).state_dict(), teacher)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(user_dir))
        cli = cli_main(
            ["fit", f"--config={KD_CONFIG}", f"--model.class_path={USER_MODULE}.CalibratedKD",
             f"--model.init_args.teacher_ckpt={teacher}", *data_args(tiny_folder, download=None),
             *trainer_args(workdir)]
        )
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = cli.model.deployable().eval()(x)
    yield str(user_dir), str(workdir / "checkpoints" / "last.ckpt"), x, expected
    sys.modules.pop(USER_MODULE, None)


def test_user_method_exports_from_a_fresh_process_as_an_ordinary_file(user_method_run, tmp_path):
    """``--method`` imports the method's module from PYTHONPATH; the file is 0644 under umask 022, and torch
    says nothing about a temporary file name."""
    user_dir, ckpt, x, expected = user_method_run
    out = tmp_path / "student.pt2"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([user_dir, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_kd.cli", "export", f"--ckpt_path={ckpt}", f"--output={out}",
         f"--method={USER_MODULE}.CalibratedKD"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, preexec_fn=lambda: os.umask(0o022),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(tmp_path) == ["student.pt2"]  # no temporary file left
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    assert "Expect archive file" not in result.stderr + result.stdout and ".tmp" not in result.stderr + result.stdout
    # The method's own deployable network: student and calibration layer, with the trained weights.
    torch.testing.assert_close(torch.export.load(str(out)).module()(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("format, name", [("exported", "student.pt2"), ("state_dict", "student.pth")])
def test_exported_files_take_the_mode_of_any_new_file(user_method_run, tmp_path, format, name):
    _user_dir, ckpt, _x, _expected = user_method_run
    previous = os.umask(0o027)
    try:
        (tmp_path / "ordinary").write_text("")
        export_student(ckpt, str(tmp_path / name), format=format, method=f"{USER_MODULE}.CalibratedKD")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == stat.S_IMODE(os.stat(tmp_path / "ordinary").st_mode)
    assert sorted(os.listdir(tmp_path)) == sorted(["ordinary", name])


def test_a_method_from_outside_the_library_is_never_imported_on_the_checkpoints_word(
    user_method_run, tmp_path, monkeypatch
):
    """A checkpoint naming an importable, not yet imported module: export asks for ``--method`` and imports
    nothing; with it, the export goes through."""
    _user_dir, ckpt, _x, _expected = user_method_run
    (tmp_path / "unimported_method.py").write_text(textwrap.dedent(USER_METHOD))
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["hyper_parameters"]["_class_path"] = "unimported_method.CalibratedKD"
    torch.save(checkpoint, tmp_path / "renamed.ckpt")
    out = tmp_path / "out" / "student.pt2"
    message = "'unimported_method.CalibratedKD', defined outside lightning_kd: name it with --method unimported_method"
    with pytest.raises(ValueError, match=message):
        export_student(str(tmp_path / "renamed.ckpt"), str(out))
    assert "unimported_method" not in sys.modules and not os.path.exists(out)
    export_student(str(tmp_path / "renamed.ckpt"), str(out), method="unimported_method.CalibratedKD")
    sys.modules.pop("unimported_method")
    assert os.path.isfile(out)


@pytest.mark.parametrize(
    "method, message",
    [
        ("no_such_module.Method", r"--method 'no_such_module.Method' cannot be imported .*PYTHONPATH"),
        ("collections.OrderedDict", r"--method 'collections.OrderedDict' is not a lightning_kd method"),
    ],
)
def test_a_bad_method_option_is_one_clear_error(user_method_run, tmp_path, method, message):
    _user_dir, ckpt, _x, _expected = user_method_run
    with pytest.raises(ValueError, match=message):
        export_student(ckpt, str(tmp_path / "student.pt2"), method=method)
    assert os.listdir(tmp_path) == []
