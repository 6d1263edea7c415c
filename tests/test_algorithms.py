"""The Algorithm contract, for every algorithm config in conf/algorithm/ and the 28x28 backbones."""

from __future__ import annotations

import pytest
import torch

from conftest import CONF
from metarun.build import build_algorithm
from metarun.loop import batchnorm_mode
from metarun.tasks import Task, TaskSplit

ALGORITHMS = sorted(p.stem for p in (CONF / "algorithm").glob("*.yaml"))
BACKBONES = ["conv4", "mlp"]


def random_task(ways: int = 5, shots: int = 1, query_shots: int = 2) -> Task:
    def split(per_class: int) -> TaskSplit:
        return TaskSplit(torch.rand(ways * per_class, 1, 28, 28), torch.arange(ways).repeat_interleave(per_class),
                         ways)

    return Task(support=split(shots), query=split(query_shots))


@pytest.fixture(params=[(a, b) for a in ALGORITHMS for b in BACKBONES], ids=lambda p: f"{p[0]}-{p[1]}")
def algorithm(request, compose_cfg):
    name, backbone = request.param
    cfg = compose_cfg(f"algorithm={name}", f"backbone={backbone}")
    algorithm, _ = build_algorithm(cfg, torch.device("cpu"))
    return algorithm


def test_finite_loss_and_per_step_metrics(algorithm):
    steps = 2
    results = algorithm.run_task(random_task(), steps, every_step=True)
    assert 1 <= len(results) <= steps + 1
    for r in results:
        assert torch.isfinite(r.loss) and r.loss.dim() == 0
        assert 0.0 <= float(r.accuracy) <= 1.0
    assert len(algorithm.run_task(random_task(), steps, every_step=False)) == 1


def test_meta_gradient_reaches_meta_parameters(algorithm):
    algorithm.train()
    results = algorithm.run_task(random_task(), algorithm.inner_steps, every_step=False)
    algorithm.meta_loss(results).backward()
    grads = [p.grad for p in algorithm.parameters()]
    assert all(g is not None for g in grads), "every meta-parameter gets a gradient"
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_adaptation_never_mutates_meta_parameters(algorithm):
    before = {k: v.clone() for k, v in algorithm.state_dict().items()}
    with batchnorm_mode(algorithm, batch_stats=True):
        algorithm.adapt(random_task().support, steps=3)
        with torch.no_grad():
            algorithm.run_task(random_task(), 3, every_step=True)
    for k, v in algorithm.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed during adaptation"


def test_works_in_eval_mode_without_gradients(algorithm):
    algorithm.eval()
    with torch.no_grad():
        results = algorithm.run_task(random_task(), algorithm.eval_inner_steps, every_step=True)
    assert all(torch.isfinite(r.loss) for r in results)
    assert not results[-1].loss.requires_grad


def test_adaptation_improves_support_fit(algorithm):
    """A few inner steps lower the loss on the support set itself (a sanity check of the inner loop)."""
    task = random_task()
    fit_support = Task(support=task.support, query=task.support)
    with torch.no_grad():
        results = algorithm.run_task(fit_support, 5, every_step=True)
    if len(results) > 1:
        assert results[-1].loss < results[0].loss


@pytest.mark.parametrize("name", ALGORITHMS)
def test_training_ways_may_exceed_evaluation_ways(compose_cfg, name):
    """Snell et al. (2017) train with more ways than they test; every algorithm accepts it."""
    cfg = compose_cfg(f"algorithm={name}", "ways=3", "train_ways=7", "train_query_shots=2")
    algorithm, _ = build_algorithm(cfg, torch.device("cpu"))
    algorithm.train()
    results = algorithm.run_task(random_task(ways=7, query_shots=2), algorithm.inner_steps, every_step=False)
    algorithm.meta_loss(results).backward()
    assert torch.isfinite(results[-1].loss)
    with torch.no_grad():
        for r in algorithm.run_task(random_task(ways=3), algorithm.eval_inner_steps, every_step=True):
            assert torch.isfinite(r.loss) and 0.0 <= float(r.accuracy) <= 1.0


def test_gradient_heads_refuse_fewer_training_ways_than_evaluation_ways(compose_cfg):
    """Head outputs past train_ways would never get a meta-gradient: one clear error."""
    from metarun.cli import user_error
    from metarun.errors import ConfigError

    with pytest.raises(Exception) as raised:  # Hydra wraps errors raised by a _target_
        build_algorithm(compose_cfg("algorithm=maml", "train_ways=3"), torch.device("cpu"))
    cause = user_error(raised.value)
    assert isinstance(cause, ConfigError) and "train_ways=3 is smaller than ways=5" in str(cause)
