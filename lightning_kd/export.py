"""``lightning-kd export``: write the trained student alone, loadable without this library's training code.

Formats:

* ``exported`` (default): a ``torch.export`` program (``.pt2``) with a dynamic batch dimension; load it
  anywhere with ``torch.export.load(path).module()`` — no lightning_kd needed.
* ``state_dict``: ``{'model': name, 'num_classes': K, 'state_dict': ...}`` for students built from a
  model name; rebuild with ``lightning_kd.models.get_model(name, K)`` and ``load_state_dict``.
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings
from typing import Literal, Optional

import torch

import lightning_kd.methods  # noqa: F401  (registers the method classes a checkpoint may name)
from lightning_kd.core import DistillationModule


def _method_class(ckpt_path: str) -> type[DistillationModule]:
    """The method class a checkpoint names, if already imported (nothing is imported on a checkpoint's word).

    Loading through the base class would build the base alone: Lightning drops the class path from the
    arguments of a class whose ``__init__`` takes no ``**kwargs``, and a method's own modules would not load.
    """
    checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=True)
    module_name, _, name = str(checkpoint.get("hyper_parameters", {}).get("_class_path", "")).rpartition(".")
    method = getattr(sys.modules.get(module_name), name, None)
    return method if isinstance(method, type) and issubclass(method, DistillationModule) else DistillationModule


def load_module(ckpt_path: str) -> DistillationModule:
    """The method module stored in a checkpoint written by ``lightning-kd fit``, on the CPU."""
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"Checkpoint not found: {ckpt_path!r}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no teacher_ckpt given.*")
        # The teacher's weights are inside the checkpoint: its original file is not needed.
        overrides = {"teacher_ckpt": None}
        module = _method_class(ckpt_path).load_from_checkpoint(ckpt_path, map_location="cpu", **overrides)
    return module.eval()


def _write_atomically(output: str, save) -> None:
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, output)
    except BaseException:
        os.unlink(tmp)
        raise


def export_student(
    ckpt_path: str,
    output: str,
    format: Literal["exported", "state_dict"] = "exported",
    input_shape: Optional[list[int]] = None,
    network: Optional[str] = None,
) -> str:
    """Export the deployable network of a lightning_kd checkpoint.

    Args:
        ckpt_path: a checkpoint written by ``lightning-kd fit``.
        output: the file to write (written atomically: nothing half-written on failure).
        format: ``exported`` (torch.export program, .pt2) or ``state_dict`` (model name + weights).
        input_shape: one sample's shape, e.g. ``[3, 32, 32]``; default: the shape seen in training.
        network: which of the method's networks to export, e.g. ``peer_1`` (DML) or ``exit_2`` (BYOT);
            default: the main one, the student.
    """
    module = load_module(ckpt_path)
    deployed = module.deployable(network).eval()
    if format == "state_dict":
        if network is not None:
            raise ValueError(f"format=state_dict writes the student only; export {network!r} with format=exported")
        spec = module.hparams.get("student")
        if not isinstance(spec, str):
            raise ValueError("format=state_dict needs a student built from a model name; use format=exported")
        record = {"model": spec, "num_classes": module.num_classes, "state_dict": deployed.state_dict()}
        _write_atomically(output, lambda path: torch.save(record, path))
        return output
    shape = tuple(input_shape or module.input_shape or ())
    if not shape:
        raise ValueError("The checkpoint records no input shape: pass --input_shape, e.g. 3 32 32")
    example = torch.randn(2, *shape)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(deployed, (example,), dynamic_shapes=({0: batch},))
    _write_atomically(output, lambda path: torch.export.save(program, path))
    return output


def export_cli(argv: list[str]) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="lightning-kd export", description=export_student.__doc__)
    parser.add_function_arguments(export_student, as_positional=False)
    print(f"wrote {export_student(**parser.parse_args(argv).as_dict())}")
