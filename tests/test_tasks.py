"""Task sampling through learn2learn: shapes, labels, support/query split, fixed evaluation tasks."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from metarun.data.base import ClassSplits, DatasetError, ImageClasses
from metarun.tasks.sampling import TaskSampler


def toy_classes(num_classes: int = 12, per_class: int = 6) -> ImageClasses:
    """Image i is filled with the value i, so a task's images reveal which samples were drawn."""
    n = num_classes * per_class
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    return ImageClasses(
        images=images.to(torch.uint8),
        labels=torch.arange(num_classes).repeat_interleave(per_class),
        class_names=[f"c{i}" for i in range(num_classes)],
        groups=["g"] * num_classes,
    )


def sample_ids(split) -> list[int]:
    return [round(v * 255) for v in split.x[:, 0, 0, 0].tolist()]


def test_task_shapes_labels_and_disjoint_support_query():
    classes = toy_classes()
    sampler = TaskSampler(classes, ways=5, shots=2, query_shots=3)
    for _ in range(20):
        task = sampler.sample()
        assert task.support.x.shape == (10, 1, 4, 4) and task.query.x.shape == (15, 1, 4, 4)
        assert task.support.x.dtype == torch.float32 and float(task.support.x.max()) <= 1.0
        for split, per_class in ((task.support, 2), (task.query, 3)):
            assert split.y.min() >= 0 and split.y.max() < 5
            assert torch.bincount(split.y, minlength=5).tolist() == [per_class] * 5
        support_ids, query_ids = sample_ids(task.support), sample_ids(task.query)
        assert not set(support_ids) & set(query_ids)
        # Split by label, never by position: a task label names one original class on both sides.
        original = {}
        for ids, split in ((support_ids, task.support), (query_ids, task.query)):
            for sample, label in zip(ids, split.y.tolist(), strict=True):
                original.setdefault(label, set()).add(int(classes.labels[sample]))
        assert all(len(c) == 1 for c in original.values())
        assert len(set().union(*original.values())) == 5


def test_training_tasks_are_fresh():
    sampler = TaskSampler(toy_classes(), ways=5, shots=1, query_shots=1)
    drawn = {tuple(sample_ids(sampler.sample().support)) for _ in range(10)}
    assert len(drawn) > 5


def test_fixed_tasks_depend_only_on_seed_and_restore_global_rng():
    sampler = TaskSampler(toy_classes(), ways=5, shots=1, query_shots=2)
    random.seed(123)
    before = random.getstate()
    first = [sample_ids(t.query) for t in sampler.fixed_tasks(8, seed=7)]
    assert random.getstate() == before
    random.seed(999)
    again = [sample_ids(t.query) for t in sampler.fixed_tasks(8, seed=7)]
    other = [sample_ids(t.query) for t in sampler.fixed_tasks(8, seed=8)]
    assert first == again
    assert first != other
    tasks = sampler.fixed_tasks(3, seed=1)
    assert [sample_ids(t.support) for t in tasks] == [sample_ids(t.support) for t in tasks]  # re-iterable


def test_ways_larger_than_classes_is_one_clear_error():
    with pytest.raises(DatasetError, match=r"ways=20 but the val split has only 12 classes"):
        TaskSampler(toy_classes(), ways=20, shots=1, query_shots=1, split_name="val")


def test_shots_plus_query_larger_than_samples_is_one_clear_error():
    with pytest.raises(DatasetError, match=r"shots \+ query_shots = 7 .* only 6 samples"):
        TaskSampler(toy_classes(), ways=5, shots=2, query_shots=5)


def grouped_classes() -> ImageClasses:
    """12 classes in groups of 2, 4 and 6 classes."""
    classes = toy_classes(num_classes=12)
    classes.groups = ["a"] * 2 + ["b"] * 4 + ["c"] * 6
    return classes


def test_within_group_tasks_draw_all_classes_from_one_eligible_group():
    classes = grouped_classes()
    sampler = TaskSampler(classes, ways=3, shots=1, query_shots=1, within_group=True)
    seen_groups = set()
    for _ in range(60):
        task = sampler.sample()
        class_of = [i // 6 for i in sample_ids(task.support)]  # toy image i belongs to class i // 6
        groups = {classes.groups[c] for c in class_of}
        assert len(groups) == 1 and len(set(class_of)) == 3
        seen_groups |= groups
    assert seen_groups == {"b", "c"}, "group 'a' has 2 < ways classes and is never drawn; the others are"


def test_without_within_group_tasks_mix_groups():
    classes = grouped_classes()
    sampler = TaskSampler(classes, ways=3, shots=1, query_shots=1)
    mixed = sum(len({classes.groups[i // 6] for i in sample_ids(sampler.sample().support)}) > 1 for _ in range(30))
    assert mixed > 10


def test_within_group_without_a_large_enough_group_is_one_clear_error():
    with pytest.raises(DatasetError, match=r"ways=7 classes but the largest of the train split has 6.*within_group=test"):
        TaskSampler(grouped_classes(), ways=7, shots=1, query_shots=1, within_group=True)


def test_a_group_too_small_for_training_tasks_blames_train_ways_and_for_evaluation_tasks_ways():
    with pytest.raises(DatasetError, match=r"^within_group tasks need a group with train_ways=7 classes .* lower "
                                           r"train_ways, or leave the train split out of dataset.within_group"):
        TaskSampler(grouped_classes(), ways=7, shots=1, query_shots=1, split_name="train", within_group=True)
    with pytest.raises(DatasetError, match=r"^within_group tasks need a group with ways=7 classes but the largest of "
                                           r"the test split has 6; lower ways,"):
        TaskSampler(grouped_classes(), ways=7, shots=1, query_shots=1, split_name="test", within_group=True)


def test_groups_too_small_are_skipped_and_the_log_says_how_many_once(caplog):
    with caplog.at_level(logging.INFO, logger="metarun.tasks.sampling"):
        sampler = TaskSampler(grouped_classes(), ways=3, shots=1, query_shots=1, split_name="test", within_group=True)
        for _ in range(5):
            sampler.sample()
    said = [r.getMessage() for r in caplog.records if "never drawn" in r.getMessage()]
    assert said == ["within_group test tasks: 1 of 3 groups have fewer than ways=3 classes and are never drawn"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="metarun.tasks.sampling"):
        TaskSampler(grouped_classes(), ways=2, shots=1, query_shots=1, within_group=True)
    assert not [r for r in caplog.records if "never drawn" in r.getMessage()]  # every group is large enough


@pytest.mark.parametrize(("within_group", "grouped"), [
    ("test", {"test"}), (["val", "test"], {"val", "test"}), ("eval", {"val", "test"}), (True, {"train", "val", "test"}),
    ("all", {"train", "val", "test"}), (False, set()), ("none", set()), (["train"], {"train"}),
])
def test_within_group_can_name_the_splits_whose_tasks_stay_in_one_group(within_group, grouped):
    classes = grouped_classes()
    splits = ClassSplits(train=classes, val=classes, test=classes, within_group=within_group)
    assert splits.within_group == grouped
    for name in ("train", "val", "test"):
        sampler = splits.sampler(name, ways=3, shots=1, query_shots=1, device="cpu", augment=None)
        mixed = sum(len({classes.groups[i // 6] for i in sample_ids(sampler.sample().support)}) > 1 for _ in range(30))
        assert (mixed == 0) == (name in grouped), name


def test_a_bad_within_group_value_is_one_clear_error():
    with pytest.raises(DatasetError, match=r"dataset.within_group must be true, false, all, none, eval .* got \['tset'\]"):
        ClassSplits(train=toy_classes(), val=toy_classes(), test=toy_classes(), within_group=["tset"])


def test_training_across_groups_and_testing_within_one_from_the_config(compose_cfg):
    """``train_ways=8 ways=3 dataset.within_group=test``: training tasks mix alphabets, test tasks
    draw all their classes from one (a Hydra override gives the string ``test``)."""
    from hydra.utils import instantiate

    from metarun.build import build_data

    cfg = compose_cfg("dataset.num_alphabets=2", "dataset.characters_per_alphabet=20", "dataset.split_sizes=[20,10,-1]",
                      "train_ways=8", "ways=3", "dataset.within_group=test")
    build_data(cfg, torch.device("cpu"))  # the run's data path takes it
    splits = instantiate(cfg.dataset, _convert_="all")
    assert splits.within_group == {"test"}
    for name, ways, one_group in (("train", 8, False), ("test", 3, True)):
        sampler = splits.sampler(name, ways, 1, 1, "cpu", None)
        classes = dict(splits.items())[name]
        groups = [len({classes.groups[int(classes.labels[i])] for i in sampler.sample_indices()[0]}) for _ in range(20)]
        assert all(g == 1 for g in groups) == one_group, name
