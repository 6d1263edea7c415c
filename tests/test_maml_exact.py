"""MAML's meta-gradient against a derivation by hand, on a linear 2-way classifier.

Model: logits ``z = W x~`` with ``x~ = [x, 1]`` (the head's bias folded in), ``W`` 2x4, softmax
cross-entropy ``L(W) = mean_i CE(W x~_i, y_i)``. Then, with ``p_i = softmax(W x~_i)``,

    grad L(W)      = mean_i (p_i - e_{y_i}) x~_i^T
    Hess L(W)[V]   = mean_i ((diag(p_i) - p_i p_i^T) V x~_i) x~_i^T

One inner step ``W' = W - a grad L_s(W)``; the second-order meta-gradient is
``grad L_q(W') - a Hess L_s(W)[grad L_q(W')]`` (the Hessian is symmetric), the first-order one
``grad L_q(W')`` (Finn et al. 2017, §2.2 and §5.2). Computed here in NumPy float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from metarun.algorithms.maml import MAML
from metarun.tasks.types import Task, TaskSplit

ALPHA = 0.7


class Identity3(nn.Flatten):
    """A 'backbone' that passes 3 input features through unchanged."""

    out_features = 3


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def grad(W: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xt = np.hstack([x, np.ones((len(x), 1))])
    p = softmax(xt @ W.T)
    return (p - np.eye(2)[y]).T @ xt / len(x)


def hessian_vector(W: np.ndarray, x: np.ndarray, V: np.ndarray) -> np.ndarray:
    xt = np.hstack([x, np.ones((len(x), 1))])
    p = softmax(xt @ W.T)
    out = np.zeros_like(W)
    for p_i, x_i in zip(p, xt, strict=True):
        out += np.outer((np.diag(p_i) - np.outer(p_i, p_i)) @ (V @ x_i), x_i)
    return out / len(x)


@pytest.fixture
def problem():
    rng = np.random.default_rng(3)
    xs, xq = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    ys, yq = np.array([0, 1, 1, 0]), np.array([1, 0, 1, 0])
    W = rng.normal(size=(2, 4)) * 0.5
    task = Task(
        support=TaskSplit(torch.tensor(xs), torch.tensor(ys), 2),
        query=TaskSplit(torch.tensor(xq), torch.tensor(yq), 2),
    )
    return W, task


# MAML++'s switches, all off: Finn et al.'s MAML.
PLAIN = {"per_step_bn_statistics": False, "per_step_bn_weights": False, "per_step_inner_lrs": False,
         "multi_step_loss": False, "msl_anneal_iterations": 0, "first_order_iterations": 0,
         "vectorize": False}


def meta_gradient(W: np.ndarray, task: Task, first_order: bool) -> np.ndarray:
    torch.set_default_dtype(torch.float64)
    try:
        algorithm = MAML(Identity3(), ways=2, inner_lr=ALPHA, first_order=first_order, inner_steps=1, eval_inner_steps=1, **PLAIN)
    finally:
        torch.set_default_dtype(torch.float32)
    head = algorithm.learnable.module[1]
    with torch.no_grad():
        head.weight.copy_(torch.tensor(W[:, :3]))
        head.bias.copy_(torch.tensor(W[:, 3]))
    loss, _ = algorithm.train_task(task)
    loss.backward()
    return np.hstack([head.weight.grad.numpy(), head.bias.grad.numpy()[:, None]])


def test_second_order_meta_gradient_matches_hand_derivation(problem):
    W, task = problem
    xs, ys, xq, yq = (t.numpy() for t in (task.support.x, task.support.y, task.query.x, task.query.y))
    W_adapted = W - ALPHA * grad(W, xs, ys)
    g_query = grad(W_adapted, xq, yq)
    expected = g_query - ALPHA * hessian_vector(W, xs, g_query)
    np.testing.assert_allclose(meta_gradient(W, task, first_order=False), expected, rtol=1e-10, atol=1e-12)


def test_first_order_meta_gradient_drops_the_hessian_term(problem):
    W, task = problem
    xs, ys, xq, yq = (t.numpy() for t in (task.support.x, task.support.y, task.query.x, task.query.y))
    expected = grad(W - ALPHA * grad(W, xs, ys), xq, yq)
    first = meta_gradient(W, task, first_order=True)
    second = meta_gradient(W, task, first_order=False)
    np.testing.assert_allclose(first, expected, rtol=1e-10, atol=1e-12)
    # The Hessian term is not negligible here, so the two orders must differ.
    assert np.abs(first - second).max() > 1e-3


def test_a_head_wider_than_the_task_gives_the_same_learner_as_a_head_of_the_task_size(problem):
    """With train_ways > ways the head has train_ways outputs and an N-way task reads the first N:
    the extra outputs get no gradient, so adaptation and query loss equal those of an N-output head."""
    W, task = problem
    torch.set_default_dtype(torch.float64)
    try:
        narrow = MAML(Identity3(), ways=2, inner_lr=ALPHA, first_order=False, inner_steps=1, eval_inner_steps=1, **PLAIN)
        wide = MAML(Identity3(), ways=2, train_ways=5, inner_lr=ALPHA, first_order=False, inner_steps=1,
                    eval_inner_steps=1, **PLAIN)
    finally:
        torch.set_default_dtype(torch.float32)
    assert wide.head_outputs == 5 and wide.learnable.module[1].out_features == 5
    with torch.no_grad():
        narrow.learnable.module[1].weight.copy_(torch.tensor(W[:, :3]))
        narrow.learnable.module[1].bias.copy_(torch.tensor(W[:, 3]))
        wide.learnable.module[1].weight[:2].copy_(torch.tensor(W[:, :3]))
        wide.learnable.module[1].bias[:2].copy_(torch.tensor(W[:, 3]))
    narrow_results = narrow.run_task(task, 2, every_step=True)
    wide_results = wide.run_task(task, 2, every_step=True)
    for a, b in zip(narrow_results, wide_results, strict=True):
        assert torch.allclose(a.loss, b.loss, atol=1e-12) and torch.equal(a.accuracy, b.accuracy)
