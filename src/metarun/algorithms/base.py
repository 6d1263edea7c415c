"""The one contract every meta-learning algorithm implements.

An algorithm is an ``nn.Module`` whose parameters are the meta-parameters. For one task it

1. adapts to the support set: :meth:`Algorithm.trajectory` yields a *learner* after 0, 1, ...,
   ``steps`` adaptation steps, exactly ``steps + 1`` learners (a method without an inner loop,
   such as a metric-based one, yields the same learner every time), and
2. is scored on the query set: :meth:`Algorithm.score` returns a :class:`TaskResult` whose
   loss is differentiable with respect to the meta-parameters.

and for a meta-batch of tasks it

3. updates its meta-parameters: :meth:`Algorithm.meta_step` (default: the mean over tasks of
   :meth:`Algorithm.train_task`'s loss, one backward per task, then the loop's optimizer step).
   An algorithm with another outer update overrides it in its own file (Reptile moves towards
   the adapted weights; a vectorised meta-batch runs all tasks at once); one with another
   per-task objective overrides :meth:`Algorithm.train_task` (MAML++'s multi-step loss).
4. follows training progress: :meth:`Algorithm.on_iteration` is called before every meta-update
   with the iteration and the total, so schedules (annealed weights, derivative order, Reptile's
   outer step) are a function of the iteration alone and exact after a resume.

So every family reports query metrics per adaptation step from the same calls, and the loop
never looks inside an algorithm. Conventions:

- Adapting never changes the meta-model: not its parameters (only the meta-update does), and
  not its buffers. BatchNorm running statistics are learned state like the parameters:
  :meth:`run_task` runs every forward pass on private copies of the buffers, which only
  :meth:`train_task` folds back, task after task, in the order the meta-batch runs.
- A yielded learner is valid until the next one is drawn from the same trajectory.
- Under ``torch.no_grad()`` (evaluation) nothing is backpropagated into the meta-parameters,
  so an algorithm may adapt a detached copy with first-order steps; with gradients enabled
  (meta-training) the query loss must carry the meta-gradient.

Constructor arguments: an algorithm's config in ``conf/algorithm/`` sets its hyperparameters,
and the build adds ``ways``, ``train_ways``, ``objective`` and, when the run has a backbone
(``backbone`` is not null), ``features``. See "Adding an algorithm" in the README.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from metarun.distributed import SINGLE, Ranks, buffer_state
from metarun.errors import ConfigError, NonFiniteLossError
from metarun.objectives import Objective, TaskResult
from metarun.tasks.types import Task, TaskSplit


@contextlib.contextmanager
def private_buffers(module: nn.Module, keep: bool = False) -> Iterator[None]:
    """Run ``module`` on copies of its buffers.

    Forward passes inside (BatchNorm in training mode, also in any learn2learn clone made
    inside, which shares the buffers it finds) update the copies; the original buffer tensors
    are never written, unless ``keep``: then they receive the copies' final values on a normal
    exit, which is what updating them in place would have left.
    """
    originals = []
    for owner in module.modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                originals.append((owner, name, buffer))
                owner._buffers[name] = buffer.clone()
    completed = False
    try:
        yield
        completed = True
    finally:
        for owner, name, buffer in originals:
            copy = owner._buffers[name]
            owner._buffers[name] = buffer
            if keep and completed:
                with torch.no_grad():
                    buffer.copy_(copy)


class MetaUpdate:
    """What the loop lends to :meth:`Algorithm.meta_step`: the optimizer, the non-finite check,
    gradient clipping, and the other ranks of a distributed run. The loop owns these mechanisms; an
    algorithm decides when to use them.

    With several ranks (:mod:`metarun.distributed`), :meth:`shared` gives each rank its slice of the
    meta-batch, and every mean an algorithm takes over its tasks becomes the mean over the whole
    meta-batch where it passes through here: :meth:`report` (the metrics), :meth:`step` (the
    meta-gradient, before clipping, so clipping sees the global norm) and :meth:`average` (an update
    of the algorithm's own, such as Reptile's). So a ``W``-rank run with ``meta_batch_size`` B follows
    the one-process run with B, up to float summation order. With one rank none of this runs.

    Args:
        optimizer: the meta-optimizer (config group ``optimizer``).
        grad_clip: clip the meta-gradient's global norm to this, or None.
        ranks: the run's process group (:data:`metarun.distributed.SINGLE`: one process).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, grad_clip: float | None, ranks: Ranks = SINGLE) -> None:
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.ranks = ranks
        self.weight = 1.0  # this rank's share of the meta-batch

    @contextlib.contextmanager
    def shared(self, algorithm: nn.Module, tasks: Sequence[Task]) -> Iterator[Sequence[Task]]:
        """This rank's slice of the meta-batch ``tasks`` (every rank drew the whole of it) for one
        meta-step; on exit the BatchNorm running statistics become those of one process running all
        the slices in rank order (:meth:`Ranks.merge_buffers`). One rank: ``tasks`` itself."""
        if not self.ranks.active:
            yield tasks
            return
        local = tasks[self.ranks.share(len(tasks))]
        self.weight = len(local) / len(tasks)
        before = buffer_state(algorithm)
        yield local
        self.ranks.merge_buffers(algorithm, before)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def read(self, *values: torch.Tensor | None) -> list[float | None]:
        """Scalars to floats in one host read (one GPU sync per meta-batch), each the mean over the
        whole meta-batch (over ranks). The first value is the loss being optimised; a non-finite one
        raises :class:`NonFiniteLossError`."""
        present = torch.stack([v.detach().float().reshape(()) for v in values if v is not None])
        self.ranks.weighted_sum_([present], self.weight)
        floats = iter(present.tolist())
        out = [None if v is None else next(floats) for v in values]
        if not math.isfinite(out[0]):
            raise NonFiniteLossError(f"meta-training loss is {out[0]}")
        return out

    def report(self, loss: torch.Tensor, accuracy: torch.Tensor | None = None,
               parts: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """The metrics a meta-step returns, read in one host read (:meth:`read`, so a non-finite
        ``loss`` raises): ``train/loss``, ``train/acc`` when there is an accuracy, and
        ``train/<name>`` for each of ``parts`` (the terms of a composite loss)."""
        names = list(parts or {})
        loss_value, accuracy_value, *part_values = self.read(loss, accuracy, *((parts or {})[n] for n in names))
        metrics = {"train/loss": loss_value}
        if accuracy_value is not None:
            metrics["train/acc"] = accuracy_value
        metrics.update({f"train/{name}": value for name, value in zip(names, part_values, strict=True)})
        return metrics

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        """Tensors that are means over this rank's tasks become means over the whole meta-batch, in
        place (an update the algorithm applies itself, without the optimizer: Reptile's ``phi``)."""
        self.ranks.weighted_sum_(list(tensors), self.weight)

    def step(self, parameters: Iterable[nn.Parameter]) -> None:
        """Average ``.grad`` over the ranks (when there are several), clip (when configured) and
        apply the optimizer."""
        parameters = list(parameters)
        self.ranks.reduce_gradients(parameters, self.weight)
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(parameters, self.grad_clip)
        self.optimizer.step()


class Algorithm(nn.Module, ABC):
    """Base class of every meta-learning algorithm.

    Args:
        inner_steps: adaptation steps during meta-training (0 for methods without an inner loop).
        eval_inner_steps: adaptation steps at meta-validation and meta-test time.

    Attributes:
        label_equivariant: whether relabelling the support classes by a permutation permutes the
            query's class scores exactly (a learner built from the support set alone). False for a
            method with per-class slow weights (MetaNet's slow output layer); the contract tests
            then only check that the scores depend on the support labels.
    """

    label_equivariant: bool = True

    def __init__(self, inner_steps: int, eval_inner_steps: int) -> None:
        super().__init__()
        if inner_steps < 0 or eval_inner_steps < 0:
            raise ConfigError(f"inner_steps and eval_inner_steps must be >= 0, got {inner_steps}/{eval_inner_steps}")
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps

    @abstractmethod
    def trajectory(self, support: TaskSplit, steps: int) -> Iterator[nn.Module]:
        """Yield the learner after 0, 1, ..., ``steps`` adaptation steps on ``support``: ``steps + 1`` learners.

        Args:
            support: ``x [ways * shots, ...]``, ``y [ways * shots]``.
            steps: number of adaptation steps.
        """

    @abstractmethod
    def score(self, learner: nn.Module, query: TaskSplit) -> TaskResult:
        """Score ``learner`` on ``query`` (``x [ways * query_shots, ...]``, ``y [ways * query_shots]``)."""

    def adapt(self, support: TaskSplit, steps: int) -> nn.Module:
        """The learner after ``steps`` adaptation steps (the meta-model's buffers are left untouched)."""
        with private_buffers(self):
            *_, learner = self.trajectory(support, steps)
        return learner

    def run_task(self, task: Task, steps: int, every_step: bool, update_statistics: bool = False) -> list[TaskResult]:
        """Adapt on the support set and score on the query set.

        Args:
            task: the task.
            steps: adaptation steps.
            every_step: score the learner after every step (evaluation curves, MAML++'s multi-step
                loss) or only the final learner.
            update_statistics: fold the buffers' final values (BatchNorm running statistics)
                back into the meta-model; only meta-training does.

        Returns:
            One TaskResult per scored learner (``steps + 1``, or 1); the last is the fully adapted learner.
        """
        results = []
        drawn = 0
        with private_buffers(self, keep=update_statistics):
            for drawn, learner in enumerate(self.trajectory(task.support, steps), start=1):
                if every_step or drawn == steps + 1:
                    results.append(self.score(learner, task.query))
        if drawn != steps + 1:
            raise RuntimeError(f"{type(self).__name__}.trajectory yielded {drawn} learners for {steps} steps, "
                               f"not {steps + 1}")
        return results

    def run_tasks(self, tasks: Iterable[Task], steps: int, every_step: bool) -> list[list[TaskResult]]:
        """:meth:`run_task` for every task (evaluation: nothing is folded back), ``results[task][step]``.
        Default: one task at a time; an algorithm that can run many at once overrides it (the
        gradient-based family's vectorised path)."""
        return [self.run_task(task, steps, every_step) for task in tasks]

    def train_task(self, task: Task) -> tuple[torch.Tensor, TaskResult]:
        """One training task: the loss to minimise (``train/loss``), and the fully adapted
        learner's query result (``train/acc``). Default: the loss is the final query loss."""
        results = self.run_task(task, self.inner_steps, every_step=False, update_statistics=True)
        return results[-1].loss, results[-1]

    def meta_step(self, tasks: Sequence[Task], update: MetaUpdate) -> dict[str, float]:
        """One meta-update on a meta-batch; returns ``{"train/loss": ..., "train/acc": ...}`` (the
        mean loss minimised, and the adapted learners' mean query accuracy when there is one).

        Default: minimise the mean of :meth:`train_task`'s losses with the loop's optimizer. Each
        task's loss is backpropagated as soon as it is computed, so only one task's graph is alive
        at a time; ``.grad`` accumulates the mean over the meta-batch.
        """
        update.zero_grad()
        losses, accuracies = [], []
        for task in tasks:
            loss, result = self.train_task(task)
            (loss / len(tasks)).backward()
            losses.append(loss.detach())
            if result.accuracy is not None:
                accuracies.append(result.accuracy.detach())
        metrics = update.report(torch.stack(losses).mean(), torch.stack(accuracies).mean() if accuracies else None)
        update.step(self.parameters())
        return metrics

    @staticmethod
    def output_units(ways: int, train_ways: int | None, objective: Objective, what: str) -> int:
        """Units of a head (or of a method's per-class state) that serves tasks of ``ways`` and
        ``train_ways`` classes: one per class of the largest task, ``max(ways, train_ways)`` (an
        N-way task reads the first N), or the regression target's dimension.

        Raises:
            ConfigError: ``train_ways < ways``: the units past ``train_ways`` would never be
                trained. ``what`` names the method in the message.
        """
        if train_ways is not None and train_ways < ways:
            raise ConfigError(f"train_ways={train_ways} is smaller than ways={ways}: the outputs past {train_ways} "
                              f"would never be trained; use train_ways >= ways for {what}")
        return objective.outputs(max(ways, train_ways or ways))

    @staticmethod
    def unchanged(learner: nn.Module, steps: int) -> Iterator[nn.Module]:
        """The trajectory of a method without an inner loop: ``learner`` after every one of the
        ``steps + 1`` positions (metric-, memory- and model-based methods)."""
        for _ in range(steps + 1):
            yield learner

    def on_iteration(self, iteration: int, iterations: int) -> None:
        """Called by the loop before meta-update ``iteration + 1`` of ``iterations`` (``iteration``
        updates are done). Default: nothing; schedules derive their values from these two alone."""
