"""The batched meta-batch (metarun.algorithms.vectorized) against the per-task loop.

The parity gate: in float64, on tiny shapes, the vectorised meta-step gives the per-task loop's
meta-gradient (1e-10 relative to the largest entry), running statistics, metrics, and per-step
query metrics at evaluation; for 1 and 5 inner steps, first and second order, with BatchNorm. It
fails on the usual functorch version of the vectorised path with vmap over the fused
``F.batch_norm`` (test_the_gate_fails_on_vmap_over_fused_batchnorm), and passes on the same
vmap version with BatchNorm written from mean, var and rsqrt. That vmap engine lives here, in
the test: nothing in metarun runs it.

The engine knows no algorithm: a gradient-based method defined in this file (``ScaledHeadMAML``)
is batched through the family's hooks alone.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from conftest import float64
from metarun._learn2learn import l2l
from metarun.algorithms import vectorized
from metarun.algorithms.anil import ANIL
from metarun.algorithms.base import MetaUpdate
from metarun.algorithms.gradient import GradientBasedAlgorithm, classifier
from metarun.algorithms.maml import MAML
from metarun.algorithms.metasgd import MetaSGD
from metarun.backbones import MLP, Conv4, SpatialMean
from metarun.errors import ConfigError
from metarun.grouped_conv import GroupedConv2d
from metarun.loop import batchnorm_mode
from metarun.objectives import Regression
from metarun.tasks.types import Task, TaskBatch, TaskSplit

TOLERANCE = 1e-10  # relative, float64
WAYS = 3
OFF = {"per_step_bn_statistics": False, "per_step_bn_weights": False, "per_step_inner_lrs": False,
       "multi_step_loss": False, "msl_anneal_iterations": 0, "first_order_iterations": 0}
ALL_ON = {"per_step_bn_statistics": True, "per_step_bn_weights": True, "per_step_inner_lrs": True,
          "multi_step_loss": True, "msl_anneal_iterations": 10, "first_order_iterations": 0}


def conv4() -> Conv4:
    return Conv4(in_channels=1, hidden=4, image_size=8, pool="stride", flatten=False)  # BatchNorm in every block, 8 -> 4 -> 2 -> 1 -> 1


def maml(steps: int, first_order: bool, vectorize: str = "false", features=None, **switches) -> MAML:
    with float64():
        features = conv4() if features is None else features.double()
        return MAML(features, ways=WAYS, inner_lr=0.3, first_order=first_order, inner_steps=steps,
                    eval_inner_steps=steps, vectorize=vectorize, **{**OFF, **switches})


def tasks(count: int = 4, shape: tuple[int, ...] = (1, 8, 8), shots: int = 1, query_shots: int = 2,
          regression: bool = False) -> list[Task]:
    generator = torch.Generator().manual_seed(5)
    out = []
    for _ in range(count):
        def split(per_class: int) -> TaskSplit:
            x = torch.rand(WAYS * per_class, *shape, generator=generator, dtype=torch.float64)
            if regression:
                return TaskSplit(x, torch.randn(WAYS * per_class, 1, generator=generator, dtype=torch.float64), 1)
            return TaskSplit(x, torch.arange(WAYS).repeat_interleave(per_class), WAYS)

        out.append(Task(split(shots), split(query_shots)))
    return out


def meta_step(algorithm, batch) -> dict:
    """One meta-step with a zero learning rate: metrics, meta-gradients and buffers after it."""
    algorithm.train()
    update = MetaUpdate(torch.optim.SGD(algorithm.parameters(), lr=0.0), grad_clip=None)
    metrics = algorithm.meta_step(batch, update)
    return {"metrics": metrics,
            "grads": {n: p.grad.detach().clone() for n, p in algorithm.named_parameters() if p.grad is not None},
            "buffers": {n: b.detach().clone() for n, b in algorithm.named_buffers()}}


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over every entry, relative to the largest |a| (a tensor whose true value is 0,
    such as a convolution bias before BatchNorm, has only rounding noise of its own)."""
    assert a.keys() == b.keys()
    scale = max(v.abs().max().item() for v in a.values() if v.is_floating_point())
    return max(((a[k].double() - b[k].double()).abs().max().item() / scale) for k in a if a[k].is_floating_point())


@contextlib.contextmanager
def engine_class(engine):
    """Run the batched path with ``engine`` (an Engine class) in place of metarun's, or as it is (None)."""
    original = vectorized.Engine
    vectorized.Engine = engine or original
    try:
        yield
    finally:
        vectorized.Engine = original


def gate(make, batch=None, engine=None) -> dict[str, float]:
    """Relative differences between the per-task loop and the batched path (``engine``: another
    Engine class, the vmap one below), for one meta-step and for per-step evaluation metrics."""
    batch = batch if batch is not None else tasks()
    loop = make("false")
    vector = copy.deepcopy(loop)
    vector.vectorize = "true"
    expected = meta_step(loop, batch)
    with engine_class(engine):
        got = meta_step(vector, batch)
    for name in expected["buffers"]:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(expected["buffers"][name], got["buffers"][name]), name
    errors = {
        "meta-gradient": relative(expected["grads"], got["grads"]),
        "running statistics": relative(expected["buffers"], got["buffers"]) if expected["buffers"] else 0.0,
        "train/loss": abs(expected["metrics"]["train/loss"] - got["metrics"]["train/loss"]),
    }
    assert expected["metrics"].get("train/acc") == got["metrics"].get("train/acc")
    # Per-step query metrics at evaluation: batch statistics (transductive) and running statistics.
    for batch_stats in (True, False):
        with torch.no_grad(), batchnorm_mode(loop, batch_stats), batchnorm_mode(vector, batch_stats):
            steps = loop.eval_inner_steps
            want = [loop.run_task(task, steps, every_step=True) for task in batch]
            with engine_class(engine):
                have = vector.run_tasks(batch, steps, True)
        for name in ("loss", "accuracy", "predictions"):
            a = {f"{t}/{k}": getattr(r, name) for t, task in enumerate(want) for k, r in enumerate(task)
                 if getattr(r, name) is not None}
            b = {f"{t}/{k}": getattr(r, name) for t, task in enumerate(have) for k, r in enumerate(task)
                 if getattr(r, name) is not None}
            if a:
                errors[f"eval {name} ({'batch' if batch_stats else 'running'} statistics)"] = relative(a, b)
    return errors


def assert_parity(errors: dict[str, float]) -> None:
    failed = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    assert not failed, f"vectorised != per-task loop beyond {TOLERANCE:g} (relative): {failed}"


# ---- the usual functorch version, to measure the gate against ------------------------------


class VmapEngine(vectorized.Engine):
    """:meth:`vectorized.Engine.run` as one task's adaptation (``torch.func.grad`` for the inner
    gradient) under ``torch.func.vmap``: the usual functorch MAML. BatchNorm is written from mean,
    var and rsqrt, which is exact; :class:`FusedVmapEngine` uses the fused ``F.batch_norm``."""

    fused_batchnorm = False

    def run(self, batch, steps, scored, fold):
        algorithm = self.algorithm
        meta_gradients = torch.is_grad_enabled()
        scored = set(scored)
        ways = batch.ways
        records: list[tuple[nn.Module, int]] = []  # (layer, row) of every recorded pass, in task order
        keep = fold is not None
        start = {name: self.meta[name] if meta_gradients else self.meta[name].detach() for name in self.names}

        def task(params, support_x, support_y, query_x, query_y):
            stats, outputs = [], []
            if self.backbone is not None:
                support_x = self.single(self.backbone, support_x, {}, 0, stats if keep else [], records if keep else [])
            query_features = None

            def support_loss(p, step):
                inner_stats = []
                predictions = self.single(self.root, support_x, p, step, inner_stats, records if keep else [])
                return self.objective.losses(predictions[None], support_y[None], ways)[0], inner_stats

            for step in range(steps + 1):
                if step in scored:
                    inputs = query_x
                    if self.backbone is not None:
                        if query_features is None:
                            query_features = self.single(self.backbone, query_x, {}, 0, stats if keep else [],
                                                         records if keep else [])
                        inputs = query_features
                    passes = keep and step == fold and self.backbone is None
                    outputs.append(self.single(self.root, inputs, params, step, stats if passes else [],
                                               records if passes else []))
                if step == steps:
                    break
                grads, inner_stats = torch.func.grad(support_loss, has_aux=True)(params, step)
                if keep:
                    stats.extend(inner_stats)
                if algorithm.first_order_at(step) or not meta_gradients:
                    grads = {name: g.detach() for name, g in grads.items()}
                params = {name: params[name] + (-self.rate(name, step)) * grads[name] for name in self.names}
            return tuple(outputs), tuple(stats)

        # torch.func.grad differentiates inside even under an outer no_grad (evaluation).
        outputs, stats = torch.func.vmap(task, in_dims=(None, 0, 0, 0, 0))(
            start, batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        outcome = vectorized.Outcome()
        for step, predictions in zip(sorted(scored), outputs, strict=True):
            outcome.scored[step] = self.objective.results(predictions, batch.query_y, ways)
        for (bn, row), (mean, var) in zip(records, stats, strict=True):
            outcome.statistics.setdefault((bn, row), []).append((mean, var))
            outcome.passes[bn] = outcome.passes.get(bn, 0) + 1
        return outcome

    def single(self, module, x, fast, step, stats, records):
        """``module`` on one task ``x [n, ...]`` (the body of the vmap)."""
        plain = vectorized._plain
        if plain(module, nn.Sequential):
            for child in module:
                x = self.single(child, x, fast, step, stats, records)
            return x
        if plain(module, nn.Conv2d):
            return F.conv2d(x, self._param(module, "weight", fast), self._param(module, "bias", fast),
                            module.stride, module.padding, module.dilation)
        if plain(module, nn.Linear):
            return F.linear(x, self._param(module, "weight", fast), self._param(module, "bias", fast))
        if any(plain(module, cls) for cls in vectorized.BATCHNORMS):
            row, (w, _), (b, _), mean, var, batch_statistics, record = self._bn_parts(module, step, fast)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            dims = [0, *range(2, x.dim())]
            if batch_statistics:
                count = x.numel() // x.shape[1]
                if self.fused_batchnorm:
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
        if plain(module, nn.ReLU):
            return F.relu(x)
        if plain(module, nn.MaxPool2d):
            return F.max_pool2d(x, module.kernel_size, module.stride, module.padding, module.dilation,
                                ceil_mode=module.ceil_mode)
        if plain(module, nn.Flatten):
            return x.flatten(1)
        if plain(module, SpatialMean):
            return x.mean(dim=(2, 3))
        if plain(module, nn.Identity):
            return x
        raise TypeError(f"not vectorisable: {module}")


class FusedVmapEngine(VmapEngine):
    """vmap over the fused ``F.batch_norm``: silently wrong second-order meta-gradients."""

    fused_batchnorm = True


# ---- the parity gate ------------------------------------------------------------------------


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("steps", [1, 5])
def test_vectorised_maml_equals_the_per_task_loop(steps, first_order):
    assert_parity(gate(lambda vectorize: maml(steps, first_order, vectorize)))


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_the_gate_fails_on_vmap_over_fused_batchnorm(first_order):
    """The functorch version (vmap over the task, torch.func.grad inside) is exact with BatchNorm
    written from mean, var and rsqrt, and wrong in second order with the fused F.batch_norm: a
    convolution bias before BatchNorm gets a meta-gradient where the true one is 0."""
    make = lambda vectorize: maml(1, first_order, vectorize)  # noqa: E731
    assert_parity(gate(make, engine=VmapEngine))
    errors = gate(make, engine=FusedVmapEngine)
    if first_order:  # no double backward through BatchNorm: the fused version is right here
        assert_parity(errors)
        return
    assert errors["meta-gradient"] > 1e-4, errors
    with pytest.raises(AssertionError, match="meta-gradient"):
        assert_parity(errors)


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("steps", [1, 2])
def test_vectorised_family_equals_the_per_task_loop(steps, first_order):
    """Meta-SGD, ANIL, MAML++ with every switch (mid-anneal, so the multi-step loss is on), and
    MAML on a flattening max-pool Conv4, on the MLP, with a head wider than the task, and on regression."""
    def with_float64(build):
        def make(vectorize):
            with float64():
                return build(vectorize)
        return make

    cases = {
        "metasgd": with_float64(lambda v: MetaSGD(conv4(), ways=WAYS, inner_lr=0.3, first_order=first_order,
                                                   inner_steps=steps, eval_inner_steps=steps, vectorize=v)),
        "anil": with_float64(lambda v: ANIL(conv4(), ways=WAYS, inner_lr=0.3, first_order=first_order,
                                             inner_steps=steps, eval_inner_steps=steps, vectorize=v)),
        "maml++": lambda v: maml(steps, first_order, v, **ALL_ON),
        "maml-maxpool-flatten": lambda v: maml(steps, first_order, v, features=Conv4(1, 4, 8, pool="max",
                                                                                     flatten=True, pooled_blocks=2)),
        "maml-mlp": lambda v: maml(steps, first_order, v, features=MLP(64, (8, 6))),
        "maml-wide-head": with_float64(lambda v: MAML(conv4(), ways=WAYS, train_ways=WAYS + 2, inner_lr=0.3,
                                                       first_order=first_order, inner_steps=steps,
                                                       eval_inner_steps=steps, vectorize=v, **OFF)),
    }
    for name, make in cases.items():
        if name == "maml++":
            make = (lambda base: lambda v: _on_iteration(base(v), 3, 10))(make)
        errors = gate(make)
        failed = {k: v for k, v in errors.items() if not v <= TOLERANCE}
        assert not failed, f"{name}: {failed}"
    regression = with_float64(lambda v: MAML(MLP(1, (8, 8), batch_norm=False), ways=1, inner_lr=0.01,
                                             first_order=first_order, inner_steps=steps, eval_inner_steps=steps,
                                             vectorize=v, objective=Regression(), **OFF))
    assert_parity(gate(regression, tasks(shape=(1,), regression=True)))


@pytest.mark.parametrize("stride,padding,dilation", [((2, 2), (1, 1), (1, 1)), ((1, 1), (0, 0), (1, 1)),
                                                     ((2, 1), (1, 2), (2, 1))])
def test_the_grouped_convolution_is_twice_differentiable(stride, padding, dilation):
    """GroupedConv2d, the second-order engine's convolution (its own backward, so that the double
    backward stays grouped): first and second derivatives against finite differences, on an 8x9
    input where the transposed convolution needs an output padding."""
    generator = torch.Generator().manual_seed(0)
    groups = 2
    x = torch.randn(2, groups * 3, 8, 9, dtype=torch.float64, generator=generator).requires_grad_()
    w = torch.randn(groups * 2, 3, 3, 3, dtype=torch.float64, generator=generator).requires_grad_()
    conv = lambda x, w: GroupedConv2d.apply(x, w, stride, padding, dilation, groups)  # noqa: E731
    expected = nn.functional.conv2d(x, w, None, stride, padding, dilation, groups)
    assert torch.allclose(conv(x, w), expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(conv, (x, w))
    assert torch.autograd.gradgradcheck(conv, (x, w))


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_second_order_steps_run_the_grouped_convolution(first_order, monkeypatch):
    calls = []
    original = GroupedConv2d.apply
    monkeypatch.setattr(GroupedConv2d, "apply", lambda *args: calls.append(1) or original(*args))
    algorithm = maml(1, first_order, "true")
    meta_step(algorithm, tasks())
    assert (len(calls) > 0) == (not first_order)


def _on_iteration(algorithm, iteration, iterations):
    algorithm.on_iteration(iteration, iterations)
    if algorithm.inner_steps > 1:
        assert any(algorithm.step_weights[:-1])  # MSL on
    return algorithm


def test_the_gate_can_fail():
    """A vectorised path that folds the running statistics of all tasks but the last fails the gate."""
    make = lambda vectorize: maml(2, False, vectorize)  # noqa: E731
    original = vectorized.Engine.fold

    def fold_without_last_task(outcome, tasks):
        for key, passes in outcome.statistics.items():
            outcome.statistics[key] = [(m[:-1], v[:-1]) for m, v in passes]
        return original(outcome, tasks)

    try:
        vectorized.Engine.fold = staticmethod(fold_without_last_task)
        errors = gate(make)
    finally:
        vectorized.Engine.fold = staticmethod(original)
    assert errors["running statistics"] > 1e-3


# ---- a new method on the batched path, without touching vectorized.py ------------------------


class HeadOnlyDecayingMAML(GradientBasedAlgorithm):
    """A gradient-based method that exists only here: the inner loop adapts the linear head and
    the last convolution, at a rate that halves every step, and the training loss weighs every
    step's query loss equally. It overrides hooks only, so the engine batches it as it is."""

    def __init__(self, features, ways, inner_lr, inner_steps, vectorize):
        super().__init__(ways, inner_lr, False, inner_steps, inner_steps, None, None, vectorize)
        self.learnable = l2l.algorithms.MAML(classifier(features, self.head_outputs), lr=inner_lr)

    def adapted_parameters(self, module):
        last_conv = [name for name, m in module.named_modules() if isinstance(m, nn.Conv2d)][-1]
        return [(name, p) for name, p in module.named_parameters() if name.startswith(("1.", last_conv))]

    def inner_rate(self, name, step):
        return self.inner_lr * 0.5 ** step

    def step_loss_weights(self):
        return [1.0 / self.inner_steps] * self.inner_steps

    def first_order_at(self, step):
        return step > 0  # second order through the first step only


@pytest.mark.parametrize("steps", [1, 3])
def test_a_method_that_fits_the_hooks_is_batched_exactly(steps):
    def make(vectorize):
        with float64():
            return HeadOnlyDecayingMAML(conv4(), WAYS, 0.3, steps, vectorize)

    algorithm = make("auto")
    assert algorithm.batchable and vectorized.choose(algorithm, tasks(), "meta-training")
    errors = gate(make)
    assert_parity(errors)
    grads = meta_step(make("true"), tasks())["grads"]
    # The first convolution is not adapted, and still gets its meta-gradient (through the
    # second-order first step), while the step weights reach every step's query loss.
    assert grads["learnable.module.0.blocks.0.weight"].abs().sum() > 0


class OwnTrajectoryMAML(MAML):
    """A subclass that changes the per-task path itself: the engine cannot know what it does."""

    def trajectory(self, support, steps):
        yield from super().trajectory(support, steps)


def test_a_subclass_that_overrides_what_the_engine_replaces_is_not_batched():
    with float64():
        algorithm = OwnTrajectoryMAML(conv4(), ways=WAYS, inner_lr=0.3, first_order=False, inner_steps=1,
                                      eval_inner_steps=1, vectorize="auto", **OFF)
    assert not OwnTrajectoryMAML.batchable and MAML.batchable
    assert not vectorized.choose(algorithm, tasks(), "meta-training")
    algorithm.vectorize = "true"
    with pytest.raises(ConfigError, match="OwnTrajectoryMAML overrides trajectory"):
        vectorized.choose(algorithm, tasks(), "meta-training")


# ---- vectorize=auto|true|false ---------------------------------------------------------------


class Dropout4(Conv4):
    """A backbone the vectorised path does not know (its forward differs from Conv4's)."""

    def forward(self, x):
        return nn.functional.dropout(super().forward(x), 0.1, self.training)


def test_auto_falls_back_to_the_per_task_loop_where_it_cannot_vectorise(caplog):
    batch = tasks()
    with caplog.at_level(logging.INFO, logger="metarun.algorithms.vectorized"):
        assert vectorized.choose(maml(1, False, "auto"), batch, "meta-training")
        assert not vectorized.choose(maml(1, False, "auto", features=Dropout4(1, 4, 8, "stride", False)), batch, "meta-training")
        assert not vectorized.choose(maml(1, False, "false"), batch, "meta-training")
    messages = [r.getMessage() for r in caplog.records]
    assert any("vectorised meta-batch" in m for m in messages), messages
    assert any("per-task loop" in m and "Dropout4" in m for m in messages), messages
    with pytest.raises(ConfigError, match="cannot be vectorised"):
        vectorized.choose(maml(1, False, "true", features=Dropout4(1, 4, 8, "stride", False)), batch, "meta-training")
    mixed = [batch[0], Task(batch[1].support, TaskSplit(batch[1].query.x[:2], batch[1].query.y[:2], WAYS))]
    assert not vectorized.choose(maml(1, False, "auto"), mixed, "evaluation")


def test_auto_keeps_the_per_task_loop_for_large_cpu_batches():
    """On a CPU, 15 queries per class at 28x28 measured slower vectorised (docs/results.md)."""
    algorithm = maml(1, False, "auto", features=Conv4(1, 64, 28, "stride", False))
    small = tasks(2, (1, 28, 28), query_shots=1)
    large = tasks(2, (1, 28, 28), query_shots=15)
    assert vectorized.choose(algorithm, small, "meta-training")
    assert not vectorized.choose(algorithm, large, "meta-training")


def test_vectorize_option_values():
    assert [vectorized.vectorize_option(v) for v in (True, False, "auto", "TRUE")] == ["true", "false", "auto", "true"]
    with pytest.raises(ConfigError, match="vectorize"):
        vectorized.vectorize_option("sometimes")


def test_a_task_batch_is_a_sequence_of_tasks():
    batch = TaskBatch.of(tasks(3))
    assert len(batch) == 3 and TaskBatch.of(batch) is batch
    assert torch.equal(batch[1].support.x, tasks(3)[1].support.x) and batch[1].query.ways == WAYS
    assert len(list(batch)) == 3 and len(batch[1:]) == 2


# ---- no host sync inside a meta-iteration ----------------------------------------------------


SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "numpy", "cpu",
         "masked_select", "unique", "nonzero_static"}


class HostSyncs(TorchFunctionMode):
    """Counts the calls that read a tensor on the host (a GPU sync), and boolean-mask indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            name = getattr(func, "__name__", str(func))
            masks = [a for a in (args[1:2] if name in ("__getitem__", "__setitem__") else [])
                     for a in (a if isinstance(a, tuple) else (a,)) if isinstance(a, torch.Tensor) and
                     a.dtype == torch.bool]
            if name in SYNCS or masks:
                self.calls.append(name if not masks else f"{name}[bool mask]")
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", ["maml", "maml++", "anil"])
def test_a_vectorised_meta_step_reads_the_host_once(name):
    """Only MetaUpdate.read touches the host (one tolist of the loss and accuracy); the optimizer's
    step, which the loop owns, is left out of the count."""
    algorithm = {"maml": lambda: maml(2, False, "true"), "maml++": lambda: _on_iteration(maml(2, False, "true",
                                                                                               **ALL_ON), 3, 10),
                 "anil": lambda: ANIL(conv4(), ways=WAYS, inner_lr=0.3, first_order=False, inner_steps=2,
                                      eval_inner_steps=2, vectorize="true").double()}[name]()
    update = MetaUpdate(torch.optim.Adam(algorithm.parameters(), lr=1e-3), grad_clip=1.0)
    counter = HostSyncs()
    read, step = update.read, update.step

    def counted_read(*values):
        counter.calls.append("MetaUpdate.read")
        counter.paused = True
        try:
            return read(*values)
        finally:
            counter.paused = False

    def uncounted_step(parameters):
        counter.paused = True
        try:
            return step(parameters)
        finally:
            counter.paused = False

    update.read, update.step = counted_read, uncounted_step
    batch = TaskBatch.of(tasks())
    algorithm.train()
    with counter:
        algorithm.meta_step(batch, update)
    assert counter.calls == ["MetaUpdate.read"], counter.calls
    # And the counter does see syncs: the per-task path's learn2learn clone makes none, but the sampler does.
    with HostSyncs() as probe:
        torch.tensor([1.0]).item()
        torch.arange(3)[torch.tensor([True, False, True])]
    assert probe.calls == ["item", "__getitem__[bool mask]"]


def test_evaluation_runs_in_vectorised_chunks(monkeypatch):
    algorithm = maml(1, False, "true")
    calls = []
    original = vectorized.run_batch
    monkeypatch.setattr(vectorized, "EVAL_CHUNK", 3)
    monkeypatch.setattr(vectorized, "run_batch", lambda a, t, *rest: calls.append(len(t)) or original(a, t, *rest))
    with torch.no_grad(), batchnorm_mode(algorithm, True):
        results = algorithm.run_tasks(iter(tasks(7)), 1, every_step=True)
    assert calls == [3, 3, 1] and len(results) == 7 and all(len(r) == 2 for r in results)


@pytest.mark.gpu
def test_the_benchmark_prints_both_paths_on_cuda():
    """scripts/bench_maml.py on the GPU, in one process: the learn2learn loop and the vectorised path
    with their meta-it/s and the ratio (scripts/gpu_checks.sh runs the full measurement)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "scripts" / "bench_maml.py"), "--device", "cuda", "--rounds", "1",
                           "--seconds", "0.5", "--variants", "learn2learn,vectorised"],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "vectorised" in done.stdout and "/l2l:" in done.stdout, done.stdout
