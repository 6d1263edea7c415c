"""Reptile: the outer update against a hand computation, its schedule, the authors' minibatches and
non-transductive evaluation, running statistics, regression, and a learning check."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from metarun.algorithms.base import MetaUpdate
from metarun.algorithms.reptile import Reptile
from metarun.errors import ConfigError
from metarun.loop import batchnorm_mode
from metarun.tasks.types import Task, TaskSplit
from test_metric import Flat, trained_and_untrained

OPTIONS = {"inner_optimizer": "sgd", "inner_lr": 0.1, "inner_batch_size": None, "inner_steps": 3,
           "eval_inner_steps": 3, "outer_lr": 1.0, "outer_lr_final": 0.0, "transductive": True}


class BatchNormFeatures(nn.Sequential):
    """``[n, dim] -> [n, hidden]``: linear, BatchNorm, ReLU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.out_features = hidden


def reptile(features: nn.Module, ways: int, **options) -> Reptile:
    return Reptile(features, ways=ways, **{**OPTIONS, **options}).double()


def task(ways: int, dim: int, shots: int, query_shots: int, generator: torch.Generator) -> Task:
    def split(per_class: int) -> TaskSplit:
        x = torch.randn(ways * per_class, dim, dtype=torch.float64, generator=generator)
        return TaskSplit(x, torch.arange(ways).repeat(per_class), ways)

    return Task(split(shots), split(query_shots))


def hand_adapted(theta: list[torch.Tensor], support: TaskSplit, optimizer: str, lr: float, steps: int,
                 adam: tuple[list[torch.Tensor], int]) -> tuple[list[torch.Tensor], tuple[list[torch.Tensor], int]]:
    """A linear classifier ``x @ W.T + b`` after ``steps`` full-batch steps of SGD, or of TensorFlow's Adam
    with beta1 = 0 (m = g, no first-moment correction) from the state ``adam`` (second moments, steps
    done), written out; returns the weights and Adam's state after them."""
    weights = [t.detach().clone() for t in theta]
    second, done = adam
    for _ in range(steps):
        w, b = (t.requires_grad_(True) for t in weights)
        loss = nn.functional.cross_entropy(support.x @ w.T + b, support.y)
        gradients = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            if optimizer == "sgd":
                weights = [t - lr * g for t, g in zip(weights, gradients, strict=True)]
            else:
                done += 1
                second = [0.999 * v + 0.001 * g * g for v, g in zip(second, gradients, strict=True)]
                rate = lr * (1 - 0.999 ** done) ** 0.5
                weights = [t - rate * g / (v.sqrt() + 1e-8) for t, g, v in zip(weights, gradients, second, strict=True)]
    return [w.detach() for w in weights], (second, done)


@pytest.mark.parametrize("inner_optimizer,inner_lr", [("sgd", 0.5), ("adam", 0.05)])
@pytest.mark.parametrize("iteration,iterations,outer_lr,outer_lr_final,eps", [
    (0, 10, 1.0, 0.0, 1.0),
    (3, 10, 1.0, 0.0, 0.7),
    (9, 10, 1.0, 0.0, 0.1),
    (5, 10, 0.5, 0.1, 0.3),
])
def test_meta_step_moves_towards_the_mean_adapted_weights(inner_optimizer, inner_lr, iteration, iterations,
                                                          outer_lr, outer_lr_final, eps):
    """theta <- theta + eps * mean_i(phi_i - theta), eps annealed linearly, and the loop's optimizer
    (here Adam with lr 1, given a .grad) is never used. The inner Adam's state carries over."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    ways, dim, steps = 3, 4, 3
    algorithm = reptile(Flat(dim), ways, inner_optimizer=inner_optimizer, inner_lr=inner_lr, inner_steps=steps,
                        outer_lr=outer_lr, outer_lr_final=outer_lr_final)
    tasks = [task(ways, dim, 2, 2, generator) for _ in range(2)]
    theta = [p.detach().clone() for p in algorithm.parameters()]  # head weight [3, 4], bias [3]
    adam = ([torch.zeros_like(t) for t in theta], 0)
    adapted = []
    for t in tasks:  # Adam's state carries over from task to task, as in the authors' code
        phi, adam = hand_adapted(theta, t.support, inner_optimizer, inner_lr, steps, adam)
        adapted.append(phi)
    expected = [t + eps * torch.stack([phi[j] - t for phi in adapted]).mean(0) for j, t in enumerate(theta)]
    query_logits = [t.query.x @ w.T + b for t, (w, b) in zip(tasks, adapted, strict=True)]
    expected_loss = torch.stack([nn.functional.cross_entropy(logits, t.query.y)
                                 for logits, t in zip(query_logits, tasks, strict=True)]).mean()
    expected_acc = torch.stack([(logits.argmax(1) == t.query.y).double().mean()
                                for logits, t in zip(query_logits, tasks, strict=True)]).mean()

    optimizer = torch.optim.Adam(algorithm.parameters(), lr=1.0)
    for p in algorithm.parameters():
        p.grad = torch.ones_like(p)
    algorithm.on_iteration(iterations - 1, iterations)  # schedules depend on the two numbers alone
    algorithm.on_iteration(iteration, iterations)
    assert algorithm.outer_step == pytest.approx(eps, abs=1e-12)
    metrics = algorithm.meta_step(tasks, MetaUpdate(optimizer, grad_clip=None))

    for p, e in zip(algorithm.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, atol=1e-12, rtol=0)
    assert not optimizer.state, "the loop's optimizer took a step"
    if inner_optimizer == "adam":
        assert int(algorithm.adam.steps) == 2 * steps
        for index, v in enumerate(adam[0]):
            torch.testing.assert_close(algorithm.adam.get_buffer(f"second_moment_{index}"), v, atol=1e-15, rtol=1e-12)
    # update.read reports in float32
    assert metrics["train/loss"] == pytest.approx(float(expected_loss), rel=1e-6)
    assert metrics["train/acc"] == pytest.approx(float(expected_acc), rel=1e-6)


def test_evaluation_adapts_from_the_trained_adam_state_and_leaves_it():
    """The authors restored their optimizer's state after each test task: evaluation starts from
    the state training left, and changes nothing in it."""
    generator = torch.Generator().manual_seed(4)
    algorithm = reptile(Flat(3), 2, inner_optimizer="adam", inner_lr=0.01)
    example = task(2, 3, 2, 2, generator)
    with torch.no_grad():
        for index, parameter in enumerate(algorithm.parameters()):
            algorithm.adam.get_buffer(f"second_moment_{index}").copy_(torch.rand_like(parameter) + 1.0)
        algorithm.adam.steps.fill_(1000)
    state = {k: v.clone() for k, v in algorithm.adam.state_dict().items()}
    theta = [p.detach().clone() for p in algorithm.parameters()]
    expected, _ = hand_adapted(theta, example.support, "adam", 0.01, 2, (list(state.values())[:2], 1000))
    with torch.no_grad():
        learner = algorithm.adapt(example.support, steps=2)
    for a, e in zip(learner.parameters(), expected, strict=True):
        torch.testing.assert_close(a.detach(), e, atol=1e-12, rtol=0)
    for key, value in algorithm.adam.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_non_finite_loss_stops_before_the_update():
    from metarun.errors import NonFiniteLossError

    generator = torch.Generator().manual_seed(0)
    algorithm = reptile(Flat(2), 2, inner_lr=1e300)
    before = [p.detach().clone() for p in algorithm.parameters()]
    with pytest.raises(NonFiniteLossError):
        algorithm.meta_step([task(2, 2, 2, 2, generator)], MetaUpdate(torch.optim.SGD(algorithm.parameters()), None))
    assert all(torch.equal(p, b) for p, b in zip(algorithm.parameters(), before, strict=True))


def test_minibatches_cycle_through_the_support_set_as_the_authors_code():
    """Batches of 3 from 4 support samples over 8 steps: 24 draws, 6 passes, each a fresh random
    permutation (a batch may span two passes); the evaluation order is the same every time."""
    algorithm = reptile(Flat(1), 2, inner_batch_size=3)
    seen: list[torch.Tensor] = []
    algorithm.model[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].flatten().clone()))
    support = TaskSplit(torch.arange(4, dtype=torch.float64)[:, None], torch.tensor([0, 1, 0, 1]), 2)
    with torch.no_grad():
        first = algorithm.adapt(support, steps=8)
        drawn = torch.cat(seen).long()
        second = algorithm.adapt(support, steps=8)
    assert [len(batch) for batch in seen[:8]] == [3] * 8
    passes = [tuple(drawn[start:start + 4].tolist()) for start in range(0, 24, 4)]
    assert all(sorted(p) == [0, 1, 2, 3] for p in passes), passes
    assert len(set(passes)) > 1, "every pass has the same order"
    assert torch.equal(torch.cat(seen[8:]).long(), drawn)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_non_transductive_evaluation_classifies_each_query_sample_with_the_support_set():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(2)
    ways, dim = 3, 5
    transductive = reptile(BatchNormFeatures(dim, 8), ways, transductive=True)
    inductive = reptile(BatchNormFeatures(dim, 8), ways, transductive=False)
    inductive.load_state_dict(transductive.state_dict())
    example = task(ways, dim, 2, 3, generator)
    with torch.no_grad(), batchnorm_mode(inductive, batch_stats=True):
        [result] = inductive.run_task(example, steps=2, every_step=False)
        learner = inductive.adapt(example.support, steps=2)
        logits = torch.stack([learner(torch.cat([example.support.x, example.query.x[i:i + 1]]))[-1]
                              for i in range(len(example.query.x))])
    with torch.no_grad(), batchnorm_mode(transductive, batch_stats=True):
        [batched] = transductive.run_task(example, steps=2, every_step=False)
    assert result.predictions.shape == batched.predictions.shape == (9, ways)
    torch.testing.assert_close(result.predictions, logits.softmax(1), atol=1e-12, rtol=0)
    assert float(result.loss) == pytest.approx(float(nn.functional.cross_entropy(logits, example.query.y)), abs=1e-12)
    assert float(result.accuracy) == pytest.approx(float((logits.argmax(1) == example.query.y).double().mean()))
    assert not torch.allclose(result.predictions, batched.predictions, atol=1e-3), "BatchNorm saw the same batches"


def test_meta_step_learns_running_statistics_as_in_place_updates_would():
    """Each training task's forward passes (inner loop, query pass) update the running statistics
    in turn, as if they ran on the meta-model's own buffers."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(3)
    algorithm = reptile(BatchNormFeatures(4, 6), 3)
    reference = copy.deepcopy(algorithm)
    tasks = [task(3, 4, 2, 2, generator) for _ in range(2)]
    algorithm.train(), reference.train()
    algorithm.meta_step(tasks, MetaUpdate(torch.optim.SGD(algorithm.parameters()), None))
    for t in tasks:  # the same forward passes, on the shared buffers themselves
        *_, learner = reference.trajectory(t.support, reference.inner_steps)
        learner(t.query.x)
    bn, expected = algorithm.model[0][1], reference.model[0][1]
    assert int(bn.num_batches_tracked) == 2 * (3 + 1)
    torch.testing.assert_close(bn.running_mean, expected.running_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(bn.running_var, expected.running_var, atol=1e-12, rtol=0)


def test_regression_tasks(compose_cfg):
    """Sinusoids: MSE in the inner loop, no accuracy."""
    from metarun.build import build_algorithm, build_data

    cfg = compose_cfg("dataset=sinusoid", "backbone=mlp_sinusoid", "algorithm=reptile", "ways=1", "shots=5",
                      "query_shots=10")
    train, _, test, objective = build_data(cfg, torch.device("cpu"))
    algorithm, optimizer, _ = build_algorithm(cfg, torch.device("cpu"), objective)
    algorithm.on_iteration(0, 1)
    metrics = algorithm.meta_step([train.sample() for _ in range(2)], MetaUpdate(optimizer, None))
    assert set(metrics) == {"train/loss"}
    with torch.no_grad():
        results = algorithm.run_task(next(iter(test)), 3, every_step=True)
    assert all(r.accuracy is None and r.predictions.shape == (10, 1) for r in results)
    assert results[-1].loss < results[0].loss


def test_a_run_resumed_mid_way_ends_bit_identical(compose_cfg, tmp_path, monkeypatch):
    """Stopped after 2 of 4 iterations and resumed: the outer step's anneal (a function of the
    iteration and the total), Adam's carried state and the minibatch order all continue exactly."""
    from metarun.loop import run

    tiny = ["algorithm=reptile", "iterations=4", "backbone.hidden=8", "algorithm.eval_inner_steps=2",
            "train_shots=3"]
    straight, stopped, resumed = tmp_path / "straight", tmp_path / "stopped", tmp_path / "resumed"
    run(compose_cfg(*tiny), straight)
    original, calls = Reptile.meta_step, []

    def stop_at_the_third(self, tasks, update):
        calls.append(self.outer_step)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, tasks, update)

    monkeypatch.setattr(Reptile, "meta_step", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg(*tiny), stopped)
    monkeypatch.setattr(Reptile, "meta_step", original)
    run(compose_cfg(*tiny, f"resume={stopped}"), resumed)
    assert calls[:2] == [1.0, 0.75]
    expected = torch.load(straight / "checkpoints" / "last.pt")
    actual = torch.load(resumed / "checkpoints" / "last.pt")
    assert actual["state"]["iteration"] == 4 and int(actual["algorithm"]["adam.steps"]) == 4 * 2 * 5
    for key, value in expected["algorithm"].items():
        assert torch.equal(value, actual["algorithm"][key]), key


@pytest.mark.parametrize("options,message", [
    ({"inner_optimizer": "rmsprop"}, "inner_optimizer must be one of sgd, adam"),
    ({"inner_batch_size": 0}, "inner_batch_size must be >= 1 or null"),
    ({"inner_lr": -1.0}, "inner_lr must be >= 0"),
    ({"outer_lr_final": -0.1}, "outer_lr and outer_lr_final must be >= 0"),
    ({"train_ways": 2}, "train_ways=2 is smaller than ways=3"),
])
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(ConfigError, match=message):
        reptile(Flat(2), 3, **options)


# Reptile trains on more shots than it tests (the authors: 10 Omniglot, 15 mini-ImageNet); a short run,
# well under a minute on one core. Measured: 0.485 before training, 0.695 after (80 test tasks).
GLYPHS_RUN = ["iterations=50", "meta_batch_size=6", "eval_every=50", "eval.val_tasks=10", "eval.tasks=80",
              "train_shots=5"]


def test_reptile_learns_glyphs(compose_cfg, tmp_path):
    trained, untrained = trained_and_untrained(compose_cfg, tmp_path, "algorithm=reptile", *GLYPHS_RUN)
    assert trained > untrained + 0.1, f"reptile: {untrained:.3f} before training, {trained:.3f} after"
    assert trained > 0.55  # 5-way chance is 0.2
