"""The value types of a task: its two sides, the task itself (with a sequence view for sequence
models) and a meta-batch of same-shaped tasks held as stacked tensors.

:class:`TaskBatch` is a ``Sequence[Task]`` (``len``, indexing and iteration give ordinary
:class:`Task` views, so every algorithm's per-task ``meta_step`` takes it as it is) whose tensors
are also reachable whole: ``support_x [T, n_s, ...]``, ``support_y [T, n_s]``, ``query_x [T, n_q,
...]``, ``query_y [T, n_q]``. The device sampler (:mod:`metarun.tasks.device`) draws one directly;
the batched gradient-based path (:mod:`metarun.algorithms.vectorized`) reads its tensors, or stacks
a list of tasks into one.

A leaf module: it imports nothing from metarun, so the samplers, the datasets, the objectives
and the algorithms can all import it without a cycle. A learner's result (``TaskResult``,
``Curve``) lives beside the objectives that compute it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class TaskSplit:
    """One side of a task.

    Attributes:
        x: inputs ``[n, C, H, W]`` (float32 in [0, 1] for images); ``[n, 1]`` for sinusoids.
        y: labels ``[n]`` int64 in ``[0, ways)``; real targets ``[n, 1]`` for regression.
        ways: classes of the task. Carried with the data because training and evaluation tasks
            may have different ways (``train_ways``), and a label tensor alone cannot tell a
            class that is absent from one that does not exist. A regression task is one
            function, and has ``ways = 1``.
        seed: the seed of the randomness of adapting to this split in meta-training (an episode's
            order and labels, Reptile's mini-batches), which the loop gives every task of a
            meta-batch (:func:`with_seeds`); None: drawn from torch's global RNG.
    """

    x: torch.Tensor
    y: torch.Tensor
    ways: int
    seed: int | None = None

    def generator(self) -> torch.Generator:
        """A CPU generator for the randomness of adapting to this split, seeded by :attr:`seed` (so a
        task's draws do not depend on the tasks before it, nor on the rank that runs it), or by a
        draw from torch's global RNG when it has none."""
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()))
        return torch.Generator().manual_seed(seed)


@dataclass
class TaskSequence:
    """A task read as one sequence of (input, label) pairs, for sequence models (MANN, SNAIL).

    Attributes:
        x: inputs in presentation order ``[T, ...]`` (``T = len(support) + len(query)``).
        y: their labels after the episode's class permutation ``[T]``, in ``[0, ways)``.
        is_query: ``[T]`` bool, True where the element comes from the query set.
        permutation: ``[ways]``, the episode's class-to-label assignment: original class ``c`` is
            shown as label ``permutation[c]``.
        ways: classes of the task.
    """

    x: torch.Tensor
    y: torch.Tensor
    is_query: torch.Tensor
    permutation: torch.Tensor
    ways: int


@dataclass
class Task:
    """An N-way few-shot task: ``support`` has ``ways * shots`` samples, ``query`` ``ways * query_shots``."""

    support: TaskSplit
    query: TaskSplit

    def sequence(self, generator: torch.Generator, query_last: bool) -> TaskSequence:
        """The task as one shuffled sequence with a fresh random class-to-label assignment.

        Samplers return class-sorted splits (support labels ``[0, 0, 1, 1, 2, 2]``), so a sequence
        model would read the answer off the order: here every episode draws its own label
        permutation and presentation order from ``generator``, so the same generator state gives
        the same sequence (reproducible from a seed), and every sample of the task appears exactly once.

        Args:
            generator: the source of the permutation and the shuffle (on the CPU).
            query_last: shuffle the support and the query separately and put the query after the
                support (SNAIL: Mishra et al. 2018); otherwise shuffle all samples together into
                one episode (MANN: Santoro et al. 2016).
        """
        ways = self.support.ways
        permutation = torch.randperm(ways, generator=generator)
        device = self.support.x.device
        n_support, n_query = len(self.support.y), len(self.query.y)
        if query_last:
            order = torch.cat([torch.randperm(n_support, generator=generator),
                               n_support + torch.randperm(n_query, generator=generator)])
        else:
            order = torch.randperm(n_support + n_query, generator=generator)
        order = order.to(device)
        x = torch.cat([self.support.x, self.query.x])[order]
        y = permutation.to(device)[torch.cat([self.support.y, self.query.y])[order]]
        is_query = (order >= n_support)
        return TaskSequence(x=x, y=y, is_query=is_query, permutation=permutation.to(device), ways=ways)


@dataclass
class TaskBatch(Sequence[Task]):
    """``T`` tasks of one shape, stacked.

    Attributes:
        support_x: ``[T, n_s, ...]`` support inputs.
        support_y: ``[T, n_s]`` labels (``[T, n_s, dim]`` targets for regression).
        query_x: ``[T, n_q, ...]`` query inputs.
        query_y: ``[T, n_q]`` labels (or ``[T, n_q, dim]`` targets).
        ways: classes of every task.
        seeds: every task's :attr:`TaskSplit.seed` (its support's), or None.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: int
    seeds: list[int] | None = None

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def __getitem__(self, index):  # type: ignore[override]
        seeds = self.seeds
        if isinstance(index, slice):
            return TaskBatch(self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index],
                             self.ways, None if seeds is None else seeds[index])
        return Task(support=TaskSplit(self.support_x[index], self.support_y[index], self.ways,
                                      None if seeds is None else seeds[index]),
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
        seeds = [t.support.seed for t in tasks]
        return cls(torch.stack([t.support.x for t in tasks]), torch.stack([t.support.y for t in tasks]),
                   torch.stack([t.query.x for t in tasks]), torch.stack([t.query.y for t in tasks]),
                   tasks[0].support.ways, None if None in seeds else seeds)


def with_seeds(tasks: Sequence[Task], iteration: int) -> Sequence[Task]:
    """``tasks`` (a meta-batch), each with its own :attr:`TaskSplit.seed` on its support: a hash of
    torch's CPU RNG state, ``iteration`` and the task's place in the meta-batch. Nothing is drawn, so
    the run's random stream is unchanged; a resumed run (its RNG state restored) gets the same seeds;
    and every rank of a distributed run, which drew the same meta-batch, gives every task the same seed
    whichever rank runs it."""
    base = hashlib.blake2b(torch.get_rng_state().numpy().tobytes() + iteration.to_bytes(8, "little"),
                           digest_size=8).digest()
    seeds = [int.from_bytes(hashlib.blake2b(base + index.to_bytes(8, "little"), digest_size=8).digest(), "little")
             >> 2 for index in range(len(tasks))]
    if isinstance(tasks, TaskBatch):
        return dataclasses.replace(tasks, seeds=seeds)
    return [Task(dataclasses.replace(task.support, seed=seed), task.query) for task, seed in zip(tasks, seeds,
                                                                                                 strict=True)]
