"""A meta-batch of same-shaped tasks held as stacked tensors.

:class:`TaskBatch` is a ``Sequence[Task]`` (``len``, indexing and iteration give ordinary
:class:`~metarun.task_types.Task` views, so every algorithm's per-task ``meta_step`` takes it as
it is) whose tensors are also reachable whole: ``support_x [T, n_s, ...]``, ``support_y [T, n_s]``,
``query_x [T, n_q, ...]``, ``query_y [T, n_q]``. The device sampler
(:mod:`metarun.device_sampler`) draws one directly; the vectorised gradient-based path
(:mod:`metarun.algorithms.vectorized`) reads its tensors, or stacks a list of tasks into one.

A leaf module like ``task_types``: it imports nothing else from metarun.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from metarun.task_types import Task, TaskSplit


@dataclass
class TaskBatch(Sequence[Task]):
    """``T`` tasks of one shape, stacked.

    Attributes:
        support_x: ``[T, n_s, ...]`` support inputs.
        support_y: ``[T, n_s]`` labels (``[T, n_s, dim]`` targets for regression).
        query_x: ``[T, n_q, ...]`` query inputs.
        query_y: ``[T, n_q]`` labels (or ``[T, n_q, dim]`` targets).
        ways: classes of every task.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: int

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return TaskBatch(self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index],
                             self.ways)
        return Task(support=TaskSplit(self.support_x[index], self.support_y[index], self.ways),
                    query=TaskSplit(self.query_x[index], self.query_y[index], self.ways))

    def __iter__(self) -> Iterator[Task]:
        for index in range(len(self)):
            yield self[index]

    @staticmethod
    def stackable(tasks: Sequence[Task]) -> bool:
        """Whether ``tasks`` share every shape, dtype, device and ``ways`` (so :meth:`of` can stack them)."""
        if len(tasks) == 0:
            return False
        if isinstance(tasks, TaskBatch):
            return True
        first = tasks[0]

        def signature(task: Task) -> tuple:
            return tuple((t.shape, t.dtype, t.device) for t in (task.support.x, task.support.y, task.query.x,
                                                                  task.query.y)) + (task.support.ways, task.query.ways)

        reference = signature(first)
        return first.support.ways == first.query.ways and all(signature(t) == reference for t in tasks[1:])

    @classmethod
    def of(cls, tasks: Sequence[Task]) -> TaskBatch:
        """``tasks`` as one batch: itself when it already is one, else stacked (one copy per tensor).
        The tasks must be :meth:`stackable`."""
        if isinstance(tasks, TaskBatch):
            return tasks
        return cls(torch.stack([t.support.x for t in tasks]), torch.stack([t.support.y for t in tasks]),
                   torch.stack([t.query.x for t in tasks]), torch.stack([t.query.y for t in tasks]),
                   tasks[0].support.ways)
