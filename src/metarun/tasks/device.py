"""Device-side task sampling: a whole meta-batch of N-way K-shot tasks in a few tensor ops.

:class:`metarun.tasks.TaskSampler` draws one task at a time through learn2learn's ``TaskDataset``
(Python's ``random``, per-sample descriptions, then masks and ``nonzero`` per class to split the
support from the query): about 30 ``.item()`` calls and 9 mask or ``nonzero`` ops per task, each
a host sync on a GPU. :class:`DeviceTaskSampler` draws the same task distribution for ``T`` tasks
at once from a ``[classes, samples, C, H, W]`` uint8 tensor on the device:

1. classes: ``ways`` distinct classes per task, the ``ways`` largest of ``T x classes`` uniform
   keys (``topk``): every ``ways``-subset is equally likely, and the order of the chosen classes,
   which gives their labels ``0..ways-1``, is a uniform random permutation;
2. samples: ``shots + query_shots`` distinct samples of each chosen class, the largest of uniform
   keys over its samples (slots past a smaller class's count get keys below 0 and are never
   chosen); the first ``shots`` are the support set, the rest the query set;
3. one gather, and uint8 -> float in [0, 1] as :func:`metarun.tasks.image_tensor` does.

No ``.item()``, no boolean mask, no host sync. Draws use torch's default generator on the device
(seeded by ``seed_everything``, saved and restored with the checkpoints' RNG states), so a run is
repeatable and resumes exactly. learn2learn's ``MetaDataset`` stays the source of the
class-to-indices map. The learn2learn sampler stays the reference (``sampler=learn2learn``), the
sampler of the fixed validation and test tasks (so they do not change), and the sampler of
``within_group`` tasks. Augmentation (per-sample random transforms) applies to the whole batch at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from metarun.errors import ConfigError
from metarun.tasks.sampling import FixedTasks, OneGroup, Sampler, TaskSampler
from metarun.tasks.types import Task, TaskBatch

log = logging.getLogger(__name__)

SAMPLERS = ("device", "learn2learn")


class DeviceTaskSampler:
    """Draws whole meta-batches of a :class:`TaskSampler`'s tasks on its device.

    Args:
        reference: the learn2learn sampler of the split (its images, class-to-indices map, task
            shape and augmentation); it still draws the fixed tasks.

    Attributes:
        images: uint8 ``[classes, samples, C, H, W]`` on the device (classes with fewer samples
            are padded with their own first image, never drawn).
        index: int64 ``[classes, samples]``, the image index (in the reference's numbering) of every slot.
        counts: int64 ``[classes]`` samples per class.
    """

    def __init__(self, reference: TaskSampler) -> None:
        if any(isinstance(t, OneGroup) for t in reference.taskset.task_transforms):
            raise ConfigError("the device sampler draws classes from the whole split; within_group tasks need "
                              "sampler=learn2learn")
        self.reference = reference
        self.ways, self.shots, self.query_shots = reference.ways, reference.shots, reference.query_shots
        self.augment = reference.augment
        device = reference.images.device
        labels_to_indices = reference.taskset.dataset.labels_to_indices  # learn2learn's MetaDataset
        classes = sorted(labels_to_indices)
        counts = [len(labels_to_indices[c]) for c in classes]
        width = max(counts)
        index = torch.tensor([labels_to_indices[c] + labels_to_indices[c][:1] * (width - len(labels_to_indices[c]))
                              for c in classes], dtype=torch.long)
        # The reference holds k / 255 in float32; * 255 and rounding gives back exactly k.
        stored = reference.images.mul(255.0).round_().to(torch.uint8)
        self.images = stored[index.to(device)]  # [classes, samples, C, H, W]
        self.index = index.to(device)
        self.counts = torch.tensor(counts, dtype=torch.long, device=device)
        self.uneven = min(counts) != width
        self.slots = torch.arange(width, device=device)
        self.support_y = torch.arange(self.ways, device=device).repeat_interleave(self.shots)
        self.query_y = torch.arange(self.ways, device=device).repeat_interleave(self.query_shots)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def draw(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` tasks as ``classes [count, ways]`` (class of label ``c`` in column ``c``) and
        ``slots [count, ways, shots + query_shots]`` (the support slots first)."""
        num_classes, width = self.images.shape[:2]
        keys = torch.rand(count, num_classes, dtype=torch.float64, device=self.device)
        classes = keys.topk(self.ways, dim=1).indices  # [T, ways]: distinct, in random order
        sample_keys = torch.rand(count, self.ways, width, dtype=torch.float64, device=self.device)
        if self.uneven:  # slots past the class's count: keys in [-1, 0), below every real one
            sample_keys = sample_keys - (self.slots >= self.counts[classes].unsqueeze(-1)).to(sample_keys.dtype)
        slots = sample_keys.topk(self.shots + self.query_shots, dim=2).indices  # [T, ways, k]
        return classes, slots

    def image_indices(self, classes: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The reference's image indices ``[T, ways, k]`` of drawn tasks."""
        return self.index[classes.unsqueeze(-1), slots]

    def materialise_batch(self, classes: torch.Tensor, slots: torch.Tensor) -> TaskBatch:
        count = classes.shape[0]
        k = self.shots + self.query_shots
        images = self.images[classes.unsqueeze(-1), slots]  # [T, ways, k, C, H, W] uint8: one gather
        x = images.to(torch.float32).div_(255.0)
        if self.augment is not None:
            x = self.augment(x.view(count * self.ways * k, *x.shape[3:])).view(x.shape)
        image = x.shape[3:]
        return TaskBatch(
            support_x=x[:, :, : self.shots].reshape(count, self.ways * self.shots, *image),
            support_y=self.support_y.expand(count, -1).clone(),
            query_x=x[:, :, self.shots :].reshape(count, self.ways * self.query_shots, *image),
            query_y=self.query_y.expand(count, -1).clone(),
            ways=self.ways,
        )

    def sample_batch(self, count: int) -> TaskBatch:
        """``count`` fresh random tasks, stacked (a ``Sequence[Task]``)."""
        return self.materialise_batch(*self.draw(count))

    def sample(self) -> Task:
        """One fresh random task."""
        return self.sample_batch(1)[0]

    def fixed_tasks(self, count: int, seed: int) -> FixedTasks:
        """The reference sampler's fixed tasks: validation and test tasks do not depend on the sampler."""
        return self.reference.fixed_tasks(count, seed)

    def materialise(self, *drawn: Any) -> Task:
        return self.reference.materialise(*drawn)


def training_sampler(sampler: Sampler, choice: str, split_name: str = "train") -> Sampler:
    """The sampler of meta-training tasks for ``sampler=choice``: the device sampler over a class
    split's learn2learn sampler (``device``), unless its tasks need learn2learn (within_group);
    any other sampler (sinusoids) as it is."""
    if choice not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {choice!r}")
    if choice == "learn2learn" or not isinstance(sampler, TaskSampler):
        return sampler
    if any(isinstance(t, OneGroup) for t in sampler.taskset.task_transforms):
        log.info("sampler=device: the %s split's within_group tasks are drawn by learn2learn's TaskDataset", split_name)
        return sampler
    return DeviceTaskSampler(sampler)


def sample_tasks(sampler: Sampler | Callable[[], Task], count: int) -> Sequence[Task]:
    """A meta-batch of ``count`` fresh tasks: in one draw from a sampler that has ``sample_batch``
    (a :class:`TaskBatch`), else ``count`` calls of ``sample()``."""
    batch = getattr(sampler, "sample_batch", None)
    if batch is not None:
        return batch(count)
    return [sampler.sample() for _ in range(count)]
