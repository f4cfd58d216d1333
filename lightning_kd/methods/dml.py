"""Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning" (DML, CVPR 2018, arXiv 1706.00384)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.core import DistillationModule, Step, build_network


def dml_loss(peer_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each peer's cross-entropy and mean KL to the others (Zhang et al. 2018, the objective for K networks):

        L_k = CE(p_k, y) + 1/(K−1)·Σ_{j≠k} KL(p_j ‖ p_k),   p = softmax(logits)

    Every other peer's p_j is a fixed target (detached), so the gradient of Σ_k L_k with respect to peer k
    is that of L_k alone.

    Args:
        peer_logits: (K, B, C) logits of the K ≥ 2 peers.
        targets: (B,) class labels.

    Returns:
        (K,) cross-entropies and (K,) mean KL divergences (summed over classes, averaged over the batch).
    """
    count = peer_logits.shape[0]
    log_p = F.log_softmax(peer_logits, dim=-1)
    fixed = log_p.detach()
    ce = torch.stack([F.cross_entropy(logits, targets) for logits in peer_logits])
    kl = torch.stack([
        sum(F.kl_div(log_p[k], fixed[j], reduction="batchmean", log_target=True) for j in range(count) if j != k)
        for k in range(count)
    ]) / (count - 1)
    return ce, kl


class DML(DistillationModule):
    """Deep mutual learning: K ≥ 2 peers trained together from scratch, each on CE + mean KL to the others.

    The student is peer 0 and ``peers`` are the others; architectures may differ (all must output the
    data's classes). Loss: :func:`dml_loss`, logged per peer (``ce_peer_k``, ``kl_peer_k``).

    Updates are simultaneous: every step runs all peers on the batch once, and one backward of Σ_k L_k and
    one optimizer step update them all from the same predictions. The paper updates the peers in turn,
    re-predicting after each update. With the targets detached, the joint step gives each peer exactly the
    gradient of its own L_k at the step's predictions, costs one forward per peer, and needs no manual
    optimization: under DDP the one wrapped module gets gradients for all its parameters every step, and
    under mixed precision one gradient scaler serves the one optimizer. All peers therefore share the
    optimizer's settings and schedule, as they do in the paper.

    Validation logs every peer (``val/acc1/peer_0`` … ``peer_{K−1}``); ``val/acc1`` is peer 0's. Every peer
    is exportable by name (``--network peer_1``); the default is peer 0.

    Args:
        peers: the other peers: model names (CIFAR zoo or torchvision) built for the data's classes.
    """

    needs_teacher = False

    def __init__(self, peers: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        if not peers:
            raise ValueError("DML needs at least one peer besides the student: set model.peers, e.g. [resnet32]")
        self.peers = nn.ModuleList(build_network(peer, self.num_classes) for peer in peers)
        self.peer_names = [f"peer_{k}" for k in range(len(peers) + 1)]
        self.score_outputs(self.peer_names)

    def all_peer_logits(self, x: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        """(K, B, C) logits of every peer, given the student's."""
        logits = [student_logits]
        for name, peer in zip(self.peer_names[1:], self.peers):
            logits.append(peer(x))
            self._check_classes(logits[-1], name)
        return torch.stack(logits)

    def forward_step(self, x: torch.Tensor, y: torch.Tensor, fields: Optional[dict] = None) -> Step:
        """The base step, plus ``outputs["peer_logits"]`` (K, B, C), the student first."""
        step = super().forward_step(x, y, fields)
        step.outputs["peer_logits"] = self.all_peer_logits(x, step.student_logits)
        return step

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        ce, kl = dml_loss(step.outputs["peer_logits"], step.targets)
        terms = {}
        for name, peer_ce, peer_kl in zip(self.peer_names, ce, kl):
            terms[f"ce_{name}"] = peer_ce
            terms[f"kl_{name}"] = peer_kl
        return terms

    def evaluation_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(x)
        return logits, dict(zip(self.peer_names, self.all_peer_logits(x, logits)))

    def deployable(self, name: Optional[str] = None) -> nn.Module:
        """Peer ``name`` (``peer_0`` … ``peer_{K−1}``); default: peer 0, the student."""
        if name is None or name == self.peer_names[0]:
            return self.student
        if name not in self.peer_names:
            raise ValueError(f"DML deploys one of the peers {self.peer_names}, got {name!r}")
        return self.peers[self.peer_names.index(name) - 1]
