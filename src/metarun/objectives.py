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
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # tasks imports the data modules, which import this module for their objective
    from metarun.tasks import TaskSplit


@dataclass
class TaskResult:
    """Query metrics of one learner on one task.

    Attributes:
        loss: scalar tensor, differentiable w.r.t. the meta-parameters when gradients are enabled.
        accuracy: scalar tensor in [0, 1], or None for methods without classes (regression).
    """

    loss: torch.Tensor
    accuracy: torch.Tensor | None



def classification_result(logits: torch.Tensor, labels: torch.Tensor) -> TaskResult:
    """Cross-entropy and accuracy of ``logits [n, ways]`` against ``labels [n]``."""
    loss = nn.functional.cross_entropy(logits, labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return TaskResult(loss=loss, accuracy=accuracy)


class Objective(ABC):
    """The loss and metrics of a task's predictions.

    Attributes:
        loss_metric: the name under which the loss is also reported as the task's metric when
            the loss itself measures success (regression: ``"mse"``, so curves read
            ``adapt/test_mse``); None when it is only a training loss (classification reports
            accuracy).
    """

    loss_metric: str | None = None

    @abstractmethod
    def outputs(self, ways: int) -> int:
        """Outputs a prediction head needs for tasks of at most ``ways`` classes."""

    @abstractmethod
    def loss(self, predictions: torch.Tensor, split: TaskSplit) -> torch.Tensor:
        """Scalar training loss of ``predictions [n, outputs]`` on ``split``."""

    @abstractmethod
    def result(self, predictions: torch.Tensor, split: TaskSplit) -> TaskResult:
        """Loss and metrics of ``predictions [n, outputs]`` on ``split``."""


class Classification(Objective):
    """Softmax cross-entropy and accuracy over the task's ``split.ways`` classes.

    A head may have more outputs than the task has classes (``train_ways > ways``: Snell et al.
    2017 train with more ways than they test); an N-way task reads the first N logits. Labels are
    re-drawn for every task, so every output is trained on every class and the first N are as
    good as any N.
    """

    def outputs(self, ways: int) -> int:
        return ways

    def loss(self, predictions: torch.Tensor, split: TaskSplit) -> torch.Tensor:
        return nn.functional.cross_entropy(predictions[:, : split.ways], split.y)

    def result(self, predictions: torch.Tensor, split: TaskSplit) -> TaskResult:
        return classification_result(predictions[:, : split.ways], split.y)


class Regression(Objective):
    """Mean squared error against real targets ``y [n, outputs]``; no accuracy (Finn et al. 2017, §5.1).

    Args:
        dim: dimension of a target (1 for sinusoids).
    """

    loss_metric = "mse"

    def __init__(self, dim: int = 1) -> None:
        self.dim = dim

    def outputs(self, ways: int) -> int:
        return self.dim

    def loss(self, predictions: torch.Tensor, split: TaskSplit) -> torch.Tensor:
        return nn.functional.mse_loss(predictions, split.y)

    def result(self, predictions: torch.Tensor, split: TaskSplit) -> TaskResult:
        return TaskResult(loss=self.loss(predictions, split), accuracy=None)
