"""A cache of decoded tensor-resident splits: the first process decodes a folder of images, the next ones load it.

Decoding the CIFAR-10 JPEG tree takes 15–90 s on two cores, in every process that sets the data up. The decoded
uint8 split is written once to ``<cache directory>/decoded/<key hash>.pt`` and memory-mapped by later processes. The
key names everything the decoded pixels depend on: each file's path, size and modification time, its class index,
and the decode transform; any change to one of them gives another key, so a stale file is never read. Files are
written under a temporary name and renamed into place, so a reader (another DDP rank, a parallel run) sees a whole
file or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from typing import Callable, Optional, Union

import torch

from lightning_kd.data.tensor_resident import TensorImageDataset

__all__ = ["cache_directory", "cached_decode", "file_fingerprint"]

#: Bump when the layout of a cache file changes: older files then no longer match any key.
CACHE_FORMAT = 1


def cache_directory(setting: Union[bool, str]) -> Optional[str]:
    """Where decoded splits are cached: ``None`` for ``False`` (no cache); the given directory for a string; for
    ``True``, ``$LIGHTNING_KD_CACHE``, else ``$XDG_CACHE_HOME/lightning_kd``, else ``~/.cache/lightning_kd``."""
    if setting is False:
        return None
    if isinstance(setting, str):
        return os.path.expanduser(setting)
    base = os.environ.get("LIGHTNING_KD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lightning_kd"
    )
    return base


def file_fingerprint(samples: Sequence[tuple[str, int]]) -> str:
    """SHA-256 of every ``(path, class index)`` with the file's size and modification time (ns), in order."""
    digest = hashlib.sha256()
    for path, target in samples:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\t{target}\n".encode())
    return digest.hexdigest()


def cached_decode(
    key: dict, directory: str, decode: Callable[[], TensorImageDataset], describe: str
) -> TensorImageDataset:
    """The split decoded by ``decode()``, read from ``directory`` when a file of this ``key`` is there, else decoded
    and written there (atomically). An unreadable or mismatched file is decoded again and replaced, with a warning; a
    directory that cannot be written is used without a cache, with a warning.

    Args:
        key: JSON-serialisable description of everything the decoded pixels depend on.
        directory: the cache directory (:func:`cache_directory`); files go to its ``decoded/`` folder.
        decode: decodes the split (called on a miss only).
        describe: what the split is, for messages (e.g. ``"training images of /data/cifar10"``).
    """
    text = json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True)
    path = os.path.join(directory, "decoded", hashlib.sha256(text.encode()).hexdigest()[:40] + ".pt")
    if os.path.isfile(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if saved["key"] == text:
                return TensorImageDataset(saved["images"], saved["targets"])
            warnings.warn(f"The decoded-image cache {path} holds another split: decoding the {describe} again")
        except Exception as error:  # a truncated or foreign file: decode again and replace it
            warnings.warn(f"The decoded-image cache {path} is unreadable ({error}): decoding the {describe} again")
    dataset = decode()
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"key": text, "images": dataset.images, "targets": dataset.targets}, temporary)
        os.replace(temporary, path)
    except OSError as error:
        warnings.warn(f"Could not write the decoded-image cache {path} ({error}): the next run decodes again")
        if os.path.exists(temporary):
            os.remove(temporary)
    return dataset
