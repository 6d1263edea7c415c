"""Few-shot tasks: the TaskSource/Sampler interface that ``build_data``
uses (class splits and regression task distributions implement it), and a sampler over
learn2learn's TaskDataset.

A :class:`TaskSampler` wraps one class split. learn2learn's ``MetaDataset``/``TaskDataset`` with
``NWays``, ``KShots``, ``LoadData``, ``RemapLabels`` and ``ConsecutiveLabels`` chooses the
classes and samples of every task. The dataset it sees holds *image indices* rather than
images: ``LoadData`` then loads ``(index, label)`` pairs and the images are gathered in one
``index_select`` from a tensor that lives on the training device, so no image is copied per
sample and, with a GPU, the images never leave it.

Support and query are split by label: of the ``shots + query_shots`` samples drawn for each
class, the first ``shots`` go to the support set and the rest to the query set.

Two options change what a task is: ``within_group`` puts :class:`OneGroup` before ``NWays`` so
that all classes of a task share a group (one alphabet: Koch et al. 2015), and ``augment``
transforms the images of every task drawn (the training sampler only; fixed evaluation tasks
are augmented only as the seeded views of test-time augmentation, :class:`AugmentedTasks`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from metarun._learn2learn import l2l
from metarun.errors import DatasetError
from metarun.objectives import Objective
from metarun.tasks.types import Task, TaskSplit

log = logging.getLogger(__name__)


def image_tensor(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Stored images as a model reads them: uint8 ``[N, C, H, W]`` -> float32 in [0, 1] on ``device``.

    :class:`TaskSampler`'s classes (every validation and test task) and the images of an episodes
    file (``metarun-eval --episodes``) go through here, so an episode's image is exactly the input a
    sampled task's would be.
    """
    return images.to(device=device, dtype=torch.float32).div_(255.0)


class ImageClasses(Protocol):
    """What a sampler reads of a class split (``metarun.data.base.ImageClasses`` has it; the data
    package depends on the samplers, never the other way round)."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    groups: list[str]  # one group name per class

    @property
    def num_classes(self) -> int: ...

    def samples_per_class(self) -> torch.Tensor: ...


class Sampler(Protocol):
    """Draws the tasks of one split; :class:`TaskSampler` for classes, ``SinusoidSampler`` for functions."""

    def sample(self) -> Task:
        """A fresh random task, drawn with Python's global ``random`` (so ``seed_everything`` fixes it)."""

    def fixed_tasks(self, count: int, seed: int) -> FixedTasks:
        """``count`` tasks that depend only on ``seed``."""

    def materialise(self, *drawn: Any) -> Task:
        """The task described by one entry of :attr:`FixedTasks.drawn`."""


class TaskSource(Protocol):
    """What a ``conf/dataset`` target returns, and all that ``build_data`` asks of it.

    :class:`metarun.data.base.ClassSplits` (image classes) and
    :class:`metarun.data.sinusoid.Sinusoids` (regression functions) implement it.

    Attributes:
        objective: what the tasks ask for (classification or regression).
    """

    objective: Objective

    def sampler(self, split_name: str, ways: int, shots: int, query_shots: int, device: torch.device | str,
                augment: Callable[[torch.Tensor], torch.Tensor] | None) -> Sampler:
        """The task sampler of split ``split_name`` (``train``/``val``/``test``).

        Raises:
            DatasetError: the split cannot provide such tasks (one line for the user).
        """


@contextlib.contextmanager
def python_random_seed(seed: int) -> Iterator[None]:
    """Seed Python's global ``random`` (which learn2learn samples with) and restore it afterwards."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


class OneGroup(l2l.data.transforms.TaskTransform):
    """learn2learn task transform: keep the samples of one random group that has >= ``ways`` classes.

    Placed before ``NWays``, it makes every task's classes come from one group, e.g. Lake et
    al.'s and Koch et al.'s (2015) "within-alphabet" one-shot tasks. Groups are drawn uniformly
    (Lake's runs each use one alphabet), with Python's ``random`` like the rest of learn2learn.

    Args:
        dataset: the learn2learn MetaDataset.
        class_groups: the group of every class (label).
        ways: classes a task needs; groups with fewer are never drawn (logged once, with how many).
        split_name: for the messages; the ``train`` split's tasks have ``train_ways`` classes.

    Raises:
        DatasetError: no group has ``ways`` classes; it names ``train_ways`` for the train split.
    """

    def __init__(self, dataset: l2l.data.MetaDataset, class_groups: list[str], ways: int, split_name: str = "train"
                 ) -> None:
        super().__init__(dataset)
        members: dict[str, list[int]] = {}
        for label, group in enumerate(class_groups):
            members.setdefault(group, []).append(label)
        self.groups = [labels for _, labels in sorted(members.items()) if len(labels) >= ways]
        key = "train_ways" if split_name == "train" else "ways"
        if not self.groups:
            largest = max(len(labels) for labels in members.values())
            raise DatasetError(
                f"within_group tasks need a group with {key}={ways} classes but the largest of the {split_name} "
                f"split has {largest}; lower {key}, or leave the {split_name} split out of dataset.within_group "
                f"(e.g. dataset.within_group=test, or false)"
            )
        skipped = len(members) - len(self.groups)
        if skipped:
            log.info("within_group %s tasks: %d of %d groups have fewer than %s=%d classes and are never drawn",
                     split_name, skipped, len(members), key, ways)

    def __call__(self, task_description: list | None) -> list:
        if task_description is not None:
            raise ValueError("OneGroup must be the first task transform")
        labels_to_indices = self.dataset.labels_to_indices
        return [l2l.data.task_dataset.DataDescription(i) for label in random.choice(self.groups) for i in labels_to_indices[label]]


class TaskSampler:
    """Samples N-way K-shot tasks from one class split through learn2learn.

    Args:
        classes: the split's images and labels.
        ways: classes per task.
        shots: support samples per class.
        query_shots: query samples per class.
        device: where the images live and tasks are returned.
        split_name: ``train``/``val``/``test``, for error messages.
        within_group: all classes of a task come from one group (:class:`OneGroup`).
        augment: applied to the images ``[n, C, H, W]`` of every task drawn (training only).

    Raises:
        DatasetError: the split has fewer classes than ``ways``, or a class has fewer samples
            than ``shots + query_shots``, or (``within_group``) no group has ``ways`` classes.
    """

    def __init__(
        self,
        classes: ImageClasses,
        ways: int,
        shots: int,
        query_shots: int,
        device: torch.device | str = "cpu",
        split_name: str = "train",
        within_group: bool = False,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        check_task_shape(classes, ways, shots, query_shots, split_name)
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        self.augment = augment
        # uint8 -> float once, on the device: tasks then cost one index_select each.
        self.images = image_tensor(classes.images, device)
        self.labels = classes.labels
        indices = torch.arange(len(self.labels))
        labels_to_indices = {c: [] for c in range(classes.num_classes)}
        for i, c in enumerate(self.labels.tolist()):
            labels_to_indices[c].append(i)
        # learn2learn iterates the whole dataset to build this map unless it is given one.
        meta = l2l.data.MetaDataset(torch.utils.data.TensorDataset(indices, self.labels),
                                    labels_to_indices=labels_to_indices)
        transforms = [OneGroup(meta, classes.groups, ways, split_name)] if within_group else []
        transforms += [
            l2l.data.transforms.NWays(meta, ways),
            l2l.data.transforms.KShots(meta, shots + query_shots),
            l2l.data.transforms.LoadData(meta),
            l2l.data.transforms.RemapLabels(meta),
            l2l.data.transforms.ConsecutiveLabels(meta),
        ]
        self.taskset = l2l.data.TaskDataset(meta, task_transforms=transforms, num_tasks=-1)

    def sample_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One task as image indices ``[ways * (shots + query_shots)]`` and labels in ``[0, ways)``."""
        return self.taskset.sample()

    def materialise(self, index: torch.Tensor, label: torch.Tensor) -> Task:
        """Gather the images of a task and split it by label into support and query."""
        device = self.images.device
        index, label = index.to(device), label.to(device)
        support_mask = torch.zeros_like(label, dtype=torch.bool)
        for c in range(self.ways):
            members = (label == c).nonzero().flatten()
            support_mask[members[: self.shots]] = True
        x = self.images.index_select(0, index)
        if self.augment is not None:
            x = self.augment(x)
        return Task(
            support=TaskSplit(x[support_mask], label[support_mask], self.ways),
            query=TaskSplit(x[~support_mask], label[~support_mask], self.ways),
        )

    def sample(self) -> Task:
        """A fresh random task (learn2learn draws with Python's global ``random``)."""
        return self.materialise(*self.sample_indices())

    def fixed_tasks(self, count: int, seed: int) -> FixedTasks:
        """``count`` tasks that depend only on ``seed`` (the global RNG is restored afterwards)."""
        return draw_fixed_tasks(self, self.sample_indices, count, seed, self.images.device)


def draw_fixed_tasks(sampler: Sampler, draw: Callable[[], tuple], count: int, seed: int,
                     device: torch.device) -> FixedTasks:
    """``count`` task descriptions from ``draw()`` under ``python_random_seed(seed)``, for ``sampler``.

    Their tensors are moved to ``device`` once here, not at every evaluation.
    """
    with python_random_seed(seed):
        drawn = [draw() for _ in range(count)]
    drawn = [tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in task) for task in drawn]
    return FixedTasks(sampler, drawn)


class FixedTasks:
    """A fixed, cached list of tasks (validation and test), stored as the sampler's compact
    descriptions (image indices and labels; a sinusoid's inputs and parameters) and
    materialised on use.

    Attributes:
        start: the place of the first task in the whole list (a rank's share of it starts later).
    """

    def __init__(self, sampler: Sampler, drawn: list[tuple[Any, ...]], start: int = 0) -> None:
        self.sampler = sampler
        self.drawn = drawn
        self.start = start

    def __len__(self) -> int:
        return len(self.drawn)

    def __iter__(self) -> Iterator[Task]:
        for description in self.drawn:
            yield self.sampler.materialise(*description)

    def part(self, part: slice) -> FixedTasks:
        """The tasks of ``part`` (a rank's share of an evaluation), in order."""
        begin, _, _ = part.indices(len(self.drawn))
        return FixedTasks(self.sampler, self.drawn[part], self.start + begin)


# Seeds of test-time augmentation views: view v of task t draws from seed AUGMENTED_VIEW_SEED * v + t.
AUGMENTED_VIEW_SEED = 1_000_003


class AugmentedTasks:
    """View ``view`` (1, 2, ...) of fixed tasks for test-time augmentation: every image of every task,
    support and query, passed through ``transform`` (a training augmentation, :mod:`metarun.augment`).

    Each task's draws come from a seed of the view and the task's place in the whole list, so the
    images are the same in every evaluation and on every rank's share, and the global RNG is left
    as it was.
    """

    def __init__(self, tasks: FixedTasks, transform: Callable[[torch.Tensor], torch.Tensor], view: int) -> None:
        self.tasks, self.transform, self.view = tasks, transform, view

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        for place, task in enumerate(self.tasks, start=self.tasks.start):
            x = torch.cat([task.support.x, task.query.x])  # [n_s + n_q, C, H, W]
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(AUGMENTED_VIEW_SEED * self.view + place)
                x = self.transform(x)
            n = len(task.support.y)
            yield Task(dataclasses.replace(task.support, x=x[:n]), dataclasses.replace(task.query, x=x[n:]))


def check_task_shape(classes: ImageClasses, ways: int, shots: int, query_shots: int, split_name: str) -> None:
    """Raise one clear DatasetError when a split cannot provide the requested tasks."""
    if ways < 1 or shots < 1 or query_shots < 1:
        raise DatasetError(f"ways, shots and query_shots must be >= 1, got {ways}/{shots}/{query_shots}")
    if ways > classes.num_classes:
        raise DatasetError(
            f"ways={ways} but the {split_name} split has only {classes.num_classes} classes; "
            f"lower ways or choose a larger split"
        )
    fewest = int(classes.samples_per_class().min())
    if shots + query_shots > fewest:
        raise DatasetError(
            f"shots + query_shots = {shots + query_shots} but some {split_name} classes have only "
            f"{fewest} samples; lower shots or query_shots"
        )
