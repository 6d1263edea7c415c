"""Model-Agnostic Meta-Learning."""

from __future__ import annotations

from torch import nn

from metarun._learn2learn import l2l
from metarun.algorithms.gradient import GradientBasedAlgorithm, classifier
from metarun.objectives import Objective


class MAML(GradientBasedAlgorithm):
    """MAML (Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks", ICML 2017), second order, or first order (FOMAML, same paper §5.2) with
    ``first_order=True``.

    Inner loop: ``theta' = theta - inner_lr * grad L_support(theta)`` for ``steps`` steps;
    outer loss: ``L_query(theta')``, differentiated through the inner loop (second order) or
    treating ``grad L_support`` as a constant (first order). Built on ``l2l.algorithms.MAML``.

    Args:
        features: backbone ``[B, C, H, W] -> [B, out_features]``.
        ways: classes per task (outputs of the linear head).
        inner_lr: step size of the inner loop (0.4 for Omniglot 5-way in the paper).
        first_order: drop second-order terms of the meta-gradient.
        inner_steps: adaptation steps during meta-training.
        eval_inner_steps: adaptation steps at evaluation.
        train_ways: ways of meta-training tasks (``None``: ``ways``).
        objective: the task's loss and metrics (default: classification).
    """

    def __init__(self, features: nn.Module, ways: int, inner_lr: float, first_order: bool,
                 inner_steps: int, eval_inner_steps: int, train_ways: int | None = None,
                 objective: Objective | None = None) -> None:
        super().__init__(ways, inner_lr, first_order, inner_steps, eval_inner_steps, train_ways, objective)
        self.learnable = l2l.algorithms.MAML(classifier(features, self.head_outputs), lr=inner_lr,
                                             first_order=first_order)
