"""Checkpoints that say what they are: ``last`` is the last state, files appear whole, runs never mix.

:class:`RunCheckpoint` is Lightning's ``ModelCheckpoint`` with the contracts of ARCHITECTURE.md:

* ``last.ckpt`` is rewritten at the end of every epoch (and at the end of fit), whatever the monitored metric
  did; Lightning rewrites it only when a top-k checkpoint was saved in the same step.
* every file is written to a temporary name beside it and renamed (:class:`AtomicCheckpointIO`): a crash or a
  full disk leaves the previous file intact and never a partial or 0-byte file under a final name.
* one directory, one run: a new fit into a directory that holds another run's checkpoints stops with a message
  (resume it, or pass ``overwrite=True`` to start over), so ``last.ckpt`` never becomes ``last-v1.ckpt`` while
  readers keep reading the old file.
* the directory is checked for writing when fit starts, not after the first epoch.

Nothing non-finite is saved either: :class:`~lightning_kd.core.module.DistillationModule` refuses to be saved
with a non-finite loss or weight (see :class:`~lightning_kd.core.module.NonFiniteLossError`).
"""
from __future__ import annotations

import glob
import os
import tempfile
import warnings
from typing import Any, Optional

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_info

__all__ = ["AtomicCheckpointIO", "RunCheckpoint", "write_atomically"]

# RunCheckpoint decides what a non-empty directory means (see _claim_directory); Lightning's notice would only confuse.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def write_atomically(path: str, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path`` (mode 0644 less the
    umask, like any new file). On any failure the temporary file is removed and ``path`` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]  # writers that check the extension (torch.export.save) see the real one
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local files appear atomically (:func:`write_atomically`), and whose write
    errors name the file. Remote (fsspec) paths are written by Lightning as before."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            write_atomically(str(path), lambda tmp: torch.save(checkpoint, tmp))
        except OSError as error:
            raise OSError(
                error.errno, f"Could not write checkpoint {str(path)!r} ({error.strerror or error}); the earlier "
                "checkpoints in its directory are intact"
            ) from error


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the last state and whose directory holds one run.

    Takes every argument of ``ModelCheckpoint``, plus:

    Args:
        overwrite: a fit that does not resume from a checkpoint in ``dirpath`` but finds checkpoints of another
            run there deletes them when it starts (``True``) or stops before training with a message (``False``,
            the default).
    """

    def __init__(self, *args, overwrite: bool = False, **kwargs) -> None:
        kwargs.setdefault("enable_version_counter", False)  # one run per directory: never a last-v1.ckpt
        super().__init__(*args, **kwargs)
        self.overwrite = bool(overwrite)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_fit_start(self, trainer, pl_module) -> None:
        """Before the first step (and after a checkpoint was restored): claim the directory, check it is writable."""
        problem = None
        if trainer.is_global_zero and _is_local_file_protocol(self.dirpath):
            try:
                self._claim_directory(trainer.ckpt_path)
                self._check_writable()
            except (RuntimeError, OSError) as error:
                problem = error
        problem = trainer.strategy.broadcast(problem)  # every process stops, none waits for the others
        if problem is not None:
            raise problem

    def _claim_directory(self, resumed_from: Optional[str]) -> None:
        """Stop (or, with ``overwrite``, clean up) when ``dirpath`` holds checkpoints of another run."""
        existing = sorted(glob.glob(os.path.join(glob.escape(self.dirpath), "*" + self.FILE_EXTENSION)))
        resumed_here = resumed_from is not None and os.path.dirname(os.path.abspath(resumed_from)) == os.path.abspath(
            self.dirpath
        )
        if not existing or resumed_here:
            return
        if not self.overwrite:
            names = ", ".join(os.path.basename(path) for path in existing[:4]) + (" ..." if len(existing) > 4 else "")
            hint = f"resume it with --ckpt_path {os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)}, "
            raise RuntimeError(
                f"Checkpoint directory {self.dirpath!r} already holds another run's checkpoints ({names}). "
                f"To continue that run, {hint}to replace it, pass --checkpoint.overwrite true; or set another "
                "--checkpoint.dirpath."
            )
        for path in existing:
            os.remove(path)
        rank_zero_info(f"Removed {len(existing)} checkpoint(s) of an earlier run from {self.dirpath} (overwrite=True)")

    def _check_writable(self) -> None:
        try:
            os.makedirs(self.dirpath, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.dirpath):
                pass
        except OSError as error:
            raise OSError(
                error.errno, f"Checkpoint directory {self.dirpath!r} is not writable ({error.strerror or error})"
            ) from error

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """Save every ``every_n_train_steps`` steps as usual, except at an epoch's last batch: that save waits for the
        end of the epoch. pytorch-lightning 2.6 resumes a checkpoint written at an epoch's last batch (before the
        epoch's validation) with its fit loop one step off: it skips that validation and the next epoch's start."""
        at_last_batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready >= trainer.num_training_batches
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if at_last_batch and due:
            self._defer_save_until_validation = True  # see on_validation_end / on_train_epoch_end
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _save_last_if_behind(self, trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._defer_save_until_validation and self._should_save_on_train_epoch_end(trainer):
            self._defer_save_until_validation = False  # no validation follows: the deferred save is now
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_last_if_behind(trainer)  # a fit stopped by max_steps mid-epoch
