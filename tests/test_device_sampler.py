"""The device sampler (metarun.tasks.device) draws learn2learn's task distribution, without host syncs.

Both samplers draw many tasks from a toy split whose classes have different sizes and whose image
``i`` is filled with the value ``i`` (so a task's pixels tell which images it drew). For each:
every task has ``ways`` distinct classes, one class per label, no image twice, and support and
query disjoint; and the two samplers agree (chi-square tests of homogeneity at the 0.1% level, on
fixed seeds, so the test is deterministic) on how often each class is drawn, how often each image
is drawn and is in the support set, and on the labels' assignment to classes.
"""

from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import chi2, chi2_contingency

from metarun.data.base import ImageClasses
from metarun.errors import ConfigError
from metarun.tasks.device import DeviceTaskSampler, sample_tasks, training_sampler
from metarun.tasks.sampling import TaskSampler
from metarun.tasks.types import TaskBatch
from test_vectorized import HostSyncs

COUNTS = [4, 5, 6, 7, 8, 4, 5, 6, 7, 8]  # samples per class: uneven, so padding must never be drawn
WAYS, SHOTS, QUERY = 3, 1, 2
TASKS = 3000
LEVEL = 1e-3


def toy_classes(counts=COUNTS, groups=None) -> ImageClasses:
    labels = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return ImageClasses(images, labels, [f"c{i}" for i in range(len(counts))], groups or ["g"] * len(counts))


def ids(x: torch.Tensor) -> torch.Tensor:
    """Image indices from pixel values (the device sampler must give back exactly k / 255)."""
    values = x[..., 0, 0, 0] * 255
    assert torch.equal(values, values.round()), "pixel values are not exactly k / 255"
    return values.round().long()


def draws(kind: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``TASKS`` tasks as (support ids, support labels, query ids, query labels)."""
    random.seed(1)
    torch.manual_seed(1)
    reference = TaskSampler(toy_classes(), WAYS, SHOTS, QUERY)
    if kind == "learn2learn":
        tasks = [reference.sample() for _ in range(TASKS)]
    else:
        batch = DeviceTaskSampler(reference).sample_batch(TASKS)
        assert isinstance(batch, TaskBatch) and batch.support_x.shape == (TASKS, WAYS * SHOTS, 1, 2, 2)
        tasks = list(batch)
    return [(ids(t.support.x), t.support.y, ids(t.query.x), t.query.y) for t in tasks]


@pytest.fixture(scope="module")
def drawn():
    return {kind: draws(kind) for kind in ("learn2learn", "device")}


def class_of() -> torch.Tensor:
    return toy_classes().labels


@pytest.mark.parametrize("kind", ["learn2learn", "device"])
def test_every_task_is_well_formed(drawn, kind):
    labels = class_of()
    for support, support_y, query, query_y in drawn[kind]:
        assert torch.bincount(support_y, minlength=WAYS).tolist() == [SHOTS] * WAYS
        assert torch.bincount(query_y, minlength=WAYS).tolist() == [QUERY] * WAYS
        everything = torch.cat([support, query])
        assert len(set(everything.tolist())) == len(everything), "an image drawn twice (support/query overlap)"
        classes = {}
        for image, label in zip(everything.tolist(), torch.cat([support_y, query_y]).tolist(), strict=True):
            classes.setdefault(label, set()).add(int(labels[image]))
        assert all(len(c) == 1 for c in classes.values()), "a label mixes classes"
        assert len({next(iter(c)) for c in classes.values()}) == WAYS, "a class appears under two labels"


def frequencies(tasks) -> dict[str, torch.Tensor]:
    labels = class_of()
    n_images = len(labels)
    out = {"class": torch.zeros(len(COUNTS)), "image": torch.zeros(n_images), "support": torch.zeros(n_images),
           "rank of label 0's class": torch.zeros(WAYS)}
    for support, support_y, query, _ in tasks:
        out["class"] += torch.bincount(labels[support], minlength=len(COUNTS)).float()
        out["image"] += torch.bincount(torch.cat([support, query]), minlength=n_images).float()
        out["support"] += torch.bincount(support, minlength=n_images).float()
        task_classes = labels[support]  # SHOTS == 1: one support image per label, in label order below
        order = task_classes[torch.argsort(support_y)]
        out["rank of label 0's class"][(order < order[0]).sum()] += 1
    return out


def test_the_samplers_draw_the_same_task_distribution(drawn):
    ours, theirs = frequencies(drawn["device"]), frequencies(drawn["learn2learn"])
    # Classes are uniform (each task has WAYS of the 10), for both.
    for counts in (ours["class"], theirs["class"]):
        expected = TASKS * WAYS / len(COUNTS)
        statistic = float(((counts - expected) ** 2 / expected).sum())
        assert statistic < chi2.ppf(1 - LEVEL, len(COUNTS) - 1), counts
    for key in ours:
        table = torch.stack([ours[key], theirs[key]]).numpy()
        _, p, _, _ = chi2_contingency(table)
        assert p > LEVEL, f"{key}: the samplers differ (p = {p:.2g})\n{table}"
    # Within a class every image is equally likely: an image of a class of n is drawn TASKS*WAYS/10 * 3/n times.
    labels = class_of()
    per_class = torch.tensor(COUNTS, dtype=torch.float)[labels]
    expected = ours["class"][labels] * (SHOTS + QUERY) / per_class
    statistic = float(((ours["image"] - expected) ** 2 / expected).sum())
    assert statistic < chi2.ppf(1 - LEVEL, len(labels) - len(COUNTS)), "images within a class are not uniform"


def test_the_distribution_test_can_fail(drawn):
    """A sampler that always labels the classes in increasing order is caught."""
    biased = []
    labels = class_of()
    for support, support_y, query, query_y in drawn["device"]:
        rank = torch.argsort(torch.argsort(labels[support]))  # SHOTS == 1: label -> rank of its class
        biased.append((support, rank[support_y], query, rank[query_y]))
    ours, theirs = frequencies(biased), frequencies(drawn["learn2learn"])
    _, p, _, _ = chi2_contingency(torch.stack([ours["rank of label 0's class"],
                                               theirs["rank of label 0's class"]]).numpy())
    assert p < LEVEL


def test_sampling_a_meta_batch_makes_no_host_sync():
    reference = TaskSampler(toy_classes(), WAYS, SHOTS, QUERY)
    sampler = DeviceTaskSampler(reference)
    with HostSyncs() as device:
        sample_tasks(sampler, 32)
    assert device.calls == []
    with HostSyncs() as learn2learn:  # today's sampler, for contrast: its masks and nonzero per class
        sample_tasks(reference, 32)
    assert sum(c in ("nonzero", "__getitem__[bool mask]", "__setitem__[bool mask]") for c in learn2learn.calls) > 32


def test_images_and_augmentation_reach_the_batch():
    calls = []

    def augment(x):
        calls.append(tuple(x.shape))
        return 1.0 - x

    reference = TaskSampler(toy_classes(), WAYS, SHOTS, QUERY, augment=augment)
    batch = DeviceTaskSampler(reference).sample_batch(5)
    assert calls == [(5 * WAYS * (SHOTS + QUERY), 1, 2, 2)]  # one call for the whole meta-batch
    values = (1.0 - batch.query_x[..., 0, 0, 0]) * 255  # the augmentation undone: the stored images' values
    assert torch.allclose(values, values.round(), atol=1e-4) and int(values.round().max()) < sum(COUNTS)


def test_within_group_tasks_stay_with_learn2learn():
    classes = toy_classes(groups=["a"] * 5 + ["b"] * 5)
    grouped = TaskSampler(classes, WAYS, SHOTS, QUERY, within_group=True)
    assert training_sampler(grouped, "device") is grouped
    with pytest.raises(ConfigError, match="within_group"):
        DeviceTaskSampler(grouped)
    plain = TaskSampler(classes, WAYS, SHOTS, QUERY)
    assert isinstance(training_sampler(plain, "device"), DeviceTaskSampler)
    assert training_sampler(plain, "learn2learn") is plain


def test_the_run_config_chooses_the_sampler(compose_cfg):
    from metarun.build import build_data

    train, val, _, _ = build_data(compose_cfg(), torch.device("cpu"))
    assert isinstance(train, DeviceTaskSampler)
    assert isinstance(val.sampler, TaskSampler)  # fixed tasks: learn2learn's, whatever the training sampler
    train, _, _, _ = build_data(compose_cfg("sampler=learn2learn"), torch.device("cpu"))
    assert isinstance(train, TaskSampler)
