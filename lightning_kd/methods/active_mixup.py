"""Wang, Li, Wang & Gong, "Neural Networks Are More Productive Teachers Than Human Raters: Active Mixup for
Data-Efficient Knowledge Distillation from a Blackbox Model" (CVPR 2020, arXiv 2003.13960).

Our reading of the paper and of its code (github.com/dwang181/active-mixup):

* The teacher is a black box: it answers class probabilities, and every image it is asked about is a query.
* A small pool of unlabeled images (1000 CIFAR-10 training images in their code; labels never used).
  Round 0 queries the teacher on the pool images themselves.
* Candidates are mixes ``w·a + (1−w)·b`` of two pool images (their code: every pair). The student, in eval
  mode, scores each pair at ``w ∈ {0.30, 0.34, …, 0.70}``; a pair's score is its lowest max-softmax and the
  ``w`` reaching it is the mix that is kept (the hardest mix of that pair for the student).
* Each later round queries the teacher on the ``k`` lowest-scoring candidates (k = 10K in their code), adds
  them with the teacher's probabilities to the training set, and trains the student on all labelled images
  with the soft cross-entropy ``−Σ_c p_teacher(c)·log softmax(s)_c``, averaged over the batch.

Where this implementation differs: their code retrains the student from scratch after each round (200 epochs,
SGD lr 0.01, ÷10 after 80/140/180 epochs); here one Trainer run keeps training the same student, round after
round, on the growing set (``epochs_per_round`` epochs each; a per-round restarting schedule such as
``CosineAnnealingWarmRestarts(T_0=epochs_per_round)`` plays the part of the restart). The training set grows
through Lightning's data reloading (``trainer.reload_dataloaders_every_n_epochs=1``) from a
:class:`~lightning_kd.data.QueryPoolDataModule`.

:class:`ActiveMixup` is the LightningModule (the loss, the black-box teacher); :class:`ActiveMixupRounds`, the
callback it attaches to the Trainer itself (``configure_callbacks``), runs the query rounds.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import WandbLogger
from torch import nn

from lightning_kd.core import (
    BlackBoxTeacher,
    DistillationModule,
    Step,
    check_choice,
    check_range,
    evaluation_mode,
    freeze,
)
from lightning_kd.data import QueryPoolDataModule, mix_images


def soft_target_loss(student_logits: torch.Tensor, teacher_probabilities: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy ``−Σ_c p_c·log softmax(s)_c`` averaged over the batch: training on the teacher's
    probabilities (Wang et al.'s distillation loss; ``cross_entropy`` of their ``active_train.py``)."""
    return F.cross_entropy(student_logits, teacher_probabilities)


def least_confident_mixes(
    student: nn.Module,
    pool: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    mix_weights: torch.Tensor,
    count: int,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` candidate mixes of pool pairs ``(first[i], second[i])`` the student is least confident about.

    Each pair is mixed at every weight of ``mix_weights`` (``w·a + (1−w)·b``); its confidence is the lowest
    max-softmax of the student over those mixes, and that mix's weight is kept (Wang et al.'s active selection;
    ``10_data_prep.py`` of their code).
    The student runs in eval mode under ``torch.no_grad`` (its mode is restored), ``batch_size`` pairs at a time.

    Returns:
        the indices (into ``first``/``second``) of the ``count`` least confident pairs, and their mix weights.
    """
    confidences, weights = [], []
    with evaluation_mode(student):
        for start in range(0, len(first), batch_size):
            pairs = first[start : start + batch_size], second[start : start + batch_size]
            confidence = torch.stack(
                [
                    student(mix_images(pool, *pairs, weight.expand(len(pairs[0])))).float().softmax(-1).amax(-1)
                    for weight in mix_weights
                ]
            )  # (weights, pairs)
            lowest, at = confidence.min(dim=0)
            confidences.append(lowest)
            weights.append(mix_weights[at])
    chosen = torch.cat(confidences).topk(min(count, len(first)), largest=False).indices
    return chosen, torch.cat(weights)[chosen]


def random_mixes(pairs: int, mix_weights: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` of ``pairs`` candidate pairs drawn at random, each with a mix weight drawn from ``mix_weights``:
    the control of the active selection (Wang et al.'s "random mixup", Fig. 4), the same budget spent blind."""
    chosen = torch.randperm(pairs)[: min(count, pairs)].to(mix_weights.device)
    return chosen, mix_weights[torch.randint(len(mix_weights), (len(chosen),)).to(mix_weights.device)]


class ActiveMixupRounds(pl.Callback):
    """The query rounds of Active Mixup (Wang et al., CVPR 2020): it owns the growing pool and the teacher's queries.

    Round 0 labels the pool images when the fit starts; after every ``epochs_per_round`` epochs a new round scores
    ``candidates`` unlabeled pairs with the student (:func:`least_confident_mixes`), asks the teacher about the
    ``queries_per_round`` least confident mixes and adds them, with its probabilities, to the
    :class:`~lightning_kd.data.QueryPoolDataModule` (the next epoch's training set). At the end of each round it
    logs the validation accuracy against the queries so far: a line plot (``active_mixup/acc1_vs_queries``) on
    W&B, the metric ``active_mixup/val_acc1`` with the query count as its step on other loggers; those points are
    its checkpoint state.

    Built and attached by :class:`ActiveMixup` (its ``configure_callbacks``), whose teacher, a
    :class:`~lightning_kd.core.BlackBoxTeacher`, is asked through ``teacher_forward`` and metered on its
    ``teacher_cost``. Under DDP the first process asks (:meth:`query_round`). Its arguments are
    :class:`ActiveMixup`'s, passed on.

    Args:
        rounds: query rounds after round 0.
        queries_per_round: the mixes queried per round.
        candidates: unlabeled pairs scored per round; ``None`` scores every unlabeled pair.
        epochs_per_round: training epochs between two rounds.
        mix_range: the lowest and highest mix weight tried.
        mix_steps: how many evenly spaced weights of ``mix_range`` are tried.
        score_batch_size: candidate pairs scored (and images queried) per forward pass.
        selection: ``"least_confident"`` or ``"random"``.
    """

    def __init__(
        self,
        rounds: int,
        queries_per_round: int,
        candidates: Optional[int],
        epochs_per_round: int,
        mix_range: Sequence[float],
        mix_steps: int,
        score_batch_size: int,
        selection: str = "least_confident",
    ) -> None:
        self.selection = selection
        self.rounds = rounds
        self.queries_per_round = queries_per_round
        self.candidates = candidates
        self.epochs_per_round = epochs_per_round
        self.mix_weights = torch.linspace(*mix_range, mix_steps)
        self.score_batch_size = score_batch_size
        self.accuracy_vs_queries: list[tuple[int, float]] = []  # (cumulative queries, val/acc1) per round

    @staticmethod
    def pool_data(trainer: pl.Trainer) -> QueryPoolDataModule:
        data = trainer.datamodule
        if not isinstance(data, QueryPoolDataModule):
            raise ValueError(
                "ActiveMixup needs a lightning_kd.data.QueryPoolDataModule (an unlabeled pool), "
                f"got {type(data).__name__}"
            )
        return data

    def planned_queries(self, pool_size: int) -> int:
        """Teacher queries of the whole run: the pool images, then up to ``queries_per_round`` per round."""
        return pool_size + min(self.rounds * self.queries_per_round, pool_size * (pool_size - 1) // 2)

    def candidate_pairs(self, data: QueryPoolDataModule) -> tuple[torch.Tensor, torch.Tensor]:
        """Unlabeled pairs ``i < j`` of pool images: all of them, or ``candidates`` drawn at random."""
        size = len(data.pool)
        first, second = torch.triu_indices(size, size, offset=1)
        unlabeled = ~torch.isin(first * size + second, data.labelled_pair_ids())
        first, second = first[unlabeled], second[unlabeled]
        if self.candidates is not None and len(first) > self.candidates:
            drawn = torch.randperm(len(first))[: self.candidates]
            first, second = first[drawn], second[drawn]
        return first, second

    def query_round(self, trainer: pl.Trainer, module: DistillationModule) -> None:
        """Label the next round: the pool images (round 0) or the least confident candidate mixes.

        Under DDP the first process chooses the mixes and asks the teacher, and every process receives the same
        labelled mixes: each image is asked about once and all processes train on one set. The first process's
        meter counts every query (so the budget is global); the others' count none, and the logged
        ``teacher/images``, summed over the processes, is every query made.
        """
        data = self.pool_data(trainer)
        labelled = self.choose_and_query(data, module) if trainer.is_global_zero else None
        data.add(*trainer.strategy.broadcast(labelled, src=0))

    def choose_and_query(
        self, data: QueryPoolDataModule, module: DistillationModule
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next round's mixes ``(first, second, weight)`` and the teacher's probabilities for them (on the CPU)."""
        device = module.device
        pool = data.pool.to(device)
        if data.additions == 0:
            first = second = torch.arange(len(pool), device=device)
            weight = torch.ones(len(pool), device=device)
        else:
            first, second = (pairs.to(device) for pairs in self.candidate_pairs(data))
            if self.selection == "random":
                chosen, weight = random_mixes(len(first), self.mix_weights.to(device), self.queries_per_round)
            else:
                chosen, weight = least_confident_mixes(
                    module.student, pool, first, second, self.mix_weights.to(device), self.queries_per_round,
                    self.score_batch_size,
                )
            first, second = first[chosen], second[chosen]
        probabilities = [
            module.teacher_forward(mix_images(pool, *chunk)).softmax(-1)
            for chunk in zip(*(t.split(self.score_batch_size) for t in (first, second, weight)))
        ]
        probabilities = torch.cat(probabilities) if probabilities else data.targets[:0]
        return first.cpu(), second.cpu(), weight.cpu(), probabilities.cpu()

    def label_due_rounds(self, trainer: pl.Trainer, module: DistillationModule, epoch: int) -> None:
        """Label every round due when ``epoch`` starts: round 0 at once, round r after r·epochs_per_round epochs."""
        due = 1 + min(self.rounds, epoch // self.epochs_per_round)
        while self.pool_data(trainer).additions < due:
            self.query_round(trainer, module)

    def queries_so_far(self, trainer: pl.Trainer, module: DistillationModule) -> int:
        """Every query made, by all processes: the teacher's meter summed over them (as ``teacher/images`` is)."""
        count = torch.tensor(module.teacher_cost.images, device=module.device)
        return int(trainer.strategy.reduce(count, reduce_op="sum"))

    def record_accuracy(self, trainer: pl.Trainer, module: DistillationModule) -> None:
        """Log the validation accuracy reached with the queries so far (at the end of a round)."""
        accuracy = trainer.callback_metrics.get("val/acc1")
        if accuracy is None:
            return
        queries, accuracy = self.queries_so_far(trainer, module), float(accuracy)
        self.accuracy_vs_queries.append((queries, accuracy))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                rows = [list(row) for row in self.accuracy_vs_queries]
                table = wandb.Table(columns=["teacher queries", "val/acc1"], data=rows)
                title = "Active Mixup: accuracy against teacher queries"
                chart = wandb.plot.line(table, "teacher queries", "val/acc1", title=title)
                step = trainer.global_step
                logger.experiment.log({"active_mixup/acc1_vs_queries": chart, "trainer/global_step": step})
            else:
                logger.log_metrics({"active_mixup/val_acc1": accuracy}, step=queries)

    # --- hooks ----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, module: DistillationModule) -> None:
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                "ActiveMixup grows the training set between epochs: set trainer.reload_dataloaders_every_n_epochs=1 "
                f"(got {trainer.reload_dataloaders_every_n_epochs})"
            )
        pool_size = len(self.pool_data(trainer).pool)
        planned, budget = self.planned_queries(pool_size), module.teacher_cost.budget
        if budget is not None and planned > budget:
            raise ValueError(
                f"ActiveMixup plans {planned} teacher queries ({pool_size} pool images + {self.rounds} "
                f"rounds × {self.queries_per_round}) but the teacher's query budget is {budget}"
            )
        self.label_due_rounds(trainer, module, 0)  # round 0, before the first training loader (a resumed run has it)

    def on_train_start(self, trainer: pl.Trainer, module: DistillationModule) -> None:
        # Normally nothing to do. On resume, labels a round due but not in the checkpoint (written before the
        # round, or by a run that ended there); its images join the training set at the next reload.
        self.label_due_rounds(trainer, module, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, module: DistillationModule) -> None:
        module.stop_if_non_finite()  # (this hook runs before the module's) no queries for a student gone non-finite
        next_epoch = trainer.current_epoch + 1
        if next_epoch % self.epochs_per_round == 0:
            self.record_accuracy(trainer, module)
        if next_epoch != trainer.max_epochs:  # no queries that no epoch would train on
            self.label_due_rounds(trainer, module, next_epoch)

    def state_dict(self) -> dict:
        return {"accuracy_vs_queries": self.accuracy_vs_queries}

    def load_state_dict(self, state: dict) -> None:
        self.accuracy_vs_queries = [tuple(row) for row in state["accuracy_vs_queries"]]

    def on_load_checkpoint(self, trainer: pl.Trainer, module: DistillationModule, checkpoint: dict) -> None:
        """Take a checkpoint written before this callback (its points at the top level); on the other processes
        than the first, zero the teacher's meter restored from the checkpoint: the first made every query."""
        if "accuracy_vs_queries" in checkpoint:
            self.load_state_dict(checkpoint)
        if trainer.global_rank != 0:
            module.teacher_cost.clear()


class ActiveMixup(DistillationModule):
    """Active Mixup: query a black-box teacher on the mixes of a small unlabeled pool the student finds hardest.

    Round 0 labels the pool images; every ``epochs_per_round`` epochs a new round scores ``candidates``
    unlabeled pairs, queries the teacher on the ``queries_per_round`` least confident mixes and adds them to the
    training set. The student trains on the teacher's probabilities (:func:`soft_target_loss`). Needs a
    :class:`~lightning_kd.data.QueryPoolDataModule` and ``trainer.reload_dataloaders_every_n_epochs=1``; plan
    ``max_epochs = (rounds + 1)·epochs_per_round``. The rounds are run by :class:`ActiveMixupRounds`
    (:attr:`query_rounds`), which the module attaches to the Trainer itself.

    The teacher is wrapped in a :class:`~lightning_kd.core.BlackBoxTeacher` (unless it is one), so only its
    probabilities are seen and its queries are counted (``teacher/images``) and capped; under DDP the budget is
    global (one process asks, see :meth:`ActiveMixupRounds.query_round`). Logs validation accuracy against the
    cumulative queries at the end of each round: a line plot (``active_mixup/acc1_vs_queries``) on W&B, the
    metric ``active_mixup/val_acc1`` with the query count as its step on other loggers.

    Args:
        rounds: query rounds after round 0.
        queries_per_round: k, the mixes queried per round (their code: 10K).
        candidates: unlabeled pairs scored per round, drawn at random; ``None`` scores every unlabeled pair.
        epochs_per_round: training epochs between two rounds (and after the last one).
        query_budget: the most images the teacher may be asked about in all, round 0 included; the run
            fails before training when its plan needs more. ``None``: no limit, or the budget of a given
            ``BlackBoxTeacher``.
        mix_range: the lowest and highest mix weight tried (the paper: 0.3 and 0.7).
        mix_steps: how many evenly spaced weights of ``mix_range`` are tried (their code: 11, a step of 0.04).
        score_batch_size: candidate pairs scored (and images queried) per forward pass.
        selection: ``"least_confident"`` (the method) or ``"random"``: the same queries spent on candidate mixes
            drawn at random, weights too (:func:`random_mixes`; the paper's random-mixup control).
    """

    needs_teacher = True
    selections = ("least_confident", "random")

    def __init__(
        self,
        rounds: int = 1,
        queries_per_round: int = 10000,
        candidates: Optional[int] = None,
        epochs_per_round: int = 200,
        query_budget: Optional[int] = None,
        mix_range: Sequence[float] = (0.3, 0.7),
        mix_steps: int = 11,
        score_batch_size: int = 1024,
        selection: str = "least_confident",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("selection", selection, self.selections)
        check_range("rounds", rounds, 0)
        check_range("queries_per_round", queries_per_round, 1)
        if candidates is not None:
            check_range("candidates", candidates, 1)
        check_range("epochs_per_round", epochs_per_round, 1)
        check_range("mix_steps", mix_steps, 1)
        check_range("score_batch_size", score_batch_size, 1)
        low, high = mix_range
        check_range("mix_range[0]", low, 0.0, 1.0)
        check_range("mix_range[1]", high, low, 1.0)
        if isinstance(self.teacher, BlackBoxTeacher):
            if query_budget is not None:
                raise ValueError("The teacher is a BlackBoxTeacher: give the query budget once, as its budget")
        else:
            self.teacher = freeze(BlackBoxTeacher(self.teacher, budget=query_budget))
        self.query_rounds = ActiveMixupRounds(
            rounds, queries_per_round, candidates, epochs_per_round, (low, high), mix_steps, score_batch_size, selection
        )

    def configure_callbacks(self) -> list[pl.Callback]:
        """The rounds of queries (:class:`ActiveMixupRounds`): configs and scripts need not add them."""
        return [self.query_rounds]

    def needs_teacher_forward(self) -> bool:
        return False  # training reads the teacher's stored answers

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        return {"soft_ce": soft_target_loss(step.student_logits, step.targets)}
