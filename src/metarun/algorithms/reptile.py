"""Reptile: first-order meta-learning by moving towards the adapted weights."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from metarun.algorithms.base import Algorithm, MetaUpdate, private_buffers
from metarun.algorithms.gradient import classifier
from metarun.errors import ConfigError
from metarun.objectives import Classification, Objective, TaskResult
from metarun.tasks.types import Task, TaskSplit

INNER_OPTIMIZERS = ("sgd", "adam")
# The authors' inner optimizer: TensorFlow's Adam with beta1 = 0 and its default beta2 and epsilon.
ADAM_BETA2 = 0.999
ADAM_EPSILON = 1e-8


class Adapted(nn.Module):
    """A Reptile learner: an adapted copy of the network, and the support inputs it was adapted on.

    ``forward``: ``[B, ...] -> [B, outputs]``. ``support_x [ways * shots, ...]`` is kept for the
    non-transductive evaluation, which classifies each query sample together with them.
    """

    def __init__(self, network: nn.Module, support_x: torch.Tensor) -> None:
        super().__init__()
        self.network = network
        self.support_x = support_x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


class Reptile(Algorithm):
    """Reptile (Nichol, Achiam, Schulman, "On First-Order Meta-Learning Algorithms", arXiv:1803.02999, 2018).

    The model is ``features -> linear head``: ``[B, ...] -> [B, outputs]``, with
    ``outputs = objective.outputs(max(ways, train_ways))`` (an N-way task reads the first N).

    Inner loop (training and evaluation alike): a copy ``phi`` of the meta-parameters ``theta``,
    detached (nothing is backpropagated through it), takes ``k`` steps of plain SGD or of Adam with
    ``betas=(0, 0.999)`` (the authors' choice) with step size ``inner_lr`` on the support loss.
    Adam is the authors' TensorFlow one (:meth:`step`), and as in their code its state (second
    moments, step count) is not reset between tasks: it lives in buffers (``self.adam``) that
    training tasks carry over one to the next, evaluation uses without changing (their code
    restored it after each test task), and checkpoints save, like BatchNorm's running statistics.
    Each step sees a minibatch of ``inner_batch_size`` support samples, drawn as the authors'
    ``_mini_batches`` does without replacement: the batches cut a stream of successive random
    permutations of the support set, so a batch may span two of them and hold a sample twice when
    the support set is smaller than the batch (``null``: every step sees the whole support set, in
    order). In training the permutations come from torch's global RNG (saved in checkpoints);
    :meth:`trajectory` (evaluation) draws them from a generator with a fixed seed, so a model
    scores the same on the same task every time.

    Outer update (:meth:`meta_step`): for the meta-batch's tasks ``i = 1..n``, adapt ``phi_i`` with
    ``inner_steps`` steps, then ``theta <- theta + eps * mean_i(phi_i - theta)``, applied by Reptile
    itself without a gradient. The loop's optimizer, its schedule and ``grad_clip`` are not used:
    an optimizer such as Adam applied to ``theta - phi`` would not be Reptile. ``eps`` is annealed
    linearly from ``outer_lr`` (iteration 0) towards ``outer_lr_final`` (reached after the last
    iteration), as the authors' ``frac_done`` schedule, from :meth:`on_iteration`'s two numbers.

    Scoring (:meth:`score`): ``transductive`` scores the whole query set ``[q, ...]`` in one
    forward pass (BatchNorm on the query batch's statistics with ``eval.bn_batch_stats=true``);
    otherwise, as the authors' non-transductive test, each query sample is classified in its own
    forward pass of ``cat(support.x, query.x[i:i+1])`` ``[ways * shots + 1, ...]``, its row the
    last one, so BatchNorm sees the support set and that one sample. Either way predictions are
    ``[q, ways]`` class probabilities (``[q, dim]`` for regression).

    Buffers (BatchNorm running statistics, Adam's state) are learned as in the default meta-step:
    each training task (its inner loop and its query pass) runs on private buffers folded back into
    the meta-model task after task. ``train/loss`` and ``train/acc`` are the adapted learners'
    query loss and accuracy, from one forward pass of the query set whatever ``transductive``
    says (they are a diagnostic: the update does not use them, and a pass per query sample would
    cost more than the inner loop).

    Args:
        features: backbone ``[B, ...] -> [B, out_features]``.
        ways: classes per evaluation task.
        inner_optimizer: ``"sgd"`` or ``"adam"`` (Adam with ``beta1 = 0``).
        inner_lr: step size of the inner loop (authors: Adam, 1e-3 for 5-way).
        inner_batch_size: support samples per inner step (authors: 10), or None: the whole support set.
        inner_steps: inner steps during meta-training (authors: 5 Omniglot 5-way, 8 mini-ImageNet).
        eval_inner_steps: inner steps at evaluation (authors: 50).
        outer_lr: outer step size ``eps`` at the first iteration (authors: 1.0).
        outer_lr_final: ``eps`` at the end of training, reached linearly (authors: 0.0).
        transductive: score the query set in one batch (True) or each query sample with the support set.
        train_ways: ways of meta-training tasks (``None``: ``ways``); at least ``ways``.
        objective: the task's loss and metrics (default: classification).
    """

    def __init__(self, features: nn.Module, ways: int, inner_optimizer: str, inner_lr: float,
                 inner_batch_size: int | None, inner_steps: int, eval_inner_steps: int, outer_lr: float,
                 outer_lr_final: float, transductive: bool, train_ways: int | None = None,
                 objective: Objective | None = None) -> None:
        super().__init__(inner_steps, eval_inner_steps)
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ConfigError(f"algorithm.inner_optimizer must be one of {', '.join(INNER_OPTIMIZERS)}, "
                              f"got {inner_optimizer!r}")
        if inner_lr < 0:
            raise ConfigError(f"algorithm.inner_lr must be >= 0, got {inner_lr}")
        if inner_batch_size is not None and inner_batch_size < 1:
            raise ConfigError(f"algorithm.inner_batch_size must be >= 1 or null (the whole support set), "
                              f"got {inner_batch_size}")
        if outer_lr < 0 or outer_lr_final < 0:
            raise ConfigError(f"algorithm.outer_lr and outer_lr_final must be >= 0, got {outer_lr}/{outer_lr_final}")
        self.inner_optimizer = inner_optimizer
        self.inner_lr = inner_lr
        self.inner_batch_size = inner_batch_size
        self.outer_lr = outer_lr
        self.outer_lr_final = outer_lr_final
        self.transductive = transductive
        self.objective = objective or Classification()
        self.model = classifier(features, self.output_units(ways, train_ways, self.objective, "reptile"))
        self.outer_step = outer_lr  # eps of the next meta-update: on_iteration sets it
        if inner_optimizer == "adam":
            # The inner Adam's state (second moments, step count) is learned state, as BatchNorm's running
            # statistics are: kept in buffers, carried from training task to training task (the authors'
            # optimizer kept its slots), used but not changed by evaluation, saved in checkpoints.
            self.adam = nn.Module()
            for index, parameter in enumerate(self.model.parameters()):
                self.adam.register_buffer(f"second_moment_{index}", torch.zeros_like(parameter))
            self.adam.register_buffer("steps", torch.zeros((), dtype=torch.long))

    # -- inner loop -------------------------------------------------------------------------------

    def on_iteration(self, iteration: int, iterations: int) -> None:
        done = iteration / iterations
        self.outer_step = (1 - done) * self.outer_lr + done * self.outer_lr_final

    def batches(self, samples: int, steps: int, generator: torch.Generator | None,
                device: torch.device) -> list[torch.Tensor | None]:
        """Support indices ``[inner_batch_size]`` of each of ``steps`` steps (None: the whole set)."""
        if self.inner_batch_size is None or steps == 0:
            return [None] * steps
        needed = steps * self.inner_batch_size
        stream = torch.cat([torch.randperm(samples, generator=generator) for _ in range(math.ceil(needed / samples))])
        return list(stream[:needed].to(device).view(steps, self.inner_batch_size))

    def adaptation(self, support: TaskSplit, steps: int, generator: torch.Generator | None) -> Iterator[Adapted]:
        """The learner after 0..``steps`` inner steps, on a copy of the parameters that shares the
        meta-model's buffers (the private copies inside ``private_buffers``)."""
        shared = {id(buffer): buffer for buffer in self.model.buffers()}
        network = copy.deepcopy(self.model, memo=shared)  # new parameters, the same buffer tensors
        weights = [w.requires_grad_(True) for w in network.parameters()]
        learner = Adapted(network, support.x)
        yield learner
        for batch in self.batches(len(support.x), steps, generator, support.x.device):
            split = support if batch is None else TaskSplit(support.x[batch], support.y[batch], support.ways)
            with torch.enable_grad():
                loss = self.objective.loss(network(split.x), split)
                gradients = torch.autograd.grad(loss, weights, allow_unused=True)
            used = [(w, g, i) for i, (w, g) in enumerate(zip(weights, gradients, strict=True)) if g is not None]
            with torch.no_grad():
                self.step([w for w, _, _ in used], [g for _, g, _ in used], [i for _, _, i in used])
            yield learner

    def step(self, weights: list[torch.Tensor], gradients: list[torch.Tensor], indices: list[int]) -> None:
        """One inner step, in place. SGD: ``w <- w - lr g``. Adam as the authors' (TensorFlow's, with
        ``beta1 = 0``): ``t <- t + 1``, ``v <- b2 v + (1 - b2) g^2``, ``w <- w - lr sqrt(1 - b2^t) g / (sqrt(v) + eps)``,
        on the state in ``self.adam`` (``indices``: the weights' positions among the parameters)."""
        if self.inner_optimizer == "sgd":
            torch._foreach_add_(weights, gradients, alpha=-self.inner_lr)
            return
        moments = [self.adam.get_buffer(f"second_moment_{i}") for i in indices]
        steps = self.adam.get_buffer("steps")
        steps.add_(1)
        torch._foreach_mul_(moments, ADAM_BETA2)
        torch._foreach_addcmul_(moments, gradients, gradients, value=1 - ADAM_BETA2)
        updates = torch._foreach_div(gradients, torch._foreach_add(torch._foreach_sqrt(moments), ADAM_EPSILON))
        decay = torch.full_like(steps, ADAM_BETA2, dtype=weights[0].dtype) ** steps
        torch._foreach_mul_(updates, self.inner_lr * (1 - decay).sqrt())
        torch._foreach_sub_(weights, updates)

    def trajectory(self, support: TaskSplit, steps: int) -> Iterator[nn.Module]:
        # A fixed seed for the minibatch order: evaluation is a function of the model and the task.
        return self.adaptation(support, steps, torch.Generator().manual_seed(0))

    def score(self, learner: nn.Module, query: TaskSplit) -> TaskResult:
        if self.transductive:
            predictions = learner(query.x)
        else:
            predictions = torch.cat([learner(torch.cat([learner.support_x, query.x[i:i + 1]]))[-1:]
                                     for i in range(len(query.x))])
        return self.objective.result(predictions, query)

    # -- outer loop -------------------------------------------------------------------------------

    def meta_step(self, tasks: Sequence[Task], update: MetaUpdate) -> dict[str, float]:
        """``theta <- theta + eps * mean_i(phi_i - theta)``; ``update`` lends its non-finite check and the
        mean over ranks (:meth:`MetaUpdate.average`), not its optimizer."""
        parameters = list(self.model.parameters())
        totals = [torch.zeros_like(p) for p in parameters]  # sum_i (phi_i - theta): small numbers, summed exactly
        losses, accuracies = [], []
        with torch.no_grad():
            for task in tasks:
                with private_buffers(self, keep=True):  # running statistics are learned task after task
                    *_, learner = self.adaptation(task.support, self.inner_steps, task.support.generator())
                    result = self.objective.result(learner(task.query.x), task.query)
                for total, weight, parameter in zip(totals, learner.network.parameters(), parameters, strict=True):
                    total.add_(weight - parameter)
                losses.append(result.loss)
                if result.accuracy is not None:
                    accuracies.append(result.accuracy)
            metrics = update.report(torch.stack(losses).mean(), torch.stack(accuracies).mean() if accuracies else None)
            means = [total / len(tasks) for total in totals]  # mean_i (phi_i - theta) over this rank's tasks
            update.average(means)  # ... over the whole meta-batch when it is split across ranks
            for parameter, mean in zip(parameters, means, strict=True):
                parameter.add_(mean, alpha=self.outer_step)
        return metrics
