"""Siamese Networks for one-shot image recognition."""

from __future__ import annotations

import torch
from torch import nn

from metarun.algorithms.metric import MetricBasedAlgorithm
from metarun.errors import ConfigError
from metarun.objectives import Objective, TaskResult
from metarun.tasks.types import TaskSplit


def balanced_pairs(query_y: torch.Tensor, support_y: torch.Tensor, ways: int) -> tuple[torch.Tensor, ...]:
    """Same/different (query, support) pairs, exactly half of each, deterministic.

    Every query is paired with each support sample of its own class (a positive pair) and, for
    each of those, with the support sample at the same position of another class (a negative
    pair). The other class cycles with the query's position, so negatives cover all classes.
    Koch et al. (2015) train on balanced same/different pairs; a deterministic choice keeps the
    evaluation loss reproducible.

    Args:
        query_y: ``[q]`` labels in ``[0, ways)``.
        support_y: ``[s]`` labels, the same number of samples for every class (``shots``).
        ways: classes of the task (>= 2).

    Returns:
        ``query_index [P]``, ``support_index [P]``, ``same [P]`` (float 1/0), with ``P = 2 q shots``.
    """
    order = torch.argsort(support_y, stable=True)  # support indices grouped by class
    shots = support_y.shape[0] // ways
    by_class = order.view(ways, shots)  # [ways, shots]
    q = query_y.shape[0]
    positions = torch.arange(q, device=query_y.device)
    other = (query_y + 1 + positions % (ways - 1)) % ways  # never the query's own class
    query_index = positions.repeat_interleave(shots).repeat(2)
    support_index = torch.cat([by_class[query_y].flatten(), by_class[other].flatten()])
    same = torch.cat([torch.ones(q * shots, device=query_y.device), torch.zeros(q * shots, device=query_y.device)])
    return query_index, support_index, same


class TwinScorer(nn.Module):
    """A task's classifier: the similarity of each query to each support image. ``[q, ...] -> [q, s]`` logits."""

    def __init__(self, algorithm: SiameseNet, support: TaskSplit) -> None:
        super().__init__()
        self.algorithm = algorithm
        self.support = algorithm.embed(support.x)  # [s, E] twin embeddings
        self.support_y, self.ways = support.y, support.ways

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.algorithm.similarity(self.algorithm.embed(x), self.support)


class SiameseNet(MetricBasedAlgorithm):
    """Siamese Neural Networks (Koch, Zemel, Salakhutdinov, "Siamese Neural Networks for One-shot
    Image Recognition", ICML Deep Learning Workshop 2015).

    Twin networks with shared weights embed two images; their similarity is
    ``p = sigmoid(sum_j alpha_j |h1_j - h2_j| + b)`` (the weighted L1 distance, eq. 1), trained with
    binary cross-entropy on balanced same/different pairs (:func:`balanced_pairs`: each query with
    the support samples of its class and as many of other classes). A one-shot query takes the
    label of its most similar support image. Koch's affine distortions are the training
    augmentation ``augment=koch_affine``; his 20-way within-alphabet protocol is the
    ``experiment=siamese_omniglot_koch`` preset.

    Args:
        features: the twin's convolutional part ``[B, C, H, W] -> [B, D]``.
        ways: classes per evaluation task (unused).
        embedding_dim: units of the twin's last, fully connected sigmoid layer (4096 in Koch's
            net); ``None`` uses the features as they are.
        train_ways: classes per training task (unused).
        objective: must be classification.
    """

    def __init__(self, features: nn.Module, ways: int, embedding_dim: int | None,
                 train_ways: int | None = None, objective: Objective | None = None) -> None:
        super().__init__(objective, "siamese")
        if min(ways, train_ways or ways) < 2:
            raise ConfigError(f"siamese networks need tasks of at least 2 ways (a negative pair needs another class), "
                              f"got ways={ways}, train_ways={train_ways}")
        self.features = features
        dim = features.out_features
        self.projection = (nn.Sequential(nn.Linear(dim, embedding_dim), nn.Sigmoid()) if embedding_dim
                           else nn.Identity())
        self.distance_weights = nn.Linear(embedding_dim or dim, 1)  # alpha_j and the bias

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """One twin: ``[B, C, H, W] -> [B, E]``."""
        return self.projection(self.features(x))

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Logits of "same class" for every pair: ``a [m, E]``, ``b [n, E]`` -> ``[m, n]`` (sigmoid gives p)."""
        distance = (a[:, None, :] - b[None, :, :]).abs()  # [m, n, E]
        return self.distance_weights(distance).squeeze(-1)

    def learner(self, support: TaskSplit) -> TwinScorer:
        return TwinScorer(self, support)

    def score(self, learner: nn.Module, query: TaskSplit) -> TaskResult:
        logits = learner(query.x)  # [q, s]
        query_index, support_index, same = balanced_pairs(query.y, learner.support_y, learner.ways)
        pair_logits = logits[query_index, support_index]
        loss = nn.functional.binary_cross_entropy_with_logits(pair_logits, same.to(pair_logits.dtype))
        predicted = learner.support_y[logits.argmax(dim=1)]  # the most similar support image's label
        # Class scores: the similarity of the most similar support image of each class [q, ways].
        same_class = nn.functional.one_hot(learner.support_y, learner.ways).T.bool()  # [ways, s]
        scores = logits.detach().sigmoid()[:, None, :].masked_fill(~same_class, -1.0).amax(dim=2)
        return TaskResult(loss=loss, accuracy=(predicted == query.y).float().mean(), predictions=scores)
