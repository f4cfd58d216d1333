"""Xu, Liu & Loy, "Computation-Efficient Knowledge Distillation via Uncertainty-Aware Mixup" (arXiv 2012.09413).

Our reading of the paper and of its code (github.com/xuguodong03/UNIXKD, ``student_v0.py``):

* Cost. KD costs, per training image, a student forward and backward (counted as 2·F_s) and a teacher forward
  (F_t). UNIX adds a gradient-free student forward on all B images of a batch but sends only k of them through
  the teacher and the trained student, so its computation relative to KD is::

      (B·F_s + k·(2·F_s + F_t)) / (B·(2·F_s + F_t))

  This gives every "Computation" figure of their CIFAR-100 table from its F_t/F_s column, e.g.
  resnet32x4 → resnet8x4 (F_t/F_s = 6.12): 87.32 %; vgg13 → MobileNetV2 (38.17): 77.49 %.
* Step. A no-grad student pass scores each image's uncertainty (entropy by default; least confidence
  1 − max p; margin −(p₁ − p₂)); their code runs it in the student's training mode, so BatchNorm also sees
  the clean batch — kept here. Images are sorted by decreasing uncertainty (rank r = 0 the most uncertain),
  λ ~ Beta(1, 1) and a random permutation π of the batch are drawn, and image r becomes
  ``(1 − m_r)·x_(r) + m_r·x_π(r)`` with the mask ``m_r = λ·sigmoid(w·(r/B − (2b−1)/(2B)))``: uncertain
  images stay nearly clean, confident ones are mixed strongly. Only the first k go on.
* Loss on the k images: ``kd_weight·T²·KL(softmax(t/T) ‖ softmax(s/T))`` plus ``ce_weight`` times the mixed
  cross-entropy ``(1 − m)·CE(s, y_(r)) + m·CE(s, y_π(r))``. Their defaults: B = 64, k = 48, b = 32, w = 10,
  T = 4, KD weight 1, CE weight 0.

B is the size of each batch as it comes (a short last batch included); k and b are counts.
"""
from __future__ import annotations

import warnings
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch.distributions import Beta, Categorical

from lightning_kd.core import DistillationModule, FlopsPerImage, Step, check_choice, check_range, check_weights
from lightning_kd.methods.kd import kd_loss

UNCERTAINTIES = ("entropy", "least_confidence", "margin")


def uncertainty(logits: torch.Tensor, kind: str = "entropy") -> torch.Tensor:
    """Per-image uncertainty of ``logits`` (B, K), higher is more uncertain (Xu et al.'s sample selection).

    ``entropy``: −Σ p log p; ``least_confidence``: 1 − max p; ``margin``: −(p₁ − p₂), the two largest
    probabilities.
    """
    if kind == "entropy":
        return Categorical(logits=logits).entropy()
    probabilities = logits.softmax(dim=-1)
    if kind == "least_confidence":
        return 1 - probabilities.amax(dim=-1)
    if kind == "margin":
        top2 = probabilities.topk(2, dim=-1).values
        return top2[:, 1] - top2[:, 0]
    raise ValueError(f"uncertainty must be one of {', '.join(UNCERTAINTIES)}, got {kind!r}")


def unix_mix_weights(
    batch_size: int, center: float, sharpness: float, lam: float, device: Optional[torch.device] = None
) -> torch.Tensor:
    """The mixup mask ``m_r = λ·sigmoid(w·(r/B − (2b−1)/(2B)))`` for ranks r = 0 … B−1 (Xu et al.'s
    uncertainty-aware mixup; ``mask_proto`` of their ``student_v0.py``).

    Rises from ≈0 to ≈λ around rank b − ½ (where it is λ/2); every value lies in [0, λ].
    """
    rank = torch.arange(batch_size, device=device, dtype=torch.float32)
    return lam * torch.sigmoid(sharpness * (rank / batch_size - (2 * center - 1) / (2 * batch_size)))


def unix_loss_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mixed_targets: torch.Tensor,
    temperature: float,
    kd_weight: float,
    ce_weight: float,
) -> dict[str, torch.Tensor]:
    """UNIX's loss on the kept mixed images (Xu et al.; ``loss`` of their ``student_v0.py``).

    ``kd``: ``kd_weight·T²·KL(softmax(t/T) ‖ softmax(s/T))`` (batch mean); ``ce``: ``ce_weight`` times the
    cross-entropy with the mixed labels ``mixed_targets = (1 − m)·onehot(y_a) + m·onehot(y_b)``, which equals
    ``(1 − m)·CE(s, y_a) + m·CE(s, y_b)``.
    """
    return {
        "ce": ce_weight * F.cross_entropy(student_logits, mixed_targets),
        "kd": kd_weight * kd_loss(student_logits, teacher_logits, temperature),
    }


class UNIXKD(DistillationModule):
    """UNIX: KD on the k of B images a student is least sure of, the others mixed into them by uncertainty.

    Logs ``unix/teacher_images_saved`` (images of the batches that did not go through the teacher, so far: the
    images seen less the teacher's meter, :attr:`teacher_cost`) and ``unix/computation_vs_kd``, the paper's
    efficiency figure: the run's computation so far relative to plain KD on the same batches, from the forward
    FLOPs of student and teacher (omitted when the teacher's FLOPs cannot be counted).

    Args:
        keep: k, images per batch sent through the teacher and the trained student (batches of at most k
            images are used whole).
        mix_center: b, the rank around which the mixing strength rises.
        mix_sharpness: w, how steeply it rises.
        temperature: T of the KD term.
        kd_weight: weight of the KD term.
        ce_weight: weight of the mixed cross-entropy.
        uncertainty: ``entropy``, ``least_confidence`` or ``margin``.
    """

    needs_teacher = True

    def __init__(
        self,
        keep: int = 48,
        mix_center: int = 32,
        mix_sharpness: float = 10.0,
        temperature: float = 4.0,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        uncertainty: Literal["entropy", "least_confidence", "margin"] = "entropy",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_range("keep", keep, 1)
        check_range("mix_center", mix_center, 0)
        check_range("mix_sharpness", mix_sharpness, 0.0)
        check_range("temperature", temperature, 0.0, low_open=True)
        check_weights(kd_weight=kd_weight, ce_weight=ce_weight)
        check_choice("uncertainty", uncertainty, UNCERTAINTIES)
        self.keep = keep
        self.mix_center = mix_center
        self.mix_sharpness = mix_sharpness
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.ce_weight = ce_weight
        self.uncertainty = uncertainty
        self.student_flops = FlopsPerImage(self.student)
        self.mix_strength = Beta(1.0, 1.0)
        # Running totals for the efficiency figures (Python integers: no accelerator sync); the images sent through
        # the teacher are its meter's (teacher_cost).
        self.images_seen = 0
        self.flops_spent: Optional[int] = 0
        self.flops_of_kd: Optional[int] = 0

    def count_cost(self, x: torch.Tensor, kept: int) -> None:
        """Add a batch ``x`` of which ``kept`` images go on to the running totals (paper's cost model)."""
        batch = x.shape[0]
        self.images_seen += batch
        student, teacher = self.student_flops(x), self.teacher_cost.flops_per_image(x)
        if teacher is None or self.flops_spent is None:
            self.flops_spent = self.flops_of_kd = None
            return
        self.flops_spent += batch * student + kept * (2 * student + teacher)
        self.flops_of_kd += batch * (2 * student + teacher)

    def forward_step(self, x: torch.Tensor, y: torch.Tensor, fields: Optional[dict] = None) -> Step:
        """Score and sort the batch by uncertainty, mix it, and run student and teacher on the first k images (mixes
        of two samples: no per-sample fields)."""
        batch, kept = x.shape[0], min(self.keep, x.shape[0])
        self.count_cost(x, kept)
        with torch.no_grad():
            order = uncertainty(self.student(x).float(), self.uncertainty).argsort(descending=True)[:kept]
        partner = torch.randperm(batch, device=x.device)[:kept]
        lam = self.mix_strength.sample().item()
        mask = unix_mix_weights(batch, self.mix_center, self.mix_sharpness, lam, device=x.device)[:kept]
        inputs = torch.lerp(x[order], x[partner], mask.to(x.dtype).view(-1, *([1] * (x.dim() - 1))))
        labels = F.one_hot(y[order], self.num_classes).float(), F.one_hot(y[partner], self.num_classes).float()
        return super().forward_step(inputs, torch.lerp(*labels, mask[:, None]))

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        return unix_loss_terms(
            step.student_logits, step.teacher_logits, step.targets, self.temperature, self.kd_weight, self.ce_weight
        )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if batch_size is not None and batch_size <= self.keep:
            warnings.warn(
                f"UNIXKD: keep={self.keep} is not below the batch size {batch_size}: every image goes through the "
                "teacher, nothing is saved"
            )

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        saved = float(self.images_seen - self.teacher_cost.images)
        self.log("unix/teacher_images_saved", saved, on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True)
        if self.flops_spent is not None and self.flops_of_kd:
            ratio = self.flops_spent / self.flops_of_kd
            self.log("unix/computation_vs_kd", ratio, on_step=False, on_epoch=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["unix_cost"] = [self.images_seen, self.flops_spent, self.flops_of_kd]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "unix_cost" in checkpoint:
            cost = checkpoint["unix_cost"]
            if len(cost) == 4:  # written when the kept images were counted here too: they are the teacher's meter
                cost = [cost[0], *cost[2:]]
            self.images_seen, self.flops_spent, self.flops_of_kd = cost
