"""The Algorithm contract, for every algorithm config in conf/algorithm/ and the 28x28 backbones."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF
from metarun.algorithms.base import MetaUpdate
from metarun.build import build_algorithm
from metarun.loop import batchnorm_mode
from metarun.tasks.types import Task, TaskSplit

ALGORITHMS = sorted(p.stem for p in (CONF / "algorithm").glob("*.yaml"))
BACKBONES = ["conv4", "mlp"]


def random_task(ways: int = 5, shots: int = 1, query_shots: int = 2) -> Task:
    def split(per_class: int) -> TaskSplit:
        return TaskSplit(torch.rand(ways * per_class, 1, 28, 28), torch.arange(ways).repeat_interleave(per_class),
                         ways)

    return Task(support=split(shots), query=split(query_shots))


def state(algorithm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in algorithm.state_dict().items()}


def assert_unchanged(algorithm, before, what: str) -> None:
    for k, v in algorithm.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed during {what}"


def has_buffers(algorithm) -> bool:
    return any(b.is_floating_point() for b in algorithm.buffers())


@pytest.fixture(params=[(a, b) for a in ALGORITHMS for b in BACKBONES], ids=lambda p: f"{p[0]}-{p[1]}")
def algorithm(request, compose_cfg):
    name, backbone = request.param
    cfg = compose_cfg(f"algorithm={name}", f"backbone={backbone}")
    algorithm, _, _ = build_algorithm(cfg, torch.device("cpu"))
    return algorithm


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_trajectory_yields_steps_plus_one_learners(algorithm, steps):
    with torch.no_grad():
        assert len(list(algorithm.trajectory(random_task().support, steps))) == steps + 1


def test_finite_loss_and_per_step_metrics(algorithm):
    steps = 2
    results = algorithm.run_task(random_task(), steps, every_step=True)
    assert len(results) == steps + 1
    for r in results:
        assert torch.isfinite(r.loss) and r.loss.dim() == 0
        assert 0.0 <= float(r.accuracy) <= 1.0
    assert len(algorithm.run_task(random_task(), steps, every_step=False)) == 1


def test_meta_step_moves_every_meta_parameter(algorithm):
    """The meta-update reaches every meta-parameter: it moves it, or gives it a meta-gradient (which may
    be exactly 0: a convolution's bias before BatchNorm has none, nor does Meta-SGD's rate for it)."""
    before = {name: p.detach().clone() for name, p in algorithm.named_parameters()}
    update = MetaUpdate(torch.optim.Adam(algorithm.parameters(), lr=1e-3), grad_clip=None)
    algorithm.train()
    algorithm.on_iteration(0, 10)
    metrics = algorithm.meta_step([random_task(), random_task()], update)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and 0.0 <= metrics["train/acc"] <= 1.0
    frozen = [name for name, p in algorithm.named_parameters() if torch.equal(p.detach(), before[name])
              and p.grad is None]
    assert not frozen, f"the meta-update never reached these meta-parameters: {frozen}"
    assert any(not torch.equal(p.detach(), before[name]) for name, p in algorithm.named_parameters())


def test_adapting_never_changes_the_meta_model_in_training_mode(algorithm):
    """Parameters AND buffers: learn2learn's clone shares BatchNorm's running statistics with the
    meta-model, so this fails unless adaptation really runs on private buffers."""
    algorithm.train()
    before = state(algorithm)
    algorithm.adapt(random_task().support, steps=3)
    algorithm.run_task(random_task(), 2, every_step=True)
    assert_unchanged(algorithm, before, "adaptation in training mode")


def test_adapting_never_changes_the_meta_model_in_evaluation(algorithm):
    before = state(algorithm)
    with torch.no_grad(), batchnorm_mode(algorithm, batch_stats=True):
        algorithm.adapt(random_task().support, steps=3)
        algorithm.run_task(random_task(), 3, every_step=True)
    assert_unchanged(algorithm, before, "evaluation")


def test_training_tasks_fold_running_statistics_back_as_in_place_updates_would(algorithm):
    """``train_task`` is where running statistics are learned: exactly what updating the shared
    buffers in place during the same forward passes gives."""
    if not has_buffers(algorithm):
        pytest.skip("no running statistics")
    reference = copy.deepcopy(algorithm)
    task = random_task()
    algorithm.train(), reference.train()
    before = state(algorithm)
    algorithm.train_task(task)
    # The same forward passes, on the shared buffers themselves (no private copies).
    *_, learner = reference.trajectory(task.support, reference.inner_steps)
    reference.score(learner, task.query)
    changed = [k for k, v in algorithm.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "training left the running statistics where they were"
    for key, value in reference.state_dict().items():
        if not isinstance(value, torch.Tensor) or key not in dict(reference.named_buffers()):
            continue
        torch.testing.assert_close(algorithm.state_dict()[key], value, msg=key)


def test_works_in_eval_mode_without_gradients(algorithm):
    algorithm.eval()
    with torch.no_grad():
        results = algorithm.run_task(random_task(), algorithm.eval_inner_steps, every_step=True)
    assert all(torch.isfinite(r.loss) for r in results)
    assert not results[-1].loss.requires_grad


def test_adaptation_uses_the_support_set(algorithm):
    """Methods with an inner loop: a few steps lower the loss on the support set itself. Methods
    without one: the learner is built from the support set, so relabelling the support classes
    by a permutation permutes the query's class scores the same way (where the method is
    ``label_equivariant``; otherwise relabelling must at least change the scores)."""
    task = random_task()
    if algorithm.eval_inner_steps > 0:
        fit_support = Task(support=task.support, query=task.support)
        with torch.no_grad(), batchnorm_mode(algorithm, batch_stats=True):
            results = algorithm.run_task(fit_support, 5, every_step=True)
        assert results[-1].loss < results[0].loss
        return
    permutation = torch.tensor([2, 0, 4, 1, 3])
    relabelled = Task(TaskSplit(task.support.x, permutation[task.support.y], task.support.ways),
                      TaskSplit(task.query.x, permutation[task.query.y], task.query.ways))
    with torch.no_grad(), batchnorm_mode(algorithm, batch_stats=True):
        [plain] = algorithm.run_task(task, 0, every_step=True)
        [permuted] = algorithm.run_task(relabelled, 0, every_step=True)
    assert not torch.allclose(plain.predictions, plain.predictions[:, permutation]), "scores ignore the support set"
    if algorithm.label_equivariant:
        torch.testing.assert_close(permuted.predictions[:, permutation], plain.predictions)
    else:  # per-class slow weights (MetaNet): the support's labels must still move the scores
        assert not torch.allclose(permuted.predictions, plain.predictions), "scores ignore the support labels"


@pytest.mark.parametrize("name", ALGORITHMS)
def test_training_ways_may_exceed_evaluation_ways(compose_cfg, name):
    """Snell et al. (2017) train with more ways than they test; every algorithm accepts it."""
    cfg = compose_cfg(f"algorithm={name}", "ways=3", "train_ways=7", "train_query_shots=2")
    algorithm, _, _ = build_algorithm(cfg, torch.device("cpu"))
    algorithm.train()
    loss, result = algorithm.train_task(random_task(ways=7, query_shots=2))
    assert torch.isfinite(loss) and torch.isfinite(result.loss)
    with torch.no_grad():
        for r in algorithm.run_task(random_task(ways=3), algorithm.eval_inner_steps, every_step=True):
            assert torch.isfinite(r.loss) and 0.0 <= float(r.accuracy) <= 1.0


@pytest.mark.parametrize("name", ALGORITHMS)
def test_options_are_declared_once_in_the_config(name):
    """Every hyperparameter of an algorithm has its value in conf/algorithm/<name>.yaml and no
    default in Python, so a reader of either sees the truth."""
    import inspect

    from hydra.utils import get_class

    from metarun.build import BUILD_ARGUMENTS

    options = OmegaConf.to_container(OmegaConf.load(CONF / "algorithm" / f"{name}.yaml"))
    target = options.get("_target_")
    while target is None:  # a config that extends another (fomaml extends maml)
        parent = options["defaults"][0]
        options = {**OmegaConf.to_container(OmegaConf.load(CONF / "algorithm" / f"{parent}.yaml")), **options}
        target = options.get("_target_")
    parameters = inspect.signature(get_class(target).__init__).parameters
    for pname, parameter in parameters.items():
        if pname == "self" or pname in BUILD_ARGUMENTS:
            continue
        assert pname in options, f"{target} takes {pname}, which conf/algorithm/{name}.yaml does not set"
        assert parameter.default is inspect.Parameter.empty, f"{target}.{pname} has a Python default as well"


def test_gradient_heads_refuse_fewer_training_ways_than_evaluation_ways(compose_cfg):
    """Head outputs past train_ways would never get a meta-gradient: one clear error."""
    from metarun.commands import user_error
    from metarun.errors import ConfigError

    with pytest.raises(Exception) as raised:  # Hydra wraps errors raised by a _target_
        build_algorithm(compose_cfg("algorithm=maml", "train_ways=3"), torch.device("cpu"))
    cause = user_error(raised.value)
    assert isinstance(cause, ConfigError) and "train_ways=3 is smaller than ways=5" in str(cause)
