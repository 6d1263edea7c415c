"""Meta Networks (MetaNet): fast weights generated from loss gradients, read from a memory by attention."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from metarun.algorithms.base import Algorithm, MetaUpdate, private_buffers
from metarun.errors import ConfigError
from metarun.objectives import Classification, Objective, TaskResult
from metarun.tasks.types import Task, TaskSplit

REPRESENTATION_LOSSES = ("contrastive", "cross_entropy")


# ---------------------------------------------------------------------------------------------
# Layer augmentation
# ---------------------------------------------------------------------------------------------


def augmented_layer(x: torch.Tensor, slow: torch.Tensor, fast: torch.Tensor | None, activation: bool) -> torch.Tensor:
    """One layer with slow and fast weights (Munkhdalai & Yu 2017, §3.3, "layer augmentation").

    A hidden layer (``activation``) is ``ReLU(x W^T) + ReLU(x W*^T)``: the input goes through the
    slow and the fast weights separately, each through the non-linearity, and the two activations
    are summed. An output layer (no activation: logits or representations, which must be free to
    go negative) sums the two linear maps, ``x W^T + x W*^T``, as the authors' code does for its
    last layer. Without fast weights the layer is the slow one alone.

    Args:
        x: ``[B, in]`` inputs.
        slow: ``[out, in]`` slow weights.
        fast: None, ``[out, in]`` (one fast weight for the whole batch: task-level) or
            ``[B, out, in]`` (one per input: example-level, read from the memory).
        activation: ReLU on both paths (a hidden layer).

    Returns:
        ``[B, out]``.
    """
    slow_out = F.linear(x, slow)
    if fast is None:
        return F.relu(slow_out) if activation else slow_out
    fast_out = F.linear(x, fast) if fast.dim() == 2 else torch.bmm(fast, x[:, :, None])[:, :, 0]
    if activation:
        return F.relu(slow_out) + F.relu(fast_out)
    return slow_out + fast_out


class AugmentedMLP(nn.Module):
    """Fully connected layers without biases, each of which takes fast weights: ReLU-augmented
    hidden layers and a linearly augmented last layer (see :func:`augmented_layer`).

    Args:
        sizes: ``[in, hidden..., out]``.

    Shapes: ``[B, sizes[0]] -> [B, sizes[-1]]``; the fast weights are a list with one tensor per
    layer, ``[out_l, in_l]`` or ``[B, out_l, in_l]``.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(sizes))

    @property
    def shapes(self) -> list[torch.Size]:
        return [layer.weight.shape for layer in self.layers]

    def forward(self, x: torch.Tensor, fast: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = augmented_layer(x, layer.weight, None if fast is None else fast[index], activation=index < last)
        return x

    def traced(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The slow-weights-only forward pass, keeping what per-example gradients need.

        Returns:
            the output ``[B, out]``, every layer's input ``a_{l-1} [B, in_l]`` and every layer's
            pre-activation ``z_l [B, out_l]``. For a bias-free layer ``z_l = a_{l-1} W_l^T``, so the
            gradient of a loss ``L_b`` of row ``b`` alone w.r.t. ``W_l`` is ``outer(dL_b/dz_lb, a_{l-1,b})``.
        """
        inputs, pre_activations = [], []
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            inputs.append(x)
            z = F.linear(x, layer.weight)
            pre_activations.append(z)
            x = F.relu(z) if index < last else z
        return x, inputs, pre_activations


def per_step_gradients(inputs: list[torch.Tensor], pre_activations: list[torch.Tensor], step_losses: torch.Tensor,
                       step_of_row: torch.Tensor, create_graph: bool, retain_graph: bool) -> list[torch.Tensor]:
    """Gradients of each step's loss w.r.t. every layer's slow weights, from one backward pass.

    Every row of the traced batch belongs to exactly one step and the layers act on rows
    independently, so ``d(sum_t L_t)/dz_b = dL_{t(b)}/dz_b`` and ``dL_t/dW_l = sum_{b in t}
    outer(dL_t/dz_lb, a_{l-1,b})``.

    Args:
        inputs, pre_activations: from :meth:`AugmentedMLP.traced` (``[rows, in_l]``, ``[rows, out_l]``).
        step_losses: ``[T]`` the loss of every step.
        step_of_row: ``[rows]`` the step each row belongs to.
        create_graph: keep the gradients differentiable (second order).
        retain_graph: keep the forward graph (the losses are backpropagated later too).

    Returns:
        One ``[T, out_l, in_l]`` tensor per layer; detached unless ``create_graph``.
    """
    deltas = torch.autograd.grad(step_losses.sum(), pre_activations, create_graph=create_graph,
                                 retain_graph=retain_graph or create_graph)
    steps = step_losses.shape[0]
    gradients = []
    for delta, a in zip(deltas, inputs, strict=True):
        if not create_graph:
            a = a.detach()
        rows = delta[:, :, None] * a[:, None, :]  # [rows, out, in]
        gradients.append(rows.new_zeros(steps, *rows.shape[1:]).index_add(0, step_of_row, rows))
    return gradients


# ---------------------------------------------------------------------------------------------
# Fast-weight generation from gradients (the meta information)
# ---------------------------------------------------------------------------------------------


def preprocess_gradients(gradients: torch.Tensor, k: float) -> torch.Tensor:
    """``[...] -> [..., 2]``: every gradient coordinate as two features on comparable scales.

    The authors' code uses Andrychowicz et al.'s (2016) log-and-sign preprocessing,
    ``(max(log|g| / k, -1), clip(g e^k, -1, 1))`` with ``k = 7``. Here the first feature is shifted by
    +1 (``max(1 + log|g| / k, 0)``, exactly 0 for ``|g| <= e^-k``), so that a zero gradient gives
    zero features; the shift is what a bias in the generator's first layer would add, and the
    generators have none (zero gradients must give zero fast weights, exactly).
    """
    magnitude = gradients.abs()
    threshold = math.exp(-k)
    # Clamp before the log: where() alone would backpropagate 0 * inf = nan from the unused branch.
    log_part = torch.where(magnitude > threshold, 1 + magnitude.clamp_min(threshold).log() / k,
                           torch.zeros_like(gradients))
    linear_part = (gradients * math.exp(k)).clamp(-1.0, 1.0)
    return torch.stack([log_part, linear_part], dim=-1)


class ExampleWeightGenerator(nn.Module):
    """The paper's ``m`` (``W*_i = m(Z, grad_i)``): an MLP on each gradient coordinate of the base
    learner's per-example loss, shared by all coordinates of one layer (one per augmented layer;
    the authors' code shares one across the conv layers and one across the fc layers).

    ``2 -> hidden -> hidden -> 1`` with ReLU (the authors' code: 2-20-20-1), without biases: with the
    zero-preserving :func:`preprocess_gradients`, a zero gradient gives a zero fast weight.
    Shapes: ``[..., 2] -> [...]``.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, hidden, bias=False),
                                 nn.ReLU(), nn.Linear(hidden, 1, bias=False))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)[..., 0]


class TaskWeightGenerator(nn.Module):
    """The paper's ``d`` (``Q* = d(G, {grad_t}_{t=1..T})``): an LSTM that reads the sequence of the
    representation loss's gradients, each coordinate independently (the coordinates are its batch),
    then a linear map of its last hidden state; shared by all coordinates of one layer (one per
    augmented layer of ``u``). The paper prefers an LSTM to an MLP for ``d`` (an MLP converged badly).

    Bias-free LSTM (``hidden`` units; authors: 20) and output layer: from a zero state, zero inputs
    give gates of 1/2 and a zero candidate, so the state stays exactly zero, and so does ``Q*``.
    Shapes: ``[T, C, 2] -> [C]``.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, hidden, bias=False)
        self.out = nn.Linear(hidden, 1, bias=False)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(sequence)  # h: [1, C, hidden], the state after the last step
        return self.out(h[0])[:, 0]


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def memory_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """``a = softmax_i(scale * cos(r, r'_i))``: ``queries [q, R]``, ``keys [N, R]`` -> ``[q, N]``, rows sum to 1."""
    cosine = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T
    return torch.softmax(scale * cosine, dim=1)


def read_memory(queries: torch.Tensor, keys: torch.Tensor, values: Sequence[torch.Tensor],
                scale: float) -> list[torch.Tensor]:
    """``W*_q = sum_i a_qi W*_i`` (Munkhdalai & Yu 2017, Algorithm 1, lines 17-19).

    Args:
        queries: ``[q, R]`` representations of the inputs.
        keys: ``[N, R]`` the representation memory (one key per support example).
        values: the example-level weight memory, per layer ``[N, out_l, in_l]``.
        scale: multiplies the cosine similarities before the softmax (paper: 1).

    Returns:
        Per layer ``[q, out_l, in_l]``: each input's fast weights.
    """
    attention = memory_attention(queries, keys, scale)  # [q, N]
    return [torch.einsum("qn,noi->qoi", attention, value) for value in values]


# ---------------------------------------------------------------------------------------------
# The algorithm
# ---------------------------------------------------------------------------------------------


class TaskMemory(nn.Module):
    """A task's classifier: MetaNet after it has read the support set. ``[q, ...] -> [q, outputs]`` logits.

    Attributes:
        task_weights: ``u``'s task-level fast weights ``Q*``, per layer ``[out_l, in_l]``.
        keys: ``[N, R]`` the support examples' representations ``r'_i = u(Q, Q*, x'_i)``.
        values: the example-level fast weights ``W*_i``, per base-learner layer ``[N, out_l, in_l]``.
        representation_loss: the representation loss on the support set (scalar).
        support_loss: the base learner's mean loss on the support set, slow weights alone (scalar).
    """

    def __init__(self, algorithm: MetaNetwork, task_weights: list[torch.Tensor], keys: torch.Tensor,
                 values: list[torch.Tensor], representation_loss: torch.Tensor, support_loss: torch.Tensor) -> None:
        super().__init__()
        self.algorithm = algorithm
        self.task_weights, self.keys, self.values = task_weights, keys, values
        self.representation_loss, self.support_loss = representation_loss, support_loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        algorithm = self.algorithm
        representations = algorithm.representation(algorithm.representation_features(x), self.task_weights)
        fast = read_memory(representations, self.keys, self.values, algorithm.attention_scale)
        return algorithm.base(algorithm.base_features(x), fast)


class MetaNetwork(Algorithm):
    """Meta Networks (Munkhdalai & Yu, "Meta Networks", ICML 2017), the one-shot procedure of their
    Algorithm 1.

    Two networks, each with slow weights (meta-parameters) and fast weights (generated per task),
    combined by layer augmentation (:func:`augmented_layer`):

    - the dynamic representation function ``u`` (``representation_features``, a fresh copy of the
      backbone, then ``representation``, an augmented ``D -> hidden -> R`` MLP). Its task-level
      fast weights ``Q*`` come from ``d`` (:class:`TaskWeightGenerator`, an LSTM) applied to the
      gradients of the representation loss on ``T`` steps of the support set (lines 1-6);
    - the base learner ``b`` (``base_features``, the backbone, then ``base``, an augmented
      ``D -> hidden -> outputs`` MLP). Its example-level fast weights ``W*_i = m(Z, grad_i)``
      (:class:`ExampleWeightGenerator`, an MLP) come from the gradient of its loss on support example
      ``i`` with slow weights alone, and are stored in a memory under the key ``r'_i = u(Q, Q*, x'_i)``
      (lines 7-14).

    A query ``x`` reads its fast weights ``W* = sum_i softmax_i(cos(u(Q, Q*, x), r'_i)) W*_i`` and is
    classified by ``b(W, W*, x)`` (lines 16-20). No inner loop: the task's learner is that memory,
    the same after any number of steps (0 in the configs). Gradients of the fast-weight networks'
    inputs are constants of the meta-update (``first_order``, the authors' code) or differentiated
    through (the full derivative of Algorithm 1's objective).

    The meta-update minimises ``query_loss + representation_weight * representation_loss +
    support_weight * support_loss`` (the paper and the authors' code minimise the query loss alone,
    line 22: weights 0); :meth:`meta_step` logs the sum as ``train/loss`` and its three losses as
    ``train/query_loss``, ``train/representation_loss`` and ``train/support_loss``.

    Representation loss: ``contrastive`` (the paper's choice for one-shot learning: ``T`` pairs of
    support examples, ``l d^2 + (1 - l) max(0, margin - d)^2`` with ``l`` = same class and ``d`` the
    distance between the L2-normalised representations, which the memory compares by cosine) or
    ``cross_entropy`` (the paper with several examples per class, and the authors' Omniglot code:
    a slow linear head on ``u``'s representation, the support set split into ``T`` consecutive
    chunks, one per step; with ``first_order`` and ``representation_weight`` 0 nothing trains that
    head, as in the authors' code).

    Shapes: support ``x [N, C, H, W]``, ``y [N]``; queries ``[q, C, H, W]`` -> logits
    ``[q, max(ways, train_ways)]`` (an N-way task reads the first N); memory keys ``[N, R]``, values
    per base-learner layer ``[N, out_l, in_l]``; ``Q*`` per ``u`` layer ``[out_l, in_l]``.

    Differences from the paper: fast weights augment the fully connected layers on top of the
    backbone only (the authors' Omniglot network augments its 5 conv layers too; their
    mini-ImageNet network augments the last 2 conv layers and the fc layers); the generators
    have no biases and the preprocessing is shifted (:func:`preprocess_gradients`), so zero
    gradients give zero fast weights; ``m`` and ``d`` are one network per augmented layer. The
    slow output layer gives every output unit its own weights, so, as in the paper, relabelling
    the support classes does not exactly permute the query's class scores.

    Args:
        features: the backbone ``[B, C, H, W] -> [B, D]``: ``b``'s, and a re-initialised copy for ``u``.
        ways: classes per evaluation task.
        hidden: width of the augmented hidden layer of ``b`` and of ``u`` (authors: 64).
        representation_dim: size ``R`` of ``u``'s representations, the memory keys (authors: 64).
        generator_hidden: units of ``m``'s hidden layers and of ``d``'s LSTM (authors: 20).
        representation_loss: ``"contrastive"`` or ``"cross_entropy"``.
        representation_steps: ``T``, the steps ``d`` reads: pairs (contrastive) or chunks of the
            support set (cross-entropy, at most one per example; authors: 5).
        contrastive_margin: the margin of the contrastive loss, on normalised representations (0..2).
        attention_scale: multiplies the cosine similarities of the memory read (paper: 1).
        gradient_log_scale: ``k`` of :func:`preprocess_gradients` (authors: 7).
        first_order: treat the gradients given to ``m`` and ``d`` as constants (authors' code).
        representation_weight: weight of the representation loss in the minimised loss (paper: 0).
        support_weight: weight of the base learner's support loss in the minimised loss (paper: 0).
        train_ways: classes per training task (``None``: ``ways``); the output layer has
            ``max(ways, train_ways)`` units and an N-way task reads the first N.
        objective: must be classification.
    """

    # The slow output layer gives each class index its own weights (see above).
    label_equivariant = False

    def __init__(self, features: nn.Module, ways: int, hidden: int, representation_dim: int, generator_hidden: int,
                 representation_loss: str, representation_steps: int, contrastive_margin: float,
                 attention_scale: float, gradient_log_scale: float, first_order: bool,
                 representation_weight: float, support_weight: float, train_ways: int | None = None,
                 objective: Objective | None = None) -> None:
        super().__init__(inner_steps=0, eval_inner_steps=0)
        if objective is not None and not isinstance(objective, Classification):
            raise ConfigError(
                f"metanet classifies (its representation loss and memory use class labels) and needs a "
                f"classification dataset, not {type(objective).__name__.lower()}; choose a gradient-based algorithm "
                f"(e.g. algorithm=maml)"
            )
        if representation_loss not in REPRESENTATION_LOSSES:
            raise ConfigError(f"algorithm.representation_loss must be one of {', '.join(REPRESENTATION_LOSSES)}, "
                              f"got {representation_loss!r}")
        if min(hidden, representation_dim, generator_hidden, representation_steps) < 1:
            raise ConfigError("algorithm.hidden, representation_dim, generator_hidden and representation_steps must "
                              f"be >= 1, got {hidden}/{representation_dim}/{generator_hidden}/{representation_steps}")
        if contrastive_margin < 0:
            raise ConfigError(f"algorithm.contrastive_margin must be >= 0 (a distance between normalised "
                              f"representations, 0..2), got {contrastive_margin}")
        if gradient_log_scale <= 0 or representation_weight < 0 or support_weight < 0:
            raise ConfigError(f"algorithm.gradient_log_scale must be > 0 and the loss weights >= 0, got "
                              f"{gradient_log_scale}/{representation_weight}/{support_weight}")
        outputs = self.output_units(ways, train_ways, Classification(), "metanet")  # slow output units
        dim = features.out_features
        self.base_features = features
        self.base = AugmentedMLP([dim, hidden, outputs])
        self.representation_features = copy.deepcopy(features)
        for module in self.representation_features.modules():  # u's own slow weights, not a copy of b's
            if module is not self.representation_features and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.representation = AugmentedMLP([dim, hidden, representation_dim])
        # Cross-entropy needs class scores from u: a slow head, never fast-weighted (the authors' code
        # computes fast weights for it but never uses them).
        self.representation_head = (nn.Linear(representation_dim, outputs, bias=False)
                                    if representation_loss == "cross_entropy" else None)
        self.example_generators = nn.ModuleList(ExampleWeightGenerator(generator_hidden) for _ in self.base.layers)
        self.task_generators = nn.ModuleList(TaskWeightGenerator(generator_hidden)
                                             for _ in self.representation.layers)
        self.representation_loss_name = representation_loss
        self.representation_steps = representation_steps
        self.contrastive_margin = contrastive_margin
        self.attention_scale = attention_scale
        self.gradient_log_scale = gradient_log_scale
        self.first_order = first_order
        self.representation_weight, self.support_weight = representation_weight, support_weight

    # -- fast weights ---------------------------------------------------------------------------

    def example_weights(self, gradients: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``m``: per-example gradients, per layer ``[N, out_l, in_l]`` -> fast weights of the same shapes."""
        return [generator(preprocess_gradients(g, self.gradient_log_scale))
                for generator, g in zip(self.example_generators, gradients, strict=True)]

    def task_weights(self, gradients: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``d``: per-step gradients, per layer ``[T, out_l, in_l]`` -> fast weights ``[out_l, in_l]``."""
        return [generator(preprocess_gradients(g.flatten(1), self.gradient_log_scale)).view(g.shape[1:])
                for generator, g in zip(self.task_generators, gradients, strict=True)]

    def contrastive_pairs(self, n: int, device: torch.device) -> torch.Tensor:
        """``[T, 2]`` support indices: ``T`` distinct unordered pairs in a seeded random order (all
        pairs, repeated, when there are fewer than ``T``). Fixed for a support size, so that a task's
        learner is a function of the model and the task."""
        pairs = torch.combinations(torch.arange(n), 2)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
        return pairs[order.repeat(math.ceil(self.representation_steps / len(pairs)))[: self.representation_steps]].to(
            device)

    def representation_gradients(self, h: torch.Tensor, support: TaskSplit, create_graph: bool,
                                 retain_graph: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The representation loss of ``u`` with slow weights on the support features ``h [N, D]``, and
        its gradient at each of the ``T`` steps, per layer ``[T, out_l, in_l]`` (Algorithm 1, lines 1-5)."""
        n = h.shape[0]
        with torch.enable_grad():
            if self.representation_loss_name == "contrastive":
                pairs = self.contrastive_pairs(n, h.device)  # [T, 2]
                steps = pairs.shape[0]
                out, inputs, pre = self.representation.traced(h[pairs.flatten()])  # rows: pair t -> 2t, 2t + 1
                step_of_row = torch.arange(steps, device=h.device).repeat_interleave(2)
                unit = F.normalize(out, dim=1).view(steps, 2, -1)
                distance = (unit[:, 0] - unit[:, 1]).pow(2).sum(1).clamp_min(1e-12).sqrt()
                same = (support.y[pairs[:, 0]] == support.y[pairs[:, 1]]).to(h.dtype)
                step_losses = same * distance**2 + (1 - same) * F.relu(self.contrastive_margin - distance) ** 2
            else:
                steps = min(self.representation_steps, n)
                step_of_row = torch.arange(n, device=h.device) * steps // n  # consecutive chunks
                out, inputs, pre = self.representation.traced(h)
                row_losses = F.cross_entropy(self.representation_head(out)[:, : support.ways], support.y,
                                             reduction="none")
                counts = torch.bincount(step_of_row, minlength=steps).to(h.dtype)
                step_losses = row_losses.new_zeros(steps).index_add(0, step_of_row, row_losses) / counts
            gradients = per_step_gradients(inputs, pre, step_losses, step_of_row, create_graph, retain_graph)
        return step_losses.mean(), gradients

    def support_gradients(self, h: torch.Tensor, support: TaskSplit, create_graph: bool,
                          retain_graph: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The base learner's loss with slow weights on every support example (features ``h [N, D]``),
        and each example's gradient, per layer ``[N, out_l, in_l]`` (Algorithm 1, lines 8-9)."""
        with torch.enable_grad():
            out, inputs, pre = self.base.traced(h)
            row_losses = F.cross_entropy(out[:, : support.ways], support.y, reduction="none")
            rows = torch.arange(h.shape[0], device=h.device)
            gradients = per_step_gradients(inputs, pre, row_losses, rows, create_graph, retain_graph)
        return row_losses.mean(), gradients

    def learner(self, support: TaskSplit) -> TaskMemory:
        """Read the support set ``x [N, ...]``, ``y [N]``: task-level fast weights, keys and the memory."""
        meta_gradients = torch.is_grad_enabled()
        # Under no_grad (evaluation) nothing is backpropagated: the gradients are constants.
        create_graph = meta_gradients and not self.first_order
        h_u = self.representation_features(support.x)  # [N, D]
        representation_loss, gradients = self.representation_gradients(h_u, support, create_graph, meta_gradients)
        task_weights = self.task_weights(gradients)  # Q*, per layer [out, in]
        keys = self.representation(h_u, task_weights)  # [N, R]
        h_b = self.base_features(support.x)  # [N, D]
        support_loss, gradients = self.support_gradients(h_b, support, create_graph, meta_gradients)
        values = self.example_weights(gradients)  # W*_i, per layer [N, out, in]
        return TaskMemory(self, task_weights, keys, values, representation_loss, support_loss)

    # -- the contract ---------------------------------------------------------------------------

    def trajectory(self, support: TaskSplit, steps: int) -> Iterator[nn.Module]:
        return self.unchanged(self.learner(support), steps)  # no inner loop

    def score(self, learner: nn.Module, query: TaskSplit) -> TaskResult:
        return Classification().result(learner(query.x), query)

    def task_losses(self, task: Task) -> tuple[torch.Tensor, dict[str, torch.Tensor], TaskResult]:
        """One training task: the minimised loss, its parts (the unweighted losses) and the query result.

        The forward passes are those of ``trajectory`` + ``score`` (the auxiliary losses are by-products
        of reading the support set), on private buffers folded back at the end like every training task.
        """
        with private_buffers(self, keep=True):
            *_, learner = self.trajectory(task.support, self.inner_steps)
            result = self.score(learner, task.query)
        parts = {"query_loss": result.loss, "representation_loss": learner.representation_loss,
                 "support_loss": learner.support_loss}
        loss = (result.loss + self.representation_weight * learner.representation_loss
                + self.support_weight * learner.support_loss)
        return loss, parts, result

    def train_task(self, task: Task) -> tuple[torch.Tensor, TaskResult]:
        loss, _, result = self.task_losses(task)
        return loss, result

    def meta_step(self, tasks: Sequence[Task], update: MetaUpdate) -> dict[str, float]:
        """The default meta-update (mean loss over the meta-batch, one backward per task), also
        logging the parts: ``train/loss = train/query_loss + representation_weight *
        train/representation_loss + support_weight * train/support_loss`` (task means)."""
        update.zero_grad()
        losses, accuracies = [], []
        parts: dict[str, list[torch.Tensor]] = {}
        for task in tasks:
            loss, terms, result = self.task_losses(task)
            (loss / len(tasks)).backward()
            losses.append(loss.detach())
            for name, value in terms.items():
                parts.setdefault(name, []).append(value.detach())
            if result.accuracy is not None:
                accuracies.append(result.accuracy.detach())
        metrics = update.report(torch.stack(losses).mean(), torch.stack(accuracies).mean() if accuracies else None,
                                {name: torch.stack(values).mean() for name, values in parts.items()})
        update.step(self.parameters())
        return metrics
