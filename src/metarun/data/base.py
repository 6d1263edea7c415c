"""Types shared by every dataset family: labelled images of many classes, and class splits.

A dataset module turns files (or a generator) into one :class:`ImageClasses` holding every
class, then :func:`split_by_names` or :func:`split_by_seed` cuts it into train/val/test
classes, and :func:`with_rotations` optionally adds rotated copies as new classes. Tasks are
sampled later, from one split at a time (``metarun.tasks.sampling``).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metarun.checkpoint import atomic_save
from metarun.errors import DatasetError, one_line
from metarun.objectives import Classification, Objective
from metarun.tasks.sampling import TaskSampler

log = logging.getLogger(__name__)

# Bump when the layout of cached ImageClasses files changes.
CACHE_FORMAT = 1

SPLIT_NAMES = ("train", "val", "test")

# Names that stand for several splits in a per-split option (``dataset.rotations``, ``dataset.within_group``).
SPLIT_ALIASES = {"all": frozenset(SPLIT_NAMES), "none": frozenset(), "eval": frozenset({"val", "test"})}


def split_set(value: Any, option: str) -> frozenset[str]:
    """The class splits a per-split dataset option applies to.

    ``true`` or ``"all"``: every split; ``false``, ``"none"`` or null: none; ``"train"``, ``"val"``
    or ``"test"``: that split; ``"eval"``: val and test; a list of these: their union. So
    ``rotations: train`` adds rotated classes to the training split only, and
    ``within_group: test`` draws only the test tasks from one group.

    Raises:
        DatasetError: any other value, naming ``option``.
    """
    if value is None or isinstance(value, bool):
        return frozenset(SPLIT_NAMES) if value else frozenset()
    names = [value] if isinstance(value, str) else value
    try:
        names = list(names)
    except TypeError:
        names = [value]
    chosen: set[str] = set()
    for name in names:
        if isinstance(name, str) and name in SPLIT_ALIASES:
            chosen |= SPLIT_ALIASES[name]
        elif isinstance(name, str) and name in SPLIT_NAMES:
            chosen.add(name)
        else:
            raise DatasetError(
                f"{option} must be true, false, all, none, eval (val and test), a split ({', '.join(SPLIT_NAMES)}) "
                f"or a list of splits, got {value!r}"
            )
    return frozenset(chosen)


@dataclass
class ImageClasses:
    """Labelled images of many classes.

    Attributes:
        images: uint8 tensor ``[N, C, H, W]``; for character data, ink is bright (255) on a
            dark (0) background.
        labels: int64 tensor ``[N]`` with values in ``[0, len(class_names))``.
        class_names: one unique name per class, e.g. ``"Latin/character01"``.
        groups: one group name per class (the alphabet for character data), used by protocols
            that draw every class of a task from one group (Koch et al. 2015).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    groups: list[str]

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be [N] with one label per image")
        if len(self.class_names) != len(self.groups):
            raise ValueError("class_names and groups must have one entry per class")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def samples_per_class(self) -> torch.Tensor:
        """int64 ``[num_classes]``: how many images each class has."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def subset(self, class_indices: list[int]) -> ImageClasses:
        """The given classes only, relabelled ``0..len(class_indices)-1`` in the given order."""
        remap = torch.full((self.num_classes,), -1, dtype=torch.long)
        remap[torch.tensor(class_indices, dtype=torch.long)] = torch.arange(len(class_indices))
        new_labels = remap[self.labels]
        keep = new_labels >= 0
        return ImageClasses(
            images=self.images[keep],
            labels=new_labels[keep],
            class_names=[self.class_names[i] for i in class_indices],
            groups=[self.groups[i] for i in class_indices],
        )


@dataclass
class ClassSplits:
    """Disjoint class splits: meta-train, meta-validation and meta-test classes.

    Attributes:
        within_group: the splits whose tasks draw all their classes from one group (one
            alphabet): Lake et al.'s and Koch et al.'s (2015) within-alphabet protocol; the other
            splits draw classes from the whole split. Given as any value :func:`split_set` takes
            (``True``: every split, ``"test"``, ``["val", "test"]``, ...) and kept as that set.
        objective: what the tasks ask for; labelled classes are classification.
    """

    train: ImageClasses
    val: ImageClasses
    test: ImageClasses
    within_group: bool | str | list[str] | frozenset[str] = False
    objective: Objective = field(default_factory=Classification)

    def __post_init__(self) -> None:
        self.within_group = split_set(self.within_group, "dataset.within_group")

    def items(self) -> list[tuple[str, ImageClasses]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]

    def sampler(self, split_name: str, ways: int, shots: int, query_shots: int, device: torch.device | str,
                augment: Callable[[torch.Tensor], torch.Tensor] | None) -> TaskSampler:
        """N-way K-shot tasks from the classes of ``split_name`` (the ``TaskSource`` interface of
        ``metarun.tasks.sampling``), drawn from one group when ``split_name`` is in :attr:`within_group`;
        ``augment`` transforms their images ``[n, C, H, W]``."""
        classes = dict(self.items())[split_name]
        return TaskSampler(classes, ways, shots, query_shots, device, split_name, split_name in self.within_group,
                           augment)


def split_by_seed(classes: ImageClasses, sizes: tuple[int, int, int], seed: int,
                  rotations: bool | str | list[str] = False) -> ClassSplits:
    """Shuffle the classes with ``random.Random(seed)`` and cut them into train/val/test.

    This is MAML's Omniglot protocol (Finn et al. 2017: a seeded shuffle of the 1623 characters,
    1100 train / 100 val / 423 test). A private RNG keeps the split independent of the run seed
    and of anything else that touched the global RNG (learn2learn's own split does not).

    Args:
        classes: all classes, before rotations.
        sizes: number of train, val and test classes; ``-1`` for test means "all the rest".
        seed: seed of the shuffle.
        rotations: then give every split the rotated copies of its own classes as new classes
            (:func:`with_rotations`; MAML's protocol), so no rotation of a training class is
            seen at validation or test time. Per split: any value :func:`split_set` takes
            (``"train"``: rotated training classes, unrotated validation and test classes).
    """
    rotated = split_set(rotations, "dataset.rotations")
    n_train, n_val, n_test = sizes
    needed = n_train + n_val + max(n_test, 1)
    if min(n_train, n_val) < 1 or n_test == 0 or needed > classes.num_classes:
        raise DatasetError(
            f"class split {n_train}/{n_val}/{n_test} (train/val/test) needs at least {needed} classes but the "
            f"dataset has {classes.num_classes}; set dataset.split_sizes to fit"
        )
    if n_test < 0:
        n_test = classes.num_classes - n_train - n_val
    order = list(range(classes.num_classes))
    random.Random(seed).shuffle(order)
    cuts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val : n_train + n_val + n_test])
    parts = [classes.subset(sorted(c)) for c in cuts]
    return ClassSplits(*(with_rotations(p) if name in rotated else p for name, p in zip(SPLIT_NAMES, parts, strict=True)))


def with_rotations(classes: ImageClasses, angles: tuple[int, ...] = (0, 90, 180, 270)) -> ImageClasses:
    """Rotated copies of every class as new classes (Santoro et al. 2016; Finn et al. 2017).

    Class ``c`` rotated by ``angles[r]`` becomes class ``c * len(angles) + r`` and is named
    ``"<name>/rot<angle:03d>"`` (the naming of Vinyals et al.'s split files).
    """
    if any(a % 90 for a in angles):
        raise ValueError(f"rotations must be multiples of 90 degrees, got {angles}")
    images, labels = [], []
    for r, angle in enumerate(angles):
        images.append(torch.rot90(classes.images, k=angle // 90, dims=(2, 3)))
        labels.append(classes.labels * len(angles) + r)
    order = torch.argsort(torch.cat(labels), stable=True)
    return ImageClasses(
        images=torch.cat(images)[order],
        labels=torch.cat(labels)[order],
        class_names=[f"{name}/rot{angle:03d}" for name in classes.class_names for angle in angles],
        groups=[group for group in classes.groups for _ in angles],
    )


def split_by_names(classes: ImageClasses, names: dict[str, list[str]]) -> ClassSplits:
    """Cut ``classes`` into the splits listed by name (e.g. Vinyals et al.'s Omniglot split).

    Args:
        classes: the classes the names refer to (already rotated when the lists name rotations).
        names: ``{"train": [...], "val": [...], "test": [...]}`` of class names.

    Raises:
        DatasetError: a listed class is not in the dataset, or a class is listed twice.
    """
    index = {name: i for i, name in enumerate(classes.class_names)}
    seen: set[str] = set()
    parts = []
    for split in ("train", "val", "test"):
        wanted = names[split]
        missing = [n for n in wanted if n not in index]
        if missing:
            raise DatasetError(
                f"{len(missing)} classes of the {split} split list are not in the dataset "
                f"(first: {missing[0]!r}); check dataset.split_dir and dataset.rotations"
            )
        twice = seen.intersection(wanted)
        if twice:
            raise DatasetError(f"class {sorted(twice)[0]!r} is listed in two splits; the split lists must be disjoint")
        seen.update(wanted)
        parts.append(classes.subset([index[n] for n in wanted]))
    return ClassSplits(*parts)


def split_by_groups(classes: ImageClasses, groups: dict[str, list[str]]) -> ClassSplits:
    """Cut ``classes`` by group: every class of a group listed under ``"train"`` goes to train, etc.

    Koch et al. (2015) split Omniglot this way, by alphabet, so that no test alphabet is seen in
    training.

    Raises:
        DatasetError: a listed group has no classes, or a group is listed twice.
    """
    present = set(classes.groups)
    seen: set[str] = set()
    parts = []
    for split in ("train", "val", "test"):
        wanted = set(groups[split])
        missing = sorted(wanted - present)
        if missing:
            raise DatasetError(f"group {missing[0]!r} of the {split} split is not in the dataset; check the split")
        if seen & wanted:
            raise DatasetError(f"group {sorted(seen & wanted)[0]!r} is listed in two splits; they must be disjoint")
        seen |= wanted
        parts.append(classes.subset([i for i, g in enumerate(classes.groups) if g in wanted]))
    return ClassSplits(*parts)


def check_split_sizes(split_sizes: object) -> tuple[int, int, int]:
    """``dataset.split_sizes`` as three ints ``(train, val, test)``, test ``-1`` meaning "the rest".

    Hydra hands over a ListConfig; anything that iterates into three ints will do.
    """
    try:
        sizes = tuple(split_sizes)  # type: ignore[call-overload]
    except TypeError:
        sizes = ()
    if len(sizes) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise DatasetError(
            f"dataset.split_sizes must be three ints [train, val, test] (test -1 = the rest), got {split_sizes!r}"
        )
    return sizes  # type: ignore[return-value]


def cache_dir(path: str | None) -> Path:
    """Where decoded or generated datasets are cached: ``path``, else ``$METARUN_CACHE``, else ``~/.cache/metarun``."""
    return Path(path or os.environ.get("METARUN_CACHE") or "~/.cache/metarun").expanduser()


def cached_classes(path: Path, build: Callable[[], ImageClasses], what: str) -> ImageClasses:
    """The :class:`ImageClasses` cached at ``path``, or ``build()`` saved there for next time.

    The caller names ``path`` by a hash of everything that determines the content, so a stale
    file is never read. A file that does not load is rebuilt with a warning; a cache that
    cannot be written costs time on the next run, so it is a warning too, never an error.
    Writes are atomic (:func:`metarun.checkpoint.atomic_save`).
    """
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("format") != CACHE_FORMAT:
                raise ValueError(f"cache format {payload.get('format')}, expected {CACHE_FORMAT}")
            classes = ImageClasses(payload["images"], payload["labels"], list(payload["class_names"]),
                                   list(payload["groups"]))
            if classes.images.dtype != torch.uint8:
                raise ValueError(f"images are {classes.images.dtype}, expected uint8")
            return classes
        except Exception as error:  # noqa: BLE001 - any unreadable cache (truncated, old, foreign) is rebuilt
            log.warning("unreadable %s cache %s (%s); regenerating it", what, path, one_line(error))
    classes = build()
    payload = {"format": CACHE_FORMAT, "images": classes.images, "labels": classes.labels,
               "class_names": classes.class_names, "groups": classes.groups}
    try:
        atomic_save(payload, path)
        log.info("cached %s images in %s", what, path)
    except OSError as error:
        log.warning("could not write the %s cache %s (%s); continuing without it", what, path, one_line(error))
    return classes
