"""SNAIL: causality of every block, the TC block's dilations, the attention mask, the label
permutation's round trip, and a learning check on glyphs."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms.snail import (
    SNAIL,
    AttentionBlock,
    DenseBlock,
    SequenceModel,
    TCBlock,
    first_appearance,
    tc_dilations,
)
from metarun.errors import ConfigError
from metarun.objectives import Regression
from metarun.tasks.types import Task, TaskSplit
from test_metric import trained_and_untrained

SMALL = [{"attention": [8, 4]}, {"tc": 6}, {"attention": [8, 4]}, {"tc": 6}, {"attention": [8, 4]}]


class Flat(torch.nn.Flatten):
    """A 'backbone' whose features are the inputs themselves (``[n, D] -> [n, D]``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_features = dim


# ---------------------------------------------------------------------------------------------
# Causality: an output never depends on a later input
# ---------------------------------------------------------------------------------------------


BLOCKS = {
    "attention": lambda: AttentionBlock(5, key_size=4, value_size=3),
    "dense-d1": lambda: DenseBlock(5, dilation=1, filters=4),
    "dense-d4": lambda: DenseBlock(5, dilation=4, filters=4),
    "tc": lambda: TCBlock(5, sequence_length=11, filters=4),
    "model": lambda: SequenceModel(5, outputs=3, sequence_length=11, blocks=SMALL),
}


@pytest.mark.parametrize("name", BLOCKS)
def test_changing_a_later_element_never_changes_an_earlier_output(name):
    torch.manual_seed(0)
    block = BLOCKS[name]()
    x = torch.randn(2, 11, 5)
    out = block(x)
    for t in range(11):
        perturbed = x.clone()
        perturbed[:, t] += torch.randn(2, 5)
        changed = block(perturbed)
        assert torch.equal(changed[:, :t], out[:, :t]), f"{name}: outputs before {t} saw position {t}"
        assert not torch.allclose(changed[:, t], out[:, t]), f"{name}: position {t} ignores its own input"


@pytest.mark.parametrize("name", ["tc", "model"])
def test_every_output_depends_on_every_earlier_input(name):
    """The receptive field covers the sequence: d out[t] / d x[s] is nonzero for every s <= t, zero after."""
    torch.manual_seed(0)
    block = BLOCKS[name]()
    x = torch.randn(1, 11, 5, requires_grad=True)
    out = block(x)
    for t in range(11):
        (grad,) = torch.autograd.grad(out[0, t].sum(), x, retain_graph=True)
        reach = grad[0].abs().sum(dim=1)  # [T]
        assert bool((reach[: t + 1] > 0).all()), f"{name}: position {t} cannot see {(reach[: t + 1] == 0).nonzero()}"
        assert bool((reach[t + 1:] == 0).all())


def test_the_tc_block_alone_reaches_every_earlier_position():
    """Through the convolutions only (no attention): dilations 1, 2, 4, ... reach every offset < 2^n."""
    torch.manual_seed(0)
    block = TCBlock(3, sequence_length=16, filters=4)
    x = torch.randn(1, 16, 3, requires_grad=True)
    new = block(x)[0, :, 3:]  # the dense blocks' outputs, without the input passed through
    (grad,) = torch.autograd.grad(new[15].sum(), x)
    assert bool((grad[0].abs().sum(dim=1) > 0).all()), "the last position does not see every earlier one"


# ---------------------------------------------------------------------------------------------
# The blocks' shapes and the attention mask
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,dilations", [(2, [1]), (3, [1, 2]), (6, [1, 2, 4]), (8, [1, 2, 4]),
                                              (9, [1, 2, 4, 8]), (26, [1, 2, 4, 8, 16]), (101, [1, 2, 4, 8, 16, 32, 64])])
def test_tc_block_dilations_and_output_size(length, dilations):
    """ceil(log2 T) dense blocks (the paper's TCBlock(T, D)), each adding D channels."""
    assert tc_dilations(length) == dilations
    block = TCBlock(7, sequence_length=length, filters=5)
    assert [b.conv.dilation for b in block.blocks] == dilations
    assert [b.conv.conv.dilation[0] for b in block.blocks] == dilations
    assert block.out_channels == 7 + 5 * len(dilations)
    assert block(torch.randn(3, length, 7)).shape == (3, length, 7 + 5 * len(dilations))
    assert block(torch.randn(3, 2 * length, 7)).shape == (3, 2 * length, block.out_channels)  # any length runs


def test_dense_block_is_a_gated_causal_convolution_concatenated_to_its_input():
    torch.manual_seed(0)
    block = DenseBlock(3, dilation=2, filters=4)
    x = torch.randn(2, 6, 3)
    w, b = block.conv.conv.weight, block.conv.conv.bias  # [8, 3, 2], [8]
    previous = torch.cat([torch.zeros(2, 2, 3), x[:, :-2]], dim=1)  # x[t - 2], zero before the start
    pre = previous @ w[:, :, 0].T + x @ w[:, :, 1].T + b  # [2, 6, 8]
    expected = torch.tanh(pre[..., :4]) * torch.sigmoid(pre[..., 4:])
    out = block(x)
    assert out.shape == (2, 6, 7)
    assert torch.equal(out[..., :3], x)
    torch.testing.assert_close(out[..., 3:], expected)


def test_attention_weights_are_causal_distributions():
    torch.manual_seed(0)
    block = AttentionBlock(5, key_size=4, value_size=3)
    x = torch.randn(2, 7, 5)
    weights = block.weights(x)  # [2, 7, 7]
    above = torch.ones(7, 7, dtype=torch.bool).triu(diagonal=1)
    assert bool((weights[:, above] == 0).all()), "a position attends to a later one"
    assert bool((weights[:, ~above] > 0).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 7))
    # The read is the weighted sum of the values, scaled dot-product logits.
    logits = block.query(x) @ block.key(x).transpose(1, 2) / 2.0  # sqrt(key_size = 4)
    expected = logits.masked_fill(above, float("-inf")).softmax(-1)
    torch.testing.assert_close(weights, expected)
    out = block(x)
    assert out.shape == (2, 7, 8) and torch.equal(out[..., :5], x)
    torch.testing.assert_close(out[..., 5:], weights @ block.value(x))


def test_the_paper_architecture_sizes():
    """AttentionBlock(64, 32), TCBlock(T, 128), AttentionBlock(256, 128), TCBlock(T, 128), AttentionBlock(512, 256)
    on a 64-d embedding and 5-way one-hot labels, T = 6 (5-way 1-shot): 3 dense blocks per TC block."""
    paper = [{"attention": [64, 32]}, {"tc": 128}, {"attention": [256, 128]}, {"tc": 128}, {"attention": [512, 256]}]
    model = SNAIL(Flat(64), ways=5, train_shots=1, blocks=paper).model
    sizes = [block.out_channels for block in model.blocks]
    assert sizes == [69 + 32, 101 + 3 * 128, 485 + 128, 613 + 3 * 128, 997 + 256]
    assert (model.head.in_features, model.head.out_features) == (1253, 5)


@pytest.mark.parametrize("blocks,message", [
    ([], "empty"),
    ([{"conv": 3}], "unknown block 'conv'"),
    ([{"attention": [8]}], r"\[key_size, value_size\]"),
    ([{"tc": 0}], "filters"),
    ([{"tc": 4, "attention": [4, 4]}], "every block is"),
])
def test_bad_blocks_are_one_clear_error(blocks, message):
    with pytest.raises(ConfigError, match=message):
        SNAIL(Flat(4), ways=2, train_shots=1, blocks=blocks)


def test_snail_refuses_regression():
    with pytest.raises(ConfigError, match="needs a classification dataset.*algorithm=maml"):
        SNAIL(Flat(4), ways=2, train_shots=1, blocks=SMALL, objective=Regression())


def test_labels_and_outputs_cover_the_widest_task():
    """train_ways > ways: one-hot labels and outputs of size max(ways, train_ways); an N-way task reads N."""
    net = SNAIL(Flat(4), ways=3, train_shots=2, blocks=SMALL, train_ways=7)
    assert net.labels == 7 and net.model.head.out_features == 7 and net.sequence_length == 15
    assert net.model.blocks[0].key.in_features == 4 + 7
    support = TaskSplit(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    learner = net.adapt(support, 0)
    assert learner(torch.randn(5, 4)).shape == (5, 3)


# ---------------------------------------------------------------------------------------------
# Episodes: the label permutation and its round trip
# ---------------------------------------------------------------------------------------------


class NearestLabel(torch.nn.Module):
    """A hand-made 'sequence model' that is right by construction: at the last position, the label
    one-hot of the earlier element whose embedding is nearest. ``[B, T, E + L] -> [B, T, L]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embeddings, labels = x[..., : self.dim], x[..., self.dim:]
        distance = ((embeddings[:, :-1] - embeddings[:, -1:]) ** 2).sum(-1)  # [B, T - 1]
        nearest = labels[torch.arange(len(x)), distance.argmin(1)]  # [B, L]
        return 10 * nearest[:, None].expand(-1, x.shape[1], -1)


def separable_task(ways: int = 5, shots: int = 2) -> Task:
    """Class k's samples are near k * e_0: a query's nearest support sample is of its own class."""
    def split(per_class: int) -> TaskSplit:
        y = torch.arange(ways).repeat_interleave(per_class)
        x = torch.randn(len(y), 3) * 0.01
        x[:, 0] += y.float()
        return TaskSplit(x, y, ways)

    return Task(support=split(shots), query=split(3))


def test_predictions_are_mapped_back_to_the_task_labels_whatever_the_permutation():
    """With a model that answers the nearest support sample's shown label, the result in the task's
    label space is right for every episode drawn; without the mapping it would be the shown labels."""
    torch.manual_seed(0)
    net = SNAIL(Flat(3), ways=5, train_shots=2, blocks=SMALL)
    net.model = NearestLabel(3)
    task = separable_task()
    net.train()
    drawn = set()
    for _ in range(8):
        learner = net.adapt(task.support, 0)  # training mode with gradients: a random episode each time
        drawn.add(tuple(learner.permutation.tolist()))
        result = net.score(learner, task.query)
        assert float(result.accuracy) == 1.0
        assert torch.equal(result.predictions.argmax(1), task.query.y)
    assert len(drawn) > 4, "the label permutation is not re-drawn per training episode"
    assert any(p != tuple(range(5)) and p != tuple(torch.tensor(p).argsort().tolist()) for p in drawn)


def test_the_episode_shows_each_support_sample_with_its_permuted_label():
    torch.manual_seed(0)
    task = separable_task(ways=4, shots=3)
    net = SNAIL(Flat(3), ways=4, train_shots=3, blocks=SMALL)
    net.train()
    learner = net.adapt(task.support, 0)
    classes = learner.support[:, 0].round().long()  # each sample's task class, read off its input
    assert torch.equal(learner.shown, learner.permutation[classes])
    assert sorted(learner.support[:, 0].round().tolist()) == sorted(task.support.x[:, 0].round().tolist())
    assert learner.shown.tolist() != sorted(learner.shown.tolist()), "the support is not shuffled"
    # The sequences: the support with one-hot labels, then the query with a zero label.
    queries = torch.randn(2, 3)
    sequences = learner.sequences(queries)  # [2, 13, 3 + 4]
    assert sequences.shape == (2, 13, 7)
    assert torch.equal(sequences[0, :12, 3:], torch.nn.functional.one_hot(learner.shown, 4).float())
    assert torch.equal(sequences[:, 12, 3:], torch.zeros(2, 4)) and torch.equal(sequences[:, 12, :3], queries)
    # The scores at the query position, reordered into the task's label space.
    scores = net.model(sequences)[:, -1]
    assert torch.equal(learner(queries), scores[:, learner.permutation])


def test_evaluation_episodes_are_a_function_of_the_task_and_equivariant_to_relabelling():
    torch.manual_seed(0)
    net = SNAIL(Flat(3), ways=5, train_shots=2, blocks=SMALL).eval()
    task = separable_task()
    with torch.no_grad():
        first = net.run_task(task, 0, every_step=False)[0]
        torch.manual_seed(123)  # evaluation draws nothing from the global RNG
        again = net.run_task(task, 0, every_step=False)[0]
    assert torch.equal(first.predictions, again.predictions)
    # Relabelling the classes permutes the class scores the same way (the canonical first-appearance names).
    relabel = torch.tensor([3, 0, 4, 2, 1])
    relabelled = Task(TaskSplit(task.support.x, relabel[task.support.y], 5), TaskSplit(task.query.x, relabel[task.query.y], 5))
    with torch.no_grad():
        permuted = net.run_task(relabelled, 0, every_step=False)[0]
    # (Equal up to rounding: the softmax sums the same scores in another column order.)
    torch.testing.assert_close(permuted.predictions[:, relabel], first.predictions, rtol=0, atol=1e-6)
    assert not torch.allclose(first.predictions, first.predictions[:, relabel], rtol=0, atol=1e-4)
    # Other images, another episode: evaluation does not show every task in one fixed order.
    episodes = {tuple(net.adapt(separable_task().support, 0).shown.tolist()) for _ in range(6)}
    assert len(episodes) > 1


def test_first_appearance_names_classes_by_their_order_in_the_support():
    y = torch.tensor([2, 2, 0, 3, 0, 1])
    rank = first_appearance(y, 5)
    assert rank[y].tolist() == [0, 0, 1, 2, 1, 3]
    assert rank.tolist() == [1, 3, 0, 2, 4]  # class 4 is absent: last
    relabel = torch.tensor([4, 0, 1, 3, 2])
    assert torch.equal(first_appearance(relabel[y], 5)[relabel[y]], rank[y])


# ---------------------------------------------------------------------------------------------
# Learning check
# ---------------------------------------------------------------------------------------------


# A small SNAIL (the paper's five blocks, narrower; Conv4-32) with 5 queries per class in training:
# SNAIL's loss sits at ln 5 for its first ~100-150 updates (attention has to learn to match a query with its support
# sample) and then drops fast, so the check buys updates (300 of 4 tasks, Adam 3e-3) rather than wide batches.
SMALL_RUN = [
    "algorithm.blocks=[{attention:[32,16]},{tc:32},{attention:[64,32]},{tc:32},{attention:[64,32]}]",
    "backbone.hidden=32", "optimizer.lr=0.003", "iterations=300", "meta_batch_size=4", "train_query_shots=5",
]


def test_snail_learns_glyphs(compose_cfg, tmp_path):
    """Measured (seed 0): 0.604 after training, 0.186 before, on the same 100 test tasks (seed 1: 0.434 / 0.188);
    about 35 s of CPU time on one core."""
    trained, untrained = trained_and_untrained(compose_cfg, tmp_path, "dataset=glyphs", "algorithm=snail", *SMALL_RUN)
    assert trained > untrained + 0.15, f"snail: {untrained:.3f} before training, {trained:.3f} after"
    assert trained > 0.35, f"snail: {trained:.3f} after training (5-way chance is 0.2)"
