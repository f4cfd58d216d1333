"""Where a teacher's weights file comes from: a local path, a URL (downloaded once into the torch hub cache) or the
short name of a published teacher.

``teacher_ckpt`` accepts:

* a local file (any format :func:`~lightning_kd.core.teacher.load_weights` reads);
* an ``http://``, ``https://`` or ``file://`` URL, downloaded once into ``torch.hub.get_dir()/checkpoints`` (as
  ``<8 hex digits of the URL's sha256>_<its last two path parts>``) and read from there by every later run;
* ``repdistiller:<architecture>``, one of the CIFAR-100 teachers RepDistiller published
  (Tian, Krishnan, Isola, *Contrastive Representation Distillation*, ICLR 2020, arXiv 1910.10699;
  https://github.com/HobbitLong/RepDistiller, BSD-2-Clause), listed in its ``scripts/fetch_pretrained_teachers.sh``.

An expected sha256 (``teacher_sha256``: the hex digest, or a prefix of at least 8 of its digits) is checked on the
file that is read; a download that does not match is never kept in the cache.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.error
import uuid
from typing import Any, Optional
from urllib.parse import unquote, urlparse

import torch

URL_SCHEMES = ("http", "https", "file")

# RepDistiller's published CIFAR-100 teachers (trained 240 epochs, {'model': state_dict, 'epoch', 'accuracy', ...}),
# by the architecture name of lightning_kd.models.get_model; data from scripts/fetch_pretrained_teachers.sh.
REPDISTILLER_TEACHERS = {
    "wrn_40_2": "http://shape2prog.csail.mit.edu/repo/wrn_40_2_vanilla/ckpt_epoch_240.pth",
    "resnet56": "http://shape2prog.csail.mit.edu/repo/resnet56_vanilla/ckpt_epoch_240.pth",
    "resnet110": "http://shape2prog.csail.mit.edu/repo/resnet110_vanilla/ckpt_epoch_240.pth",
    "resnet32x4": "http://shape2prog.csail.mit.edu/repo/resnet32x4_vanilla/ckpt_epoch_240.pth",
    "vgg13": "http://shape2prog.csail.mit.edu/repo/vgg13_vanilla/ckpt_epoch_240.pth",
    "ResNet50": "http://shape2prog.csail.mit.edu/repo/ResNet50_vanilla/ckpt_epoch_240.pth",
}
# Short names ``<collection>:<architecture>`` of published teachers, and the number of classes of each collection.
PUBLISHED_TEACHERS = {"repdistiller": REPDISTILLER_TEACHERS}
PUBLISHED_CLASSES = {"repdistiller": 100}


class TeacherNotFoundError(FileNotFoundError):
    """The local teacher checkpoint ``path`` does not exist; ``published`` names the published teacher of the same
    architecture and number of classes (``repdistiller:resnet56`` for a 100-class resnet56), if there is one."""

    def __init__(self, path: str, teacher: Any = None, num_classes: Optional[int] = None) -> None:
        names = [f"{name}:{teacher}" for name, table in PUBLISHED_TEACHERS.items()
                 if teacher in table and PUBLISHED_CLASSES[name] == num_classes]
        self.path, self.published = path, (names[0] if names else None)
        hint = f" (or the published {teacher}: teacher_ckpt {self.published})" if self.published else ""
        super().__init__(f"Teacher checkpoint not found: {path!r}{hint}")


def file_sha256(path: str) -> str:
    """The sha256 hex digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def expected_sha256(value: Optional[str]) -> Optional[str]:
    """``teacher_sha256`` lower-cased: a sha256 hex digest or its first 8 or more digits (``None``: none expected)."""
    if value is not None and not re.fullmatch(r"[0-9a-fA-F]{8,64}", value):
        raise ValueError(f"teacher_sha256 must be a sha256 hex digest (or its first 8+ digits), got {value!r}")
    return None if value is None else value.lower()


def check_sha256(what: str, actual: str, expected: Optional[str]) -> None:
    """One ``ValueError`` naming ``what`` when its sha256 ``actual`` does not start with ``expected`` (lower-case,
    see :func:`expected_sha256`; ``None``: nothing to check)."""
    if expected is not None and not actual.startswith(expected):
        raise ValueError(f"{what} has sha256 {actual}, expected {expected}… (teacher_sha256)")


def teacher_url(spec: str) -> Optional[str]:
    """The URL ``spec`` names: itself for a URL, the published teacher's for a short name such as
    ``repdistiller:resnet56``; ``None`` for a local path. An unknown published name is one ``ValueError``."""
    collection, _, name = spec.partition(":")
    if collection in PUBLISHED_TEACHERS and name:
        table = PUBLISHED_TEACHERS[collection]
        if name not in table:
            raise ValueError(f"teacher_ckpt {spec!r}: {collection} publishes no teacher {name!r}; it has "
                             + ", ".join(f"{collection}:{known}" for known in table))
        return table[name]
    return spec if urlparse(spec).scheme in URL_SCHEMES else None


def check_published_architecture(spec: str, teacher: Any) -> None:
    """A published teacher (``repdistiller:resnet56``) must be built as its architecture: a ``teacher`` named
    otherwise is one ``ValueError`` (a teacher given as a module is checked by its weights' shapes only)."""
    collection, _, name = spec.partition(":")
    if name in PUBLISHED_TEACHERS.get(collection, ()) and isinstance(teacher, str) and teacher != name:
        raise ValueError(f"teacher_ckpt {spec!r} holds a {name} but model.teacher is {teacher!r}: set model.teacher "
                         f"to {name!r}, or pick the published teacher of {teacher!r}")


def cache_path(url: str) -> str:
    """Where ``url`` is kept in the torch hub cache: ``<hub dir>/checkpoints/<8 hex of sha256(url)>_<parent>_<name>``
    (the URL's last two path parts: RepDistiller names every teacher ``ckpt_epoch_240.pth``)."""
    parts = [unquote(part) for part in urlparse(url).path.split("/") if part][-2:]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", "_".join(parts)) or "checkpoint"
    key = hashlib.sha256(url.encode()).hexdigest()[:8]
    return os.path.join(torch.hub.get_dir(), "checkpoints", f"{key}_{name}")


def download_once(url: str, sha256: Optional[str] = None) -> str:
    """The cached file of ``url`` (:func:`cache_path`), downloaded first when it is not there; a download whose
    sha256 does not match ``sha256`` is removed and refused, an unreachable URL is one ``OSError``."""
    path = cache_path(url)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{uuid.uuid4().hex}.download"  # processes downloading at once never share a file
    print(f"lightning-kd: downloading the teacher checkpoint {url} to {path}", file=sys.stderr, flush=True)
    try:
        torch.hub.download_url_to_file(url, partial, progress=sys.stderr.isatty())
        check_sha256(f"The download of {url}", file_sha256(partial), sha256)
        os.replace(partial, path)
    except urllib.error.URLError as error:
        raise OSError(f"Could not download the teacher checkpoint {url}: {error.reason}") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def locate_teacher_file(
    spec: str, teacher: Any = None, sha256: Optional[str] = None, num_classes: Optional[int] = None
) -> tuple[str, Optional[str]]:
    """``(local file, URL or None)`` of a ``teacher_ckpt``: a local path as it is (:class:`TeacherNotFoundError`
    when missing, naming the published teacher of architecture ``teacher`` and ``num_classes`` classes if any), a URL
    or published name (checked against ``teacher``) downloaded once (:func:`download_once`)."""
    url = teacher_url(spec)
    check_published_architecture(spec, teacher)
    if url is not None:
        return download_once(url, sha256), url
    if not os.path.isfile(spec):
        raise TeacherNotFoundError(spec, teacher, num_classes)
    return spec, None
