"""``lightning-kd export``: write the trained student alone, loadable without this library's training code.

Formats:

* ``exported`` (default): a ``torch.export`` program (``.pt2``) with a dynamic batch dimension; load it
  anywhere with ``torch.export.load(path).module()`` — no lightning_kd needed.
* ``state_dict``: ``{'model': name, 'num_classes': K, 'state_dict': ...}`` for students built from a
  model name; rebuild with ``lightning_kd.models.get_model(name, K)`` and ``load_state_dict``.

A method defined outside the library (in your own module) is named with ``--method module.Class``, its module
importable: ``PYTHONPATH=path/to/dir lightning-kd export --method my_module.MyKD --ckpt_path ... --output ...``.
Files are written atomically, with the mode of any new file (0644 under the usual umask).
"""
from __future__ import annotations

import importlib
import sys
from typing import Literal, Optional

import torch

import lightning_kd.methods  # noqa: F401  (registers the method classes a checkpoint may name)
from lightning_kd.core import DistillationModule, load_checkpoint_file, write_atomically


def _import_method(method: str) -> type[DistillationModule]:
    """The method class ``method`` names (``module.Class``), its module imported."""
    module_name, _, name = method.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"--method {method!r} cannot be imported ({error}): give module.Class, its module importable "
            "(installed, or its directory on PYTHONPATH)"
        ) from None
    if not (isinstance(found, type) and issubclass(found, DistillationModule)):
        raise ValueError(f"--method {method!r} is not a lightning_kd method (a DistillationModule subclass)")
    return found


def _method_class(ckpt_path: str, method: Optional[str]) -> type[DistillationModule]:
    """The class to load a checkpoint with: ``method`` if given, else the class the checkpoint names
    (``hyper_parameters._class_path``), which must be imported already (the library's methods are).

    Nothing is imported on a checkpoint's word (Lightning's loader refuses it too, against code run from a
    file): a method defined outside the library is named by the user. A checkpoint that names no class (one
    written through the Python API) loads as the base class, or as ``method``.
    """
    checkpoint = load_checkpoint_file(ckpt_path, mmap=True, weights_only=True)
    if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
        raise ValueError(f"{ckpt_path!r} is not a Lightning checkpoint (one written by `lightning-kd fit`)")
    if method is not None:
        return _import_method(method)
    class_path = str(checkpoint.get("hyper_parameters", {}).get("_class_path", ""))
    if not class_path:
        return DistillationModule
    module_name, _, name = class_path.rpartition(".")
    found = getattr(sys.modules.get(module_name), name, None)
    if not (isinstance(found, type) and issubclass(found, DistillationModule)):
        raise ValueError(
            f"Checkpoint {ckpt_path!r} was written by the method {class_path!r}, defined outside lightning_kd: "
            f"name it with --method {class_path} (its module importable, e.g. its directory on PYTHONPATH)"
        )
    return found


def load_module(ckpt_path: str, method: Optional[str] = None) -> DistillationModule:
    """The method module stored in a checkpoint written by ``lightning-kd fit``, on the CPU.

    ``method``: ``module.Class`` of a method defined outside the library, imported to load the checkpoint.
    """
    # The teacher's weights are inside the checkpoint: load_from_checkpoint does not read its original file.
    return _method_class(ckpt_path, method).load_from_checkpoint(ckpt_path, map_location="cpu").eval()


def export_student(
    ckpt_path: str,
    output: str,
    format: Literal["exported", "state_dict"] = "exported",
    input_shape: Optional[list[int]] = None,
    network: Optional[str] = None,
    method: Optional[str] = None,
) -> str:
    """Export the deployable network of a lightning_kd checkpoint.

    Args:
        ckpt_path: a checkpoint written by ``lightning-kd fit``.
        output: the file to write (written atomically: nothing half-written on failure).
        format: ``exported`` (torch.export program, .pt2) or ``state_dict`` (model name + weights).
        input_shape: one sample's shape, e.g. ``[3, 32, 32]``; default: the shape seen in training.
        network: which of the method's networks to export, e.g. ``peer_1`` (DML) or ``exit_2`` (BYOT);
            default: the main one, the student.
        method: ``module.Class`` of the checkpoint's method when it is defined outside lightning_kd; its
            module is imported (it must be importable, e.g. on ``PYTHONPATH``).
    """
    module = load_module(ckpt_path, method)
    deployed = module.deployable(network).eval()
    if format == "state_dict":
        if network is not None:
            raise ValueError(f"format=state_dict writes the student only; export {network!r} with format=exported")
        spec = module.hparams.get("student")
        if not isinstance(spec, str):
            raise ValueError("format=state_dict needs a student built from a model name; use format=exported")
        record = {"model": spec, "num_classes": module.num_classes, "state_dict": deployed.state_dict()}
        write_atomically(output, lambda path: torch.save(record, path))
        return output
    shape = tuple(input_shape or module.input_shape or ())
    if not shape:
        raise ValueError("The checkpoint records no input shape: pass --input_shape, e.g. 3 32 32")
    example = torch.randn(2, *shape)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(deployed, (example,), dynamic_shapes=({0: batch},))
    write_atomically(output, lambda path: torch.export.save(program, path))
    return output


def export_cli(argv: list[str]) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="lightning-kd export", description=export_student.__doc__)
    parser.add_function_arguments(export_student, as_positional=False)
    print(f"wrote {export_student(**parser.parse_args(argv).as_dict())}")
