"""Relation Network."""

from __future__ import annotations

import torch
from torch import nn

from metarun.algorithms.metric import MetricBasedAlgorithm
from metarun.errors import ConfigError
from metarun.objectives import Objective, TaskResult
from metarun.tasks.types import TaskSplit


class RelationModule(nn.Module):
    """Sung et al.'s (2018) relation module: scores a pair of concatenated feature maps in [0, 1].

    Two blocks of (3x3 conv with 64 filters, BatchNorm, ReLU, 2x2 max-pool), then fully connected
    ``-> hidden`` (ReLU) ``-> 1`` (sigmoid). A block pools only while its maps are at least 2x2,
    so small maps (and the 1x1 maps of vector backbones) work too.

    Args:
        map_shape: ``(C, h, w)`` of one embedding; the module takes ``2C`` channels.
        filters: convolution filters (64 in the paper).
        hidden: units of the hidden fully connected layer (8 in the paper).
        padding: padding of the convolutions (the paper: 1 for Omniglot, 0 for mini-ImageNet).

    Shapes: ``[P, 2C, h, w] -> [P]`` relation scores.
    """

    def __init__(self, map_shape: tuple[int, int, int], filters: int, hidden: int, padding: int) -> None:
        super().__init__()
        channels, side, _ = map_shape
        layers: list[nn.Module] = []
        for block in range(2):
            layers += [nn.Conv2d(2 * channels if block == 0 else filters, filters, 3, padding=padding),
                       nn.BatchNorm2d(filters), nn.ReLU()]
            side = side + 2 * padding - 2
            if side >= 2:
                layers.append(nn.MaxPool2d(2))
                side //= 2
        if side < 1:
            raise ConfigError(f"feature maps of {map_shape} are too small for the relation module with padding "
                             f"{padding}; set algorithm.padding=1")
        self.convs = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(filters * side * side, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(pairs)).squeeze(1)


class RelationScores(nn.Module):
    """A task's classifier: relation scores of each query with each class. ``[q, ...] -> [q, ways]`` in [0, 1]."""

    def __init__(self, algorithm: RelationNet, class_maps: torch.Tensor) -> None:
        super().__init__()
        self.algorithm = algorithm
        self.class_maps = class_maps  # [ways, C, h, w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        queries = self.algorithm.features.feature_maps(x)  # [q, C, h, w]
        q, ways = queries.shape[0], self.class_maps.shape[0]
        pairs = torch.cat([
            self.class_maps[None].expand(q, -1, -1, -1, -1),
            queries[:, None].expand(-1, ways, -1, -1, -1),
        ], dim=2)  # [q, ways, 2C, h, w]: class maps first, as in the authors' code
        return self.algorithm.relation(pairs.flatten(0, 1)).view(q, ways)


class RelationNet(MetricBasedAlgorithm):
    """Relation Network (Sung, Yang, Zhang, Xiang, Torr, Hospedales, "Learning to Compare: Relation
    Network for Few-Shot Learning", CVPR 2018).

    An embedding module maps images to feature maps; for K-shot, a class's maps are the *sum* of
    its support maps. Each (class, query) pair of maps is concatenated along the channels and a
    relation module scores it in [0, 1]; training regresses the scores onto one-hot targets with
    MSE (the paper's eq. 3). The paper's embedding is ``backbone=conv4_relation``; any backbone
    works (vector features become 1x1 maps).

    Args:
        features: embedding module with ``feature_maps: [B, C, H, W] -> [B, *map_shape]``.
        ways: classes per evaluation task (unused).
        filters: relation module's convolution filters (64).
        hidden: relation module's hidden units (8).
        padding: relation module's convolution padding (1 for Omniglot, 0 for mini-ImageNet).
        train_ways: classes per training task (unused).
        objective: must be classification.
    """

    def __init__(self, features: nn.Module, ways: int, filters: int, hidden: int, padding: int,
                 train_ways: int | None = None, objective: Objective | None = None) -> None:
        super().__init__(objective, "relation")
        self.features = features
        self.relation = RelationModule(tuple(features.map_shape), filters, hidden, padding)

    def learner(self, support: TaskSplit) -> RelationScores:
        maps = self.features.feature_maps(support.x)  # [s, C, h, w]
        one_hot = nn.functional.one_hot(support.y, support.ways).to(maps.dtype)  # [s, ways]
        class_maps = (one_hot.T @ maps.flatten(1)).view(support.ways, *maps.shape[1:])  # summed per class
        return RelationScores(self, class_maps)

    def score(self, learner: nn.Module, query: TaskSplit) -> TaskResult:
        scores = learner(query.x)  # [q, ways]
        targets = nn.functional.one_hot(query.y, scores.shape[1]).to(scores.dtype)
        loss = nn.functional.mse_loss(scores, targets)
        accuracy = (scores.argmax(dim=1) == query.y).float().mean()
        return TaskResult(loss=loss, accuracy=accuracy, predictions=scores.detach())
