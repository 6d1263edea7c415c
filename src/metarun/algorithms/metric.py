"""Shared machinery of the metric-based family (Prototypical, Matching, Relation, Siamese networks).

These methods have no inner loop: "adapting" to a task is embedding its support set once, and a
query is classified by comparing its embedding with the support embeddings. So the learner after
any number of steps is that one learner (their configs use 0 steps: the query metrics are those
of adaptation step 0), and meta-training minimises the query loss of that learner,
differentiated through the embeddings.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator

import torch
from torch import nn

from metarun.algorithms.base import Algorithm
from metarun.errors import ConfigError
from metarun.objectives import Classification, Objective, TaskResult, classification_result
from metarun.tasks.types import TaskSplit


class MetricBasedAlgorithm(Algorithm):
    """An algorithm that classifies queries by comparing them with the embedded support set.

    Subclasses implement :meth:`learner` (support set -> a module giving ``[q, ways]`` logits or
    log-probabilities for queries); :meth:`score` is cross-entropy and accuracy on them unless
    the method has another loss (the Relation Network's MSE).

    Args:
        objective: must be classification: every method of the family compares classes.
        name: the method's name, for the error message.
    """

    def __init__(self, objective: Objective | None, name: str) -> None:
        super().__init__(inner_steps=0, eval_inner_steps=0)
        if objective is not None and not isinstance(objective, Classification):
            raise ConfigError(
                f"{name} classifies by comparing classes and needs a classification dataset, not "
                f"{type(objective).__name__.lower()}; choose a gradient-based algorithm (e.g. algorithm=maml)"
            )

    @abstractmethod
    def learner(self, support: TaskSplit) -> nn.Module:
        """The task's classifier, built from the support set ``x [ways * shots, ...]``."""

    def trajectory(self, support: TaskSplit, steps: int) -> Iterator[nn.Module]:
        return self.unchanged(self.learner(support), steps)  # no inner loop

    def score(self, learner: nn.Module, query: TaskSplit) -> TaskResult:
        return classification_result(learner(query.x), query.y)


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Mean embedding of every class: ``embeddings [n, ...]``, ``labels [n]`` -> ``[ways, ...]``."""
    one_hot = nn.functional.one_hot(labels, ways).to(embeddings.dtype)  # [n, ways]
    sums = one_hot.T @ embeddings.flatten(1)  # [ways, D]
    return (sums / one_hot.sum(0)[:, None]).view(ways, *embeddings.shape[1:])
