"""What a task asks for: class labels (classification) or real targets (regression).

The dataset decides the objective (``ClassSplits.objective`` is classification; a regression
dataset such as sinusoids gives :class:`Regression`) and the build passes it to the algorithm,
so one algorithm file serves both: MAML's inner loop minimises ``objective.loss`` and scores with
``objective.result``, whatever the targets are. Accuracy exists only for classification; the
loop and trackers treat it as optional.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from metarun.tasks.types import TaskSplit


@dataclass
class Curve:
    """Metrics of one learner on one task along an axis other than the adaptation step, e.g. the
    accuracy by the instance number of a class within a sequential episode.

    Attributes:
        positions: ``[P]`` int64, the axis values (instance 1, 2, ...), increasing.
        metrics: metric name (``"acc"``) -> ``[P]`` float values at those positions, detached; NaN
            where a position does not occur in this task.
    """

    positions: torch.Tensor
    metrics: dict[str, torch.Tensor]


@dataclass
class TaskResult:
    """Query metrics of one learner on one task.

    Attributes:
        loss: scalar tensor, differentiable w.r.t. the meta-parameters when gradients are enabled.
        accuracy: scalar tensor in [0, 1], or None for methods without classes (regression).
        predictions: the learner's query predictions ``[n, ways]`` (class scores, higher is more
            likely: probabilities for softmax classifiers) or ``[n, dim]`` (regression), detached;
            an ensemble of models averages them. None when a method cannot give them.
        curves: metrics on other axes, by the axis' name (``{"instance": Curve(...)}``); None for
            the methods whose only axis is the adaptation step. The loop aggregates them over tasks.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor | None
    predictions: torch.Tensor | None = None
    curves: dict[str, Curve] | None = None


@dataclass
class BatchResult:
    """Query metrics of ``T`` learners on their ``T`` tasks, stacked (what :meth:`Objective.results`
    gives; :meth:`task` is one task's :class:`TaskResult`).

    Attributes:
        loss: ``[T]``, differentiable w.r.t. the meta-parameters when gradients are enabled.
        accuracy: ``[T]`` in [0, 1], or None (regression).
        predictions: ``[T, n, ways]`` class probabilities or ``[T, n, dim]`` outputs, detached.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor | None
    predictions: torch.Tensor

    def task(self, index: int) -> TaskResult:
        return TaskResult(self.loss[index], None if self.accuracy is None else self.accuracy[index],
                          self.predictions[index])


class Objective(ABC):
    """The loss and metrics of a task's predictions.

    Attributes:
        loss_metric: the name under which the loss is also reported as the task's metric when
            the loss itself measures success (regression: ``"mse"``, so curves read
            ``adapt/test_mse``); None when it is only a training loss (classification reports
            accuracy).
        metric: the name of the metric that measures success, and selects the best checkpoint
            and the sweepers' objective: ``"acc"`` or the loss metric (``"mse"``).
        higher_is_better: the direction of ``metric``.
    """

    loss_metric: str | None = None
    metric: str = "acc"
    higher_is_better: bool = True
    min_ways: int = 1

    def better(self, value: float, than: float | None) -> bool:
        """True when ``value`` of :attr:`metric` beats ``than`` (None: nothing to beat yet)."""
        if than is None:
            return True
        return value > than if self.higher_is_better else value < than

    @abstractmethod
    def outputs(self, ways: int) -> int:
        """Outputs a prediction head needs for tasks of at most ``ways`` classes."""

    @abstractmethod
    def losses(self, predictions: torch.Tensor, y: torch.Tensor, ways: int) -> torch.Tensor:
        """Per-task training loss ``[T]`` of ``predictions [T, n, outputs]`` against ``y [T, n, ...]``
        for ``T`` tasks of ``ways`` classes. The one definition of the loss: the per-task path
        (:meth:`loss`, ``T = 1``) and the batched meta-batch use it alike (``T = 1`` reduces with
        the loss function's own mean, which a per-row mean matches only to rounding)."""

    @abstractmethod
    def results(self, predictions: torch.Tensor, y: torch.Tensor, ways: int) -> BatchResult:
        """Loss and metrics of ``T`` tasks at once: ``predictions [T, n, outputs]``, ``y [T, n, ...]``."""

    def loss(self, predictions: torch.Tensor, split: TaskSplit) -> torch.Tensor:
        """Scalar training loss of one task's ``predictions [n, outputs]`` on ``split``."""
        return self.losses(predictions.unsqueeze(0), split.y.unsqueeze(0), split.ways)[0]

    def result(self, predictions: torch.Tensor, split: TaskSplit) -> TaskResult:
        """Loss and metrics of one task's ``predictions [n, outputs]`` on ``split``."""
        return self.results(predictions.unsqueeze(0), split.y.unsqueeze(0), split.ways).task(0)

    @abstractmethod
    def ensemble(self, members: list[TaskResult], split: TaskSplit) -> TaskResult:
        """The result of an ensemble whose members scored ``members`` on ``split``: metrics of the
        members' mean predictions (Antoniou et al. 2019 test MAML++ as an ensemble of its top-5
        validation checkpoints)."""


class Classification(Objective):
    """Softmax cross-entropy and accuracy over the task's ``split.ways`` classes.

    A head may have more outputs than the task has classes (``train_ways > ways``: Snell et al.
    2017 train with more ways than they test); an N-way task reads the first N logits. Labels are
    re-drawn for every task, so every output is trained on every class and the first N are as
    good as any N.
    """

    # A 1-way task is answered correctly whatever the model does: its 100% would mean nothing.
    min_ways = 2

    def outputs(self, ways: int) -> int:
        return ways

    def losses(self, predictions: torch.Tensor, y: torch.Tensor, ways: int) -> torch.Tensor:
        tasks, n = y.shape[:2]
        if tasks == 1:  # cross_entropy's own mean: bit for bit the loss learn2learn's MAML minimises
            return nn.functional.cross_entropy(predictions[0, :, :ways], y[0]).unsqueeze(0)
        logits = predictions[..., :ways].reshape(tasks * n, ways)
        return nn.functional.cross_entropy(logits, y.reshape(tasks * n), reduction="none").view(tasks, n).mean(1)

    def results(self, predictions: torch.Tensor, y: torch.Tensor, ways: int) -> BatchResult:
        logits = predictions[..., :ways]
        accuracy = (logits.argmax(dim=-1) == y).float().mean(-1)
        return BatchResult(self.losses(predictions, y, ways), accuracy, logits.detach().softmax(dim=-1))

    def ensemble(self, members: list[TaskResult], split: TaskSplit) -> TaskResult:
        """Accuracy of the mean class scores; the loss is the members' mean loss (class scores
        are probabilities for some methods and relation scores for others, so there is no common
        likelihood)."""
        scores = torch.stack([m.predictions for m in members]).mean(0)  # [n, ways]
        accuracy = (scores.argmax(dim=1) == split.y).float().mean()
        return TaskResult(torch.stack([m.loss for m in members]).mean(), accuracy, scores)


class Regression(Objective):
    """Mean squared error against real targets ``y [n, outputs]``; no accuracy (Finn et al. 2017, §5.1).

    Args:
        dim: dimension of a target (1 for sinusoids).
    """

    loss_metric = "mse"
    metric = "mse"
    higher_is_better = False

    def __init__(self, dim: int = 1) -> None:
        self.dim = dim

    def outputs(self, ways: int) -> int:
        return self.dim

    def losses(self, predictions: torch.Tensor, y: torch.Tensor, ways: int) -> torch.Tensor:
        if len(y) == 1:  # mse_loss's own mean, as for one task before batching
            return nn.functional.mse_loss(predictions[0], y[0]).unsqueeze(0)
        return nn.functional.mse_loss(predictions, y, reduction="none").flatten(1).mean(1)

    def results(self, predictions: torch.Tensor, y: torch.Tensor, ways: int) -> BatchResult:
        return BatchResult(self.losses(predictions, y, ways), None, predictions.detach())

    def ensemble(self, members: list[TaskResult], split: TaskSplit) -> TaskResult:
        """The MSE of the members' mean prediction."""
        return self.result(torch.stack([m.predictions for m in members]).mean(0), split)


def classification_result(logits: torch.Tensor, labels: torch.Tensor) -> TaskResult:
    """Cross-entropy and accuracy of ``logits [n, ways]`` against ``labels [n]`` (every logit is a
    class of the task); the predictions are the class probabilities."""
    return Classification().results(logits.unsqueeze(0), labels.unsqueeze(0), logits.shape[-1]).task(0)
