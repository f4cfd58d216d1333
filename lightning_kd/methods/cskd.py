"""Yun, Park, Lee & Shin, "Regularizing Class-wise Predictions via Self-knowledge Distillation" (CS-KD,
CVPR 2020, arXiv 2003.13964)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lightning_kd.core import DistillationModule, Step, check_range, renamed_argument
from lightning_kd.methods.kd import kd_loss


def cskd_loss(logits: torch.Tensor, pair_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(f(x')/T) ‖ softmax(f(x)/T)): the class-wise regularizer L_cls of Yun et al.

    ``x'`` is another sample of the class of ``x``; its prediction is a fixed target (detached here), so the
    model learns to predict alike within a class. KL summed over classes and averaged over the batch.
    """
    return kd_loss(logits, pair_logits.detach(), temperature)


def check_paired(targets: torch.Tensor) -> None:
    """Raise one clear error unless the batch is ``B`` samples followed by ``B`` partners of the same classes."""
    half = targets.shape[0] // 2
    if targets.shape[0] % 2 or not torch.equal(targets[:half], targets[half:]):
        raise ValueError(
            "CSKD needs class-paired batches (B samples, then a partner of the same class for each); these are "
            "not. Set `data.init_args.paired_batches: true` (lightning_kd.data.ClassPairBatchSampler)."
        )


class CSKD(DistillationModule):
    """Class-wise self-knowledge distillation: loss = CE(f(x), y) + kd_weight·T²·KL(softmax(f(x')/T) ‖ softmax(f(x)/T)).

    Trains on class-paired batches (``paired_batches: true`` on the data module): the first half of each
    batch are the samples, the second half their same-class partners ``x'``. As in the authors' code, the
    samples go through the network with gradients and the partners under ``torch.no_grad`` (both in train
    mode), and the cross-entropy is taken on the samples only. The first batch of every epoch is checked:
    unpaired data fails at once with a message saying how to pair it.

    Args:
        temperature: softening temperature T > 0 (paper: 4).
        kd_weight: weight ≥ 0 of the class-wise term, the paper's λ_cls (paper: 1; 3 on the fine-grained sets).
        cls_weight: deprecated name of ``kd_weight``; removed in the next release.
    """

    needs_teacher = False

    def __init__(self, temperature: float = 4.0, kd_weight: float = 1.0, cls_weight: Optional[float] = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        check_range("temperature", temperature, 0.0, low_open=True)
        kd_weight = renamed_argument("CSKD", "cls_weight", cls_weight, "kd_weight", kd_weight, 1.0)
        check_range("kd_weight", kd_weight, 0.0)
        self.temperature = temperature
        self.kd_weight = kd_weight

    def forward_step(self, x: torch.Tensor, y: torch.Tensor, fields: Optional[dict] = None) -> Step:
        """The base step on the first half of the batch, plus ``outputs["pair_logits"]``: the partners' logits."""
        half = x.shape[0] // 2
        step = super().forward_step(x[:half], y[:half], {name: value[:half] for name, value in (fields or {}).items()})
        with torch.no_grad():
            step.outputs["pair_logits"] = self.student(x[half:])
        return step

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:
            check_paired(batch[1])
        return super().training_step(batch, batch_idx)

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        return {
            "ce": F.cross_entropy(step.student_logits, step.targets),
            "cls": self.kd_weight * cskd_loss(step.student_logits, step.outputs["pair_logits"], self.temperature),
        }
