"""Loading and freezing a teacher network.

Accepted checkpoint formats (detected from the file):

* a checkpoint written by this library (a Lightning ``.ckpt``): the ``student.*`` weights of that run,
  e.g. the Baseline run that trained the teacher;
* the community CIFAR format of RepDistiller / mdistiller: ``{'model': state_dict, 'epoch', 'accuracy'}``;
* a plain ``state_dict`` (optionally saved from ``DataParallel``, with ``module.`` prefixes).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn


def read_state_dict(path: str, prefix: str = "student.") -> dict[str, torch.Tensor]:
    """Read the network weights stored in ``path`` in any of the accepted formats."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Teacher checkpoint not found: {path!r}")
    # weights_only=False: Lightning checkpoints carry hyper-parameters (callables, class paths);
    # the file is one the user points at explicitly.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint and "pytorch-lightning_version" in checkpoint:
        state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"Lightning checkpoint {path!r} holds no weights under {prefix!r}")
    elif isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        state = dict(checkpoint["model"])
    elif isinstance(checkpoint, Mapping) and checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        state = dict(checkpoint)
    else:
        raise ValueError(
            f"Unrecognised checkpoint format in {path!r}: expected a lightning_kd/Lightning checkpoint, "
            "a {'model': state_dict} community checkpoint or a plain state_dict"
        )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str, prefix: str = "student.") -> nn.Module:
    """Load ``path`` into ``model``; any mismatch raises one ``ValueError`` naming the first offending key."""
    state = read_state_dict(path, prefix)
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise ValueError(
                f"Checkpoint {path!r} does not fit {type(model).__name__}: key {key!r} "
                f"(shape {tuple(value.shape)}) is missing from the checkpoint"
            )
        if state[key].shape != value.shape:
            raise ValueError(
                f"Checkpoint {path!r} does not fit {type(model).__name__}: key {key!r} has shape "
                f"{tuple(state[key].shape)} in the checkpoint but {tuple(value.shape)} in the model"
                " (a different architecture or number of classes?)"
            )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ValueError(
            f"Checkpoint {path!r} does not fit {type(model).__name__}: unexpected key {unexpected[0]!r} "
            f"(shape {tuple(state[unexpected[0]].shape)}) is not in the model"
        )
    model.load_state_dict(state)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Make ``model`` a frozen teacher: no gradients, eval mode (BatchNorm statistics never move).

    The owning module must also keep it in eval mode across ``train()`` calls, see
    :meth:`lightning_kd.core.module.DistillationModule.train`.
    """
    model.requires_grad_(False)
    return model.eval()
