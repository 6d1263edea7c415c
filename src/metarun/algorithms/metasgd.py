"""Meta-SGD."""

from __future__ import annotations

import torch
from torch import nn

from metarun._learn2learn import l2l
from metarun.algorithms.gradient import GradientBasedAlgorithm, classifier
from metarun.objectives import Objective


class MetaSGD(GradientBasedAlgorithm):
    """Meta-SGD (Li, Zhou, Chen, Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017).

    Like MAML, but every parameter has its own meta-learned inner learning rate (a tensor of
    the parameter's shape, initialised to ``inner_lr``): ``theta' = theta - alpha * grad``
    with ``alpha`` learned in the outer loop. Built on ``l2l.algorithms.MetaSGD``.

    Args:
        features: backbone ``[B, C, H, W] -> [B, out_features]``.
        ways: classes per task.
        inner_lr: initial value of every learned learning rate.
        first_order: drop second-order terms of the meta-gradient.
        inner_steps: adaptation steps during meta-training (the paper uses 1).
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
        self.learnable = l2l.algorithms.MetaSGD(classifier(features, self.head_outputs), lr=inner_lr,
                                                first_order=first_order)
        # learn2learn keeps one rate tensor per parameter, in named_parameters order.
        self.rate_index = {name: i for i, (name, _) in enumerate(self.learnable.module.named_parameters())}

    def inner_rate(self, name: str, step: int) -> torch.Tensor:
        """The learned rates of parameter ``name`` (a tensor of its shape), the same at every step."""
        return self.learnable.lrs[self.rate_index[name]]
