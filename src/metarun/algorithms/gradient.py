"""Shared machinery of the gradient-based family (MAML, first-order MAML, Meta-SGD).

The model is ``features -> linear head`` wrapped in one of learn2learn's differentiable
learners (``l2l.algorithms.MAML`` or ``MetaSGD``); adaptation is ``clone()`` and ``adapt(loss)``,
which never touch the meta-parameters.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from metarun._learn2learn import l2l
from metarun.algorithms.base import Algorithm, ConfigError, TaskResult, classification_result
from metarun.tasks import TaskSplit


def classifier(features: nn.Module, ways: int) -> nn.Sequential:
    """``features`` followed by a linear head: ``[B, C, H, W] -> [B, ways]`` logits."""
    return nn.Sequential(features, nn.Linear(features.out_features, ways))


def check_inner_loop(inner_lr: float, ways: int, train_ways: int | None) -> None:
    if inner_lr < 0:
        raise ConfigError(f"algorithm.inner_lr must be >= 0, got {inner_lr}")
    if train_ways is not None and train_ways != ways:
        raise ConfigError(
            f"train_ways={train_ways} but ways={ways}: a gradient-based learner's head has one output per "
            f"way, so both must be equal for this algorithm"
        )


class GradientBasedAlgorithm(Algorithm):
    """Adapts every parameter of ``self.learnable`` (a learn2learn BaseLearner) with gradient steps.

    Subclasses set ``self.learnable`` and ``self.first_order``.
    """

    learnable: nn.Module
    first_order: bool

    def trajectory(self, support: TaskSplit, steps: int) -> Iterator[nn.Module]:
        meta_gradients = torch.is_grad_enabled()
        with torch.enable_grad():
            learner = self.learnable.clone()
            if not meta_gradients:
                # Evaluation: adapt a copy cut off from the meta-parameters; nothing will be
                # backpropagated, so first-order steps give the same learner for less work.
                l2l.detach_module(learner, keep_requires_grad=True)
        yield learner
        for _ in range(steps):
            with torch.enable_grad():
                loss = nn.functional.cross_entropy(learner(support.x), support.y)
                learner.adapt(loss, first_order=self.first_order or not meta_gradients)
            yield learner

    def evaluate(self, learner: nn.Module, query: TaskSplit) -> TaskResult:
        return classification_result(learner(query.x), query.y)
