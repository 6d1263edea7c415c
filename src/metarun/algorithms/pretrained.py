"""Pretraining on all tasks, then fine-tuning: the baseline of MAML's sinusoid experiment."""

from __future__ import annotations

from torch import nn

from metarun._learn2learn import l2l
from metarun.algorithms.gradient import GradientBasedAlgorithm, classifier
from metarun.errors import ConfigError
from metarun.objectives import Objective


class Pretrained(GradientBasedAlgorithm):
    """"Pretrained on all tasks" (Finn, Abbeel, Levine, ICML 2017, §5.1, Figure 2 and Appendix).

    Training is ordinary joint training, with no inner loop: the network is scored unadapted
    on each training task's query set, so the meta-batch is one minibatch pooled from
    ``meta_batch_size`` tasks and the outer optimizer fits the average of all tasks (for
    sinusoids, the mean function over amplitudes and phases). At test time it is fine-tuned
    by ``eval_inner_steps`` plain gradient steps of size ``inner_lr`` on the K support points,
    exactly as MAML's learner is adapted, so the two are compared step for step. Nothing here
    is specific to regression: for classification it is joint training and fine-tuning.

    Args:
        features: backbone ``[B, ...] -> [B, out_features]``.
        ways: classes per task (outputs of the linear head; the target's dimension for regression).
        inner_lr: fine-tuning step size (the paper tuned it automatically; 0.01 as MAML's here).
        inner_steps: must be 0 (no inner loop in training); an option only so that configs
            can say so, and so that a preset built on a MAML one can reset it.
        eval_inner_steps: fine-tuning steps at evaluation.
        vectorize: ``auto``, ``true`` or ``false``: train on the meta-batch, and fine-tune the
            evaluation tasks, all at once (:mod:`metarun.algorithms.vectorized`).
        train_ways: ways of training tasks (``None``: ``ways``).
        objective: the task's loss and metrics (default: classification).
    """

    def __init__(self, features: nn.Module, ways: int, inner_lr: float, inner_steps: int,
                 eval_inner_steps: int, vectorize: bool | str, train_ways: int | None = None,
                 objective: Objective | None = None) -> None:
        if inner_steps != 0:
            raise ConfigError(f"pretrained trains without an inner loop: algorithm.inner_steps must be 0, "
                              f"got {inner_steps} (that would be first-order MAML: algorithm=fomaml)")
        # Evaluation steps are first order anyway (nothing is backpropagated through them).
        super().__init__(ways, inner_lr, True, inner_steps, eval_inner_steps, train_ways, objective, vectorize)
        self.learnable = l2l.algorithms.MAML(classifier(features, self.head_outputs), lr=inner_lr, first_order=True)
