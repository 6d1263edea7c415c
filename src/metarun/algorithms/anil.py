"""Almost No Inner Loop."""

from __future__ import annotations

from torch import nn

from metarun._learn2learn import l2l
from metarun.algorithms.gradient import GradientBasedAlgorithm
from metarun.objectives import Objective


class ANIL(GradientBasedAlgorithm):
    """ANIL (Raghu, Raghu, Bengio, Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding
    the Effectiveness of MAML", ICLR 2020).

    MAML whose inner loop adapts only the linear head; the backbone is meta-learned in the
    outer loop but never adapted, so support features are computed once per task.

    Args:
        features: backbone ``[B, C, H, W] -> [B, out_features]``.
        ways: classes per task.
        inner_lr: inner step size of the head.
        first_order: drop second-order terms of the meta-gradient.
        inner_steps: adaptation steps during meta-training.
        eval_inner_steps: adaptation steps at evaluation.
        vectorize: ``auto``, ``true`` or ``false``: run the meta-batch all at once
            (:mod:`metarun.algorithms.vectorized`).
        train_ways: ways of meta-training tasks (``None``: ``ways``).
        objective: the task's loss and metrics (default: classification).
    """

    def __init__(self, features: nn.Module, ways: int, inner_lr: float, first_order: bool,
                 inner_steps: int, eval_inner_steps: int, vectorize: bool | str, train_ways: int | None = None,
                 objective: Objective | None = None) -> None:
        super().__init__(ways, inner_lr, first_order, inner_steps, eval_inner_steps, train_ways, objective,
                         vectorize)
        self.features = features
        self.learnable = l2l.algorithms.MAML(nn.Linear(features.out_features, self.head_outputs), lr=inner_lr,
                                             first_order=first_order)

    def frozen_features(self) -> nn.Module:
        """The backbone ``[B, C, H, W] -> [B, out_features]``: support features are computed once
        per task, and in meta-training the head's adaptation carries the meta-gradient into it."""
        return self.features
