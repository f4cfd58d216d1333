"""An opt-in cache of a teacher's training outputs: N students (a temperature or weight sweep) pay the teacher once.

On the tensor-resident data path a training sample's augmentation is a pure function of ``(seed, epoch, sample
index)`` (:mod:`lightning_kd.data.augment`), so the teacher's logits for the image a student sees at ``(epoch,
index)`` are the same in every run of a sweep. With ``DistillationModule(teacher_cache=DIR)`` the first run stores
them, one file per epoch, and the next runs read them instead of running the teacher:

* **The key.** A cache entry is the folder ``DIR/<sha256 of the key>/`` and its files hold the key's full text, checked
  on every read. The key (:func:`cache_key`) names everything the teacher's outputs depend on: the teacher (sha256 of
  its file, sha256 of its weights and buffers as loaded, its architecture), the data (sha256 of the decoded training
  tensor, its targets and the positions of the training samples in it, so a ``train_subset`` or ``val_split`` is
  covered; the data seed; the augmentation's parameters and a probe: the augmented pixels of the first samples in
  epochs 0 and 1, so a changed padding, mean, std, image size or drawing code changes the key), the forward's
  precision, device type, ``channels_last`` and ``compile``, and the storage. Any change is another entry, never a
  stale read.
* **Storage** (:class:`LogitCodec`). Per epoch, every training sample's logits as float16: all classes up to
  :data:`FULL_LOGITS_MAX_CLASSES`, else the ``topk`` largest with their class indices and one tail value (documented
  at :class:`LogitCodec`). The run that fills an epoch trains on the very values it stores (rounded to float16 and
  decoded), so a run that fills and a run that reads train bit-identically; versus a run without the cache the
  teacher's logits differ by their float16 rounding (and, with top-k, by the tail's reconstruction).
* **Whole epochs only.** An epoch's file is written (to a temporary name, then ``os.replace``) at the epoch's end, and
  only when every training sample went through the teacher in it: a run resumed mid-epoch, limited by
  ``limit_train_batches`` or stopped leaves that epoch to a later run. An epoch found in the cache is read whole at its
  start; one that is not is filled by this run.
* **The teacher's meter** (``teacher/images``, ``teacher/flops``) counts the teacher's forwards only: a step served
  from the cache costs no teacher forward and is not counted there; it is counted in ``teacher/images_from_cache``
  (images, so far in the run, summed over processes).

What it refuses, with one error each: data without draw records (the per-sample path, or a data module that is no
tensor-resident :class:`~lightning_kd.data.ClassificationDataModule`), a method that needs more of the teacher than its
logits (``teacher_layers``) or sends it other inputs than the training batch (mixed or sliced images: its
``forward_step`` override), a teacher whose queries are counted (:class:`~lightning_kd.core.BlackBoxTeacher`), an
overridden ``teacher_forward``, several processes (DDP), and a ``configure_callbacks`` override that drops the cache.
Validation and test never use it (the teacher's accuracy and ``kd_diagnostics`` run the teacher as before).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch

from lightning_kd.core.checks import check_range

__all__ = ["CACHE_FORMAT", "FULL_LOGITS_MAX_CLASSES", "LogitCodec", "TeacherCache", "cache_key", "tensor_sha256"]

#: Bump when the layout of the cache's files or the key changes: older entries then match no key.
CACHE_FORMAT = 1
#: Up to this many classes every logit is stored; above it the ``topk`` largest (default :data:`DEFAULT_TOPK`).
FULL_LOGITS_MAX_CLASSES = 100
DEFAULT_TOPK = 10
#: Samples (the first positions of the training set) and epochs whose augmented pixels enter the key.
_PROBE_SAMPLES, _PROBE_EPOCHS = 8, (0, 1)


@dataclasses.dataclass(frozen=True)
class LogitCodec:
    """How a batch of logits ``(B, K)`` is stored: float16, all ``K`` classes (``topk`` ``None``), or the ``topk``
    largest logits, their class indices and one tail value per sample.

    Top-k reconstruction (:meth:`decode`): the ``k`` stored logits in place, every other class the tail value
    ``c = logsumexp(other logits) − log(K − k)``, the log of the mean of their exponentials. The sum of the
    exponentials, hence softmax at temperature 1, is then unchanged: the top-k classes keep their probabilities and
    the rest share the remaining mass evenly (up to float16 rounding); at another temperature the tail is an
    approximation. A class the teacher rules out (logit ``-inf``) stays ``-inf`` when stored, or joins the tail.
    """

    num_classes: int
    topk: Optional[int] = None

    @classmethod
    def choose(cls, num_classes: int, topk: Optional[int]) -> "LogitCodec":
        """All classes when ``topk`` is ``None`` and ``num_classes <= FULL_LOGITS_MAX_CLASSES`` (or ``topk >=
        num_classes``); else top-``topk`` (default :data:`DEFAULT_TOPK`)."""
        if topk is None:
            topk = None if num_classes <= FULL_LOGITS_MAX_CLASSES else DEFAULT_TOPK
        return cls(num_classes, None if topk is None or topk >= num_classes else int(topk))

    def encode(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"values": float16 (B, K or k)}``, with top-k also ``"indices"`` (B, k) and ``"tail"`` (B,) float16."""
        logits = logits.detach().float()
        if self.topk is None:
            return {"values": logits.half()}
        values, indices = logits.topk(self.topk, dim=-1)
        others = logits.scatter(-1, indices, float("-inf"))
        tail = torch.logsumexp(others, dim=-1) - math.log(self.num_classes - self.topk)
        index_type = torch.int16 if self.num_classes <= torch.iinfo(torch.int16).max else torch.int32
        return {"values": values.half(), "indices": indices.to(index_type), "tail": tail.half()}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float32 logits ``(B, K)`` from what :meth:`encode` stored (the reconstruction in the class docstring)."""
        values = stored["values"].float()
        if self.topk is None:
            return values
        full = stored["tail"].float()[:, None].repeat(1, self.num_classes)
        return full.scatter(-1, stored["indices"].long(), values)

    def describe(self) -> dict[str, Any]:
        return {"dtype": "float16", "classes": self.num_classes, "topk": self.topk}


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors: each name, dtype, shape and the bytes (laid out contiguously), in the given order."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\t{tensor.dtype}\t{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _teacher_fingerprint(module: Any) -> dict[str, Any]:
    """The teacher as it will answer: its file's sha256, its weights' and buffers' sha256, its architecture."""
    state = module.teacher.state_dict()
    source = module.teacher_source
    return {
        "file_sha256": None if source is None else source.sha256,
        "weights_sha256": tensor_sha256({name: state[name] for name in sorted(state)}),
        "architecture_sha256": hashlib.sha256(repr(module.teacher).encode()).hexdigest(),
        "class": f"{type(module.teacher).__module__}.{type(module.teacher).__qualname__}",
        "classes": module.num_classes,
    }


def _data_fingerprint(datamodule: Any) -> dict[str, Any]:
    """The training samples and their augmentation: the decoded split, the samples' positions in it, the batch
    transform (padding, mean, std, seed) and the augmented pixels of a few samples in a few epochs."""
    train = datamodule.train_dataset
    split, transform = train.dataset, datamodule.training_batch_transform
    positions = torch.arange(len(split)) if train.indices is None else torch.tensor(train.indices, dtype=torch.int64)
    probe = positions[:_PROBE_SAMPLES]
    augmented = [
        transform(split.images[probe], True, torch.tensor([transform.draws(epoch, int(i)) for i in probe]))
        for epoch in _PROBE_EPOCHS
    ]
    return {
        "module": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
        "samples": len(train),
        "split_sha256": tensor_sha256({"images": split.images, "targets": split.targets, "positions": positions}),
        "image_shape": list(split.images.shape[1:]),
        "seed": datamodule.seed,
        "augmentation": repr(transform),
        "augmented_probe_sha256": tensor_sha256({f"epoch {epoch}": x for epoch, x in zip(_PROBE_EPOCHS, augmented)}),
    }


def cache_key(module: Any, trainer: pl.Trainer, codec: LogitCodec) -> dict[str, Any]:
    """Everything the cached teacher outputs of ``module``'s fit depend on (JSON-serialisable; see the module's
    docstring)."""
    return {
        "format": CACHE_FORMAT,
        "teacher": _teacher_fingerprint(module),
        "data": _data_fingerprint(trainer.datamodule),
        "forward": {
            "precision": str(trainer.precision),
            "device": module.device.type,
            "channels_last": module.channels_last,
            "compile": json.loads(json.dumps(module.compile_options, default=repr)),
        },
        "storage": codec.describe(),
    }


def _refusal(module: Any) -> Optional[str]:
    """Why the cache cannot serve ``module``'s fit, or ``None``."""
    from lightning_kd.core.module import DistillationModule  # the module imports this file

    trainer, method = module.trainer, type(module).__name__
    datamodule = trainer.datamodule
    if trainer.world_size > 1:
        return f"it runs in one process only, this fit has {trainer.world_size} (DDP): run without the cache"
    if getattr(module.teacher, "queries_are_counted", False):
        return f"{method}'s teacher is a black box whose queries are counted: every query must reach it"
    if module.teacher_layers:
        return (f"{method} reads the teacher's features ({module.teacher_layers}), the cache holds its logits only: "
                "a feature method runs its teacher")
    if type(module).teacher_forward is not DistillationModule.teacher_forward:
        return f"{method} overrides teacher_forward: the cache would bypass it"
    if getattr(datamodule, "training_batch_transform", None) is None:
        return ("the training data must be tensor-resident (draw records keyed by (seed, epoch, sample)): set "
                "data.tensor_resident=true on a lightning_kd data module with a tensor-resident path")
    if not any(callback is module.teacher_cache for callback in trainer.callbacks):
        return f"{method}.configure_callbacks must return super().configure_callbacks() with its own callbacks"
    return None


class TeacherCache(pl.Callback):
    """The teacher-output cache of one :class:`~lightning_kd.core.DistillationModule` (its ``teacher_cache``), a
    callback the module attaches itself (``configure_callbacks``). See the module's docstring.

    Args:
        directory: where entries are kept (created when needed); entries of other keys live side by side.
        num_classes: the teacher's number of outputs.
        topk: logits kept per sample (:meth:`LogitCodec.choose`): ``None`` for all up to 100 classes, else 10.
    """

    def __init__(self, directory: str, num_classes: int, topk: Optional[int] = None) -> None:
        if topk is not None:
            check_range("teacher_cache_topk", topk, 1)
        self.directory = os.path.expanduser(str(directory))
        self.codec = LogitCodec.choose(num_classes, topk)
        self.images_from_cache = 0
        self.entry: Optional[str] = None  # the folder of this fit's key (on_fit_start)
        self._key_text: Optional[str] = None
        self._stored: Optional[dict[str, torch.Tensor]] = None  # the epoch read from the cache, on the device
        self._filling: Optional[dict[str, torch.Tensor]] = None  # the epoch being filled, with its "filled" mask
        self._batch: Any = None

    # --- set-up ---------------------------------------------------------------------------------
    def attach(self, module: Any) -> None:
        """Check that the cache can serve ``module``'s fit (one ``ValueError`` naming why not) and have the data
        module serve every training sample's position (``"index"``). Called by the module's ``setup("fit")``."""
        problem = _refusal(module)
        if problem is not None:
            raise ValueError(f"model.teacher_cache={self.directory!r} cannot be used: {problem}")
        module.trainer.datamodule.serve_fields(["index"])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Compute the key (after a checkpoint's weights and data seed are restored) and record it in the entry."""
        text = json.dumps(cache_key(pl_module, trainer, self.codec), sort_keys=True, indent=1)
        self._key_text = text
        self.entry = os.path.join(self.directory, hashlib.sha256(text.encode()).hexdigest()[:32])
        os.makedirs(self.entry, exist_ok=True)
        key_file = os.path.join(self.entry, "key.json")
        if not os.path.isfile(key_file):
            _write_atomically(key_file, lambda path: _write_text(path, text))

    def epoch_file(self, epoch: int) -> str:
        """The file of ``epoch`` in this fit's entry."""
        return os.path.join(self.entry, f"epoch_{epoch:05d}.pt")

    # --- one epoch ------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Read this epoch whole from the cache, or start filling it."""
        epoch, samples = trainer.current_epoch, len(trainer.datamodule.train_dataset)
        self._stored = self._read(epoch, samples)
        self._filling = None
        if self._stored is not None:
            self._stored = {name: value.to(pl_module.device) for name, value in self._stored.items()}
        else:
            device = pl_module.device
            self._filling = {name: torch.zeros((samples, *value.shape[1:]), dtype=value.dtype, device=device)
                             for name, value in self.codec.encode(torch.zeros(1, self.codec.num_classes)).items()}
            self._filling["filled"] = torch.zeros(samples, dtype=torch.bool, device=device)
            self._filling["overflow"] = torch.zeros((), dtype=torch.bool, device=device)

    def _read(self, epoch: int, samples: int) -> Optional[dict[str, torch.Tensor]]:
        """The stored outputs of ``epoch``, or ``None`` when absent; a file of another key, epoch or size is not
        read (a warning) and the epoch is filled again."""
        path = self.epoch_file(epoch)
        if not os.path.isfile(path):
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            problem = None if saved["key"] == self._key_text else "another key"
            if problem is None and (saved["epoch"] != epoch or saved["outputs"]["values"].shape[0] != samples):
                problem = "another epoch or number of samples"
        except Exception as error:  # a truncated or foreign file: fill the epoch again and replace it
            problem = f"unreadable: {error}"
        if problem is not None:
            warnings.warn(f"The teacher cache file {path} holds {problem}: this run fills epoch {epoch} again")
            return None
        return saved["outputs"]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch = batch  # the batch as the data module finished it: its inputs and positions

    def teacher_logits(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """Float32 teacher logits of the training batch ``x``: read from the cache, or computed by
        ``module.teacher_forward`` (counted on the teacher's meter), stored and returned as stored (float16)."""
        batch = self._batch
        if self._stored is None and self._filling is None:
            raise RuntimeError("The teacher cache serves training steps of a fit only (it opens every epoch)")
        if not (isinstance(batch, (tuple, list)) and len(batch) == 3 and batch[0] is x and "index" in batch[2]):
            raise ValueError(
                f"model.teacher_cache cannot be used: {type(module).__name__} sends the teacher other inputs than the "
                "training batch's images (mixed, sliced or changed ones), which the cache, keyed by (epoch, sample), "
                "cannot serve: run without the cache"
            )
        index = batch[2]["index"]
        if self._stored is not None:
            self.images_from_cache += len(index)
            return self.codec.decode({name: value[index] for name, value in self._stored.items()})
        logits = module.teacher_forward(x)
        stored = self.codec.encode(logits)
        for name, value in stored.items():
            self._filling[name][index] = value
        self._filling["filled"][index] = True
        decoded = self.codec.decode(stored)
        self._filling["overflow"] |= (decoded.isinf() & logits.isfinite()).any()
        return decoded

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Write the epoch filled by this run when every sample went through the teacher; log
        ``teacher/images_from_cache``."""
        filling, self._filling, self._stored = self._filling, None, None
        pl_module.log("teacher/images_from_cache", float(self.images_from_cache), on_step=False, on_epoch=True,
                      reduce_fx="sum", sync_dist=True)
        if filling is None or not bool(filling["filled"].any()):
            return
        epoch = trainer.current_epoch
        if not bool(filling["filled"].all()):
            warnings.warn(f"Teacher cache: epoch {epoch} did not go whole through the teacher in this run (resumed "
                          "mid-epoch, limit_train_batches or stopped): it is not stored")
            return
        if bool(filling["overflow"]):
            raise ValueError(f"Teacher cache: the teacher's logits of epoch {epoch} exceed float16's range "
                             f"(±{torch.finfo(torch.float16).max:g}): run without the cache")
        outputs = {name: value.cpu() for name, value in filling.items() if name not in ("filled", "overflow")}
        record = {"key": self._key_text, "epoch": epoch, "outputs": outputs}
        _write_atomically(self.epoch_file(epoch), lambda path: torch.save(record, path))

    def state_dict(self) -> dict[str, int]:
        return {"images_from_cache": self.images_from_cache}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.images_from_cache = int(state_dict["images_from_cache"])


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _write_atomically(path: str, write: Callable[[str], Any]) -> None:
    """``write(temporary path)``, then ``os.replace`` onto ``path``: a reader sees the whole file or none. A cache that
    cannot be written is a warning (the next run pays the teacher again), never a failed fit."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        warnings.warn(f"Could not write the teacher cache file {path} ({error}): the next run runs the teacher again")
        if os.path.exists(temporary):
            os.remove(temporary)
