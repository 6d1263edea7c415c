"""Meta Networks (Munkhdalai & Yu 2017): its pieces against hand computations, its invariants, a learning check.

Exact checks: zero gradients give zero fast weights (both generators, by construction), layer
augmentation is ReLU(slow) + ReLU(fast), per-example gradients from one backward pass equal the
gradients of each example's loss alone, the memory read is the attention-weighted sum of the stored
fast weights (float64, by hand). Then: the logged train/loss is the sum of its logged parts and is
what the meta-gradient minimises, the first-order switch, relabelling the support classes (exact
only without the slow output weights: see MetaNetwork), and the method learns glyphs.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.base import MetaUpdate
from metarun.algorithms.metanet import (
    AugmentedMLP,
    MetaNetwork,
    augmented_layer,
    per_step_gradients,
    preprocess_gradients,
    read_memory,
)
from metarun.backbones import MLP
from metarun.build import build_algorithm
from metarun.errors import ConfigError
from metarun.loop import batchnorm_mode
from metarun.objectives import Regression
from metarun.tasks.types import Task, TaskSplit
from test_metric import trained_and_untrained

OPTIONS = {"hidden": 6, "representation_dim": 5, "generator_hidden": 4, "representation_loss": "contrastive",
           "representation_steps": 4, "contrastive_margin": 1.0, "attention_scale": 1.0, "gradient_log_scale": 7.0,
           "first_order": True, "representation_weight": 0.0, "support_weight": 0.0}


def metanet(ways: int = 3, in_features: int = 16, **options) -> MetaNetwork:
    return MetaNetwork(MLP(in_features=in_features, hidden=[8], batch_norm=False), ways=ways, **{**OPTIONS, **options})


def task(ways: int = 3, shots: int = 1, query_shots: int = 2, dtype=torch.float32, side: int = 4) -> Task:
    def split(per_class: int) -> TaskSplit:
        return TaskSplit(torch.rand(ways * per_class, 1, side, side, dtype=dtype), torch.arange(ways).repeat(per_class),
                         ways)

    return Task(split(shots), split(query_shots))


# ---------------------------------------------------------------------------------------------
# Fast weights
# ---------------------------------------------------------------------------------------------


def test_zero_gradients_give_zero_fast_weights():
    """By construction: bias-free generators on a preprocessing that maps 0 to (0, 0)."""
    torch.manual_seed(0)
    net = metanet()
    example_zero = [torch.zeros(5, *shape) for shape in net.base.shapes]
    task_zero = [torch.zeros(4, *shape) for shape in net.representation.shapes]
    for fast in net.example_weights(example_zero) + net.task_weights(task_zero):
        assert torch.equal(fast, torch.zeros_like(fast))
    # Not vacuous: the same generators give non-zero fast weights for non-zero gradients.
    example = net.example_weights([torch.randn(5, *shape) for shape in net.base.shapes])
    task_level = net.task_weights([torch.randn(4, *shape) for shape in net.representation.shapes])
    assert all(bool(fast.abs().sum() > 0) for fast in example + task_level)
    assert [f.shape for f in example] == [torch.Size([5, *s]) for s in net.base.shapes]
    assert [f.shape for f in task_level] == net.representation.shapes


def test_gradient_preprocessing_is_the_shifted_log_and_sign():
    """``(max(1 + log|g| / k, 0), clip(g e^k, -1, 1))``: the authors' log-and-sign with its first feature + 1."""
    k = 7.0
    g = torch.tensor([0.0, 1e-9, -1e-4, 2e-3, -0.5, 3.0], dtype=torch.float64)
    large = np.abs(g.numpy()) > np.exp(-k)
    log_part = np.where(large, 1 + np.log(np.where(large, np.abs(g.numpy()), 1.0)) / k, 0.0)
    linear_part = np.clip(g.numpy() * np.exp(k), -1, 1)
    assert np.allclose(preprocess_gradients(g, k).numpy(), np.stack([log_part, linear_part], -1), atol=1e-15)


def test_per_step_gradients_are_each_steps_own_gradient():
    """One backward pass gives, for every step, the gradient of that step's loss alone."""
    torch.manual_seed(0)
    head = AugmentedMLP([4, 6, 3]).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    step_of_row = torch.tensor([0, 0, 1, 2, 2, 2])
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out, inputs, pre = head.traced(x)
    losses = F.cross_entropy(out, y, reduction="none")
    step_losses = torch.zeros(3, dtype=torch.float64).index_add(0, step_of_row, losses)
    gradients = per_step_gradients(inputs, pre, step_losses, step_of_row, create_graph=False, retain_graph=True)
    weights = [layer.weight for layer in head.layers]
    for step in range(3):
        expected = torch.autograd.grad(step_losses[step], weights, retain_graph=True)
        for got, want in zip(gradients, expected, strict=True):
            torch.testing.assert_close(got[step], want, atol=1e-13, rtol=0)


# ---------------------------------------------------------------------------------------------
# Layer augmentation and the memory
# ---------------------------------------------------------------------------------------------


def test_layer_augmentation_is_the_sum_of_the_slow_and_fast_activations():
    torch.manual_seed(0)
    x, slow, fast = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3, 5)
    expected = torch.relu(F.linear(x, slow)) + torch.relu(F.linear(x, fast))
    assert torch.equal(augmented_layer(x, slow, fast, activation=True), expected)
    assert torch.equal(augmented_layer(x, slow, fast, activation=False), F.linear(x, slow) + F.linear(x, fast))
    assert torch.equal(augmented_layer(x, slow, None, activation=True), torch.relu(F.linear(x, slow)))
    # Example-level fast weights: every input has its own.
    x64, slow64 = x.double(), slow.double()
    per_input = torch.randn(4, 3, 5, dtype=torch.float64)
    got = augmented_layer(x64, slow64, per_input, activation=True)
    for b in range(4):
        want = torch.relu(slow64 @ x64[b]) + torch.relu(per_input[b] @ x64[b])
        torch.testing.assert_close(got[b], want, atol=1e-14, rtol=0)


def test_augmented_mlp_augments_every_layer():
    torch.manual_seed(0)
    head = AugmentedMLP([5, 4, 3])
    x = torch.randn(2, 5)
    w1, w2 = head.layers[0].weight, head.layers[1].weight
    f1, f2 = torch.randn(4, 5), torch.randn(3, 4)
    hidden = torch.relu(F.linear(x, w1)) + torch.relu(F.linear(x, f1))
    assert torch.equal(head(x, [f1, f2]), F.linear(hidden, w2) + F.linear(hidden, f2))
    assert torch.equal(head(x), F.linear(torch.relu(F.linear(x, w1)), w2))


def test_memory_read_is_the_attention_weighted_sum_of_stored_fast_weights():
    rng = np.random.default_rng(0)
    keys, queries = rng.normal(size=(4, 3)), rng.normal(size=(2, 3))
    values = [rng.normal(size=(4, 2, 3)), rng.normal(size=(4, 5, 2))]
    scale = 2.5
    expected = []
    for q in queries:
        cosine = np.array([q @ k / (np.linalg.norm(q) * np.linalg.norm(k)) for k in keys])
        a = np.exp(scale * cosine) / np.exp(scale * cosine).sum()
        expected.append([sum(a[i] * v[i] for i in range(4)) for v in values])
    got = read_memory(torch.tensor(queries), torch.tensor(keys), [torch.tensor(v) for v in values], scale)
    for layer in range(2):
        for q in range(2):
            assert np.allclose(got[layer][q].numpy(), expected[q][layer], atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# The meta-update
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("representation_loss", ["contrastive", "cross_entropy"])
def test_logged_loss_is_the_sum_of_its_parts_and_is_what_is_minimised(compose_cfg, representation_loss):
    cfg = compose_cfg("algorithm=metanet", "backbone=conv4", "backbone.hidden=8", "algorithm.hidden=6",
                      "algorithm.representation_dim=5", f"algorithm.representation_loss={representation_loss}",
                      "algorithm.representation_weight=0.5", "algorithm.support_weight=0.25")
    algorithm, _, _ = build_algorithm(cfg, torch.device("cpu"))
    reference = copy.deepcopy(algorithm)
    algorithm.train(), reference.train()
    tasks = [task(ways=5, shots=shots, query_shots=2, side=28) for shots in (1, 2)]
    metrics = algorithm.meta_step(tasks, MetaUpdate(torch.optim.SGD(algorithm.parameters(), lr=0.0), None))

    parts = ("query_loss", "representation_loss", "support_loss")
    assert set(metrics) == {"train/loss", "train/acc", *(f"train/{p}" for p in parts)}
    assert metrics["train/loss"] == pytest.approx(
        metrics["train/query_loss"] + 0.5 * metrics["train/representation_loss"]
        + 0.25 * metrics["train/support_loss"], rel=1e-6)
    assert metrics["train/representation_loss"] > 0 and metrics["train/support_loss"] > 0

    # The same tasks, by hand: the parts' means, and autograd of the mean weighted sum.
    totals, logged = [], {p: [] for p in parts}
    for t in tasks:
        loss, terms, _ = reference.task_losses(t)
        totals.append(loss)
        for p in parts:
            logged[p].append(terms[p].item())
    for p in parts:
        assert metrics[f"train/{p}"] == pytest.approx(np.mean(logged[p]), rel=1e-5)
    objective = torch.stack(totals).mean()
    assert metrics["train/loss"] == pytest.approx(objective.item(), rel=1e-5)
    names = [n for n, _ in reference.named_parameters()]
    expected = torch.autograd.grad(objective, list(reference.parameters()), allow_unused=True)
    for name, p, want in zip(names, algorithm.parameters(), expected, strict=True):
        want = torch.zeros_like(p) if want is None else want
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4, msg=name)
    assert algorithm.base.layers[0].weight.grad.abs().sum() > 0


def test_first_order_treats_the_generators_inputs_as_constants():
    """With cross-entropy, u's head only shapes the gradients d reads: first order gives it no
    meta-gradient (as in the authors' code, where it is never trained); second order does."""
    torch.manual_seed(0)
    for first_order in (True, False):
        net = metanet(representation_loss="cross_entropy", first_order=first_order)
        loss, _ = net.train_task(task())
        loss.backward()
        head = net.representation_head.weight.grad
        if first_order:  # reached only through 0 * representation loss
            assert head is None or not bool(head.any())
        else:
            assert head is not None and bool(head.abs().sum() > 0)
        assert net.task_generators[0].lstm.weight_ih_l0.grad.abs().sum() > 0


def test_relabelling_the_support_permutes_the_scores_without_slow_output_weights():
    """Why the contract test's relabelling check cannot hold for MetaNet: the base learner's slow
    output layer (the paper's softmax layer) gives every output unit its own weights. Without them,
    everything else (contrastive loss, gradients, m, the memory) is label-equivariant, exactly."""
    torch.manual_seed(0)
    net = metanet(ways=5).double()
    t = task(ways=5, dtype=torch.float64)
    permutation = torch.tensor([2, 0, 4, 1, 3])
    relabelled = Task(TaskSplit(t.support.x, permutation[t.support.y], 5), TaskSplit(t.query.x, permutation[t.query.y], 5))

    def scores() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), batchnorm_mode(net, batch_stats=True):
            [plain] = net.run_task(t, 0, every_step=True)
            [permuted] = net.run_task(relabelled, 0, every_step=True)
        return plain.predictions, permuted.predictions

    plain, permuted = scores()
    assert not torch.allclose(permuted[:, permutation], plain, atol=1e-6), "the slow output weights break it"
    with torch.no_grad():
        net.base.layers[-1].weight.zero_()
    plain, permuted = scores()
    torch.testing.assert_close(permuted[:, permutation], plain, atol=1e-12, rtol=0)
    assert not torch.allclose(plain, plain[:, permutation]), "scores ignore the support set"


def test_refuses_regression_and_fewer_training_ways():
    with pytest.raises(ConfigError, match="needs a classification dataset"):
        metanet(objective=Regression())
    with pytest.raises(ConfigError, match="train_ways=2 is smaller than ways=3"):
        metanet(train_ways=2)
    with pytest.raises(ConfigError, match="contrastive, cross_entropy"):
        metanet(representation_loss="triplet")


def test_wider_training_tasks_leave_the_extra_output_units_without_fast_weights():
    torch.manual_seed(0)
    net = metanet(ways=3, train_ways=5)
    memory = net.adapt(task(ways=3).support, steps=0)
    assert net.base.layers[-1].weight.shape[0] == 5
    assert torch.equal(memory.values[-1][:, 3:], torch.zeros_like(memory.values[-1][:, 3:]))
    assert bool(memory.values[-1][:, :3].abs().sum() > 0)


# ---------------------------------------------------------------------------------------------
# Learning check
# ---------------------------------------------------------------------------------------------


def test_metanet_learns_glyphs(compose_cfg, tmp_path):
    # A smaller backbone and heads than the defaults, and 4 tasks per update, keep it under a minute.
    trained, untrained = trained_and_untrained(
        compose_cfg, tmp_path, "dataset=glyphs", "algorithm=metanet", "backbone.hidden=32", "algorithm.hidden=16",
        "algorithm.representation_dim=16", "algorithm.representation_steps=5", "meta_batch_size=4")
    assert trained > untrained + 0.2, f"metanet: {untrained:.3f} before training, {trained:.3f} after"
    assert trained > 0.2 + 0.25  # 5-way chance is 0.2
