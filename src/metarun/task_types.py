"""The value types every part of metarun passes around: a task, its two sides, and a learner's result.

A leaf module: it imports nothing from metarun, so the samplers (``tasks``), the datasets
(``data``), the objectives and the algorithms can all import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TaskSplit:
    """One side of a task.

    Attributes:
        x: inputs ``[n, C, H, W]`` (float32 in [0, 1] for images); ``[n, 1]`` for sinusoids.
        y: labels ``[n]`` int64 in ``[0, ways)``; real targets ``[n, 1]`` for regression.
        ways: classes of the task. Carried with the data because training and evaluation tasks
            may have different ways (``train_ways``), and a label tensor alone cannot tell a
            class that is absent from one that does not exist. A regression task is one
            function, and has ``ways = 1``.
    """

    x: torch.Tensor
    y: torch.Tensor
    ways: int


@dataclass
class Sequence:
    """A task read as one sequence of (input, label) pairs, for sequence models (MANN, SNAIL).

    Attributes:
        x: inputs in presentation order ``[T, ...]`` (``T = len(support) + len(query)``).
        y: their labels after the episode's class permutation ``[T]``, in ``[0, ways)``.
        is_query: ``[T]`` bool, True where the element comes from the query set.
        permutation: ``[ways]``, the episode's class-to-label assignment: original class ``c`` is
            shown as label ``permutation[c]``.
        ways: classes of the task.
    """

    x: torch.Tensor
    y: torch.Tensor
    is_query: torch.Tensor
    permutation: torch.Tensor
    ways: int


@dataclass
class Task:
    """An N-way few-shot task: ``support`` has ``ways * shots`` samples, ``query`` ``ways * query_shots``."""

    support: TaskSplit
    query: TaskSplit

    def sequence(self, generator: torch.Generator, query_last: bool) -> Sequence:
        """The task as one shuffled sequence with a fresh random class-to-label assignment.

        Samplers return class-sorted splits (support labels ``[0, 0, 1, 1, 2, 2]``), so a sequence
        model would read the answer off the order: here every episode draws its own label
        permutation and presentation order from ``generator``, so the same generator state gives
        the same sequence (reproducible from a seed), and every sample of the task appears exactly once.

        Args:
            generator: the source of the permutation and the shuffle (on the CPU).
            query_last: shuffle the support and the query separately and put the query after the
                support (SNAIL: Mishra et al. 2018); otherwise shuffle all samples together into
                one episode (MANN: Santoro et al. 2016).
        """
        ways = self.support.ways
        permutation = torch.randperm(ways, generator=generator)
        device = self.support.x.device
        n_support, n_query = len(self.support.y), len(self.query.y)
        if query_last:
            order = torch.cat([torch.randperm(n_support, generator=generator),
                               n_support + torch.randperm(n_query, generator=generator)])
        else:
            order = torch.randperm(n_support + n_query, generator=generator)
        order = order.to(device)
        x = torch.cat([self.support.x, self.query.x])[order]
        y = permutation.to(device)[torch.cat([self.support.y, self.query.y])[order]]
        is_query = (order >= n_support)
        return Sequence(x=x, y=y, is_query=is_query, permutation=permutation.to(device), ways=ways)


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
