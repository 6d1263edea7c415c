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
class Task:
    """An N-way few-shot task: ``support`` has ``ways * shots`` samples, ``query`` ``ways * query_shots``."""

    support: TaskSplit
    query: TaskSplit


@dataclass
class TaskResult:
    """Query metrics of one learner on one task.

    Attributes:
        loss: scalar tensor, differentiable w.r.t. the meta-parameters when gradients are enabled.
        accuracy: scalar tensor in [0, 1], or None for methods without classes (regression).
        predictions: the learner's query predictions ``[n, ways]`` (class scores, higher is more
            likely: probabilities for softmax classifiers) or ``[n, dim]`` (regression), detached;
            an ensemble of models averages them. None when a method cannot give them.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor | None
    predictions: torch.Tensor | None = None
