"""The batched meta-batch of the gradient-based family: every task of a meta-batch adapts at once.

The per-task path (:meth:`GradientBasedAlgorithm.trajectory`) adapts one learn2learn clone per
task: with one query per class most of a meta-iteration is per-op overhead (a meta-batch of 32
tasks at 5-way 1-shot, second order, 1 step, issues about 23,000 ops). Here all ``T`` tasks adapt
together: every adapted tensor is stacked ``[T, *shape]`` (the tasks' fast weights) and the
network runs on all tasks in one pass per layer, the tasks' channels side by side, ``[n, T*C, H,
W]``: a convolution is one ``conv2d(..., groups=T)`` with the tasks' kernels stacked, a linear
layer one ``baddbmm``, and a BatchNorm layer one fused ``batch_norm`` over ``T*C`` channels, which
is per-task batch statistics exactly.

**What it knows.** Modules and objectives, never an algorithm. It reads an algorithm only
through the hooks of :class:`~metarun.algorithms.gradient.GradientBasedAlgorithm` (the adapted
module and its adapted parameters, the inner rate per parameter and step, frozen features, the
per-step loss weights, first order or not at a step) and its objective's batched ``losses`` and
``results``; the algorithm says with ``batchable`` whether that describes it. So a new method
that fits the hooks is batched without a line here (``tests/test_vectorized.py`` defines one).
The layers it runs: nested plain ``nn.Sequential`` (metarun's ``Conv4`` and ``MLP`` are such),
``Conv2d`` (groups 1, zero padding), ``Linear``, ``BatchNorm1d/2d`` and
:class:`~metarun.algorithms.maml_plus_plus.PerStepBatchNorm` (with a momentum), ``ReLU``,
``MaxPool2d``, ``Flatten``, ``Identity`` and :class:`~metarun.backbones.SpatialMean`. Any other
module (Dropout, a custom forward, ...) keeps a run on the per-task path (``vectorize=auto``).

The meta-parameters stay the algorithm's own (the stacked fast weights start as views of them),
so checkpoints, configs and the per-task path are interchangeable; only the order of
floating-point sums differs (the parity gate, ``tests/test_vectorized.py``: 1e-10 relative in
float64). BatchNorm running statistics are folded back as the per-task loop folds them: every
training-mode pass of task 0, then of task 1, ..., as one closed-form sum of the exponential
moving average.

No host sync happens here: the only one of a batched meta-step is ``MetaUpdate.read``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.maml_plus_plus import PerStepBatchNorm
from metarun.backbones import SpatialMean
from metarun.errors import ConfigError
from metarun.grouped_conv import GroupedConv2d
from metarun.objectives import BatchResult, TaskResult
from metarun.tasks.types import Task, TaskBatch

log = logging.getLogger(__name__)

VECTORIZE_VALUES = ("auto", "true", "false")

# Evaluation tasks run in chunks of this many (memory grows with it; speed barely does past it).
EVAL_CHUNK = 32


def vectorize_option(value: object) -> str:
    """``algorithm.vectorize`` as ``"auto"``, ``"true"`` or ``"false"`` (YAML gives booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.lower() in VECTORIZE_VALUES:
        return value.lower()
    raise ConfigError(f"algorithm.vectorize must be auto, true or false, got {value!r}")


# --------------------------------------------------------------------------------------------
# What can be batched


def _plain(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` whose forward is ``cls``'s own (a subclass may change it)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, PerStepBatchNorm)


def unsupported_module(module: nn.Module) -> str | None:
    """Why ``module`` cannot run batched, or None when it can."""
    if _plain(module, nn.Sequential):
        return next((why for why in map(unsupported_module, module) if why), None)
    if _plain(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            return f"{module} (grouped or non-zero padding)"
        return None
    if any(_plain(module, cls) for cls in BATCHNORMS):
        if module.track_running_stats and module.momentum is None:
            return f"{module} (cumulative-average running statistics, momentum=None)"
        return None
    if _plain(module, nn.Flatten):
        return None if (module.start_dim, module.end_dim) == (1, -1) else f"{module} (flattens other dims)"
    if _plain(module, nn.MaxPool2d):
        return None if not module.return_indices else f"{module} (returns indices)"
    if any(_plain(module, cls) for cls in (nn.Linear, nn.ReLU, nn.Identity, SpatialMean)):
        return None
    return f"{type(module).__name__} (not one of the layers the batched path knows)"


def unsupported(algorithm: nn.Module) -> str | None:
    """Why ``algorithm`` cannot run batched, or None when it can (its ``batchable`` attribute and
    its modules; the shapes of a meta-batch and the speed rule are checked per call)."""
    if not getattr(algorithm, "batchable", False):
        return getattr(algorithm, "not_batchable_because", f"{type(algorithm).__name__} is not batchable")
    for module in (algorithm.adapted_module(), algorithm.frozen_features()):
        why = None if module is None else unsupported_module(module)
        if why:
            return why
    return None


# --------------------------------------------------------------------------------------------
# The speed rule of vectorize=auto


# Per-task input values up to which the batched path is faster on a CPU (set from
# scripts/bench_maml.py's grid, docs/results.md "Speed").
CPU_MAX_PIXELS_PER_TASK = 20 * 28 * 28


@dataclass(frozen=True)
class BatchShape:
    tasks: int
    support: int
    query: int
    input_shape: tuple[int, ...]
    device: torch.device


def batch_shape(tasks: Sequence[Task]) -> BatchShape:
    if isinstance(tasks, TaskBatch):
        sx, qx = tasks.support_x, tasks.query_x
        return BatchShape(sx.shape[0], sx.shape[1], qx.shape[1], tuple(sx.shape[2:]), sx.device)
    first = tasks[0]
    return BatchShape(len(tasks), first.support.x.shape[0], first.query.x.shape[0],
                      tuple(first.support.x.shape[1:]), first.support.x.device)


def faster_vectorized(batch_shape: BatchShape) -> tuple[bool, str]:
    """Whether the batched path is expected to be faster for this shape, and why.

    On CUDA it always is (the per-task path issues ~700 small kernels per task; not measured in
    this repository yet). On a CPU it is faster while a task's batch is small, where per-op
    overhead dominates: scripts/bench_maml.py (docs/results.md, "Speed") measured it 1.2 to 1.8x
    the per-task loop with one query per class and mostly slower with 15 per class. The rule: the
    input values of a task (support + query images times their size) must be at most
    ``CPU_MAX_PIXELS_PER_TASK``.
    """
    if batch_shape.device.type != "cpu":
        return True, f"on {batch_shape.device.type}"
    per_task = batch_shape.support + batch_shape.query
    pixels = math.prod(batch_shape.input_shape)
    budget = CPU_MAX_PIXELS_PER_TASK
    if per_task * pixels <= budget:
        return True, f"{per_task} inputs of {pixels} values per task on a CPU (<= {budget} values)"
    return False, (f"{per_task} inputs of {pixels} values per task on a CPU (> {budget}: the per-task loop "
                   f"measured faster there)")


def choose(algorithm: nn.Module, tasks: Sequence[Task], phase: str) -> bool:
    """Whether ``algorithm`` runs ``tasks`` batched, by its ``vectorize`` option; logs the path
    taken the first time and whenever it changes (per ``phase``: training or evaluation)."""
    option = algorithm.vectorize
    if option == "false":
        chosen, why = False, "vectorize=false"
    else:
        why = unsupported(algorithm)
        if why is None and not TaskBatch.stackable(tasks):
            why = "the tasks differ in shape"
        if why is not None:
            if option == "true":
                raise ConfigError(f"algorithm.vectorize=true, but this run cannot be vectorised: {why}; use "
                                  f"vectorize=auto (falls back to the per-task loop) or false")
            chosen, why = False, f"vectorize=auto, not vectorisable: {why}"
        elif option == "true":
            chosen, why = True, "vectorize=true"
        else:
            chosen, reason = faster_vectorized(batch_shape(tasks))
            why = f"vectorize=auto: {reason}"
    logged = algorithm.__dict__.setdefault("_vectorize_logged", {})
    if logged.get(phase) != chosen:
        logged[phase] = chosen
        path = "vectorised meta-batch (grouped convolutions)" if chosen else "per-task loop"
        log.info("%s %s: %s (%s)", type(algorithm).__name__, phase, path, why)
    return chosen


# --------------------------------------------------------------------------------------------
# The engine


@dataclass
class Outcome:
    """What :meth:`Engine.run` gives: the query results after the scored steps, and the batch
    statistics to fold into the running ones."""

    scored: dict[int, BatchResult] = field(default_factory=dict)
    # Per BatchNorm layer and statistics row: the [T, C] batch means and unbiased variances of
    # every training-mode pass to fold, in the order a task runs them.
    statistics: dict[tuple[nn.Module, int], list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    passes: dict[nn.Module, int] = field(default_factory=dict)  # folded passes per layer and task


class Engine:
    """Adapts and scores the ``T`` tasks of a batch at once, for one batchable gradient-based
    algorithm, through its hooks (see the module docstring).

    Args:
        algorithm: a :class:`~metarun.algorithms.gradient.GradientBasedAlgorithm` whose
            :func:`unsupported` is None.
    """

    def __init__(self, algorithm: nn.Module) -> None:
        self.algorithm = algorithm
        self.objective = algorithm.objective
        self.rate = algorithm.inner_rate
        self.root: nn.Module = algorithm.adapted_module()
        self.backbone: nn.Module | None = algorithm.frozen_features()
        adapted = algorithm.adapted_parameters(self.root)
        self.names = [name for name, _ in adapted]
        self.meta = dict(adapted)
        # (owner module, attribute) -> name of the adapted tensor
        self.keys: dict[tuple[nn.Module, str], str] = {}
        adapted_ids = {id(p) for _, p in adapted}
        for prefix, owner in self.root.named_modules():
            for pname, parameter in owner._parameters.items():
                if parameter is not None and id(parameter) in adapted_ids:
                    self.keys[(owner, pname)] = f"{prefix}.{pname}" if prefix else pname
        self.second_order = False  # set by run(): second-order steps use GroupedConv2d

    # ---- one forward pass of all T learners ---------------------------------------------------

    def forward(self, module: nn.Module, x: torch.Tensor, fast: dict[str, torch.Tensor], step: int,
                outcome: Outcome | None) -> torch.Tensor:
        """``module`` on ``x [T, n, ...]`` with the tasks' ``fast`` weights (``[T, *shape]``; shared
        meta-parameters for the others); returns ``[T, n, out]``. Training-mode BatchNorm
        statistics go to ``outcome`` (None: not folded)."""
        tasks = x.shape[0]
        y = self._group(module, self.to_grouped(x), fast, step, outcome, tasks)
        return self.from_grouped(y.reshape(y.shape[0], -1), tasks)

    @staticmethod
    def to_grouped(x: torch.Tensor) -> torch.Tensor:
        """``[T, n, C, ...] -> [n, T*C, ...]``: the tasks' channels side by side."""
        t, n = x.shape[:2]
        return x.transpose(0, 1).reshape(n, t * x.shape[2], *x.shape[3:])

    @staticmethod
    def from_grouped(y: torch.Tensor, tasks: int) -> torch.Tensor:
        """``[n, T*out] -> [T, n, out]`` (a view)."""
        return y.view(y.shape[0], tasks, -1).transpose(0, 1)

    def _param(self, owner: nn.Module, name: str, fast: dict[str, torch.Tensor]) -> torch.Tensor | None:
        key = self.keys.get((owner, name))
        return fast[key] if key is not None else getattr(owner, name)

    @staticmethod
    def _stacked(value: torch.Tensor | None, tasks: int, fast: bool) -> torch.Tensor | None:
        """A fast tensor as it is (``[T, *shape]``), a shared one broadcast to ``[T, *shape]``."""
        if value is None or fast:
            return value
        return value.unsqueeze(0).expand(tasks, *value.shape)

    def _bn_parts(self, bn: nn.Module, step: int, fast: dict[str, torch.Tensor]):
        """The BatchNorm layer's (row, weight, bias, running mean, running var, batch statistics?)
        at adaptation step ``step``; weight/bias come with whether they are fast (stacked)."""
        row = 0
        weight, bias = self._param(bn, "weight", fast), self._param(bn, "bias", fast)
        mean, var = bn.running_mean, bn.running_var
        weight_fast = (bn, "weight") in self.keys
        bias_fast = (bn, "bias") in self.keys
        if isinstance(bn, PerStepBatchNorm):
            row = min(step, bn.sets - 1)
            if bn.per_step_statistics:
                mean, var = mean[row], var[row]
            if bn.per_step_weights:
                weight, bias = weight[row], bias[row]
        batch_statistics = bn.training or (mean is None and var is None)
        record = batch_statistics and bn.track_running_stats and bn.running_mean is not None
        return row, (weight, weight_fast), (bias, bias_fast), mean, var, batch_statistics, record

    def _group(self, module, x, fast, step, outcome, tasks) -> torch.Tensor:
        """``module`` in the grouped layout ``[n, T*C, ...]``."""
        if _plain(module, nn.Sequential):
            for child in module:
                x = self._group(child, x, fast, step, outcome, tasks)
            return x
        if _plain(module, nn.Conv2d):
            w = self._stacked(self._param(module, "weight", fast), tasks, (module, "weight") in self.keys)
            b = self._stacked(self._param(module, "bias", fast), tasks, (module, "bias") in self.keys)
            w = w.reshape(-1, *w.shape[2:])
            if not (self.second_order and isinstance(module.padding, tuple)):
                return F.conv2d(x, w, None if b is None else b.reshape(-1), module.stride, module.padding,
                                module.dilation, groups=tasks)
            y = GroupedConv2d.apply(x, w, module.stride, module.padding, module.dilation, tasks)
            return y if b is None else y + b.reshape(1, -1, 1, 1)
        if _plain(module, nn.Linear):
            w = self._stacked(self._param(module, "weight", fast), tasks, (module, "weight") in self.keys)
            b = self._stacked(self._param(module, "bias", fast), tasks, (module, "bias") in self.keys)
            n = x.shape[0]
            inputs = x.reshape(n, tasks, -1).transpose(0, 1)  # [T, n, in]
            if b is None:
                y = torch.bmm(inputs, w.transpose(1, 2))
            else:
                y = torch.baddbmm(b.unsqueeze(1), inputs, w.transpose(1, 2))  # [T, n, out]
            return y.transpose(0, 1).reshape(n, -1)
        if any(_plain(module, cls) for cls in BATCHNORMS):
            row, (w, w_fast), (b, b_fast), mean, var, batch_statistics, record = self._bn_parts(module, step, fast)
            w = self._stacked(w, tasks, w_fast)
            b = self._stacked(b, tasks, b_fast)
            w = None if w is None else w.reshape(-1)
            b = None if b is None else b.reshape(-1)
            if batch_statistics:
                if outcome is not None and record:
                    # momentum 1 leaves the batch mean and unbiased variance in the buffers given.
                    channels = x.shape[1]
                    batch_mean = x.new_zeros(channels)
                    batch_var = x.new_ones(channels)
                    y = F.batch_norm(x, batch_mean, batch_var, w, b, True, 1.0, module.eps)
                    outcome.statistics.setdefault((module, row), []).append(
                        (batch_mean.view(tasks, -1), batch_var.view(tasks, -1)))
                    outcome.passes[module] = outcome.passes.get(module, 0) + 1
                    return y
                return F.batch_norm(x, None, None, w, b, True, 0.0, module.eps)
            return F.batch_norm(x, mean.repeat(tasks), var.repeat(tasks), w, b, False, 0.0, module.eps)
        if _plain(module, nn.ReLU):
            return F.relu(x)
        if _plain(module, nn.MaxPool2d):
            return F.max_pool2d(x, module.kernel_size, module.stride, module.padding, module.dilation,
                                ceil_mode=module.ceil_mode)
        if _plain(module, nn.Flatten):
            return x.reshape(x.shape[0], -1)
        if _plain(module, nn.Identity):
            return x
        if _plain(module, SpatialMean):
            return x.mean(dim=(2, 3))
        raise TypeError(f"not vectorisable: {module}")

    # ---- adaptation ----------------------------------------------------------------------------

    def start(self, tasks: int, meta_gradients: bool) -> dict[str, torch.Tensor]:
        """Every task's fast weights before adaptation, ``{name: [T, *shape]}``: views of the
        meta-parameters (cut off from them when no meta-gradient is wanted)."""
        with torch.enable_grad():
            fast = {}
            for name in self.names:
                base = self.meta[name] if meta_gradients else self.meta[name].detach().requires_grad_()
                fast[name] = base.unsqueeze(0).expand(tasks, *base.shape)
        return fast

    def run(self, batch: TaskBatch, steps: int, scored: Iterable[int], fold: int | None) -> Outcome:
        """Adapt the batch's learners ``steps`` steps and score them on the query set after the
        steps in ``scored``. Training-mode BatchNorm statistics of the support passes and of the
        query pass after step ``fold`` (None: none) are recorded for :meth:`fold`.

        As the per-task trajectory: with gradients enabled (meta-training) the scores carry the
        meta-gradient (second order at the steps where ``first_order_at`` is False); without,
        the learners adapt a detached copy with first-order steps.
        """
        algorithm = self.algorithm
        meta_gradients = torch.is_grad_enabled()
        first_order = [algorithm.first_order_at(step) or not meta_gradients for step in range(steps)]
        self.second_order = not all(first_order)
        scored = set(scored)
        outcome = Outcome()
        record = outcome if fold is not None else None
        fast = self.start(len(batch), meta_gradients)
        support_x, query_x = batch.support_x, batch.query_x
        if self.backbone is not None:  # frozen features: computed once per split
            support_x = self.forward(self.backbone, support_x, {}, 0, record)
        query_features = None
        for step in range(steps + 1):
            if step in scored:
                if self.backbone is not None:
                    if query_features is None:
                        query_features = self.forward(self.backbone, query_x, {}, 0, record)
                    predictions = self.forward(self.root, query_features, fast, step, None)
                else:
                    predictions = self.forward(self.root, query_x, fast, step, record if step == fold else None)
                outcome.scored[step] = self.objective.results(predictions, batch.query_y, batch.ways)
            if step == steps:
                break
            with torch.enable_grad():
                predictions = self.forward(self.root, support_x, fast, step, record)
                loss = self.objective.losses(predictions, batch.support_y, batch.ways).sum()
                grads = torch.autograd.grad(loss, [fast[name] for name in self.names],
                                            retain_graph=not first_order[step], create_graph=not first_order[step])
                fast = {name: fast[name] + (-self.rate(name, step)) * grad
                        for name, grad in zip(self.names, grads, strict=True)}
        return outcome

    @staticmethod
    def fold(outcome: Outcome, tasks: int) -> None:
        """Fold the recorded batch statistics into the running ones, as the per-task loop does:
        task after task, each task's passes in order: ``r <- (1 - m) r + m s`` for every pass,
        computed as ``(1 - m)^N r + sum_i m (1 - m)^(N - 1 - i) s_i``."""
        with torch.no_grad():
            for (bn, row), passes in outcome.statistics.items():
                momentum = bn.momentum
                means = torch.stack([m for m, _ in passes], dim=1).flatten(0, 1)  # [T * P, C], task-major
                variances = torch.stack([v for _, v in passes], dim=1).flatten(0, 1)
                count = means.shape[0]
                decay = torch.full((count,), 1.0 - momentum, dtype=torch.float64, device=means.device)
                weights = (momentum * decay.pow(torch.arange(count - 1, -1, -1, device=means.device,
                                                            dtype=torch.float64))).to(means.dtype)
                keep = (1.0 - momentum) ** count
                per_step = isinstance(bn, PerStepBatchNorm) and bn.per_step_statistics
                running_mean = bn.running_mean[row] if per_step else bn.running_mean
                running_var = bn.running_var[row] if per_step else bn.running_var
                running_mean.mul_(keep).add_(weights @ means)
                running_var.mul_(keep).add_(weights @ variances)
                if per_step:
                    bn.row_passes[row] += count
            for bn, passes in outcome.passes.items():
                if bn.num_batches_tracked is not None:
                    bn.num_batches_tracked.add_(passes * tasks)


# --------------------------------------------------------------------------------------------
# Evaluation tasks


def run_batch(algorithm: nn.Module, tasks: Sequence[Task], steps: int, every_step: bool) -> list[list[TaskResult]]:
    """``Algorithm.run_task`` for a batch of tasks (evaluation: nothing is folded back)."""
    batch = TaskBatch.of(tasks)
    scored = list(range(steps + 1)) if every_step else [steps]
    outcome = Engine(algorithm).run(batch, steps, scored, fold=None)
    return [[outcome.scored[step].task(t) for step in scored] for t in range(len(batch))]


def run_tasks(algorithm: nn.Module, tasks: Iterable[Task], steps: int, every_step: bool) -> list[list[TaskResult]]:
    """Every task's results (``Algorithm.run_tasks``): in chunks of :data:`EVAL_CHUNK` tasks,
    batched where :func:`choose` says so, else task by task."""
    results: list[list[TaskResult]] = []
    chunk: list[Task] = []

    def flush() -> None:
        if chunk and choose(algorithm, chunk, "evaluation"):
            results.extend(run_batch(algorithm, chunk, steps, every_step))
        else:
            results.extend(algorithm.run_task(task, steps, every_step) for task in chunk)
        chunk.clear()

    for task in tasks:
        chunk.append(task)
        if len(chunk) == EVAL_CHUNK:
            flush()
    flush()
    return results
