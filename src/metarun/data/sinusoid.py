"""Sinusoid regression tasks (Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning", ICML 2017, §5.1).

Every task is one function ``y = A * sin(x - phi)`` with amplitude ``A ~ U[0.1, 5.0]`` and
phase ``phi ~ U[0, pi]``, observed at points ``x ~ U[-5, 5]``; the loss is the mean squared
error (:class:`metarun.objectives.Regression`). There are no classes, so in the run config

- ``shots`` is K, the number of support points (the paper trains with K = 10 and tests
  with K = 5, 10, 20: ``train_shots`` and ``shots``),
- ``query_shots`` is the number of query points the adapted function is scored on, and
- ``ways`` does not apply: a task is one function, and its ``TaskSplit.ways`` is 1.

The splits share the task distribution; validation and test tasks are the fixed tasks drawn
from the seeds that ``build_data`` gives them, and never coincide with training tasks, which
are drawn from the run's random stream.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from metarun.errors import DatasetError
from metarun.objectives import Regression
from metarun.tasks.sampling import FixedTasks, draw_fixed_tasks
from metarun.tasks.types import Task, TaskSplit


def check_range(name: str, bounds: Sequence[float]) -> tuple[float, float]:
    """``dataset.<name>`` as ``(low, high)`` with ``low <= high``, or one clear DatasetError."""
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise DatasetError(f"dataset.{name} must be two numbers [low, high], got {bounds!r}") from None
    if not low <= high:
        raise DatasetError(f"dataset.{name} must be [low, high] with low <= high, got {list(bounds)}")
    return low, high


class Sinusoids:
    """The ``_target_`` of ``conf/dataset/sinusoid.yaml``: a source of sinusoid regression tasks.

    Implements the ``TaskSource`` interface of :mod:`metarun.tasks.sampling` that ``build_data`` uses.

    Args:
        amplitude: ``[low, high]`` of the uniform amplitude ``A`` (paper: [0.1, 5.0]).
        phase: ``[low, high]`` of the uniform phase ``phi`` in radians (paper: [0, pi]).
        x_range: ``[low, high]`` of the uniform inputs ``x`` (paper: [-5, 5]).

    Attributes:
        objective: :class:`Regression` with 1-dimensional targets (MSE, no accuracy).
    """

    def __init__(self, amplitude: Sequence[float], phase: Sequence[float], x_range: Sequence[float]) -> None:
        self.amplitude = check_range("amplitude", amplitude)
        self.phase = check_range("phase", phase)
        self.x_range = check_range("x_range", x_range)
        self.objective = Regression(dim=1)

    def sampler(self, split_name: str, ways: int, shots: int, query_shots: int, device: torch.device | str,
                augment: Callable[[torch.Tensor], torch.Tensor] | None) -> SinusoidSampler:
        """Tasks of ``shots`` support and ``query_shots`` query points; ``ways`` does not apply (one function).

        Raises:
            DatasetError: an image augmentation was configured (sinusoids have no images).
        """
        if augment is not None:
            raise DatasetError("augment transforms images and sinusoid tasks have none; set augment=null")
        return SinusoidSampler(self, shots, query_shots, device)


class SinusoidSampler:
    """Draws sinusoid tasks of ``shots`` support and ``query_shots`` query points.

    Every draw takes one seed from Python's global ``random`` and draws ``A``, ``phi`` and the
    points with a torch generator seeded by it. So, as for the class samplers (learn2learn draws
    with Python's ``random``), ``seed_everything`` fixes the training stream and
    :meth:`fixed_tasks` depends only on its seed, and no other torch RNG use moves the tasks.

    Args:
        source: the task distribution.
        shots: support points per task (K).
        query_shots: query points per task.
        device: where the tasks are returned.
    """

    def __init__(self, source: Sinusoids, shots: int, query_shots: int, device: torch.device | str = "cpu") -> None:
        if shots < 1 or query_shots < 1:
            raise DatasetError(f"shots and query_shots must be >= 1, got {shots}/{query_shots}")
        self.source, self.shots, self.query_shots = source, shots, query_shots
        self.device = torch.device(device)

    def draw(self) -> tuple[torch.Tensor, float, float]:
        """One task's description: inputs ``x [shots + query_shots, 1]``, amplitude and phase."""
        generator = torch.Generator().manual_seed(random.getrandbits(63))

        def uniform(bounds: tuple[float, float], *shape: int) -> torch.Tensor:
            low, high = bounds
            return torch.rand(*shape, generator=generator) * (high - low) + low

        amplitude = float(uniform(self.source.amplitude, 1))
        phase = float(uniform(self.source.phase, 1))
        x = uniform(self.source.x_range, self.shots + self.query_shots, 1)
        return x, amplitude, phase

    def materialise(self, x: torch.Tensor, amplitude: float, phase: float) -> Task:
        """The task ``y = amplitude * sin(x - phase)`` at ``x [n, 1]``: the first ``shots`` points
        are the support set, the rest the query set."""
        x = x.to(self.device)
        y = amplitude * torch.sin(x - phase)
        return Task(
            support=TaskSplit(x[: self.shots], y[: self.shots], ways=1),
            query=TaskSplit(x[self.shots :], y[self.shots :], ways=1),
        )

    def sample(self) -> Task:
        """A fresh random task."""
        return self.materialise(*self.draw())

    def fixed_tasks(self, count: int, seed: int) -> FixedTasks:
        """``count`` tasks that depend only on ``seed`` (the global RNG is restored afterwards)."""
        return draw_fixed_tasks(self, self.draw, count, seed, self.device)
