"""Almost No Inner Loop."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from metarun._learn2learn import l2l
from metarun.algorithms.base import Algorithm, TaskResult, classification_result
from metarun.algorithms.gradient import check_inner_loop
from metarun.tasks import TaskSplit


class ANIL(Algorithm):
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
        train_ways: ways of meta-training tasks; must equal ``ways``.
    """

    def __init__(self, features: nn.Module, ways: int, inner_lr: float = 0.1, first_order: bool = False,
                 inner_steps: int = 1, eval_inner_steps: int = 3, train_ways: int | None = None) -> None:
        super().__init__(inner_steps, eval_inner_steps)
        check_inner_loop(inner_lr, ways, train_ways)
        self.first_order = first_order
        self.features = features
        self.head = l2l.algorithms.MAML(nn.Linear(features.out_features, ways), lr=inner_lr, first_order=first_order)

    def trajectory(self, support: TaskSplit, steps: int) -> Iterator[nn.Module]:
        meta_gradients = torch.is_grad_enabled()
        support_features = self.features(support.x)
        with torch.enable_grad():
            head = self.head.clone()
            if not meta_gradients:
                l2l.detach_module(head, keep_requires_grad=True)
        yield nn.Sequential(self.features, head)
        for _ in range(steps):
            with torch.enable_grad():
                loss = nn.functional.cross_entropy(head(support_features), support.y)
                head.adapt(loss, first_order=self.first_order or not meta_gradients)
            yield nn.Sequential(self.features, head)

    def evaluate(self, learner: nn.Module, query: TaskSplit) -> TaskResult:
        return classification_result(learner(query.x), query.y)
