"""The meta-learner LSTM: an LSTM that learns the update rule and the initialisation of a learner.

Ravi & Larochelle, "Optimization as a Model for Few-Shot Learning", ICLR 2017. Where the paper
leaves a detail open, this follows the authors' code (github.com/twitter-research/meta-learning-lstm,
``model/lstm/meta-learner-lstm.lua``, ``model/lstm/lstm-helper.lua``); the docstrings say where,
and where this differs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from metarun.algorithms.base import Algorithm
from metarun.algorithms.gradient import classifier
from metarun.errors import ConfigError
from metarun.objectives import Classification, Objective, TaskResult
from metarun.tasks.types import TaskSplit

# Andrychowicz et al. (2016, Appendix A) preprocessing constant; Ravi & Larochelle use p = 10.
PREPROCESS_P = 10.0
# The authors draw every meta-learner weight from U(-0.01, 0.01), apart from the gate biases.
WEIGHT_INIT = 0.01


def preprocess(x: torch.Tensor, p: float = PREPROCESS_P) -> torch.Tensor:
    """Andrychowicz et al.'s (2016) scaling of gradients and losses: ``[...] -> [..., 2]``.

    ``x -> (log(|x|) / p, sign(x))`` if ``|x| >= e^-p``, else ``(-1, e^p * x)``: the magnitude
    and the sign in separate inputs, both of order 1 whatever the scale of ``x``.
    """
    threshold = math.exp(-p)
    large = x.abs() >= threshold
    magnitude = torch.where(large, x.abs().clamp_min(threshold).log() / p, torch.full_like(x, -1.0))
    sign = torch.where(large, x.sign(), x * math.exp(p))
    return torch.stack([magnitude, sign], dim=-1)


@dataclass
class CellState:
    """The meta-learner's state after a step, one row per learner coordinate (``n`` of them).

    Attributes:
        lstm: the first layer's ``(h, c)``, each ``[n, hidden_size]``.
        input_gate: ``i_t [n]``.
        forget_gate: ``f_t [n]``.
    """

    lstm: tuple[torch.Tensor, torch.Tensor]
    input_gate: torch.Tensor
    forget_gate: torch.Tensor


class MetaLearnerCell(nn.Module):
    """One update of the learner's parameters by the two-layer, coordinate-wise meta-learner.

    Every coordinate ``k`` of the learner's parameter vector ``theta [n]`` is a row of a batch of
    ``n``: all coordinates share the weights, each has its own state. For step ``t``:

    1. inputs ``x_t = [preprocess(L_t), preprocess(grad_t)] [n, 4]`` (the loss, a scalar, is the
       same for every coordinate);
    2. a standard LSTM layer: ``h_t, _ = LSTMCell(x_t, (h_{t-1}, c'_{t-1}))``, ``h_t [n, hidden_size]``;
    3. the meta-learner cell, whose cell state is the learner's parameters (Eq. 2 of the paper):

       ``i_t = sigmoid([h_t, theta_{t-1}, i_{t-1}] . W_I + b_I)``,
       ``f_t = sigmoid([h_t, theta_{t-1}, f_{t-1}] . W_F + b_F)``,
       ``theta_t = c_t = f_t * c_{t-1} + i_t * (-grad_t)``,

       with ``W_I, W_F [hidden_size + 2]``, scalar biases and ``i_0 = f_0 = 0``.

    The gradient and the loss enter as constants: :meth:`MetaLSTM.trajectory` computes them on a
    detached copy of ``theta`` (the paper's simplification, "gradients of the inputs are not
    backpropagated"); the meta-gradient flows through ``c_{t-1}``, ``i_t`` and ``f_t``.

    The paper writes the previous gate values ``i_{t-1}``, ``f_{t-1}``; the authors' code feeds back
    their pre-sigmoid values. This follows the paper.

    Args:
        hidden_size: units of the first LSTM layer (20 in the paper).
        input_bias_init: initial ``b_I``; small, so that the untrained input gate (the learning
            rate) is small (the authors draw it from U(-5, -4)).
        forget_bias_init: initial ``b_F``; large, so that the untrained forget gate is close to 1
            and the untrained update is a small gradient step (the authors: U(4, 5)).
    """

    def __init__(self, hidden_size: int, input_bias_init: float, forget_bias_init: float) -> None:
        super().__init__()
        self.lstm = nn.LSTMCell(4, hidden_size)
        self.input_weight = nn.Parameter(torch.empty(hidden_size + 2))
        self.forget_weight = nn.Parameter(torch.empty(hidden_size + 2))
        self.input_bias = nn.Parameter(torch.tensor(float(input_bias_init)))
        self.forget_bias = nn.Parameter(torch.tensor(float(forget_bias_init)))
        for weight in (*self.lstm.parameters(), self.input_weight, self.forget_weight):
            nn.init.uniform_(weight, -WEIGHT_INIT, WEIGHT_INIT)

    def forward(self, theta: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor,
                state: CellState | None) -> tuple[torch.Tensor, CellState]:
        """``theta [n]``, ``grad [n]``, scalar ``loss`` -> ``theta_t [n]`` and the new state
        (``state`` None: the first step)."""
        n = theta.shape[0]
        inputs = torch.cat([preprocess(loss.reshape(1)).expand(n, 2), preprocess(grad)], dim=1)  # [n, 4]
        h, c = self.lstm(inputs, None if state is None else state.lstm)
        if state is None:
            previous_input = previous_forget = theta.new_zeros(n)
        else:
            previous_input, previous_forget = state.input_gate, state.forget_gate
        column = theta[:, None]
        input_gate = torch.sigmoid(
            torch.cat([h, column, previous_input[:, None]], dim=1) @ self.input_weight + self.input_bias)
        forget_gate = torch.sigmoid(
            torch.cat([h, column, previous_forget[:, None]], dim=1) @ self.forget_weight + self.forget_bias)
        theta = forget_gate * theta - input_gate * grad
        return theta, CellState((h, c), input_gate, forget_gate)


class Learner(nn.Module):
    """The learner network run with the parameters ``theta [n]`` (a cell state of the meta-learner):
    ``[B, ...] -> [B, outputs]``.

    The network is held, not registered: the learner has no parameters of its own, and running it
    never writes into the network's parameters (``torch.func.functional_call``). Its buffers are
    the network's (BatchNorm running statistics, private copies during ``Algorithm.run_task``).
    """

    def __init__(self, network: nn.Module, theta: torch.Tensor) -> None:
        super().__init__()
        self.__dict__["network"] = network
        self.theta = theta
        shapes = [(name, p.shape) for name, p in network.named_parameters()]
        pieces = theta.split([math.prod(shape) for _, shape in shapes])
        self.parameter_views = {name: piece.view(shape) for (name, shape), piece in zip(shapes, pieces, strict=True)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.network, self.parameter_views, (x,))


class MetaLSTM(Algorithm):
    """Meta-learner LSTM (Ravi & Larochelle, "Optimization as a Model for Few-Shot Learning", ICLR 2017).

    The learner is ``features -> linear head``, ``[B, C, H, W] -> [B, outputs]``. Its ``n``
    parameters, flattened into one vector ``theta [n]``, are the cell state of a coordinate-wise
    LSTM (:class:`MetaLearnerCell`), which updates them from the support loss and gradient:
    ``theta_t = f_t * theta_{t-1} - i_t * grad_t``. The initial cell state ``c_0`` is the learner's
    initialisation, a meta-parameter like the LSTM's weights; it is stored as the learner network's
    own parameters (so the step-0 learner is the plain network, and checkpoints hold it as one).
    Each adaptation step uses the whole support set as one batch (the authors' 5-way 1-shot
    setting, whose batch of 5 is the support set); the meta-loss is the final learner's query
    loss, backpropagated through the ``steps`` updates (default :meth:`Algorithm.meta_step`).
    Cost: the LSTM runs once per coordinate and step, so a learner with many parameters is slow on
    a CPU (Conv4 with 64 filters, 112k coordinates: about 1.7 s per 5-step training task on one
    core, some 50 times MAML's one-step task).

    BatchNorm in the learner: adaptation runs it on batch statistics, and so does the query pass
    at meta-test with ``eval.bn_batch_stats=true`` (the default, which this method assumes): running
    statistics are kept (on private copies, folded back by training tasks only) but never read.
    The authors reset them for each task and test with those of its training set; with
    ``eval.bn_batch_stats=false`` metarun would use the statistics of meta-training instead.

    Args:
        features: backbone ``[B, C, H, W] -> [B, out_features]``.
        ways: classes per evaluation task.
        hidden_size: units of the meta-learner's first LSTM layer (20 in the paper).
        input_bias_init: initial input-gate bias ``b_I`` (small: a small initial learning rate).
        forget_bias_init: initial forget-gate bias ``b_F`` (large: a forget gate close to 1).
        inner_steps: learner updates during meta-training (paper, 5-way 1-shot: 12).
        eval_inner_steps: learner updates at evaluation (the paper uses the training number).
        train_ways: ways of meta-training tasks (``None``: ``ways``); at least ``ways``.
        objective: the task's loss and metrics (default: classification; regression works too).
    """

    def __init__(self, features: nn.Module, ways: int, hidden_size: int, input_bias_init: float,
                 forget_bias_init: float, inner_steps: int, eval_inner_steps: int, train_ways: int | None = None,
                 objective: Objective | None = None) -> None:
        super().__init__(inner_steps, eval_inner_steps)
        if hidden_size < 1:
            raise ConfigError(f"algorithm.hidden_size must be >= 1, got {hidden_size}")
        self.objective = objective or Classification()
        self.network = classifier(features, self.output_units(ways, train_ways, self.objective, "the meta-learner LSTM"))
        self.meta_learner = MetaLearnerCell(hidden_size, input_bias_init, forget_bias_init)

    def initial_cell_state(self) -> torch.Tensor:
        """``c_0 [n]``: the network's parameters, flattened in ``named_parameters`` order."""
        return torch.cat([p.reshape(-1) for p in self.network.parameters()])

    def trajectory(self, support: TaskSplit, steps: int) -> Iterator[nn.Module]:
        theta = self.initial_cell_state()
        yield Learner(self.network, theta)
        state = None
        for _ in range(steps):
            # The learner's loss and gradient at theta_{t-1}, as constants: computed on a detached
            # copy, so no graph links them to the meta-parameters (also under torch.no_grad()).
            with torch.enable_grad():
                point = theta.detach().requires_grad_()
                loss = self.objective.loss(Learner(self.network, point)(support.x), support)
                (grad,) = torch.autograd.grad(loss, point)
            theta, state = self.meta_learner(theta, grad, loss.detach(), state)
            yield Learner(self.network, theta)

    def score(self, learner: nn.Module, query: TaskSplit) -> TaskResult:
        return self.objective.result(learner(query.x), query)
