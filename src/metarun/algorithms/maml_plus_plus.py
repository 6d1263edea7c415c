"""The pieces of MAML++ (Antoniou, Edwards, Storkey, "How to train your MAML", ICLR 2019) that
:class:`metarun.algorithms.maml.MAML` switches on: annealed multi-step loss weights and per-step
BatchNorm.

Each fix is a constructor option of MAML, switchable on its own; with all of them off it is
Finn et al.'s MAML (conf/algorithm/maml.yaml), and conf/algorithm/maml_plus_plus.yaml turns them all on. The other two fixes of the paper are run options, not
algorithm ones: the cosine meta learning-rate schedule (``scheduler=cosine``) and testing the
ensemble of the top-5 validation checkpoints (``eval.top_k=5``).

Where the paper leaves a detail open, this follows the authors' code
(github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch, ``few_shot_learning_system.py``,
``meta_neural_network_architectures.py``, ``inner_loop_optimizers.py``); the docstrings below
say where, and where this differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarun.errors import ConfigError

# The authors' floor of a non-final step's loss weight, times the number of steps.
MSL_MIN_WEIGHT = 0.03


def multi_step_loss_weights(steps: int, iteration: int, anneal_iterations: int) -> list[float]:
    """The weights ``w_1..w_K`` of the query losses after adaptation steps ``1..K`` (``K = steps``)
    at meta-update ``iteration + 1``: the authors' ``get_per_step_loss_importance_vector`` with
    iterations in place of epochs.

    They start uniform (``1/K``); every non-final weight falls linearly, by ``1/K`` over
    ``anneal_iterations`` iterations, to a floor of ``0.03/K``, and the last one takes what the
    others lose (the weights always sum to 1). From ``anneal_iterations`` on, the loss is the last
    step's alone (``[0, ..., 0, 1]``), as the authors' code drops the multi-step loss after
    ``multi_step_loss_num_epochs``. The authors' schedule moves once per epoch (500 iterations);
    this one moves every iteration.
    """
    if steps < 1:
        raise ValueError(f"the multi-step loss needs >= 1 adaptation step, got {steps}")
    if iteration >= anneal_iterations:
        return [0.0] * (steps - 1) + [1.0]
    decayed = iteration / (steps * anneal_iterations)
    floor = MSL_MIN_WEIGHT / steps
    early = max(1.0 / steps - decayed, floor)
    last = min(1.0 / steps + (steps - 1) * decayed, 1.0 - (steps - 1) * floor)
    return [early] * (steps - 1) + [last]


class PerStepBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with one set of running statistics (BNRS) and/or one learned scale and shift
    (BNWB) per adaptation step, MAML++'s per-step batch normalisation (Antoniou et al. 2019, §4).

    The set used is row ``min(step, sets - 1)`` of ``running_mean``/``running_var`` (``[sets, C]``)
    and of ``weight``/``bias`` (``[sets, C]``), where ``step`` is the attribute that
    :meth:`GradientBasedAlgorithm.enter_step` sets on the adapting copy before it runs: the number of
    adaptation steps its weights have had. Without per-step statistics (or weights) those are the
    usual ``[C]`` tensors, shared by every step. Everything else is ``nn.BatchNorm``'s: training
    mode normalises with the batch's statistics and folds them into the running ones with
    ``momentum``; evaluation mode normalises with the running ones. It is a ``_BatchNorm``, so
    ``eval.bn_batch_stats`` switches it like any other.

    Args:
        num_features: channels ``C``.
        sets: sets of per-step statistics and weights (adaptation steps + 1).
        per_step_statistics: one set of running statistics per step (else one shared set).
        per_step_weights: one scale and shift per step (else one shared pair).
        eps: added to the variance.
        momentum: weight of a new batch in the running statistics.

    Shapes: ``[B, C]``, ``[B, C, L]`` or ``[B, C, H, W]`` in and out.
    """

    def __init__(self, num_features: int, sets: int, per_step_statistics: bool, per_step_weights: bool,
                 eps: float, momentum: float) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True)
        if sets < 1:
            raise ValueError(f"PerStepBatchNorm needs >= 1 set, got {sets}")
        self.sets = sets
        self.per_step_statistics = per_step_statistics
        self.per_step_weights = per_step_weights
        self.step = 0
        if per_step_statistics:
            self.register_buffer("running_mean", torch.zeros(sets, num_features))
            self.register_buffer("running_var", torch.ones(sets, num_features))
            # Training passes folded into each row (num_batches_tracked counts them all): what merging
            # the rows of several ranks needs (metarun.distributed). Not saved: checkpoints are unchanged.
            self.register_buffer("row_passes", torch.zeros(sets, dtype=torch.long), persistent=False)
        if per_step_weights:
            self.weight = nn.Parameter(torch.ones(sets, num_features))
            self.bias = nn.Parameter(torch.zeros(sets, num_features))

    @classmethod
    def replacing(cls, bn: nn.modules.batchnorm._BatchNorm, sets: int, per_step_statistics: bool,
                  per_step_weights: bool) -> PerStepBatchNorm:
        """A per-step layer whose every set starts from ``bn``'s values."""
        if not (bn.affine and bn.track_running_stats) or bn.momentum is None:
            raise ConfigError(f"per-step BatchNorm replaces BatchNorm layers with affine weights, running statistics "
                              f"and a momentum; this backbone has {bn}")
        layer = cls(bn.num_features, sets, per_step_statistics, per_step_weights, bn.eps, bn.momentum)
        layer = layer.to(device=bn.weight.device, dtype=bn.weight.dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                getattr(layer, name).copy_(getattr(bn, name).expand_as(getattr(layer, name)))
        return layer

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected a 2D, 3D or 4D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        row = min(self.step, self.sets - 1)
        mean, var, weight, bias = self.running_mean, self.running_var, self.weight, self.bias
        if self.per_step_statistics:
            mean, var = mean[row], var[row]  # views: training mode updates the row in place
        if self.per_step_weights:
            weight, bias = weight[row], bias[row]
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.per_step_statistics:
                self.row_passes[row] += 1
        return F.batch_norm(x, mean, var, weight, bias, self.training, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, sets={self.sets}, per_step_statistics={self.per_step_statistics}, "
                f"per_step_weights={self.per_step_weights}")


def use_per_step_batchnorm(module: nn.Module, sets: int, per_step_statistics: bool, per_step_weights: bool) -> int:
    """Replace every BatchNorm layer inside ``module`` by a :class:`PerStepBatchNorm`; returns how many."""
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, PerStepBatchNorm):
            setattr(module, name, PerStepBatchNorm.replacing(child, sets, per_step_statistics, per_step_weights))
            replaced += 1
        else:
            replaced += use_per_step_batchnorm(child, sets, per_step_statistics, per_step_weights)
    return replaced


def rate_key(name: str) -> str:
    """A parameter's name as a ParameterDict key (no dots)."""
    return name.replace(".", "-")
