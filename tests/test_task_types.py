"""The value types: a task's sequence view (MANN and SNAIL read a task as one sequence)."""

from __future__ import annotations

import torch

from metarun.tasks.types import Task, TaskSplit


def class_sorted_task(ways: int = 4, shots: int = 2, query_shots: int = 3) -> Task:
    """Support and query with distinct inputs: x holds (class, index) so every sample is identifiable."""
    def split(per_class: int, offset: int) -> TaskSplit:
        y = torch.arange(ways).repeat_interleave(per_class)
        x = torch.stack([y.float(), offset + torch.arange(len(y)).float()], dim=1)  # [n, 2]
        return TaskSplit(x, y, ways)

    return Task(support=split(shots, 0), query=split(query_shots, 100))


def test_the_sequence_holds_exactly_the_task_samples_with_permuted_labels():
    task = class_sorted_task()
    for query_last in (False, True):
        seq = task.sequence(torch.Generator().manual_seed(3), query_last=query_last)
        everything = torch.cat([task.support.x, task.query.x])
        assert sorted(map(tuple, seq.x.tolist())) == sorted(map(tuple, everything.tolist()))
        # Each element's label is its original class (x[:, 0]) through the episode's permutation.
        assert torch.equal(seq.y, seq.permutation[seq.x[:, 0].long()])
        assert sorted(seq.permutation.tolist()) == [0, 1, 2, 3]
        assert torch.equal(seq.is_query, seq.x[:, 1] >= 100)
        if query_last:
            assert not seq.is_query[:8].any() and seq.is_query[8:].all()


def test_sequences_are_shuffled_relabelled_per_episode_and_reproducible_from_the_seed():
    task = class_sorted_task()
    a = task.sequence(torch.Generator().manual_seed(0), query_last=False)
    b = task.sequence(torch.Generator().manual_seed(0), query_last=False)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.permutation, b.permutation)
    generator = torch.Generator().manual_seed(0)
    episodes = [task.sequence(generator, query_last=False) for _ in range(20)]
    assert len({tuple(e.permutation.tolist()) for e in episodes}) > 5, "labels are not re-drawn per episode"
    assert len({tuple(e.x[:, 1].tolist()) for e in episodes}) > 5, "order is not shuffled per episode"
    # Not class-sorted: the first labels of the support are not [0, 0, 1, ...] every time.
    assert any(e.y[:4].tolist() != sorted(e.y[:4].tolist()) for e in episodes)
