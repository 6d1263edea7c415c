"""Shared machinery of the gradient-based family (MAML, first-order MAML, Meta-SGD, ANIL).

The model is ``features -> linear head`` wrapped in one of learn2learn's differentiable
learners (``l2l.algorithms.MAML`` or ``MetaSGD``); adaptation is ``clone()`` and ``adapt(loss)``,
which never touch the meta-parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from metarun._learn2learn import l2l
from metarun.algorithms.base import Algorithm, MetaUpdate
from metarun.errors import ConfigError
from metarun.objectives import Classification, Objective, TaskResult
from metarun.tasks.types import Task, TaskSplit


def classifier(features: nn.Module, outputs: int) -> nn.Sequential:
    """``features`` followed by a linear head: ``[B, ...] -> [B, outputs]``."""
    return nn.Sequential(features, nn.Linear(features.out_features, outputs))


class GradientBasedAlgorithm(Algorithm):
    """Adapts ``self.learnable`` (a learn2learn BaseLearner) with gradient steps on the support loss.

    Subclasses call ``super().__init__`` and then set ``self.learnable``. By default the learnable
    is the whole classifier; an algorithm that adapts only part of it (ANIL: the head) overrides
    :meth:`inner_inputs` (what the learnable sees during adaptation) and :meth:`learner` (the
    model scored on the query set). An algorithm with another inner step overrides
    :meth:`inner_update` (and :meth:`enter_step` for modules that depend on the step: MAML++).

    Args:
        ways: classes per task (outputs of the linear head).
        inner_lr: inner-loop step size (initial value, for methods that learn it).
        first_order: drop second-order terms of the meta-gradient.
        inner_steps: adaptation steps during meta-training.
        eval_inner_steps: adaptation steps at evaluation.
        train_ways: ways of meta-training tasks (``None``: ``ways``); at least ``ways``.
        objective: the task's loss and metrics (classification unless the dataset says otherwise).
        vectorize: run a meta-batch (and evaluation tasks) all at once (``"true"``), task by task
            (``"false"``), or vectorised where that is exact and measured faster (``"auto"``); see
            :mod:`metarun.algorithms.vectorized`. The meta-gradient is the same either way.

    Attributes:
        head_outputs: outputs the subclass's head must have: one per class of the largest task
            (``max(ways, train_ways)``; an N-way task reads the first N), or the regression
            target's dimension.
    """

    learnable: nn.Module

    def __init__(self, ways: int, inner_lr: float, first_order: bool, inner_steps: int, eval_inner_steps: int,
                 train_ways: int | None, objective: Objective | None, vectorize: bool | str = "false") -> None:
        from metarun.algorithms.vectorized import vectorize_option

        super().__init__(inner_steps, eval_inner_steps)
        self.vectorize = vectorize_option(vectorize)
        if inner_lr < 0:
            raise ConfigError(f"algorithm.inner_lr must be >= 0, got {inner_lr}")
        if train_ways is not None and train_ways < ways:
            raise ConfigError(
                f"train_ways={train_ways} is smaller than ways={ways}: the head outputs past {train_ways} would never "
                f"be trained; use train_ways >= ways for gradient-based algorithms"
            )
        self.first_order = first_order
        self.objective = objective or Classification()
        self.head_outputs = self.objective.outputs(max(ways, train_ways or ways))

    def inner_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What ``self.learnable`` takes during adaptation: the images themselves by default."""
        return x

    def learner(self, adapted: nn.Module) -> nn.Module:
        """The model scored on the query set, given the adapted copy of ``self.learnable``."""
        return adapted

    def inner_update(self, adapted: nn.Module, loss: torch.Tensor, step: int, first_order: bool) -> None:
        """Adaptation step ``step`` (0-based) of ``adapted`` on the support ``loss``, in place.

        Default: learn2learn's ``adapt``, ``theta - inner_lr * grad`` on every parameter of the
        learnable (Meta-SGD's learner scales by its learned rates instead); MAML++ overrides it.
        """
        adapted.adapt(loss, first_order=first_order)

    def enter_step(self, adapted: nn.Module, step: int) -> None:
        """Called with ``adapted`` after ``step`` adaptation steps, before it runs any forward pass
        (its query pass, and its support pass for step ``step + 1``). Default: nothing; MAML++'s
        per-step BatchNorm reads the step here."""

    def trajectory(self, support: TaskSplit, steps: int) -> Iterator[nn.Module]:
        meta_gradients = torch.is_grad_enabled()
        inputs = self.inner_inputs(support.x)
        with torch.enable_grad():
            adapted = self.learnable.clone()
            if not meta_gradients:
                # Evaluation: adapt a copy cut off from the meta-parameters; nothing will be
                # backpropagated, so first-order steps give the same learner for less work.
                l2l.detach_module(adapted, keep_requires_grad=True)
        self.enter_step(adapted, 0)
        yield self.learner(adapted)
        for step in range(steps):
            with torch.enable_grad():
                loss = self.objective.loss(adapted(inputs), support)
                self.inner_update(adapted, loss, step, first_order=self.first_order or not meta_gradients)
            self.enter_step(adapted, step + 1)
            yield self.learner(adapted)

    def score(self, learner: nn.Module, query: TaskSplit) -> TaskResult:
        return self.objective.result(learner(query.x), query)

    def meta_step(self, tasks: Sequence[Task], update: MetaUpdate) -> dict[str, float]:
        """The whole meta-batch at once where ``vectorize`` says so (:mod:`metarun.algorithms.vectorized`:
        the same meta-gradient, running statistics and metrics), else task by task."""
        from metarun.algorithms import vectorized

        if vectorized.choose(self, tasks, "meta-training"):
            return vectorized.meta_step(self, tasks, update)
        return super().meta_step(tasks, update)

    def run_tasks(self, tasks: Iterable[Task], steps: int, every_step: bool) -> list[list[TaskResult]]:
        """Evaluation tasks in vectorised chunks where ``vectorize`` says so, else task by task."""
        from metarun.algorithms import vectorized

        return vectorized.run_tasks(self, tasks, steps, every_step)
