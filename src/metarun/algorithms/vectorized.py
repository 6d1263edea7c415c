"""A vectorised meta-batch for the gradient-based family (MAML, FOMAML, Meta-SGD, ANIL, MAML++).

The per-task path (``Algorithm.meta_step``) adapts one learn2learn clone per task: with one query
per class most of a meta-iteration is per-op overhead (a meta-batch of 32 tasks at 5-way 1-shot,
second order, 1 step, issues about 23,000 ops). Here all ``T`` tasks of a meta-batch adapt at
once: every adapted tensor is stacked ``[T, *shape]`` (the tasks' fast weights), and the network
runs on all tasks in one pass per layer:

- **grouped** (the default backend): the tasks' channels sit side by side, ``[n, T*C, H, W]``;
  a convolution is one ``conv2d(..., groups=T)`` with the tasks' kernels stacked, a linear layer
  one ``baddbmm``, and a BatchNorm layer one fused ``batch_norm`` over ``T*C`` channels, which is
  per-task batch statistics exactly (no vmap involved: its double backward is the per-task one).
- **vmap**: the per-task forward under ``torch.func.vmap``; kept to measure against and for the
  parity gate. BatchNorm inside it is written from mean, var and rsqrt (``batchnorm="explicit"``):
  vmap over the fused ``F.batch_norm`` (``batchnorm="fused"``) gives silently wrong second-order
  meta-gradients, which ``tests/test_vectorized.py`` shows the gate catching.

The meta-parameters stay the ``l2l.algorithms.MAML`` / ``MetaSGD`` module's parameters (the
stacked fast weights start as views of them), so checkpoints, configs and the per-task path are
interchangeable; only the order of floating-point sums differs (the parity gate: 1e-10 relative
in float64). BatchNorm running statistics are folded back as the per-task loop folds them: every
training-mode pass of task 0, then of task 1, ..., in the order each task runs them, as one
closed-form sum of the exponential moving average (no per-task loop).

What it runs, and what stays on the per-task path (``unsupported``):

- algorithms: exactly :class:`~metarun.algorithms.maml.MAML` (every MAML++ switch: per-step
  BatchNorm statistics and weights, LSLR, MSL and DA), :class:`~metarun.algorithms.metasgd.MetaSGD`
  and :class:`~metarun.algorithms.anil.ANIL`; a subclass (it may override a hook) does not.
- networks: nested ``nn.Sequential`` of ``Conv2d`` (groups 1, zero padding), ``Linear``,
  ``BatchNorm1d/2d`` and :class:`PerStepBatchNorm` (with a momentum), ``ReLU``, ``MaxPool2d``,
  ``Flatten``, ``Identity``, and metarun's ``Conv4`` and ``MLP``; objectives: classification and
  regression. Any other module (Dropout, a custom forward, ...) stays per task.
- tasks: a meta-batch whose tasks share one shape (they always do in a run).

No host sync happens here: the only one of a vectorised meta-step is ``MetaUpdate.read``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from metarun._learn2learn import l2l
from metarun.algorithms.base import MetaUpdate
from metarun.algorithms.maml_plus_plus import PerStepBatchNorm
from metarun.backbones import MLP, Conv4
from metarun.errors import ConfigError
from metarun.objectives import Classification, Regression, TaskResult
from metarun.tasks.types import Task, TaskBatch

log = logging.getLogger(__name__)

VECTORIZE_VALUES = ("auto", "true", "false")
BACKENDS = ("grouped", "vmap")

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
# What can be vectorised


def _plain(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` whose forward is ``cls``'s own (a subclass may change it)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, PerStepBatchNorm)


def unsupported_module(module: nn.Module) -> str | None:
    """Why ``module`` cannot run vectorised, or None when it can."""
    if _plain(module, nn.Sequential):
        return next((why for why in map(unsupported_module, module) if why), None)
    if _plain(module, Conv4):
        return unsupported_module(module.blocks)
    if _plain(module, MLP):
        return unsupported_module(module.layers)
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
    if any(_plain(module, cls) for cls in (nn.Linear, nn.ReLU, nn.Identity)):
        return None
    return f"{type(module).__name__} (not one of the layers the vectorised path knows)"


def unsupported(algorithm: nn.Module) -> str | None:
    """Why ``algorithm`` cannot run vectorised, or None when it can (structure only; the shapes
    of a meta-batch and the speed rule are checked per call)."""
    from metarun.algorithms.anil import ANIL
    from metarun.algorithms.maml import MAML
    from metarun.algorithms.metasgd import MetaSGD

    if type(algorithm) not in (MAML, MetaSGD, ANIL):
        return f"{type(algorithm).__name__} is not MAML, MetaSGD or ANIL (a subclass may change a hook)"
    if type(algorithm.objective) not in (Classification, Regression):
        return f"objective {type(algorithm.objective).__name__}"
    if type(algorithm.learnable) not in (l2l.algorithms.MAML, l2l.algorithms.MetaSGD):
        return f"learner {type(algorithm.learnable).__name__}"
    modules = [algorithm.learnable.module] + ([algorithm.features] if type(algorithm) is ANIL else [])
    for module in modules:
        why = unsupported_module(module)
        if why:
            return why
    return None


# --------------------------------------------------------------------------------------------
# The speed rule of vectorize=auto


def faster_vectorized(algorithm: nn.Module, batch_shape: BatchShape) -> tuple[bool, str]:
    """Whether the vectorised path is expected to be faster for this shape, and why.

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


# Per-task input values up to which the vectorised path is faster on a CPU (set from
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


def choose(algorithm: nn.Module, tasks: Sequence[Task], phase: str) -> bool:
    """Whether ``algorithm`` runs ``tasks`` vectorised, by its ``vectorize`` option; logs the path
    taken the first time and whenever it changes (per ``phase``: training or evaluation)."""
    option = getattr(algorithm, "vectorize", "false")
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
            chosen, reason = faster_vectorized(algorithm, batch_shape(tasks))
            why = f"vectorize=auto: {reason}"
    logged = algorithm.__dict__.setdefault("_vectorize_logged", {})
    if logged.get(phase) != chosen:
        logged[phase] = chosen
        path = "vectorised meta-batch (grouped convolutions)" if chosen else "per-task loop"
        log.info("%s %s: %s (%s)", type(algorithm).__name__, phase, path, why)
    return chosen


# --------------------------------------------------------------------------------------------
# A grouped convolution whose double backward stays grouped


class GroupedConv2d(torch.autograd.Function):
    """``F.conv2d(x, weight, None, stride, padding, dilation, groups)`` with a backward written
    from differentiable grouped convolutions, for second-order meta-gradients.

    PyTorch's own double backward of a grouped convolution (``_convolution_double_backward``)
    computes its weight-gradient term with one convolution per group: at 32 tasks a second-order
    meta-step issues ~100 extra small convolutions. Here the backward is ``grad_x =
    conv_transpose2d(grad_y, weight)`` and ``grad_weight = ConvWeightGrad(x, grad_y)``, whose own
    backward is again one grouped ``conv_transpose2d`` and one grouped ``conv2d``; the outer
    backward of a MAML step therefore runs every convolution once for all tasks. (In the same
    process: +15% second-order meta-it/s at meta-batch 32, 1 step; first order gains nothing, so
    the engine uses it for second order only.) ``tests/test_vectorized.py`` checks it with
    ``gradcheck`` and ``gradgradcheck``; the parity gate covers it end to end.

    Shapes: ``x [n, groups*C_in, H, W]``, ``weight [groups*C_out, C_in, kH, kW]`` -> ``[n, groups*C_out, H', W']``.
    """

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(grad_y, weight, x.shape, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            grad_weight = ConvWeightGrad.apply(x, grad_y, weight.shape, stride, padding, dilation, groups)
        return grad_x, grad_weight, None, None, None, None


class ConvWeightGrad(torch.autograd.Function):
    """The weight gradient of :class:`GroupedConv2d`, differentiable in ``x`` and ``grad_y``:
    ``<ConvWeightGrad(x, g), h>`` is linear in each, with gradients ``conv_transpose2d(g, h)``
    (for ``x``) and ``conv2d(x, h)`` (for ``g``)."""

    @staticmethod
    def forward(ctx, x, grad_y, weight_shape, stride, padding, dilation, groups):
        ctx.save_for_backward(x, grad_y)
        ctx.conf = (stride, padding, dilation, groups)
        return torch.nn.grad.conv2d_weight(x, weight_shape, grad_y, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_grad_weight):
        x, grad_y = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_x = grad_grad_y = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(grad_y, grad_grad_weight, x.shape, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            grad_grad_y = GroupedConv2d.apply(x, grad_grad_weight, stride, padding, dilation, groups)
        return grad_x, grad_grad_y, None, None, None, None, None


def input_grad(grad_y: torch.Tensor, weight: torch.Tensor, x_shape: torch.Size, stride, padding, dilation,
               groups: int) -> torch.Tensor:
    """The gradient of ``conv2d(x, weight)`` w.r.t. ``x`` (shape ``x_shape``): a transposed
    convolution, with the output padding that restores ``x``'s height and width."""
    output_padding = tuple(
        size + 2 * pad - dil * (kernel - 1) - 1 - (out - 1) * st
        for size, pad, dil, kernel, out, st in zip(x_shape[2:], padding, dilation, weight.shape[2:],
                                                   grad_y.shape[2:], stride, strict=True))
    return F.conv_transpose2d(grad_y, weight, None, stride, padding, output_padding, groups, dilation)


# --------------------------------------------------------------------------------------------
# The engine


@dataclass
class Scored:
    """The query results of the ``T`` learners after one adaptation step."""

    loss: torch.Tensor  # [T]
    accuracy: torch.Tensor | None  # [T]
    predictions: torch.Tensor  # [T, n_q, ways] class probabilities, or [T, n_q, dim]


@dataclass
class Outcome:
    scored: dict[int, Scored] = field(default_factory=dict)
    # Per BatchNorm layer and statistics row: the [T, C] batch means and unbiased variances of
    # every training-mode pass to fold, in the order a task runs them.
    statistics: dict[tuple[nn.Module, int], list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    passes: dict[nn.Module, int] = field(default_factory=dict)  # folded passes per layer and task


class Engine:
    """Adapts and scores the ``T`` tasks of a batch at once, for one gradient-based algorithm.

    Args:
        algorithm: a MAML, MetaSGD or ANIL (see :func:`unsupported`).
        backend: ``"grouped"`` or ``"vmap"``.
        batchnorm: with ``vmap``: ``"explicit"`` (mean, var, rsqrt: exact) or ``"fused"``
            (``F.batch_norm`` under vmap: wrong second-order meta-gradients; for the parity test).
    """

    def __init__(self, algorithm: nn.Module, backend: str = "grouped", batchnorm: str = "explicit") -> None:
        from metarun.algorithms.anil import ANIL
        from metarun.algorithms.maml import MAML

        if backend not in BACKENDS or batchnorm not in ("explicit", "fused"):
            raise ValueError(f"backend {backend!r} / batchnorm {batchnorm!r}")
        self.algorithm = algorithm
        self.backend = backend
        self.second_order = False  # set by run()
        self.batchnorm = batchnorm
        learnable = algorithm.learnable
        self.root: nn.Module = learnable.module
        self.backbone: nn.Module | None = algorithm.features if type(algorithm) is ANIL else None
        custom = type(algorithm) is MAML and (algorithm.inner_lrs is not None or algorithm.per_step_bn_weights)
        adapted = algorithm.adapted_parameters(self.root) if custom else list(self.root.named_parameters())
        self.names = [name for name, _ in adapted]
        self.meta = dict(adapted)
        # (owner module, attribute) -> name of the adapted tensor
        self.keys: dict[tuple[nn.Module, str], str] = {}
        adapted_ids = {id(p) for _, p in adapted}
        for prefix, owner in self.root.named_modules():
            for pname, parameter in owner._parameters.items():
                if parameter is not None and id(parameter) in adapted_ids:
                    self.keys[(owner, pname)] = f"{prefix}.{pname}" if prefix else pname
        if custom:
            self.rate: Callable[[str, int], float | torch.Tensor] = algorithm.step_rate
        elif type(learnable) is l2l.algorithms.MetaSGD:
            rates = dict(zip((n for n, _ in self.root.named_parameters()), learnable.lrs, strict=True))
            self.rate = lambda name, step: rates[name]
        else:
            self.rate = lambda name, step: learnable.lr

    # ---- one forward pass of all T learners (grouped backend) -------------------------------

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
        if _plain(module, Conv4):
            x = self._group(module.blocks, x, fast, step, outcome, tasks)
            return x.flatten(1) if module.flatten else x.mean(dim=(2, 3))
        if _plain(module, MLP):
            return self._group(module.layers, x, fast, step, outcome, tasks)
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
        raise TypeError(f"not vectorisable: {module}")

    def _single(self, module, x, fast, step, stats, records) -> torch.Tensor:
        """``module`` on one task ``x [n, ...]`` (the body of the vmap backend)."""
        if _plain(module, nn.Sequential):
            for child in module:
                x = self._single(child, x, fast, step, stats, records)
            return x
        if _plain(module, Conv4):
            x = self._single(module.blocks, x, fast, step, stats, records)
            return x.flatten(1) if module.flatten else x.mean(dim=(2, 3))
        if _plain(module, MLP):
            return self._single(module.layers, x, fast, step, stats, records)
        if _plain(module, nn.Conv2d):
            return F.conv2d(x, self._param(module, "weight", fast), self._param(module, "bias", fast),
                            module.stride, module.padding, module.dilation)
        if _plain(module, nn.Linear):
            return F.linear(x, self._param(module, "weight", fast), self._param(module, "bias", fast))
        if any(_plain(module, cls) for cls in BATCHNORMS):
            row, (w, _), (b, _), mean, var, batch_statistics, record = self._bn_parts(module, step, fast)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            dims = [0, *range(2, x.dim())]
            if batch_statistics:
                count = x.numel() // x.shape[1]
                if self.batchnorm == "fused":
                    y = F.batch_norm(x, None, None, w, b, True, 0.0, module.eps)
                    batch_mean = x.detach().mean(dims)
                    biased = x.detach().var(dims, unbiased=False)
                else:
                    batch_mean = x.mean(dims, keepdim=True)
                    centred = x - batch_mean
                    biased = (centred * centred).mean(dims, keepdim=True)
                    y = centred * torch.rsqrt(biased + module.eps)
                    if w is not None:
                        y = y * w.view(shape) + b.view(shape)
                    batch_mean, biased = batch_mean.detach().flatten(), biased.detach().flatten()
                if record:
                    stats.append((batch_mean, biased * (count / max(count - 1, 1))))
                    records.append((module, row))
                return y
            y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)
            return y if w is None else y * w.view(shape) + b.view(shape)
        if _plain(module, nn.ReLU):
            return F.relu(x)
        if _plain(module, nn.MaxPool2d):
            return F.max_pool2d(x, module.kernel_size, module.stride, module.padding, module.dilation,
                                ceil_mode=module.ceil_mode)
        if _plain(module, nn.Flatten):
            return x.flatten(1)
        if _plain(module, nn.Identity):
            return x
        raise TypeError(f"not vectorisable: {module}")

    # ---- losses and results ------------------------------------------------------------

    def losses(self, predictions: torch.Tensor, y: torch.Tensor, ways: int) -> torch.Tensor:
        """Per-task training loss ``[T]`` of ``predictions [T, n, out]``: the objective's loss."""
        objective = self.algorithm.objective
        tasks, n = predictions.shape[:2]
        if type(objective) is Classification:
            logits = predictions[..., :ways].reshape(tasks * n, ways)
            return F.cross_entropy(logits, y.reshape(tasks * n), reduction="none").view(tasks, n).mean(1)
        return F.mse_loss(predictions, y, reduction="none").reshape(tasks, -1).mean(1)

    def score(self, predictions: torch.Tensor, y: torch.Tensor, ways: int) -> Scored:
        loss = self.losses(predictions, y, ways)
        if type(self.algorithm.objective) is Classification:
            logits = predictions[..., :ways]
            accuracy = (logits.argmax(dim=-1) == y).float().mean(1)  # float32, as classification_result
            return Scored(loss, accuracy, logits.detach().softmax(dim=-1))
        return Scored(loss, None, predictions.detach())

    # ---- adaptation ----------------------------------------------------------------------

    def run(self, batch: TaskBatch, steps: int, scored: Iterable[int], fold: int | None) -> Outcome:
        """Adapt the batch's learners ``steps`` steps and score them on the query set after the
        steps in ``scored``. Training-mode BatchNorm statistics of the support passes and of the
        query pass after step ``fold`` (None: none) are recorded for :meth:`fold`.

        Like ``GradientBasedAlgorithm.trajectory``: with gradients enabled (meta-training) the
        scores carry the meta-gradient (second order unless ``algorithm.first_order``); without,
        the learners adapt a detached copy with first-order steps.
        """
        if self.backend == "vmap":
            return self._run_vmap(batch, steps, set(scored), fold)
        algorithm = self.algorithm
        meta_gradients = torch.is_grad_enabled()
        first_order = algorithm.first_order or not meta_gradients
        scored = set(scored)
        # Second-order steps differentiate the convolutions twice: GroupedConv2d keeps that grouped.
        self.second_order = not first_order
        outcome = Outcome()
        record = outcome if fold is not None else None
        tasks = len(batch)
        with torch.enable_grad():
            fast = {}
            for name in self.names:
                base = self.meta[name] if meta_gradients else self.meta[name].detach().requires_grad_()
                fast[name] = base.unsqueeze(0).expand(tasks, *base.shape)
        support_x, query_x = batch.support_x, batch.query_x
        if self.backbone is not None:  # ANIL: the head adapts on features computed once per split
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
                outcome.scored[step] = self.score(predictions, batch.query_y, batch.ways)
            if step == steps:
                break
            with torch.enable_grad():
                predictions = self.forward(self.root, support_x, fast, step, record)
                loss = self.losses(predictions, batch.support_y, batch.ways).sum()
                grads = torch.autograd.grad(loss, [fast[name] for name in self.names],
                                            retain_graph=not first_order, create_graph=not first_order)
                fast = {name: fast[name] + (-self.rate(name, step)) * grad
                        for name, grad in zip(self.names, grads, strict=True)}
        return outcome

    def _single_loss(self, predictions: torch.Tensor, y: torch.Tensor, ways: int) -> torch.Tensor:
        if type(self.algorithm.objective) is Classification:
            return F.cross_entropy(predictions[:, :ways], y)
        return F.mse_loss(predictions, y)

    def _run_vmap(self, batch: TaskBatch, steps: int, scored: set[int], fold: int | None) -> Outcome:
        """:meth:`run` as one task's adaptation (``torch.func.grad`` for the inner gradient) under
        ``torch.func.vmap``: the usual functorch MAML. Exact with ``batchnorm="explicit"`` only."""
        algorithm = self.algorithm
        meta_gradients = torch.is_grad_enabled()
        first_order = algorithm.first_order or not meta_gradients
        ways = batch.ways
        records: list[tuple[nn.Module, int]] = []  # (layer, row) of every recorded pass, in task order
        keep = fold is not None
        start = {name: self.meta[name] if meta_gradients else self.meta[name].detach() for name in self.names}

        def task(params, support_x, support_y, query_x, query_y):
            stats: list[tuple[torch.Tensor, torch.Tensor]] = []
            outputs: list[torch.Tensor] = []
            if self.backbone is not None:
                support_x = self._single(self.backbone, support_x, {}, 0, stats if keep else [], records if keep else [])
            query_features = None

            def support_loss(p, step):
                inner_stats: list[tuple[torch.Tensor, torch.Tensor]] = []
                predictions = self._single(self.root, support_x, p, step, inner_stats, records if keep else [])
                return self._single_loss(predictions, support_y, ways), inner_stats

            for step in range(steps + 1):
                if step in scored:
                    inputs = query_x
                    if self.backbone is not None:
                        if query_features is None:
                            query_features = self._single(self.backbone, query_x, {}, 0, stats if keep else [],
                                                          records if keep else [])
                        inputs = query_features
                    passes = keep and step == fold and self.backbone is None
                    outputs.append(self._single(self.root, inputs, params, step, stats if passes else [],
                                                records if passes else []))
                if step == steps:
                    break
                grads, inner_stats = torch.func.grad(support_loss, has_aux=True)(params, step)
                if keep:
                    stats.extend(inner_stats)
                if first_order:
                    grads = {name: g.detach() for name, g in grads.items()}
                params = {name: params[name] + (-self.rate(name, step)) * grads[name] for name in self.names}
            return tuple(outputs), tuple(stats)

        # torch.func.grad differentiates inside even under an outer no_grad (evaluation).
        outputs, stats = torch.func.vmap(task, in_dims=(None, 0, 0, 0, 0))(
            start, batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        outcome = Outcome()
        for step, predictions in zip(sorted(scored), outputs, strict=True):
            outcome.scored[step] = self.score(predictions, batch.query_y, ways)
        for (bn, row), (mean, var) in zip(records, stats, strict=True):
            outcome.statistics.setdefault((bn, row), []).append((mean, var))
            outcome.passes[bn] = outcome.passes.get(bn, 0) + 1
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
            for bn, passes in outcome.passes.items():
                if bn.num_batches_tracked is not None:
                    bn.num_batches_tracked.add_(passes * tasks)


# --------------------------------------------------------------------------------------------
# The algorithm-facing entry points


def meta_step(algorithm: nn.Module, tasks: Sequence[Task], update: MetaUpdate,
              engine: Engine | None = None) -> dict[str, float]:
    """``Algorithm.meta_step`` for the whole meta-batch at once: the same meta-gradient (the mean
    over tasks of each task's loss), the same running statistics, the same metrics."""
    engine = engine or Engine(algorithm)
    batch = TaskBatch.of(tasks)
    steps = algorithm.inner_steps
    weights = getattr(algorithm, "step_weights", None)
    multi_step = weights is not None and any(weights[:-1])
    scored = [k for k in range(1, steps + 1) if weights[k - 1] != 0] if multi_step else [steps]
    update.zero_grad()
    outcome = engine.run(batch, steps, scored, fold=steps)
    if multi_step:
        per_task = sum(weights[k - 1] * outcome.scored[k].loss for k in scored)
    else:
        per_task = outcome.scored[steps].loss
    last = outcome.scored[scored[-1]]
    loss = per_task.mean()
    loss.backward()
    engine.fold(outcome, len(batch))
    accuracy = None if last.accuracy is None else last.accuracy.detach().mean()
    loss_value, accuracy_value = update.read(loss.detach(), accuracy)
    update.step(algorithm.parameters())
    metrics = {"train/loss": loss_value}
    if accuracy_value is not None:
        metrics["train/acc"] = accuracy_value
    return metrics


def run_batch(algorithm: nn.Module, tasks: Sequence[Task], steps: int, every_step: bool,
              engine: Engine | None = None) -> list[list[TaskResult]]:
    """``Algorithm.run_task`` for a batch of tasks (evaluation: nothing is folded back)."""
    engine = engine or Engine(algorithm)
    batch = TaskBatch.of(tasks)
    scored = list(range(steps + 1)) if every_step else [steps]
    outcome = engine.run(batch, steps, scored, fold=None)
    results: list[list[TaskResult]] = [[] for _ in range(len(batch))]
    for step in scored:
        s = outcome.scored[step]
        for t in range(len(batch)):
            results[t].append(TaskResult(loss=s.loss[t], accuracy=None if s.accuracy is None else s.accuracy[t],
                                         predictions=s.predictions[t]))
    return results


def run_tasks(algorithm: nn.Module, tasks: Iterable[Task], steps: int, every_step: bool) -> list[list[TaskResult]]:
    """Every task's results (``Algorithm.run_tasks``): in chunks of :data:`EVAL_CHUNK` tasks,
    vectorised where :func:`choose` says so, else task by task."""
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
