"""Prototypical Networks."""

from __future__ import annotations

import torch
from torch import nn

from metarun.algorithms.metric import MetricBasedAlgorithm, class_means
from metarun.errors import ConfigError
from metarun.objectives import Objective
from metarun.tasks.types import TaskSplit

DISTANCES = ("euclidean", "cosine")


def prototype_logits(queries: torch.Tensor, prototypes: torch.Tensor, distance: str, cosine_scale: float) -> torch.Tensor:
    """Logits of ``queries [q, D]`` against ``prototypes [ways, D]``: ``[q, ways]``.

    ``euclidean``: minus the squared Euclidean distance (Snell et al. 2017, eq. 2, with d = ||.||^2);
    ``cosine``: ``cosine_scale`` times the cosine similarity (a scale is needed because cosines in
    [-1, 1] give a nearly flat softmax).
    """
    if distance == "euclidean":
        return -((queries[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1)
    cosine = nn.functional.normalize(queries, dim=1) @ nn.functional.normalize(prototypes, dim=1).T
    return cosine_scale * cosine


class Prototypes(nn.Module):
    """A task's classifier: the query's distances to the class prototypes. ``[q, ...] -> [q, ways]`` logits."""

    def __init__(self, features: nn.Module, prototypes: torch.Tensor, distance: str, cosine_scale: float) -> None:
        super().__init__()
        self.features = features
        self.prototypes = prototypes  # [ways, D]; a tensor in the graph, not a parameter
        self.distance, self.cosine_scale = distance, cosine_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return prototype_logits(self.features(x), self.prototypes, self.distance, self.cosine_scale)


class ProtoNet(MetricBasedAlgorithm):
    """Prototypical Networks (Snell, Swersky, Zemel, "Prototypical Networks for Few-shot Learning",
    NeurIPS 2017).

    Each class's prototype is the mean embedding of its support samples, ``c_k = mean f(x_i)``
    over ``y_i = k``; a query is classified by a softmax over minus its squared Euclidean distance
    to the prototypes (eq. 2), trained with cross-entropy on the query set. The paper trains with
    more ways than it tests (Omniglot 60-way): set ``train_ways``.

    Args:
        features: embedding network ``[B, C, H, W] -> [B, D]``.
        ways: classes per evaluation task (unused: prototypes are built per task).
        distance: ``"euclidean"`` (squared, the paper's) or ``"cosine"``.
        cosine_scale: multiplies cosine similarities into logits.
        train_ways: classes per training task (unused: any number of prototypes works).
        objective: must be classification.
    """

    def __init__(self, features: nn.Module, ways: int, distance: str, cosine_scale: float,
                 train_ways: int | None = None, objective: Objective | None = None) -> None:
        super().__init__(objective, "protonet")
        if distance not in DISTANCES:
            raise ConfigError(f"algorithm.distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        self.features = features
        self.distance, self.cosine_scale = distance, cosine_scale

    def learner(self, support: TaskSplit) -> Prototypes:
        prototypes = class_means(self.features(support.x), support.y, support.ways)  # [ways, D]
        return Prototypes(self.features, prototypes, self.distance, self.cosine_scale)
