"""Shared machinery of the gradient-based family (MAML, first-order MAML, Meta-SGD, ANIL, MAML++,
the pretrained baseline).

The model is ``features -> linear head`` wrapped in one of learn2learn's differentiable learners
(``l2l.algorithms.MAML`` or ``MetaSGD``); adaptation is ``clone()`` and gradient steps applied
with ``l2l.utils.update_module``, which never touch the meta-parameters.

An algorithm of the family describes its inner loop through five hooks, and both paths read them:
the per-task loop here (:meth:`GradientBasedAlgorithm.trajectory`,
:meth:`GradientBasedAlgorithm.train_task`) and the batched meta-batch
(:mod:`metarun.algorithms.vectorized`), which knows modules and objectives but no algorithm:

- :meth:`~GradientBasedAlgorithm.adapted_parameters`: which parameters the inner loop updates;
- :meth:`~GradientBasedAlgorithm.inner_rate`: the step size of a parameter at a step;
- :meth:`~GradientBasedAlgorithm.frozen_features`: a feature extractor that is not adapted;
- :meth:`~GradientBasedAlgorithm.step_loss_weights`: the query-loss weight of every step;
- :meth:`~GradientBasedAlgorithm.first_order_at`: whether a step's gradient is a constant.

A subclass that overrides any other method of the per-task path (``trajectory``, ``score``,
``train_task``, ...) cannot be batched: :attr:`GradientBasedAlgorithm.batchable` turns False for
it by itself, unless the subclass sets the attribute in its own body.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from metarun._learn2learn import l2l
from metarun.algorithms import vectorized
from metarun.algorithms.base import Algorithm, MetaUpdate, private_buffers
from metarun.algorithms.maml_plus_plus import PerStepBatchNorm
from metarun.errors import ConfigError
from metarun.objectives import Classification, Objective, TaskResult
from metarun.tasks.types import Task, TaskBatch, TaskSplit


def classifier(features: nn.Module, outputs: int) -> nn.Sequential:
    """``features`` followed by a linear head: ``[B, ...] -> [B, outputs]``."""
    return nn.Sequential(features, nn.Linear(features.out_features, outputs))


def multi_step(weights: list[float] | None) -> bool:
    """Whether step-loss ``weights`` (:meth:`GradientBasedAlgorithm.step_loss_weights`) weigh any
    step but the last (else the training loss is the last step's query loss alone)."""
    return weights is not None and any(weights[:-1])


def scored_steps(steps: int, weights: list[float] | None) -> list[int]:
    """The adaptation steps whose query loss enters the training loss: the steps ``1..steps``
    with a nonzero weight under a multi-step loss, else ``[steps]``."""
    if not multi_step(weights):
        return [steps]
    return [k for k in range(1, steps + 1) if weights[k - 1] != 0]


def training_loss(losses: dict[int, torch.Tensor], steps: int, weights: list[float] | None) -> torch.Tensor:
    """The training loss from the query losses after the :func:`scored_steps` (``{step: loss}``,
    scalars or ``[T]``): ``sum_k w_k L_k`` under a multi-step loss, else the last step's."""
    if not multi_step(weights):
        return losses[steps]
    return sum(weights[k - 1] * losses[k] for k in scored_steps(steps, weights))


class GradientBasedAlgorithm(Algorithm):
    """Adapts ``self.learnable`` (a learn2learn BaseLearner) with gradient steps on the support loss.

    Subclasses call ``super().__init__``, set ``self.learnable``, and override the hooks they need
    (see the module docstring): ANIL :meth:`frozen_features`, Meta-SGD :meth:`inner_rate`, MAML's
    MAML++ options :meth:`adapted_parameters`, :meth:`inner_rate` and :meth:`step_loss_weights`.
    Per-step BatchNorm layers (:class:`~metarun.algorithms.maml_plus_plus.PerStepBatchNorm`) are
    told the step of the weights they normalise.

    Args:
        ways: classes per task (outputs of the linear head).
        inner_lr: inner-loop step size (initial value, for methods that learn it).
        first_order: drop second-order terms of the meta-gradient.
        inner_steps: adaptation steps during meta-training.
        eval_inner_steps: adaptation steps at evaluation.
        train_ways: ways of meta-training tasks (``None``: ``ways``); at least ``ways``.
        objective: the task's loss and metrics (classification unless the dataset says otherwise).
        vectorize: run a meta-batch (and evaluation tasks) all at once (``"true"``), task by task
            (``"false"``), or batched where that is exact and measured faster (``"auto"``); see
            :mod:`metarun.algorithms.vectorized`. The meta-gradient is the same either way.

    Attributes:
        head_outputs: outputs the subclass's head must have (:meth:`Algorithm.output_units`).
        batchable: whether the batched meta-batch may run this algorithm (it reads only the hooks).
    """

    learnable: nn.Module
    batchable: bool = True
    # The per-task path's own methods, which the batched engine replaces rather than calls: a
    # subclass that overrides one of them is not batchable (unless it says otherwise itself).
    ENGINE_REPLACES = ("trajectory", "score", "train_task", "run_task", "meta_step", "run_tasks")

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        overridden = [name for name in GradientBasedAlgorithm.ENGINE_REPLACES
                      if getattr(cls, name) is not getattr(GradientBasedAlgorithm, name)]
        if "batchable" not in cls.__dict__ and overridden:
            cls.batchable = False
            cls.not_batchable_because = f"{cls.__name__} overrides {', '.join(overridden)}"

    def __init__(self, ways: int, inner_lr: float, first_order: bool, inner_steps: int, eval_inner_steps: int,
                 train_ways: int | None, objective: Objective | None, vectorize: bool | str) -> None:
        super().__init__(inner_steps, eval_inner_steps)
        self.vectorize = vectorized.vectorize_option(vectorize)
        if inner_lr < 0:
            raise ConfigError(f"algorithm.inner_lr must be >= 0, got {inner_lr}")
        self.inner_lr = inner_lr
        self.first_order = first_order
        self.objective = objective or Classification()
        self.head_outputs = self.output_units(ways, train_ways, self.objective, "gradient-based algorithms")

    # -- the hooks ----------------------------------------------------------------------------

    def adapted_module(self) -> nn.Module:
        """The meta-model's network that the inner loop adapts (its parameters are the starting
        point of every task's fast weights)."""
        return self.learnable.module

    def adapted_parameters(self, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """The ``(name, tensor)`` of ``module``'s parameters (``module`` is :meth:`adapted_module` or
        an adapting copy of it) that the inner loop updates. Default: all of them."""
        return list(module.named_parameters())

    def inner_rate(self, name: str, step: int) -> float | torch.Tensor:
        """The inner step size of parameter ``name`` at step ``step`` (0-based): a number, or a
        tensor that broadcasts to the parameter (a meta-parameter when it is learned). Default:
        ``inner_lr``."""
        return self.inner_lr

    def frozen_features(self) -> nn.Module | None:
        """A feature extractor applied before the adapted network and never adapted (ANIL's
        backbone; meta-learned in the outer loop), or None (default: the whole network adapts)."""
        return None

    def step_loss_weights(self) -> list[float] | None:
        """The weights ``w_1..w_K`` of the query losses after steps ``1..K`` in the training loss
        (MAML++'s multi-step loss), or None (default): the last step's loss alone."""
        return None

    def first_order_at(self, step: int) -> bool:
        """Whether inner step ``step`` (0-based) treats its gradient as a constant during
        meta-training (evaluation is always first order). Default: ``first_order``."""
        return self.first_order

    # -- the per-task path --------------------------------------------------------------------

    @staticmethod
    def enter_step(adapted: nn.Module, step: int) -> None:
        """Tell the per-step BatchNorm layers of ``adapted`` that its weights have had ``step`` steps."""
        for module in adapted.modules():
            if isinstance(module, PerStepBatchNorm):
                module.step = step

    def inner_step(self, adapted: nn.Module, loss: torch.Tensor, step: int, first_order: bool) -> None:
        """``theta_i <- theta_i - inner_rate(i, step) * grad_i`` on the :meth:`adapted_parameters` of
        ``adapted`` (a learn2learn clone), in place, as learn2learn's ``adapt`` does."""
        named = self.adapted_parameters(adapted.module)
        grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=not first_order,
                                    create_graph=not first_order)
        for (name, parameter), grad in zip(named, grads, strict=True):
            parameter.update = -self.inner_rate(name, step) * grad
        l2l.utils.update_module(adapted.module)

    def trajectory(self, support: TaskSplit, steps: int) -> Iterator[nn.Module]:
        meta_gradients = torch.is_grad_enabled()
        features = self.frozen_features()
        # Computed in the caller's grad mode: in meta-training the head's adaptation then carries
        # the meta-gradient into frozen features, as in ANIL.
        inputs = support.x if features is None else features(support.x)
        with torch.enable_grad():
            adapted = self.learnable.clone()
            if not meta_gradients:
                # Evaluation: adapt a copy cut off from the meta-parameters; nothing will be
                # backpropagated, so first-order steps give the same learner for less work.
                l2l.detach_module(adapted, keep_requires_grad=True)
        learner = adapted if features is None else nn.Sequential(features, adapted)
        self.enter_step(adapted, 0)
        yield learner
        for step in range(steps):
            with torch.enable_grad():
                loss = self.objective.loss(adapted(inputs), support)
                self.inner_step(adapted, loss, step, first_order=self.first_order_at(step) or not meta_gradients)
            self.enter_step(adapted, step + 1)
            yield learner

    def score(self, learner: nn.Module, query: TaskSplit) -> TaskResult:
        return self.objective.result(learner(query.x), query)

    def train_task(self, task: Task) -> tuple[torch.Tensor, TaskResult]:
        """The training loss of :func:`training_loss` (the last step's query loss, or the multi-step
        loss), and the last step's query result. Only the last step's query pass folds BatchNorm
        statistics into the running ones; the earlier ones use their batch statistics alone."""
        weights = self.step_loss_weights()
        scored = scored_steps(self.inner_steps, weights)
        losses = {}
        result = None
        with private_buffers(self, keep=True):
            for step, learner in enumerate(self.trajectory(task.support, self.inner_steps)):
                if step not in scored:
                    continue
                with private_buffers(learner) if step < self.inner_steps else contextlib.nullcontext():
                    result = self.score(learner, task.query)
                losses[step] = result.loss
        return training_loss(losses, self.inner_steps, weights), result

    # -- the batched path ---------------------------------------------------------------------

    def meta_step(self, tasks: Sequence[Task], update: MetaUpdate) -> dict[str, float]:
        """The whole meta-batch at once where ``vectorize`` says so (:mod:`metarun.algorithms.vectorized`:
        the same meta-gradient, running statistics and metrics), else task by task."""
        if not vectorized.choose(self, tasks, "meta-training"):
            return super().meta_step(tasks, update)
        weights = self.step_loss_weights()
        scored = scored_steps(self.inner_steps, weights)
        update.zero_grad()
        engine = vectorized.Engine(self)
        outcome = engine.run(TaskBatch.of(tasks), self.inner_steps, scored, fold=self.inner_steps)
        loss = training_loss({k: outcome.scored[k].loss for k in scored}, self.inner_steps, weights).mean()
        loss.backward()
        engine.fold(outcome, len(tasks))
        last = outcome.scored[scored[-1]]
        metrics = update.report(loss.detach(), None if last.accuracy is None else last.accuracy.mean())
        update.step(self.parameters())
        return metrics

    def run_tasks(self, tasks: Iterable[Task], steps: int, every_step: bool) -> list[list[TaskResult]]:
        """Evaluation tasks in batched chunks where ``vectorize`` says so, else task by task."""
        return vectorized.run_tasks(self, tasks, steps, every_step)

