"""Tian, Krishnan & Isola, "Contrastive Representation Distillation" (ICLR 2020, arXiv 1910.10699).

CRD trains the student so that its representation of an input can be told apart, by a critic h, from the
teacher's representations of *other* inputs: a lower bound on the mutual information I(T; S) estimated with one
positive pair and N negatives per anchor (Sec. 3 of the paper). The critic is
h(T, S) = exp(g_T(t)ᵀ g_S(s) / τ) / (exp(g_T(t)ᵀ g_S(s) / τ) + N / M), g_T, g_S linear maps followed by an L2
normalisation, M the training-set size; the loss is −E_pos[log h] − N·E_neg[log(1 − h)].

What this file holds (the method's module is wired elsewhere): :class:`Embed` (g_S, g_T),
:class:`ContrastMemory` (the two memory banks, the scores against them, the normalisation constants Z, the bank
update), :class:`ContrastSampler` (the contrast indices: the positive and the N negatives per sample) and
:func:`contrast_loss` (the NCE loss of one direction).

Choices — the authors' code (HobbitLong/RepDistiller ``crd/criterion.py``, ``crd/memory.py``,
``dataset/cifar100.py``, ``train_student.py``; mdistiller's ``CRD.py`` is a copy), which produced the paper's tables:

- Scores come from memory banks, not from the current batch. ``memory_student`` (their ``memory_v1``) holds one
  momentum-averaged, L2-renormalised student embedding per training sample, ``memory_teacher`` (``memory_v2``) one
  teacher embedding; both (M, 128) start uniform in ±1/√(128/3) (unnormalised). The live student embedding is
  scored against ``memory_teacher`` rows (positive: the sample's own row, negatives: the sampled rows), the live
  teacher embedding against ``memory_student`` rows, and the loss is the *sum* of the two NCE losses (their
  ``CRDLoss``: "two symmetric parts"; the paper writes one critic). Gradients reach both embeddings, never the
  banks. After scoring, each bank row of the batch becomes normalise(0.5·row + 0.5·embedding) (momentum 0.5).
- The critic is the code's, not the paper's formula: P = exp(score/τ) / Z and h = P / (P + N/M + 1e-7), where the
  constant Z = M · mean(exp(score/τ)) is set from the first batch seen (one Z per direction) and then frozen, so
  the code's h is exp(·)/(exp(·) + Z·N/M): the paper's N/M times the first batch's mean score scale. Z is a
  registered buffer (``normalizers`` = [Z for the student-anchored scores, Z for the teacher-anchored ones],
  −1 while unset), so it is checkpointed and a resumed run keeps it. The NCE loss treats negatives as drawn from
  the uniform noise distribution Pn = 1/M (``ContrastLoss``) whatever the sampler does.
- Negatives, RepDistiller's default ``--mode exact`` with ``is_sample=True`` (``CIFAR100InstanceSample``; the only
  path ``train_student.py --distill crd`` takes): each sample's positive is *itself* (``exact``; ``relax`` would
  take a random sample of the same class) and its 16384 negatives are drawn, per sample, uniformly *without
  replacement among the samples of the other classes* (``np.random.choice(cls_negative[target], k,
  replace=k > len(cls_negative[target]))``), by the data loader. Same-class samples and the sample itself are
  never negatives. The memory's own sampler (``AliasMethod``, used only when no contrast indices are passed) would
  draw uniformly *with* replacement among all M samples, its own class and itself included — no CIFAR run uses it;
  RepDistiller's ImageNet loader draws other-class negatives *with* replacement. :class:`ContrastSampler` offers
  all of these; its default is the CIFAR one.
- Temperature τ = 0.07, momentum 0.5, N = 16384, embedding size 128 (RepDistiller's defaults and mdistiller's
  config). A third-party summary of the paper quotes τ = 0.1 for CIFAR-100 (not checked against the PDF here);
  the code's 0.07 produced the published tables and is used.
- Numerics: scores are computed in the banks' dtype (float32 unless the module is cast) with autocast off, since
  exp(score/0.07) needs the range; the embedding's L2 normalisation divides by max(‖x‖, 1e-12) (theirs by ‖x‖:
  the same except for an all-zero row, where theirs gives NaN).

Layers and hyper-parameters: the penultimate feature — the globally pooled, flattened vector fed to the
classifier (RepDistiller ``feat[-1]``, mdistiller ``pooled_feat``) — of student and teacher; ``Embed(dim_s, 128)``
and ``Embed(dim_t, 128)`` (e.g. resnet8x4/32x4 256, resnet20/56/110/32 64, wrn_16_2/40_2 128, wrn_40_1 64,
vgg 512, MobileNetV2 1280, ShuffleV1 960, ShuffleV2 1024, ResNet50 2048). Both embeddings are trained (with the
student, weight decay included); the banks are buffers. Loss = 1·CE + α·KD + 0.8·(CRD_s + CRD_t) with α = 0 for
"CRD" and α = 1 (KD at T = 4) for "CRD+KD" (``-r 1 -a 0 -b 0.8``; mdistiller: CE 1, feat 0.8). Schedule: the
RepDistiller one (SGD 0.9, wd 5e-4, batch 64, lr 0.05 — 0.01 for MobileNetV2/ShuffleNets — ×0.1 at 150/180/210,
240 epochs). RepDistiller reports CRD: wrn_40_2→wrn_16_2 75.48, resnet56→resnet20 71.16, resnet110→resnet32 73.48,
resnet32x4→resnet8x4 75.51, vgg13→vgg8 73.94, resnet32x4→ShuffleV1 75.11, vgg13→MobileNetV2 69.73.

How a CRD module calls this (one training step; ``index`` is the batch's int64 position of each sample in the
training set, ``num_samples`` = M = len(training set), ``labels`` = all M training labels)::

    # set-up, once (after the global seed: the banks are drawn from the global RNG, identically on every rank)
    self.embed_s, self.embed_t = Embed(dim_s), Embed(dim_t)
    self.memory = ContrastMemory(num_samples)                    # buffers: banks + Z, checkpointed
    self.sampler = ContrastSampler(labels)                       # non-persistent buffers, rebuilt from the data
    # each step
    s, t = self.embed_s(student_pooled), self.embed_t(teacher_pooled)
    contrast_index = self.sampler(index)                         # the device's global RNG (or generator=...)
    mean = (lambda x: self.all_gather(x).mean(0)) if self.trainer.world_size > 1 else None
    out_s, out_t = self.memory(s, t, contrast_index, mean_across_ranks=mean)
    crd = contrast_loss(out_s, num_samples) + contrast_loss(out_t, num_samples)
    # same step, after the scores: every rank applies the same update from the gathered batch
    gathered = [self.all_gather(x).reshape(-1, *x.shape[1:]) for x in (index, s.detach(), t.detach())]
    self.memory.update(*gathered)

Under DDP the banks stay identical on every rank because (a) they start identical (same seed before
construction, or one broadcast from rank 0), (b) every rank scores against the same banks and (c) every rank
applies :meth:`ContrastMemory.update` to the same all-gathered (index, embeddings), in the same order;
duplicated indices (``DistributedSampler`` pads the last batches with repeated samples) keep their last
occurrence in gather order, deterministically (on one device the authors' ``index_copy_`` leaves the last too).
Z is set from the mean over all ranks' first batches when ``mean_across_ranks`` is given (equal per-rank batch
sizes make the mean of the ranks' means the global mean), so every rank freezes the same Z. Lightning's DDP
broadcasts module buffers from rank 0 before each forward by default (``broadcast_buffers``), ~2·M·128·4 bytes
(51 MB on CIFAR) per step: harmless but redundant with the gathered update. Random state: the banks' initial
values and every draw of :class:`ContrastSampler` come from the global torch RNG of their device (or from an
explicit ``torch.Generator``), so a run is reproducible given that state, which the library checkpoints; each
rank draws the negatives of its own samples.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.core import Step, check_choice, check_range, classifier
from lightning_kd.methods.feature_distillation import FeatureDistillation

#: The constant the authors add to the NCE denominators (``crd/criterion.py``).
NCE_EPS = 1e-7


class Embed(nn.Module):
    """g(x) = W·flatten(x) + b, L2-normalised: CRD's embedding head (RepDistiller ``Embed``, 128-d)."""

    def __init__(self, in_features: int, feat_dim: int = 128) -> None:
        super().__init__()
        check_range("in_features", in_features, 1)
        check_range("feat_dim", feat_dim, 1)
        self.linear = nn.Linear(in_features, feat_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.reshape(features.shape[0], -1)
        if flat.shape[1] != self.linear.in_features:
            raise ValueError(
                f"Embed expects {self.linear.in_features} features per sample, got {flat.shape[1]} "
                f"(input shape {tuple(features.shape)})"
            )
        return F.normalize(self.linear(flat), p=2, dim=1)


def contrast_loss(scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """NCE loss of one direction: −(1/B)·Σ_b [log h(pos_b) + Σ_k log(1 − h(neg_bk))].

    ``scores`` (B, 1 + N) holds P = exp(score/τ)/Z with the positive in column 0; with the uniform noise
    probability Pn = 1/M, h = P / (P + N·Pn + 1e-7) and 1 − h is taken as N·Pn / (P + N·Pn + 1e-7), exactly as
    RepDistiller's ``ContrastLoss`` (its "Eq (18)"): the paper's −E_pos[log h] − N·E_neg[log(1 − h)] with the
    expectations estimated over the batch (the sum over a row's N negatives is N times their mean).

    Args:
        scores: (B, 1 + N) normalised, positive scores from :class:`ContrastMemory`.
        num_samples: M, the size of the training set (the noise distribution's support).
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"contrast_loss needs (B, 1 + N) scores with N >= 1 negatives, got {tuple(scores.shape)}")
    check_range("num_samples", num_samples, 1)
    batch, negatives = scores.shape[0], scores.shape[1] - 1
    noise = negatives * (1.0 / float(num_samples))  # N·Pn
    shift = noise + NCE_EPS
    positive, negative = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(positive / (positive + shift))
    log_d0 = torch.log(noise / (negative + shift))
    return -(log_d1.sum() + log_d0.sum()) / batch


def _check_positions(index: torch.Tensor, bound: int, name: str, owner: str) -> None:
    """One clear error unless ``index`` is int64 with values in [0, bound) (one host synchronisation)."""
    if index.dtype != torch.int64:
        raise ValueError(f"{name} must be an int64 tensor of sample positions, got dtype {index.dtype}")
    if index.numel():
        low, high = torch.stack([index.min(), index.max()]).tolist()
        if low < 0 or high >= bound:
            raise ValueError(f"{name} must lie in [0, {bound}) ({owner}), got values in [{low}, {high}]")


def _last_occurrences(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique indices, position of the last occurrence of each in ``index``), deterministically (stable sort)."""
    sorted_index, order = torch.sort(index, stable=True)
    last = torch.ones_like(sorted_index, dtype=torch.bool)
    last[:-1] = sorted_index[1:] != sorted_index[:-1]
    return sorted_index[last], order[last]


class ContrastMemory(nn.Module):
    """CRD's two memory banks and the normalised contrast scores (RepDistiller's ``ContrastMemory``).

    ``forward(student_embed, teacher_embed, contrast_index)`` returns ``(student_scores, teacher_scores)``, each
    (B, 1 + N): exp(⟨memory_teacher[j], student_embed⟩/τ)/Z_s and exp(⟨memory_student[j], teacher_embed⟩/τ)/Z_t for
    the indices j of each row of ``contrast_index`` (column 0 the positive). It does not touch the banks:
    call :meth:`update` afterwards with the (all-gathered) batch. Z is set on the first call (see the module
    docstring) and then frozen.

    Buffers (all checkpointed): ``memory_student`` and ``memory_teacher`` (num_samples, feat_dim), ``normalizers``
    (2,) = [Z_s, Z_t], −1 until set.

    Args:
        num_samples: M, the training-set size (one bank row per sample, addressed by the sample's index).
        feat_dim: embedding size (128).
        temperature: τ (0.07).
        momentum: bank momentum (0.5): row ← normalise(momentum·row + (1 − momentum)·embedding).
        generator: draws the banks' initial values (default: the global RNG).
    """

    def __init__(
        self,
        num_samples: int,
        feat_dim: int = 128,
        temperature: float = 0.07,
        momentum: float = 0.5,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        check_range("num_samples", num_samples, 1)
        check_range("feat_dim", feat_dim, 1)
        check_range("temperature", temperature, 0.0, low_open=True)
        check_range("momentum", momentum, 0.0, 1.0)
        self.num_samples = int(num_samples)
        self.feat_dim = int(feat_dim)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        # Same draws, in the same order, as the authors' buffers memory_v1 then memory_v2.
        self.register_buffer(
            "memory_student", torch.rand(num_samples, feat_dim, generator=generator).mul_(2 * stdv).add_(-stdv)
        )
        self.register_buffer(
            "memory_teacher", torch.rand(num_samples, feat_dim, generator=generator).mul_(2 * stdv).add_(-stdv)
        )
        self.register_buffer("normalizers", torch.full((2,), -1.0))
        self._normalizers_known = False  # host-side cache of "Z is set", so only the first steps synchronise

    @property
    def normalizers_set(self) -> bool:
        """Whether both constants Z are fixed (a host synchronisation)."""
        return bool((self.normalizers >= 0).all())

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._normalizers_known = False
        super()._load_from_state_dict(*args, **kwargs)

    def _check_index(self, index: torch.Tensor, name: str) -> None:
        _check_positions(index, self.num_samples, name, "the training-set size given to ContrastMemory")

    def _check_embeddings(self, student_embed: torch.Tensor, teacher_embed: torch.Tensor, batch: int) -> None:
        for name, embed in (("student_embed", student_embed), ("teacher_embed", teacher_embed)):
            if embed.shape != (batch, self.feat_dim):
                raise ValueError(
                    f"{name} must be ({batch}, {self.feat_dim}) to match the indices and feat_dim, "
                    f"got {tuple(embed.shape)}"
                )

    def _fix_normalizers(
        self,
        student_scores: torch.Tensor,
        teacher_scores: torch.Tensor,
        mean_across_ranks: Optional[Callable[[torch.Tensor], torch.Tensor]],
    ) -> None:
        if self._normalizers_known:
            return
        if not self.normalizers_set:
            means = torch.stack([student_scores.detach().mean(), teacher_scores.detach().mean()])
            if mean_across_ranks is not None:
                means = mean_across_ranks(means).reshape(2).to(means)
            fresh = means * self.num_samples
            self.normalizers.copy_(torch.where(self.normalizers < 0, fresh, self.normalizers))
        self._normalizers_known = True

    def forward(
        self,
        student_embed: torch.Tensor,
        teacher_embed: torch.Tensor,
        contrast_index: torch.Tensor,
        mean_across_ranks: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(student-anchored, teacher-anchored) normalised scores, each (B, 1 + N).

        Args:
            student_embed: (B, feat_dim) L2-normalised student embeddings (:class:`Embed`).
            teacher_embed: (B, feat_dim) L2-normalised teacher embeddings (:class:`Embed`).
            contrast_index: (B, 1 + N) int64 bank rows, column 0 the positive (:class:`ContrastSampler`).
            mean_across_ranks: maps a local tensor to its mean over DDP ranks; used once, when Z is set.
        """
        if contrast_index.dim() != 2 or contrast_index.shape[1] < 2:
            raise ValueError(
                f"contrast_index must be (B, 1 + N) with N >= 1 negatives, got shape {tuple(contrast_index.shape)}"
            )
        self._check_index(contrast_index, "contrast_index")
        batch, width = contrast_index.shape
        self._check_embeddings(student_embed, teacher_embed, batch)
        dtype = self.memory_student.dtype
        with torch.autocast(device_type=self.memory_student.device.type, enabled=False):
            student_embed, teacher_embed = student_embed.to(dtype), teacher_embed.to(dtype)
            rows = contrast_index.reshape(-1)
            weight_student = self.memory_student.index_select(0, rows).view(batch, width, self.feat_dim)
            teacher_scores = torch.exp(
                torch.div(torch.bmm(weight_student, teacher_embed.view(batch, self.feat_dim, 1)), self.temperature)
            ).squeeze(2)
            weight_teacher = self.memory_teacher.index_select(0, rows).view(batch, width, self.feat_dim)
            student_scores = torch.exp(
                torch.div(torch.bmm(weight_teacher, student_embed.view(batch, self.feat_dim, 1)), self.temperature)
            ).squeeze(2)
            self._fix_normalizers(student_scores, teacher_scores, mean_across_ranks)
            return student_scores / self.normalizers[0], teacher_scores / self.normalizers[1]

    @torch.no_grad()
    def update(self, index: torch.Tensor, student_embed: torch.Tensor, teacher_embed: torch.Tensor) -> None:
        """row ← normalise(momentum·row + (1 − momentum)·embedding) for each index, in both banks.

        Pass the batch gathered from every rank (the same tensors on every rank) so the banks stay identical. An
        index given twice keeps its last occurrence.

        Args:
            index: (n,) int64 sample positions.
            student_embed: (n, feat_dim) student embeddings (detached or not; no gradient is recorded).
            teacher_embed: (n, feat_dim) teacher embeddings (detached or not; no gradient is recorded).
        """
        if index.dim() != 1:
            raise ValueError(f"index must be 1-D (one position per sample), got shape {tuple(index.shape)}")
        self._check_index(index, "index")
        self._check_embeddings(student_embed, teacher_embed, index.shape[0])
        if index.numel() == 0:
            return
        index, keep = _last_occurrences(index)
        for memory, embed in ((self.memory_student, student_embed), (self.memory_teacher, teacher_embed)):
            rows = memory.index_select(0, index)
            rows.mul_(self.momentum)
            rows.add_(torch.mul(embed[keep].to(rows.dtype), 1 - self.momentum))
            norm = rows.pow(2).sum(1, keepdim=True).pow(0.5)
            memory.index_copy_(0, index, rows.div(norm))


class ContrastSampler(nn.Module):
    """Draws CRD's contrast indices: per sample, its positive (column 0) then ``num_negatives`` negatives.

    ``forward(index, generator=None)`` → (B, 1 + N) int64. Defaults reproduce RepDistiller's CIFAR loader
    (``CIFAR100InstanceSample``, mode ``exact``): the positive is the sample itself and the negatives are drawn
    uniformly without replacement among the samples of the other classes (with replacement for a class whose
    complement has fewer than N samples, as theirs). Draws use ``generator`` or else the global RNG of the
    buffers' device; each call consumes it, so a run is reproducible given the RNG state.

    Args:
        labels: (M,) int64 class of every training sample, by position.
        num_negatives: N (16384).
        mode: ``"exact"`` (positive = the sample) or ``"relax"`` (positive = a uniformly drawn sample of the same
            class, the sample itself included).
        negatives: ``"other_classes"`` (RepDistiller's loaders) or ``"all"`` (every sample, its class and itself
            included: the memory's ``AliasMethod`` path).
        replacement: draw negatives with replacement (RepDistiller's ImageNet loader; the ``AliasMethod`` path is
            ``negatives="all", replacement=True``).
    """

    def __init__(
        self,
        labels: torch.Tensor,
        num_negatives: int = 16384,
        mode: str = "exact",
        negatives: str = "other_classes",
        replacement: bool = False,
    ) -> None:
        super().__init__()
        labels = torch.as_tensor(labels)
        integer = labels.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)
        if labels.dim() != 1 or labels.numel() == 0 or not integer:
            raise ValueError(f"labels must be a non-empty 1-D integer tensor, one class per sample, got {labels.dtype} "
                             f"of shape {tuple(labels.shape)}")
        labels = labels.long()
        if int(labels.min()) < 0:
            raise ValueError(f"labels must be non-negative class indices, got {int(labels.min())}")
        check_range("num_negatives", num_negatives, 1)
        if mode not in ("exact", "relax"):
            raise ValueError(f"mode must be 'exact' or 'relax', got {mode!r}")
        if negatives not in ("other_classes", "all"):
            raise ValueError(f"negatives must be 'other_classes' or 'all', got {negatives!r}")
        counts = torch.bincount(labels)
        if negatives == "other_classes" and int((counts > 0).sum()) < 2:
            raise ValueError("negatives='other_classes' needs samples of at least two classes")
        self.num_samples = labels.numel()
        self.num_negatives = int(num_negatives)
        self.mode = mode
        self.negatives = negatives
        self.replacement = bool(replacement)
        if negatives == "all" and not replacement and num_negatives > self.num_samples:
            raise ValueError(
                f"cannot draw {num_negatives} distinct negatives from {self.num_samples} samples; use replacement=True"
            )
        self.register_buffer("labels", labels, persistent=False)
        # Samples sorted by class (stable): class c occupies order[start[c] : start[c] + count[c]].
        self.register_buffer("order", torch.sort(labels, stable=True).indices, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        # Some class has fewer than N samples of other classes (then its samples draw with replacement, as theirs).
        self._small_complement = bool((self.num_samples - counts[counts > 0] < num_negatives).any())

    def _uniform(self, shape: tuple[int, ...], generator: Optional[torch.Generator]) -> torch.Tensor:
        return torch.rand(shape, generator=generator, dtype=torch.float64, device=self.labels.device)

    def _below(self, bound: torch.Tensor, shape: tuple[int, ...], generator: Optional[torch.Generator]) -> torch.Tensor:
        """Uniform integers in [0, bound) (``bound`` broadcast against ``shape``)."""
        draw = (self._uniform(shape, generator) * bound).long()
        return torch.minimum(draw, bound.long() - 1)

    def _without_replacement(self, targets: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """N distinct samples per row, uniformly (the N smallest of i.i.d. uniform keys), excluding the row's class."""
        chunk = max(1, (1 << 24) // self.num_samples)  # rows per draw: at most 2^24 keys (128 MiB) at a time
        parts = []
        for start in range(0, targets.shape[0], chunk):
            part = targets[start:start + chunk]
            keys = self._uniform((part.shape[0], self.num_samples), generator)
            keys.masked_fill_(self.labels[None, :] == part[:, None], 2.0)  # never among the N smallest
            parts.append(keys.topk(self.num_negatives, dim=1, largest=False).indices)
        return torch.cat(parts)

    def _with_replacement(self, targets: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """N samples per row, uniformly with replacement among the samples of other classes."""
        candidates = (self.num_samples - self.class_count[targets])[:, None]
        draw = self._below(candidates, (targets.shape[0], self.num_negatives), generator)
        # draw-th sample of the other classes, in class order: skip the row's own class block.
        start, count = self.class_start[targets][:, None], self.class_count[targets][:, None]
        return self.order[draw + count * (draw >= start)]

    def forward(self, index: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if index.dim() != 1:
            raise ValueError(f"index must be 1-D (one position per sample), got shape {tuple(index.shape)}")
        _check_positions(index, self.num_samples, "index", "the number of labels given to ContrastSampler")
        index = index.to(self.labels.device)
        batch = index.shape[0]
        targets = self.labels[index]
        if self.mode == "exact":
            positive = index
        else:
            offset = self._below(self.class_count[targets], (batch,), generator)
            positive = self.order[self.class_start[targets] + offset]
        if self.negatives == "all":
            if self.replacement:
                negatives = torch.randint(0, self.num_samples, (batch, self.num_negatives), generator=generator,
                                          device=index.device)
            else:
                keys = self._uniform((batch, self.num_samples), generator)
                negatives = keys.topk(self.num_negatives, dim=1, largest=False).indices
        elif self.replacement:
            negatives = self._with_replacement(targets, generator)
        elif not self._small_complement:
            negatives = self._without_replacement(targets, generator)
        else:
            # Theirs: replace = k > len(cls_negative[target]), decided per sample.
            forced = self.num_samples - self.class_count[targets] < self.num_negatives
            negatives = torch.empty(batch, self.num_negatives, dtype=torch.int64, device=index.device)
            for rows, draw in ((~forced, self._without_replacement), (forced, self._with_replacement)):
                rows = rows.nonzero().squeeze(1)
                if rows.numel():
                    negatives[rows] = draw(targets[rows], generator)
        return torch.cat([positive[:, None], negatives], dim=1)


def training_labels(datamodule) -> torch.Tensor:
    """The class of every training sample, by its index (``datamodule.train_dataset.targets``)."""
    targets = getattr(getattr(datamodule, "train_dataset", None), "targets", None)
    if targets is None:
        raise ValueError(
            "CRD draws each sample's negatives among the samples of other classes, so it needs the class of every "
            "training sample (the data module's train_dataset.targets, as every lightning_kd data module has): "
            "with other data, set model.negatives to 'all'"
        )
    return torch.as_tensor(targets)


class CRD(FeatureDistillation):
    """Contrastive representation distillation: loss = CE (+ KD) + β·(NCE_s + NCE_t) on memory banks of every
    training sample (see the module docstring for the choices, the authors' code's).

    Owns the two embeddings and the banks (sized by ``num_samples``, which the CLI links from the data); each batch
    carries its samples' ``index`` (``sample_fields``). Negatives are drawn from :meth:`step_generator`, so a
    resumed run draws what the uninterrupted one did. Under DDP every process applies the update of the whole
    gathered batch, so the banks stay identical.

    Args:
        beta: weight β of the contrastive term (RepDistiller: 0.8).
        feat_dim: embedding size (128).
        num_negatives: negatives N per sample (16384).
        nce_temperature: τ of the critic (0.07).
        momentum: bank momentum (0.5).
        negatives: ``other_classes`` (RepDistiller's CIFAR loader) or ``all``.
        **kwargs (Any): one layer each (default: the classifier's input, the pooled penultimate feature),
            ``ce_weight``/``kd_weight`` ("CRD+KD": ``kd_weight: 1``) and the base arguments.
    """

    sample_fields = ("index",)

    def __init__(
        self, beta: float = 0.8, feat_dim: int = 128, num_negatives: int = 16384, nce_temperature: float = 0.07,
        momentum: float = 0.5, negatives: str = "other_classes", **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_range("beta", beta, 0.0)
        check_range("num_negatives", num_negatives, 1)
        check_choice("negatives", negatives, ("other_classes", "all"))
        if self.num_samples is None:
            raise ValueError("CRD keeps a memory of every training sample: set model.num_samples (the CLI links it)")
        self.beta, self.num_negatives, self.negatives = beta, num_negatives, negatives
        (student,), (teacher,) = self.feature_shapes()
        self.embed_student = Embed(math.prod(student), feat_dim)
        self.embed_teacher = Embed(math.prod(teacher), feat_dim)  # trained: not a part of the frozen teacher
        self.memory = ContrastMemory(self.num_samples, feat_dim, nce_temperature, momentum)
        self.sampler: Optional[ContrastSampler] = None  # built from the training labels in setup

    def default_layers(self, network: nn.Module) -> list[str]:
        return [f"{classifier(network)[0]}:input"]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.sampler is None:
            labels = training_labels(self.trainer.datamodule) if self.negatives == "other_classes" else None
            labels = torch.zeros(self.num_samples, dtype=torch.long) if labels is None else labels
            self.sampler = ContrastSampler(labels, self.num_negatives, negatives=self.negatives).to(self.device)

    def gathered(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` of every process, concatenated along the batch (itself on one process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.all_gather(tensor).flatten(0, 1)

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        ((student, teacher),) = self.paired_features(step)
        s, t = self.embed_student(student), self.embed_teacher(teacher)
        index = step.fields["index"]
        contrast_index = self.sampler(index, generator=self.step_generator())
        scores = self.memory(s, t, contrast_index, mean_across_ranks=lambda x: self.gathered(x[None]).mean(0))
        crd = sum(contrast_loss(score, self.num_samples) for score in scores)
        self.memory.update(self.gathered(index), self.gathered(s.detach()), self.gathered(t.detach()))
        return {**self.task_terms(step), "crd": self.beta * crd}
