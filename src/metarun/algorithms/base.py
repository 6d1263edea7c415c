"""The one contract every meta-learning algorithm implements.

An algorithm is an ``nn.Module`` whose parameters are the meta-parameters. For one task it

1. adapts to the support set: :meth:`Algorithm.trajectory` yields a *learner* after 0, 1, ...,
   ``steps`` adaptation steps (methods without an inner loop, such as metric-based ones, yield
   exactly one learner), and
2. is scored on the query set: :meth:`Algorithm.evaluate` returns a :class:`TaskResult` whose
   loss is differentiable with respect to the meta-parameters.

So every family reports query metrics per adaptation step from the same two calls, and the
loop never looks inside an algorithm. Conventions:

- ``trajectory`` never mutates the meta-parameters; the loop's optimizer does.
- A yielded learner is valid until the next one is drawn from the same trajectory.
- Under ``torch.no_grad()`` (evaluation) nothing is backpropagated into the meta-parameters,
  so an algorithm may adapt a detached copy with first-order steps; with gradients enabled
  (meta-training) the query loss must carry the meta-gradient.
- :meth:`Algorithm.meta_loss` turns the per-step query results into the loss the loop
  minimises; an algorithm with another outer objective (MAML++'s multi-step loss, Reptile's
  parameter difference) overrides it in its own file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import nn

from metarun.errors import ConfigError
from metarun.objectives import TaskResult
from metarun.tasks import Task, TaskSplit


class Algorithm(nn.Module, ABC):
    """Base class of every meta-learning algorithm.

    Args:
        inner_steps: adaptation steps during meta-training (0 for methods without an inner loop).
        eval_inner_steps: adaptation steps at meta-validation and meta-test time.
    """

    def __init__(self, inner_steps: int = 0, eval_inner_steps: int = 0) -> None:
        super().__init__()
        if inner_steps < 0 or eval_inner_steps < 0:
            raise ConfigError(f"inner_steps and eval_inner_steps must be >= 0, got {inner_steps}/{eval_inner_steps}")
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps

    @abstractmethod
    def trajectory(self, support: TaskSplit, steps: int) -> Iterator[nn.Module]:
        """Yield the learner after 0, 1, ..., ``steps`` adaptation steps on ``support``.

        Args:
            support: ``x [ways * shots, ...]``, ``y [ways * shots]``.
            steps: number of adaptation steps.
        """

    @abstractmethod
    def evaluate(self, learner: nn.Module, query: TaskSplit) -> TaskResult:
        """Score ``learner`` on ``query`` (``x [ways * query_shots, ...]``, ``y [ways * query_shots]``)."""

    def adapt(self, support: TaskSplit, steps: int) -> nn.Module:
        """The learner after ``steps`` adaptation steps."""
        *_, learner = self.trajectory(support, steps)
        return learner

    def run_task(self, task: Task, steps: int, every_step: bool) -> list[TaskResult]:
        """Adapt on the support set and score on the query set.

        Args:
            task: the task.
            steps: adaptation steps.
            every_step: score the learner after every step (evaluation curves) or only the
                final learner (meta-training).

        Returns:
            One TaskResult per scored learner; the last one is the fully adapted learner.
        """
        results = []
        learner = None
        for learner in self.trajectory(task.support, steps):
            if every_step:
                results.append(self.evaluate(learner, task.query))
        if not every_step:
            results.append(self.evaluate(learner, task.query))
        return results

    def meta_loss(self, results: list[TaskResult]) -> torch.Tensor:
        """The loss the outer loop minimises for one task: the final learner's query loss."""
        return results[-1].loss
