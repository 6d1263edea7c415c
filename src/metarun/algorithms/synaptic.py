"""A meta-learned synaptic learning rule (Bengio, Bengio & Cloutier 1991; Bengio, Bengio, Cloutier & Gecsei 1992)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from metarun.algorithms.base import Algorithm
from metarun.errors import ConfigError
from metarun.objectives import Classification, Objective, Regression, TaskResult
from metarun.tasks.types import TaskSplit

# The terms a rule may combine, for the synapse from presynaptic unit i to postsynaptic unit j of
# one layer. ``pre`` is x_i, ``post`` is y_j (the unit's activity), ``error`` is m_j (its
# modulatory signal), ``weight`` is w_ji itself: pre_error = m_j * x_i (error-modulated Hebb, the
# delta rule), pre_post = y_j * x_i (Hebb), post_error = y_j * m_j, and weight as decay (negative
# coefficient) or growth.
TERMS = ("pre_error", "pre_post", "post_error", "pre", "post", "error", "weight")
FEEDBACKS = ("weights", "random")


@dataclass
class Layer:
    """One fully connected layer of the rule's network: ``weight [J, I]``, ``bias [J]``."""

    weight: torch.Tensor
    bias: torch.Tensor


class RuleNetwork(nn.Module):
    """The network a rule trains: ``x [n, ...] -> flatten [n, I] -> (tanh hidden [n, H]) -> [n, K]``.

    Its weights are plain tensors, not parameters: they are made for one task and changed only by
    the rule. ``feedback [K, H]`` is the fixed random matrix through which the hidden layer
    receives the output error when ``feedback=random`` (None otherwise).
    """

    def __init__(self, layers: list[Layer], feedback: torch.Tensor | None) -> None:
        super().__init__()
        self.layers = layers
        self.feedback = feedback

    def activities(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The input of every layer then the output's pre-activation: ``[x [n, I], (h [n, H]), o [n, K]]``."""
        out = [x.flatten(1)]
        for index, layer in enumerate(self.layers):
            a = out[-1] @ layer.weight.T + layer.bias
            out.append(torch.tanh(a) if index < len(self.layers) - 1 else a)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activities(x)[-1]


def rule_terms(term_names: Sequence[str], pre: torch.Tensor, post: torch.Tensor, mod: torch.Tensor,
               layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule's terms for every synapse of one layer, averaged over the ``n`` samples.

    Args:
        term_names: which of :data:`TERMS`, in order.
        pre: presynaptic activities ``x [n, I]``; the bias is the synapse from a unit fixed at 1.
        post: postsynaptic activities ``y [n, J]``.
        mod: modulatory signals ``m [n, J]``.
        layer: the current ``weight [J, I]`` and ``bias [J]``.

    Returns:
        ``[T, J, I]`` for the weights and ``[T, J]`` for the biases, term ``t`` being
        ``mean_s term_t(x_si, y_sj, m_sj, w_ji)``.
    """
    n = pre.shape[0]
    rows, cols = layer.weight.shape
    one = torch.ones_like(layer.bias)
    weights, biases = [], []
    for name in term_names:
        if name == "pre_error":
            w, b = mod.T @ pre / n, mod.mean(0)
        elif name == "pre_post":
            w, b = post.T @ pre / n, post.mean(0)
        elif name == "post_error":
            b = (post * mod).mean(0)
            w = b[:, None]
        elif name == "pre":
            w, b = pre.mean(0)[None, :], one
        elif name == "post":
            b = post.mean(0)
            w = b[:, None]
        elif name == "error":
            b = mod.mean(0)
            w = b[:, None]
        elif name == "weight":
            w, b = layer.weight, layer.bias
        else:
            raise ConfigError(f"unknown synaptic rule term {name!r}; choose from {', '.join(TERMS)}")
        weights.append(w.expand(rows, cols))
        biases.append(b.expand(rows))
    return torch.stack(weights), torch.stack(biases)


def apply_rule(theta: torch.Tensor, rate: torch.Tensor, term_names: Sequence[str], pre: torch.Tensor,
               post: torch.Tensor, mod: torch.Tensor, layer: Layer) -> Layer:
    """The layer after one update ``w <- w + rate * sum_t theta_t * mean_s term_t`` (``theta [T]``, ``rate []``)."""
    weights, biases = rule_terms(term_names, pre, post, mod, layer)
    theta = theta.to(weights.dtype)
    rate = rate.to(weights.dtype)
    return Layer(layer.weight + rate * torch.einsum("t,tji->ji", theta, weights),
                 layer.bias + rate * (theta @ biases))


class SynapticRule(Algorithm):
    """A parametric local learning rule whose parameters are meta-learned across tasks.

    Bengio, Bengio & Cloutier, "Learning a synaptic learning rule" (IJCNN 1991), and Bengio,
    Bengio, Cloutier & Gecsei, "On the optimization of a synaptic learning rule" (1992): the
    change of a synapse is a parametric function of local quantities only, its presynaptic
    activity, its postsynaptic activity, a modulatory signal and its weight; the function's
    parameters are shared by every synapse and optimised, by gradient descent, so that networks
    trained by the rule learn new tasks. The term set here is a Hebbian family in that spirit
    (not the papers' exact one): for the synapse ``w_ji`` from unit ``i`` to unit ``j`` of a
    layer, with ``x_i`` presynaptic, ``y_j`` postsynaptic, ``m_j`` modulatory,

        dw_ji = rate * sum_t theta_t * term_t,   terms: m_j x_i (delta rule), y_j x_i (Hebb),
                y_j m_j, x_i, y_j, m_j, w_ji (decay),

    any subset of them (``terms``). A bias is the synapse from a unit fixed at ``x = 1``. One
    update uses the whole support set: each term is averaged over its ``n`` samples.

    Meta-parameters: ``theta [L, T]`` and ``log_rate [L]``, one row per layer (``L`` = 1, or 2
    with a hidden layer: the hidden layer and the output layer each have their own rule, shared by
    all synapses of that layer), ``T = len(terms)``. With the delta-rule term alone, ``theta = 1``
    and ``feedback=weights``, one update is exactly a gradient step on the support loss (mean
    cross-entropy) with step size ``rate``: the initial rule of the config.

    The network is not meta-learned: every task gets a fresh one, ``x [n, C, H, W] -> [n, I]``
    (flattened; ``I`` taken from the data) ``-> tanh(h) [n, hidden]`` (when ``hidden > 0``)
    ``-> o [n, K]``, ``K`` = the task's ways (classification) or the target's dimension
    (regression). Weights are drawn uniformly in ``±1/sqrt(fan_in)``, biases are 0, from a
    ``torch.Generator`` seeded by ``init_seed`` and a hash of the support set: the same task
    always gets the same network (evaluation is reproducible), different tasks get different
    ones, the global RNG is never used, and nothing depends on training progress.

    Signals:

    - output layer: ``y = softmax(o)``, ``m = onehot(label) - softmax(o)`` (classification) or
      ``y = o``, ``m = target - o`` (regression): the output error.
    - hidden layer: ``y = h = tanh(a)``, ``m = (m_out @ F) * (1 - h^2)``, the output error sent back
      through ``F [K, hidden]`` and scaled by the unit's own slope. ``feedback=weights``: ``F`` is
      the current output weights, as in backpropagation (not strictly local: a hidden unit's signal
      reads the output synapses' weights); ``feedback=random``: ``F`` is a fixed random matrix
      drawn with the network (feedback alignment, Lillicrap et al. 2016), which is local.

    Adaptation applies the rule ``steps`` times on the support set; the query loss of the network
    after ``k`` updates is differentiable with respect to ``theta`` and ``log_rate`` (the rule is
    unrolled), and under ``torch.no_grad()`` the same updates run without a graph. The default
    meta-update (mean query loss, the run's optimizer) learns them. :meth:`learned_rule` reads them out.

    Notes: ``rate * theta`` is what acts (the split is a redundant parametrisation that keeps the
    rate positive and on a log scale). In a classification output layer the ``pre`` term moves
    every output unit's weights from unit ``i`` alike, which the softmax ignores, so its coefficient
    never gets a meta-gradient; on a balanced support set ``error`` equals ``-post`` plus a
    constant over the outputs, so only their difference matters. Hashing the support set reads it
    on the host once per task (one GPU sync).

    Args:
        hidden: hidden units (0: the inputs feed the outputs directly).
        feedback: how the hidden layer gets its modulatory signal: ``weights`` or ``random``.
        terms: the rule's terms, names from :data:`TERMS`.
        init: initial ``theta`` of each term (every layer); a term not named starts at 0.
        rate: initial learned rate (every layer), > 0.
        inner_steps: rule updates during meta-training.
        eval_inner_steps: rule updates at evaluation.
        init_seed: seed of the fresh networks (with the task's support set).
        ways: evaluation ways (the network has one output per class of each task: unused).
        train_ways: training ways (unused, as ``ways``).
        objective: classification or regression, from the dataset.
    """

    def __init__(self, hidden: int, feedback: str, terms: list[str], init: dict[str, float], rate: float,
                 inner_steps: int, eval_inner_steps: int, init_seed: int, ways: int | None = None,
                 train_ways: int | None = None, objective: Objective | None = None) -> None:
        super().__init__(inner_steps, eval_inner_steps)
        terms = list(terms)
        unknown = [t for t in [*terms, *init] if t not in TERMS]
        if unknown:
            raise ConfigError(f"algorithm.terms/init: unknown synaptic rule term(s) {unknown}; "
                              f"choose from {', '.join(TERMS)}")
        if not terms or len(set(terms)) != len(terms):
            raise ConfigError(f"algorithm.terms must name each term at most once, and at least one: {terms}")
        missing = [t for t in init if t not in terms]
        if missing:
            raise ConfigError(f"algorithm.init sets {missing}, which algorithm.terms does not use")
        if hidden < 0:
            raise ConfigError(f"algorithm.hidden must be >= 0, got {hidden}")
        if feedback not in FEEDBACKS:
            raise ConfigError(f"algorithm.feedback={feedback!r}; choose from {', '.join(FEEDBACKS)}")
        if rate <= 0:
            raise ConfigError(f"algorithm.rate must be > 0, got {rate}")
        self.hidden = hidden
        self.feedback = feedback
        self.terms = tuple(terms)
        self.init_seed = init_seed
        self.objective = objective or Classification()
        if not isinstance(self.objective, Classification | Regression):
            raise ConfigError(f"algorithm=synaptic: no error signal for {type(self.objective).__name__} tasks")
        self.layer_names = ("hidden", "output") if hidden > 0 else ("output",)
        row = torch.tensor([float(init.get(t, 0.0)) for t in self.terms])
        self.theta = nn.Parameter(row.repeat(len(self.layer_names), 1))  # [L, T]
        self.log_rate = nn.Parameter(torch.full((len(self.layer_names),), math.log(rate)))  # [L]

    # ------------------------------------------------------------------------------------------
    # The fresh network
    # ------------------------------------------------------------------------------------------

    def network_seed(self, support: TaskSplit) -> int:
        """``init_seed`` and the support set's content, hashed (independent of dtype and device)."""
        digest = hashlib.blake2b(digest_size=8)
        digest.update(str(self.init_seed).encode())
        digest.update(support.x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        digest.update(support.y.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        return int.from_bytes(digest.digest(), "little") & (2**63 - 1)

    def fresh_network(self, support: TaskSplit) -> RuleNetwork:
        """A new network for the task of ``support``: the same for the same support set, whatever
        the meta-parameters or the global RNG."""
        generator = torch.Generator().manual_seed(self.network_seed(support))
        sizes = [support.x[0].numel(), *([self.hidden] if self.hidden else []),
                 self.objective.outputs(support.ways)]
        like = {"dtype": support.x.dtype, "device": support.x.device}

        def uniform(rows: int, cols: int) -> torch.Tensor:
            bound = cols ** -0.5
            return ((torch.rand(rows, cols, generator=generator, dtype=torch.float64) * 2 - 1) * bound).to(**like)

        layers = [Layer(uniform(out, fan_in), torch.zeros(out, **like))
                  for fan_in, out in zip(sizes[:-1], sizes[1:], strict=True)]
        feedback = uniform(sizes[-1], self.hidden) if self.hidden and self.feedback == "random" else None
        return RuleNetwork(layers, feedback)

    # ------------------------------------------------------------------------------------------
    # The rule
    # ------------------------------------------------------------------------------------------

    def output_signals(self, output: torch.Tensor, split: TaskSplit) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, m)`` of the output units, ``[n, K]`` each."""
        if isinstance(self.objective, Regression):
            return output, split.y.to(output.dtype) - output
        probabilities = output.softmax(dim=1)
        target = nn.functional.one_hot(split.y, output.shape[1]).to(output.dtype)
        return probabilities, target - probabilities

    def update(self, network: RuleNetwork, support: TaskSplit) -> RuleNetwork:
        """One application of the rule to every synapse, from one pass over the support set."""
        acts = network.activities(support.x)  # [x, (h), o]
        post, mod = self.output_signals(acts[-1], support)
        posts, mods = [post], [mod]
        if self.hidden:
            h = acts[1]
            back = network.feedback if network.feedback is not None else network.layers[-1].weight  # [K, H]
            posts.insert(0, h)
            mods.insert(0, (mod @ back) * (1 - h * h))
        rates = self.log_rate.exp()
        layers = [apply_rule(self.theta[index], rates[index], self.terms, acts[index], posts[index], mods[index], layer)
                  for index, layer in enumerate(network.layers)]
        return RuleNetwork(layers, network.feedback)

    def unroll(self, network: RuleNetwork, support: TaskSplit, steps: int) -> Iterator[RuleNetwork]:
        """``network`` and the networks after 1..``steps`` updates on ``support``."""
        yield network
        for _ in range(steps):
            network = self.update(network, support)
            yield network

    # ------------------------------------------------------------------------------------------
    # The contract
    # ------------------------------------------------------------------------------------------

    def trajectory(self, support: TaskSplit, steps: int) -> Iterator[nn.Module]:
        yield from self.unroll(self.fresh_network(support), support, steps)

    def score(self, learner: nn.Module, query: TaskSplit) -> TaskResult:
        return self.objective.result(learner(query.x), query)

    def learned_rule(self) -> dict[str, float]:
        """The rule's current meta-parameters by name: ``{"<layer>.<term>": theta, "<layer>.rate": rate}``,
        layers ``hidden`` (with a hidden layer) and ``output``."""
        out = {}
        for index, layer in enumerate(self.layer_names):
            for term, value in zip(self.terms, self.theta[index].detach().tolist(), strict=True):
                out[f"{layer}.{term}"] = value
            out[f"{layer}.rate"] = float(self.log_rate[index].detach().exp())
        return out
