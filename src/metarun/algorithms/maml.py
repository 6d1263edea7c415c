"""Model-Agnostic Meta-Learning, with the MAML++ options."""

from __future__ import annotations

import torch
from torch import nn

from metarun._learn2learn import l2l
from metarun.algorithms.gradient import GradientBasedAlgorithm, classifier
from metarun.algorithms.maml_plus_plus import (
    PerStepBatchNorm,
    multi_step_loss_weights,
    rate_key,
    use_per_step_batchnorm,
)
from metarun.errors import ConfigError
from metarun.objectives import Objective


class MAML(GradientBasedAlgorithm):
    """MAML (Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks", ICML 2017), second order, or first order (FOMAML, same paper §5.2) with
    ``first_order=True``, and the MAML++ options (Antoniou, Edwards, Storkey, "How to train your
    MAML", ICLR 2019).

    Inner loop: ``theta' = theta - inner_lr * grad L_support(theta)`` for ``steps`` steps;
    outer loss: ``L_query(theta')``, differentiated through the inner loop (second order) or
    treating ``grad L_support`` as a constant (first order). Built on ``l2l.algorithms.MAML``.

    MAML++'s switches, each on its own (all off: the MAML above; algorithm=maml_plus_plus: all on;
    its run options are scheduler=cosine and eval.top_k=5):

    - ``multi_step_loss`` (MSL): the task loss is ``sum_k w_k L_query(theta_k)`` over the
      adaptation steps ``k = 1..K``, with the annealed weights of :func:`multi_step_loss_weights`.
      ``train/acc`` is the last step's. Only the last step's query pass folds BatchNorm statistics
      into the running ones, as without MSL: the earlier steps' query passes normalise with their
      batch statistics and leave the running ones alone (the authors' code folds them too).
    - ``per_step_bn_statistics`` (BNRS) and ``per_step_bn_weights`` (BNWB): every BatchNorm layer
      of the backbone becomes a :class:`PerStepBatchNorm` with ``inner_steps + 1`` sets, one for the
      weights after each step ``0..K``: the support pass of step ``k + 1`` and the query pass of
      the learner after ``k`` steps use set ``k``. (The authors' code has ``K`` sets and gives
      the query pass after step ``k + 1`` set ``k``, the set of the support pass before it.)
      More evaluation steps than training steps reuse the last set. Per-step scales and shifts
      are meta-parameters only, never adapted in the inner loop, as in the authors' code; shared
      ones (BNWB off) are adapted like any other weight, as in MAML.
    - ``per_step_inner_lrs`` (LSLR): the inner step ``k`` is ``theta_i - alpha_{i,k} grad_i`` with
      one learned rate per parameter tensor ``i`` and step ``k`` (initialised to ``inner_lr``),
      meta-learned with everything else, in first-order steps as well (the rates multiply a
      gradient that is then a constant). More evaluation steps than training steps reuse the last
      step's rates. The authors' code has ``K + 1`` rates per tensor, the last one unused.
    - ``first_order_iterations`` (derivative-order annealing, DA): the first that many
      meta-updates are first order, the rest second order (0: off). ``first_order=true`` is first
      order throughout. Evaluation is first order anyway.

    MSL's weights and DA's order are set in :meth:`on_iteration` from the iteration alone, so a
    resumed run continues them exactly.

    Args:
        features: backbone ``[B, C, H, W] -> [B, out_features]``.
        ways: classes per task (outputs of the linear head).
        inner_lr: inner step size (0.4 for Omniglot 5-way in Finn et al.; with LSLR, the rates'
            initial value: Antoniou et al. use 0.1).
        first_order: first order throughout.
        inner_steps: adaptation steps during meta-training (``K``; 5 in the paper).
        eval_inner_steps: adaptation steps at evaluation.
        per_step_bn_statistics: BNRS.
        per_step_bn_weights: BNWB.
        per_step_inner_lrs: LSLR.
        multi_step_loss: MSL.
        msl_anneal_iterations: iterations over which MSL's weights anneal to the last step; from
            then on the loss is the last step's (the authors: 10 epochs of 500 iterations).
        first_order_iterations: DA: first-order meta-updates before switching to second order.
        vectorize: ``auto``, ``true`` or ``false``: run the meta-batch all at once
            (:mod:`metarun.algorithms.vectorized`, through the family's hooks; every MAML++
            switch included).
        train_ways: ways of meta-training tasks (``None``: ``ways``).
        objective: the task's loss and metrics (default: classification).
    """

    def __init__(self, features: nn.Module, ways: int, inner_lr: float, first_order: bool, inner_steps: int,
                 eval_inner_steps: int, per_step_bn_statistics: bool, per_step_bn_weights: bool,
                 per_step_inner_lrs: bool, multi_step_loss: bool, msl_anneal_iterations: int,
                 first_order_iterations: int, vectorize: bool | str, train_ways: int | None = None,
                 objective: Objective | None = None) -> None:
        super().__init__(ways, inner_lr, first_order, inner_steps, eval_inner_steps, train_ways, objective,
                         vectorize)
        self.learnable = l2l.algorithms.MAML(classifier(features, self.head_outputs), lr=inner_lr,
                                             first_order=first_order)
        if msl_anneal_iterations < 0 or first_order_iterations < 0:
            raise ConfigError(f"algorithm.msl_anneal_iterations and first_order_iterations must be >= 0, got "
                              f"{msl_anneal_iterations}/{first_order_iterations}")
        self.per_step_bn_weights = per_step_bn_weights
        self.multi_step_loss = multi_step_loss
        self.msl_anneal_iterations = msl_anneal_iterations
        self.always_first_order = first_order
        self.first_order_iterations = first_order_iterations
        if per_step_bn_statistics or per_step_bn_weights:
            use_per_step_batchnorm(self.learnable.module, inner_steps + 1, per_step_bn_statistics, per_step_bn_weights)
        self.inner_lrs: nn.ParameterDict | None = None
        if per_step_inner_lrs:
            self.inner_lrs = nn.ParameterDict([  # a list keeps the parameters' order (a dict is sorted)
                (rate_key(name), nn.Parameter(torch.full((max(inner_steps, 1),), float(inner_lr))))
                for name, _ in self.adapted_parameters(self.learnable.module)
            ])
        self.step_weights: list[float] | None = None
        self.follow_schedules(0)  # until the loop says otherwise: the start of training

    def on_iteration(self, iteration: int, iterations: int) -> None:
        self.follow_schedules(iteration)

    def follow_schedules(self, iteration: int) -> None:
        """MSL's step weights and DA's derivative order at ``iteration`` (updates done)."""
        self.first_order = self.always_first_order or iteration < self.first_order_iterations
        self.step_weights = None
        if self.multi_step_loss and self.inner_steps > 0:
            self.step_weights = multi_step_loss_weights(self.inner_steps, iteration, self.msl_anneal_iterations)

    # -- the hooks of the gradient-based family (both paths read them) --------------------------

    def adapted_parameters(self, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """All parameters of ``module`` but per-step BatchNorm scales and shifts (meta-learned only)."""
        adapted = []
        for prefix, owner in module.named_modules():
            if isinstance(owner, PerStepBatchNorm) and owner.per_step_weights:
                continue
            for name, parameter in owner._parameters.items():
                if parameter is not None:
                    adapted.append((f"{prefix}.{name}" if prefix else name, parameter))
        return adapted

    def inner_rate(self, name: str, step: int) -> float | torch.Tensor:
        """``inner_lr``, or with LSLR the learned rate of parameter ``name`` at step ``step``."""
        if self.inner_lrs is None:
            return self.inner_lr
        rates = self.inner_lrs[rate_key(name)]
        return rates[min(step, len(rates) - 1)]

    def step_loss_weights(self) -> list[float] | None:
        return self.step_weights
