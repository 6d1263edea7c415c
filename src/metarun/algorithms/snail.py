"""SNAIL: a Simple Neural Attentive meta-Learner.

A model-based meta-learner: no inner loop and no hand-made comparison of embeddings. A task is
read as one sequence, the labelled support set followed by an unlabelled query, and a causal
sequence model of temporal convolutions and soft attention predicts the query's label at the
last position. Everything it learns about a task it learns from reading that sequence.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from metarun.algorithms.base import Algorithm
from metarun.errors import ConfigError
from metarun.objectives import Classification, Objective, TaskResult, classification_result
from metarun.tasks.types import Task, TaskSplit


class CausalConv1d(nn.Module):
    """A causal dilated convolution of kernel size 2 over time: ``out[t] = W_0 x[t - d] + W_1 x[t] + b``,
    with ``x[t] = 0`` for ``t < 0`` (the sequence is padded on the left only, so nothing after ``t`` is read).

    Shapes: ``[B, T, in_channels] -> [B, T, out_channels]`` (time second, channels last, as the
    attention blocks take them).
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__()
        self.dilation = dilation
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size=2, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A kernel-2 convolution is one matrix product on [x[t - d], x[t]]: on short sequences this is
        # several times faster on a CPU than conv1d (with its layout changes), and the same numbers.
        # conv1d's weight [out, in, 2]: tap 0 multiplies x[t - d], tap 1 multiplies x[t].
        T = x.shape[1]
        previous = nn.functional.pad(x, (0, 0, self.dilation, 0))[:, :T]  # x[t - d], zeros before the start
        weight = self.conv.weight.transpose(1, 2).flatten(1)  # [out, 2 * in]: tap 0's inputs, then tap 1's
        return nn.functional.linear(torch.cat([previous, x], dim=-1), weight, self.conv.bias)


class DenseBlock(nn.Module):
    """``DenseBlock(R, D)`` (Mishra et al. 2018, Algorithm 1): a causal convolution of dilation ``R`` with
    ``D`` filters and a gated activation, ``tanh(x_f) * sigmoid(x_g)``, concatenated to its input.

    Shapes: ``[B, T, C] -> [B, T, C + filters]``.
    """

    def __init__(self, in_channels: int, dilation: int, filters: int) -> None:
        super().__init__()
        self.filters = filters
        # x_f and x_g are two convolutions of the same input: one layer with 2D outputs computes both.
        self.conv = CausalConv1d(in_channels, 2 * filters, dilation)
        self.out_channels = in_channels + filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf, xg = self.conv(x).split(self.filters, dim=-1)
        return torch.cat([x, torch.tanh(xf) * torch.sigmoid(xg)], dim=-1)


def tc_dilations(sequence_length: int) -> list[int]:
    """Dilations of a TC block for sequences of ``sequence_length``: ``1, 2, 4, ...``, ``ceil(log2 T)``
    of them, so that with kernel size 2 the last position's receptive field (``2^n`` positions)
    covers the whole sequence."""
    return [2**i for i in range(max(1, math.ceil(math.log2(sequence_length))))]


class TCBlock(nn.Module):
    """``TCBlock(T, D)`` (Mishra et al. 2018, Algorithm 2): ``ceil(log2 T)`` dense blocks of ``D`` filters
    with exponentially growing dilations, each concatenating its output to its input.

    The paper's pseudocode numbers the blocks ``i = 1, ..., ceil(log2 T)`` with dilation ``2^i``
    (recalled, not checked against the paper); read literally, kernel-2 convolutions of dilations
    2, 4, 8, ... reach only even offsets, so a position would never see its neighbour through the
    convolutions. Here the dilations are WaveNet's ``1, 2, 4, ..., 2^(n-1)``: every offset
    ``0 .. 2^n - 1 >= T - 1`` is reachable, with the same number of blocks and parameters.

    Args:
        in_channels: channels of the input.
        sequence_length: ``T``, the length the block is sized for; it runs on sequences of any length.
        filters: ``D``, filters of every dense block.

    Shapes: ``[B, T, in_channels] -> [B, T, in_channels + ceil(log2 T) * filters]``.
    """

    def __init__(self, in_channels: int, sequence_length: int, filters: int) -> None:
        super().__init__()
        self.dilations = tc_dilations(sequence_length)
        blocks = []
        channels = in_channels
        for dilation in self.dilations:
            blocks.append(DenseBlock(channels, dilation, filters))
            channels = blocks[-1].out_channels
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class AttentionBlock(nn.Module):
    """``AttentionBlock(K, V)`` (Mishra et al. 2018, Algorithm 3): single-head key-value attention with a
    causal softmax, ``read = softmax(mask(q k^T / sqrt(K))) v``, concatenated to its input. Position
    ``t`` attends to positions ``0..t`` (itself included), never to a later one.

    Args:
        in_channels: channels of the input.
        key_size: ``K``, size of the keys and queries.
        value_size: ``V``, size of the values (channels added to the input).

    Shapes: ``[B, T, in_channels] -> [B, T, in_channels + value_size]``.
    """

    def __init__(self, in_channels: int, key_size: int, value_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(in_channels, key_size)
        self.query = nn.Linear(in_channels, key_size)
        self.value = nn.Linear(in_channels, value_size)
        self.scale = 1.0 / math.sqrt(key_size)
        self.out_channels = in_channels + value_size

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[B, T, T]``: row ``t`` is position ``t``'s distribution over positions ``0..t``."""
        logits = self.query(x) @ self.key(x).transpose(1, 2) * self.scale  # [B, T, T]
        T = x.shape[1]
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(diagonal=1)
        return logits.masked_fill(future, float("-inf")).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.weights(x) @ self.value(x)], dim=-1)


def block_spec(spec: Any) -> tuple[str, Any]:
    """One entry of the ``blocks`` option, ``{attention: [K, V]}`` or ``{tc: D}``, as ``(kind, sizes)``."""
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"algorithm.blocks: every block is {{attention: [key_size, value_size]}} or {{tc: filters}}, "
                          f"got {spec!r}")
    (kind, sizes), = spec.items()
    if kind == "attention":
        if (isinstance(sizes, str) or not hasattr(sizes, "__len__") or len(sizes) != 2
                or not all(isinstance(s, int) and s >= 1 for s in sizes)):
            raise ConfigError(f"algorithm.blocks: attention takes [key_size, value_size], two sizes >= 1, got {sizes!r}")
        return kind, (int(sizes[0]), int(sizes[1]))
    if kind == "tc":
        if not isinstance(sizes, int) or sizes < 1:
            raise ConfigError(f"algorithm.blocks: tc takes its number of filters (>= 1), got {sizes!r}")
        return kind, int(sizes)
    raise ConfigError(f"algorithm.blocks: unknown block {kind!r}; the blocks are attention and tc")


class SequenceModel(nn.Module):
    """SNAIL's sequence model: the ``blocks`` in order, then a position-wise linear layer (the paper's
    final 1x1 convolution) to the label scores. Causal: the output at position ``t`` depends on the
    inputs at positions ``0..t`` only.

    Args:
        in_channels: channels of a sequence element (embedding and label).
        outputs: label scores per position.
        sequence_length: ``T``, which sizes the TC blocks.
        blocks: e.g. ``[{attention: [64, 32]}, {tc: 128}, ...]`` (see :func:`block_spec`).

    Shapes: ``[B, T, in_channels] -> [B, T, outputs]``.
    """

    def __init__(self, in_channels: int, outputs: int, sequence_length: int, blocks: Any) -> None:
        super().__init__()
        if not blocks:
            raise ConfigError("algorithm.blocks is empty: SNAIL needs at least one attention or tc block")
        layers: list[nn.Module] = []
        channels = in_channels
        for spec in blocks:
            kind, sizes = block_spec(spec)
            layer = AttentionBlock(channels, *sizes) if kind == "attention" else TCBlock(channels, sequence_length, sizes)
            layers.append(layer)
            channels = layer.out_channels
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(channels, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def content_seed(x: torch.Tensor) -> int:
    """A seed that is a function of ``x``'s values alone (SHA-256 of its float32 bytes): the same images
    give the same episode, whatever their labels, the device or what was evaluated before."""
    data = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & (2**63 - 1)


def first_appearance(y: torch.Tensor, ways: int) -> torch.Tensor:
    """``[ways]``: class ``c``'s rank by its first position in ``y`` (classes absent from ``y`` last).

    Relabelling the classes of ``y`` by any permutation leaves ``rank[y]`` unchanged: a labelling
    that depends on which samples share a class, not on the class names.
    """
    positions = torch.arange(len(y), device=y.device)
    first = torch.full((ways,), len(y), dtype=positions.dtype, device=y.device).scatter_reduce(
        0, y, positions, reduce="amin")
    rank = torch.empty_like(first)
    rank[first.argsort(stable=True)] = torch.arange(ways, device=y.device)
    return rank


class Episode(nn.Module):
    """A task's learner: SNAIL conditioned on the task's support sequence. Each query is read as its own
    sequence, the support followed by that query, and classified at its position.

    Args:
        features: the embedding network ``[n, ...] -> [n, E]``.
        model: the sequence model ``[B, T, E + L] -> [B, T, L]``.
        support: the support inputs in presentation order ``[S, ...]``.
        shown: their labels as the sequence shows them ``[S]``, in ``[0, ways)``.
        permutation: ``[ways]``, task class ``c`` is shown as label ``permutation[c]``.
        labels: ``L``, the one-hot size of a label and the outputs of the model.

    Shapes: ``forward``: queries ``[Q, ...] -> [Q, ways]`` logits in the task's label space.
    """

    def __init__(self, features: nn.Module, model: SequenceModel, support: torch.Tensor, shown: torch.Tensor,
                 permutation: torch.Tensor, labels: int) -> None:
        super().__init__()
        self.features, self.model = features, model
        self.support, self.shown, self.permutation, self.labels = support, shown, permutation, labels

    def sequences(self, x: torch.Tensor) -> torch.Tensor:
        """``[Q, S + 1, E + L]``: for every query, the support (embedding and one-hot label) then the
        query (embedding and a zero label)."""
        S = len(self.support)
        # One pass of the embedding over support and queries, as one batch (BatchNorm sees the task).
        embeddings = self.features(torch.cat([self.support, x]))  # [S + Q, E]
        one_hot = nn.functional.one_hot(self.shown, self.labels).to(embeddings.dtype)  # [S, L]
        support = torch.cat([embeddings[:S], one_hot], dim=1)  # [S, E + L]
        queries = nn.functional.pad(embeddings[S:], (0, self.labels))  # [Q, E + L], zero label
        return torch.cat([support.expand(len(x), -1, -1), queries[:, None]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.model(self.sequences(x))[:, -1]  # [Q, L], at the query's position
        # Shown label permutation[c] is task class c: reorder into the task's label space.
        return scores[:, self.permutation]


class SNAIL(Algorithm):
    """SNAIL (Mishra, Rohaninejad, Chen, Abbeel, "A Simple Neural Attentive Meta-Learner", ICLR 2018).

    An N-way K-shot task is read as a sequence of ``T = NK + 1`` elements: the ``NK`` support samples,
    each its embedding concatenated with its one-hot label, in random order, then the query with a
    zero label (§4.1). A causal stack of temporal convolutions (:class:`TCBlock`) and soft attention
    (:class:`AttentionBlock`) reads it, and a position-wise linear layer gives the query's label scores
    at the last position, trained with cross-entropy. The paper's Omniglot and mini-ImageNet model is
    ``AttentionBlock(64, 32), TCBlock(T, 128), AttentionBlock(256, 128), TCBlock(T, 128),
    AttentionBlock(512, 256)``, then a 1x1 convolution to N outputs, on a Conv4-64 embedding for Omniglot.

    Episodes: every task is shown with a fresh class-to-label permutation and support order
    (:meth:`metarun.tasks.types.Task.sequence`), so the model must read the labels off the support
    rather than remember classes. In meta-training the episode is drawn from torch's global RNG (the
    run's seed reproduces it); in evaluation (``eval()`` or ``torch.no_grad()``) from a seed computed
    from the support images, with the classes first named by their order in the support, so a task
    always gives the same result, and relabelling its classes permutes the class scores the same way.
    The predictions are mapped back through the permutation: a :class:`TaskResult` is in the task's
    label space.

    Queries: the paper predicts one query per sequence. All queries of a task are scored at once, as
    a batch of sequences ``[Q, S + 1, E + L]`` sharing the support; causality means each query
    position sees only the support and itself, so this equals ``Q`` separate episodes.

    No inner loop: "adapting" is building the support sequence, and the learner after any number of
    steps is that one (:meth:`trajectory` yields it ``steps + 1`` times).

    Args:
        features: embedding network ``[B, C, H, W] -> [B, E]`` (``E = features.out_features``).
        ways: classes per evaluation task.
        train_shots: support samples per class in training; with ``train_ways`` it gives the training
            sequence length ``T = train_ways * train_shots + 1`` that sizes the TC blocks
            (``ceil(log2 T)`` dense blocks). Other lengths run too.
        blocks: the sequence model, in order: ``{attention: [key_size, value_size]}`` or ``{tc: filters}``.
        train_ways: classes per training task. Labels are one-hot of size ``L = max(ways, train_ways)``
            and the model has ``L`` outputs; an N-way task reads the first N.
        objective: must be classification.

    Shapes: a sequence element is ``E + L`` wide; the model maps ``[B, T, E + L] -> [B, T, L]``.
    """

    def __init__(self, features: nn.Module, ways: int, train_shots: int, blocks: Any,
                 train_ways: int | None = None, objective: Objective | None = None) -> None:
        super().__init__(inner_steps=0, eval_inner_steps=0)
        objective = objective or Classification()
        if not isinstance(objective, Classification):
            raise ConfigError(
                f"snail predicts class labels read off the support sequence and needs a classification dataset, "
                f"not {type(objective).__name__.lower()}; choose a gradient-based algorithm (e.g. algorithm=maml)"
            )
        if train_shots < 1:
            raise ConfigError(f"snail needs train_shots >= 1, got {train_shots}")
        train_ways = train_ways or ways
        self.labels = objective.outputs(max(ways, train_ways))
        self.sequence_length = train_ways * train_shots + 1
        self.features = features
        self.model = SequenceModel(features.out_features + self.labels, self.labels, self.sequence_length, blocks)

    def episode(self, support: TaskSplit) -> Episode:
        """The learner for ``support``: its episode's support order and label permutation."""
        if self.training and torch.is_grad_enabled():
            generator = support.generator()  # the task's own seed (CPU: no device sync)
        else:
            generator = torch.Generator().manual_seed(content_seed(support.x))
        # Name the classes by their first appearance in the support before the episode's random
        # permutation: the shown labels then depend on which samples share a class, not on the task's
        # class names (in training the random permutation makes this a no-op in distribution).
        rank = first_appearance(support.y, support.ways)  # task class -> canonical label
        canonical = TaskSplit(support.x, rank[support.y], support.ways)
        empty = TaskSplit(support.x[:0], support.y[:0], support.ways)
        sequence = Task(canonical, empty).sequence(generator, query_last=True)
        return Episode(self.features, self.model, sequence.x, sequence.y, sequence.permutation[rank], self.labels)

    def trajectory(self, support: TaskSplit, steps: int) -> Iterator[nn.Module]:
        return self.unchanged(self.episode(support), steps)  # no inner loop

    def score(self, learner: nn.Module, query: TaskSplit) -> TaskResult:
        return classification_result(learner(query.x), query.y)
