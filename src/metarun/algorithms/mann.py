"""Memory-Augmented Neural Networks with Least Recently Used Access (MANN)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from metarun.algorithms.base import Algorithm, MetaUpdate, private_buffers
from metarun.errors import ConfigError
from metarun.objectives import Classification, Curve, Objective, TaskResult, classification_result
from metarun.tasks.types import Task, TaskSplit

# The memory starts as a small constant, not zero, so that the cosine similarity of a key with
# every slot is defined (and equal: the first reads are uniform).
MEMORY_INIT = 1e-6
EPS = 1e-8


def cosine_read_weights(keys: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Read weights ``w^r_t(i) = softmax_i K(k_t, M_t(i))`` with ``K`` the cosine similarity
    (Santoro et al. 2016).

    Args:
        keys: ``[B, R, M]``, one key per read head.
        memory: ``[B, N, M]``.

    Returns:
        ``[B, R, N]``, each row a distribution over the ``N`` slots.
    """
    dots = keys @ memory.transpose(1, 2)  # [B, R, N]
    norms = keys.norm(dim=-1)[:, :, None] * memory.norm(dim=-1)[:, None, :]
    return (dots / norms.clamp(min=EPS)).softmax(dim=-1)


def least_used(usage: torch.Tensor, n: int) -> torch.Tensor:
    """Least-used weights ``w^lu``: 1 for the ``n`` slots of smallest usage, else 0; ties go
    to the lower slot index. ``usage [B, N] -> [B, N]`` (a constant: no gradient flows through it)."""
    order = torch.sort(usage.detach(), dim=-1, stable=True).indices[:, :n]
    return torch.zeros_like(usage).scatter(-1, order, 1.0)


def lrua_write_weights(gate: torch.Tensor, previous_read: torch.Tensor, previous_least_used: torch.Tensor) -> torch.Tensor:
    """LRUA write weights ``w^w_t = σ(α) w^r_{t-1} + (1 − σ(α)) w^lu_{t-1}``: a learned convex
    mix of the last-read slots and the least-used ones.

    Args:
        gate: ``[B, R]``, the logit ``α`` of every head.
        previous_read: ``[B, R, N]``, ``w^r_{t-1}``.
        previous_least_used: ``[B, N]``, ``w^lu_{t-1}``.

    Returns:
        ``[B, R, N]``.
    """
    mix = torch.sigmoid(gate)[:, :, None]
    return mix * previous_read + (1 - mix) * previous_least_used[:, None, :]


def write_memory(memory: torch.Tensor, previous_usage: torch.Tensor, write: torch.Tensor, adds: torch.Tensor
                 ) -> torch.Tensor:
    """``M_t = M_{t-1} + Σ_heads w^w_t a_t^T`` after zeroing the least-used slot of ``w^u_{t-1}``
    ("prior to writing to memory, the least used memory location is computed from w^u_{t-1} and is
    set to zero"; the lower index on a tie).

    Args:
        memory: ``M_{t-1}`` ``[B, N, M]``.
        previous_usage: ``w^u_{t-1}`` ``[B, N]``.
        write: ``w^w_t`` ``[B, R, N]``.
        adds: ``a_t`` ``[B, R, M]``.

    Returns:
        ``M_t`` ``[B, N, M]``.
    """
    erased = nn.functional.one_hot(previous_usage.argmin(dim=1), memory.shape[1]).to(memory.dtype)
    return memory * (1 - erased)[:, :, None] + write.transpose(1, 2) @ adds


def usage_update(usage: torch.Tensor, read: torch.Tensor, write: torch.Tensor, gamma: float) -> torch.Tensor:
    """Usage ``w^u_t = γ w^u_{t-1} + w^r_t + w^w_t``, summed over the heads.
    ``usage [B, N]``, ``read``/``write`` ``[B, R, N]`` -> ``[B, N]``."""
    return gamma * usage + read.sum(1) + write.sum(1)


def previous_labels(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """The label input of every time step: step ``t`` sees the one-hot ``y_{t-1}``, step 0 a zero
    (null) vector. ``labels [B, T]`` -> ``[B, T, classes]``."""
    one_hot = nn.functional.one_hot(labels, classes).float()
    return torch.cat([torch.zeros_like(one_hot[:, :1]), one_hot[:, :-1]], dim=1)


def instance_numbers(labels: torch.Tensor) -> torch.Tensor:
    """The instance number of every element of a sequence: 1 for the first presentation of its
    class, 2 for the second, ... ``labels [T]`` -> ``[T]`` int64."""
    one_hot = nn.functional.one_hot(labels)  # [T, classes]
    return one_hot.cumsum(0).gather(1, labels[:, None]).squeeze(1)


def instance_curve(correct: torch.Tensor, labels: torch.Tensor) -> Curve:
    """Accuracy by instance number: position ``k`` (1 to the most presentations of a class) is the
    accuracy over the ``k``-th presentations of all classes. ``correct``, ``labels`` ``[T]``."""
    numbers = instance_numbers(labels).cpu()
    hits = nn.functional.one_hot(numbers - 1).T.float()  # [positions, T]
    accuracy = (hits @ correct.detach().cpu().float()) / hits.sum(1)
    return Curve(positions=torch.arange(1, hits.shape[0] + 1), metrics={"acc": accuracy})


@dataclass
class MemoryState:
    """The recurrent state after a time step; ``B`` sequences, ``R`` heads, ``N`` slots of size ``M``.

    Attributes:
        h, c: controller LSTM state ``[B, H]``.
        memory: ``M_t`` ``[B, N, M]``.
        usage: ``w^u_t`` ``[B, N]``.
        read_weights: ``w^r_t`` ``[B, R, N]``.
        reads: the read vectors ``r_t`` of all heads ``[B, R * M]``.
    """

    h: torch.Tensor
    c: torch.Tensor
    memory: torch.Tensor
    usage: torch.Tensor
    read_weights: torch.Tensor
    reads: torch.Tensor

    def expand(self, batch: int) -> MemoryState:
        """One sequence's state repeated for ``batch`` continuations (the queries after a support set)."""
        return MemoryState(*(t.expand(batch, *t.shape[1:]) for t in (self.h, self.c, self.memory, self.usage,
                                                                      self.read_weights, self.reads)))


class SupportSet(nn.Module):
    """The learner of a task: MANN has no inner loop, its "adaptation" is reading the support set in
    sequence, which :meth:`MANN.score` does together with the query (one forward pass of the
    backbone over the task's images)."""

    def __init__(self, support: TaskSplit) -> None:
        super().__init__()
        self.support = support


def first_appearance_ranks(task: Task) -> torch.Tensor:
    """``[ways]``: the rank of every class by its first sample in the task (support, then query).
    Relabelling a task's classes permutes this map with them, so classes renamed this way are
    named by the task's images alone."""
    labels = torch.cat([task.support.y, task.query.y])
    position = torch.arange(len(labels), device=labels.device)
    first = torch.full((task.support.ways,), len(labels), device=labels.device, dtype=position.dtype)
    first = first.scatter_reduce(0, labels, position, reduce="amin")
    return first.argsort().argsort()


def task_seed(task: Task) -> int:
    """A seed from the task's images: evaluation presents every task in the same order every time
    (reproducible on any device), and different tasks in different orders. The labels are left
    out, so relabelling a task's classes keeps the presentation order."""
    digest = hashlib.blake2b(digest_size=8)
    for x in (task.support.x, task.query.x):
        digest.update(x.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


class MANN(Algorithm):
    """Memory-Augmented Neural Network with Least Recently Used Access (Santoro, Bartunov, Botvinick,
    Wierstra, Lillicrap, "Meta-Learning with Memory-Augmented Neural Networks", ICML 2016).

    An LSTM controller reads and writes an external memory ``M_t [N slots, M]``. At every time step
    ``t`` of an episode it receives the features of ``x_t`` and the one-hot label ``y_{t-1}`` of the
    *previous* step (a zero vector at ``t = 0``), so it must hold a sample in memory until its label
    arrives, and it predicts the class of ``x_t``. With ``R`` heads (``reads``), from the controller
    output ``h_t [H]``:

    - keys ``k_t = tanh(W_k h_t) [R, M]``, add vectors ``a_t = tanh(W_a h_t) [R, M]``, gates ``α_t [R]``;
    - write weights ``w^w_t = σ(α_t) w^r_{t-1} + (1 − σ(α_t)) w^lu_{t-1}`` (LRUA), where the
      least-used weights ``w^lu_{t-1}`` are 1 on the ``R`` slots of smallest usage ``w^u_{t-1}``;
      the single least-used slot is zeroed first, then ``M_t = M_{t-1} + Σ_heads w^w_t a_t^T``
      (the paper writes the key ``k_t``; a separate add vector, as in NTMs, lets what is
      stored differ from how it is looked up);
    - read weights ``w^r_t = softmax(cosine(k_t, M_t(i)))`` over the slots and read vectors
      ``r_t = Σ_i w^r_t(i) M_t(i)``;
    - usage ``w^u_t = γ w^u_{t-1} + w^r_t + w^w_t``;
    - class logits ``W_o [h_t, r_t]``; the read vectors also enter the controller at ``t + 1``.

    The controller's input is ``[features(x_t), y_{t-1}, r_{t-1}]`` of size ``D + L + R M``, with
    ``L = max(ways, train_ways)`` label units (an N-way task uses the first N). The paper feeds
    flattened pixels (no convolutions): ``backbone=mlp`` with ``backbone.hidden=[]`` is exactly
    that (a flatten), and any backbone (``mlp``, ``conv4``) may extract the features instead.

    Episodes (training): a task's ``shots + query_shots`` samples per class are one shuffled
    sequence (``Task.sequence(query_last=False)``; the paper's 5-way episodes have 10 instances per
    class: ``shots=1, query_shots=9``) with a fresh class-to-label permutation, drawn from a
    generator seeded from torch's global RNG; the loss is the cross-entropy at every time step.
    The meta-batch runs as one batch of sequences (the backbone still sees one task at a time).

    Evaluation reports two things from the same model:

    - the query accuracy of an N-way K-shot task (``TaskResult.accuracy``, adaptation step 0: there
      is no inner loop): the support set is read first, shuffled, its labels one step late
      (``Task.sequence(query_last=True)``); then every query is presented on its own right after
      it, with the last support label as its label input, as the next element of the episode.
      Queries never see each other nor any query label (each one continues the post-support state:
      no query label leaks into another's prediction, and the controller never meets a null label
      mid-sequence, which it never saw in training). ``predictions`` are the class probabilities.
    - the accuracy by instance number (``TaskResult.curves["instance"]``): the whole task as one
      shuffled episode, as in training; position ``k`` is the accuracy at the ``k``-th presentation
      of a class (the paper's Table 1: 1st, 2nd, 3rd, 5th, 10th instance).

    Evaluation orders and label permutations are drawn from a generator seeded by the task's images,
    so evaluating twice gives the same numbers; the permutation is applied to the classes ranked by
    their first sample in the task, not to the task's integer class names, so renaming the classes
    of a task permutes its class scores exactly. (The network itself is not equivariant to label
    permutations: its label units and logits are not tied. Training draws fresh permutations.)

    Args:
        features: the backbone ``[B, C, H, W] -> [B, D]`` (``out_features = D``).
        ways: classes per evaluation task.
        memory_slots: ``N``, rows of the memory (paper: 128).
        memory_size: ``M``, size of a row (paper: 40).
        controller_size: ``H``, units of the LSTM controller (paper: 200).
        reads: ``R``, read heads; also the number of least-used slots that ``w^lu`` marks (paper: 4).
        gamma: usage decay ``γ`` (paper: 0.95).
        train_ways: ways of training tasks (``None``: ``ways``); at least ``ways``.
        objective: must be classification.
    """

    def __init__(self, features: nn.Module, ways: int, memory_slots: int, memory_size: int, controller_size: int,
                 reads: int, gamma: float, train_ways: int | None = None, objective: Objective | None = None) -> None:
        super().__init__(inner_steps=0, eval_inner_steps=0)
        if objective is not None and not isinstance(objective, Classification):
            raise ConfigError(f"MANN predicts class labels fed back one step late and needs a classification "
                              f"dataset, not {type(objective).__name__.lower()}; choose e.g. algorithm=maml")
        if min(memory_slots, memory_size, controller_size, reads) < 1:
            raise ConfigError(f"algorithm.memory_slots, memory_size, controller_size and reads must be >= 1, got "
                              f"{memory_slots}, {memory_size}, {controller_size}, {reads}")
        if reads > memory_slots:
            raise ConfigError(f"algorithm.reads={reads} marks that many least-used slots and needs "
                              f"memory_slots >= reads, got memory_slots={memory_slots}")
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"algorithm.gamma (usage decay) must be in [0, 1], got {gamma}")
        self.features = features
        self.classes = self.output_units(ways, train_ways, Classification(), "MANN")  # label units and outputs
        self.slots, self.slot_size, self.reads, self.gamma = memory_slots, memory_size, reads, gamma
        read_size = reads * memory_size
        self.controller = nn.LSTMCell(features.out_features + self.classes + read_size, controller_size)
        self.key = nn.Linear(controller_size, read_size)
        self.add = nn.Linear(controller_size, read_size)
        self.gate = nn.Linear(controller_size, reads)
        self.output = nn.Linear(controller_size + read_size, self.classes)

    # -- the recurrent network ---------------------------------------------------------------------

    def initial_state(self, batch: int, like: torch.Tensor) -> MemoryState:
        def zeros(*shape: int) -> torch.Tensor:
            return like.new_zeros(batch, *shape)

        hidden = self.controller.hidden_size
        return MemoryState(h=zeros(hidden), c=zeros(hidden),
                           memory=like.new_full((batch, self.slots, self.slot_size), MEMORY_INIT),
                           usage=zeros(self.slots), read_weights=zeros(self.reads, self.slots),
                           reads=zeros(self.reads * self.slot_size))

    def step(self, x: torch.Tensor, label: torch.Tensor, state: MemoryState) -> tuple[torch.Tensor, MemoryState]:
        """One time step: ``x [B, D]`` features, ``label [B, L]`` the previous step's one-hot label ->
        logits ``[B, L]`` and the new state."""
        batch = x.shape[0]
        h, c = self.controller(torch.cat([x, label, state.reads], dim=1), (state.h, state.c))
        keys = torch.tanh(self.key(h)).view(batch, self.reads, self.slot_size)
        adds = torch.tanh(self.add(h)).view(batch, self.reads, self.slot_size)
        write = lrua_write_weights(self.gate(h), state.read_weights, least_used(state.usage, self.reads))
        memory = write_memory(state.memory, state.usage, write, adds)  # [B, N, M]
        read = cosine_read_weights(keys, memory)  # [B, R, N]
        reads = (read @ memory).flatten(1)  # [B, R * M]
        usage = usage_update(state.usage, read, write, self.gamma)
        logits = self.output(torch.cat([h, reads], dim=1))
        return logits, MemoryState(h, c, memory, usage, read, reads)

    def unroll(self, x: torch.Tensor, labels: torch.Tensor, state: MemoryState | None = None
               ) -> tuple[torch.Tensor, MemoryState]:
        """Read sequences: ``x [B, T, D]`` features and their labels ``[B, T]`` (fed one step late)
        -> logits ``[B, T, L]`` (step ``t`` predicts ``labels[:, t]``) and the final state."""
        state = state if state is not None else self.initial_state(x.shape[0], x)
        label_inputs = previous_labels(labels, self.classes).to(x.dtype)
        logits = []
        for t in range(x.shape[1]):
            out, state = self.step(x[:, t], label_inputs[:, t], state)
            logits.append(out)
        return torch.stack(logits, dim=1), state

    # -- tasks as sequences ------------------------------------------------------------------------

    def feature_task(self, task: Task) -> Task:
        """The task with its images replaced by their features ``[n, D]``: one backbone pass over
        all its images (BatchNorm sees the task's batch, as in every other algorithm)."""
        support, query = task.support, task.query
        features = self.features(torch.cat([support.x, query.x])).flatten(1)
        n = len(support.y)
        return Task(TaskSplit(features[:n], support.y, support.ways), TaskSplit(features[n:], query.y, query.ways))

    def episode_result(self, logits: torch.Tensor, labels: torch.Tensor, ways: int) -> TaskResult:
        """Cross-entropy and accuracy at every step of one episode (``logits [T, L]``, ``labels [T]``),
        with the accuracy by instance number."""
        logits = logits[:, :ways]
        loss = nn.functional.cross_entropy(logits, labels)
        correct = logits.argmax(dim=1) == labels
        return TaskResult(loss=loss, accuracy=correct.float().mean(),
                          curves={"instance": instance_curve(correct, labels)})

    def train_task(self, task: Task) -> tuple[torch.Tensor, TaskResult]:
        """One training episode; the loss is the cross-entropy at every time step."""
        return self._train_episodes([task])[0]

    def _train_episodes(self, tasks: Sequence[Task]) -> list[tuple[torch.Tensor, TaskResult]]:
        """Training episodes of tasks of one shape, read as one batch of sequences."""
        generators = [task.support.generator() for task in tasks]  # each task's own order and labels
        with private_buffers(self, keep=True):  # BatchNorm statistics are learned here, task after task
            sequences = [self.feature_task(task).sequence(g, query_last=False) for task, g in zip(tasks, generators,
                                                                                                   strict=True)]
        logits, _ = self.unroll(torch.stack([s.x for s in sequences]), torch.stack([s.y for s in sequences]))
        results = [self.episode_result(logits[b], s.y, s.ways) for b, s in enumerate(sequences)]
        return [(result.loss, result) for result in results]

    def meta_step(self, tasks: Sequence[Task], update: MetaUpdate) -> dict[str, float]:
        """The default meta-update (the mean of the episodes' losses), with the meta-batch's episodes
        unrolled together: one recurrent pass of ``meta_batch_size`` sequences instead of one per task."""
        shapes = {(t.support.ways, len(t.support.y), len(t.query.y)) for t in tasks}
        if len(shapes) > 1:  # tasks of different shapes cannot be stacked
            return super().meta_step(tasks, update)
        update.zero_grad()
        results = self._train_episodes(tasks)
        loss = torch.stack([loss for loss, _ in results]).mean()
        loss.backward()
        accuracy = torch.stack([r.accuracy for _, r in results]).mean()
        metrics = update.report(loss, accuracy)
        update.step(self.parameters())
        return metrics

    # -- the contract ------------------------------------------------------------------------------

    def trajectory(self, support: TaskSplit, steps: int) -> Iterator[nn.Module]:
        return self.unchanged(SupportSet(support), steps)  # no inner loop

    def score(self, learner: nn.Module, query: TaskSplit) -> TaskResult:
        """The N-way K-shot query result (support first, then each query alone), with the
        accuracy by instance number of the task read as one episode."""
        task = Task(learner.support, query)
        generator = torch.Generator().manual_seed(task_seed(task))
        # The episode's labels are drawn for the classes ranked by first appearance, not for the
        # task's integer names: what the model is shown depends on the images alone, so renaming a
        # task's classes permutes its class scores exactly (the network itself is not equivariant).
        rank = first_appearance_ranks(task)
        features = self.feature_task(task)
        features = Task(TaskSplit(features.support.x, rank[task.support.y], task.support.ways),
                        TaskSplit(features.query.x, rank[task.query.y], task.query.ways))
        ways, n_support = task.support.ways, len(task.support.y)

        # The support in a shuffled order, labels one step late; then every query continues from there.
        sequence = features.sequence(generator, query_last=True)
        _, state = self.unroll(sequence.x[None, :n_support], sequence.y[None, :n_support])
        n_query = len(query.y)
        last_label = nn.functional.one_hot(sequence.y[n_support - 1], self.classes).to(features.query.x.dtype)
        logits, _ = self.step(features.query.x, last_label.expand(n_query, -1), state.expand(n_query))
        # Back from the episode's labels to the task's: class c was shown as label permutation[rank[c]].
        result = classification_result(logits[:, :ways][:, sequence.permutation[rank]], query.y)

        episode = features.sequence(generator, query_last=False)
        episode_logits, _ = self.unroll(episode.x[None], episode.y[None])
        correct = episode_logits[0, :, :ways].argmax(dim=1) == episode.y
        result.curves = {"instance": instance_curve(correct, episode.y)}
        return result
