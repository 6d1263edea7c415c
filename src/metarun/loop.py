"""Meta-training and evaluation, in plain functions a newcomer reads top to bottom.

The loop owns the meta-optimizer, the backward pass, metrics and checkpoints; it calls the
algorithm only through its contract (``run_task``, ``meta_loss``, ``inner_steps``,
``eval_inner_steps``) and never looks inside it. Training, validation and testing share
``Algorithm.run_task``; validation and testing share :func:`evaluate`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from metarun import checkpoint
from metarun.algorithms.base import Algorithm
from metarun.build import build
from metarun.tasks import FixedTasks, Sampler
from metarun.tracking import Tracker

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The meta-training loss became NaN or infinite."""


@dataclass
class Evaluation:
    """Query metrics of fixed tasks after each adaptation step.

    Attributes:
        loss: ``[tasks, steps + 1]`` query loss after 0..steps adaptation steps (one column for
            methods without an inner loop).
        accuracy: same shape, query accuracy in [0, 1]; None for regression.
        ci_z: z-value of the confidence interval (1.96 for 95%).
        loss_metric: the objective's name for the loss when it is the task's metric (``"mse"``
            for regression), reported under that name too; None for classification.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor | None
    ci_z: float
    loss_metric: str | None = None

    def _ci(self, values: torch.Tensor) -> torch.Tensor:
        n = values.shape[0]
        std = values.std(dim=0, unbiased=True) if n > 1 else torch.zeros(values.shape[1])
        return self.ci_z * std / math.sqrt(n)

    def summary(self) -> dict[str, list[float]]:
        """Mean and CI half-width per adaptation step: ``{"loss_mean": [...], "acc_ci95": [...], ...}``
        (``mse_mean``/``mse_ci95``, copies of the loss, instead of ``acc_*`` for regression)."""
        out = {"loss_mean": self.loss.mean(0).tolist(), "loss_ci95": self._ci(self.loss).tolist()}
        if self.accuracy is not None:
            out["acc_mean"] = self.accuracy.mean(0).tolist()
            out["acc_ci95"] = self._ci(self.accuracy).tolist()
        if self.loss_metric is not None:
            out[f"{self.loss_metric}_mean"] = out["loss_mean"]
            out[f"{self.loss_metric}_ci95"] = out["loss_ci95"]
        return out

    def final_metrics(self, split: str) -> dict[str, float]:
        """Means after the last adaptation step: ``{"val/loss": ..., "val/acc": ...}`` (``val/mse`` for regression)."""
        return {f"{split}/{key.removesuffix('_mean')}": values[-1]
                for key, values in self.summary().items() if key.endswith("_mean")}

    @property
    def final_accuracy(self) -> float:
        """The validation objective, higher is better: mean query accuracy after the last
        adaptation step, or minus the mean query loss for objectives without accuracy."""
        return float(self.accuracy[:, -1].mean()) if self.accuracy is not None else -float(self.loss[:, -1].mean())


@contextlib.contextmanager
def batchnorm_mode(module: nn.Module, batch_stats: bool) -> Iterator[None]:
    """Run ``module`` with BatchNorm on batch statistics (``batch_stats``) or running statistics.

    MAML evaluates with the statistics of each task's batch (transductive, Finn et al. 2017),
    i.e. in train mode. Train mode also updates the running statistics in place, so they are
    restored on exit: evaluating never changes the model.
    """
    was_training = module.training
    saved = {name: buffer.clone() for name, buffer in module.named_buffers()}
    module.train(batch_stats)
    try:
        yield
    finally:
        module.train(was_training)
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(saved[name])


def evaluate(algorithm: Algorithm, tasks: FixedTasks, bn_batch_stats: bool, ci_z: float,
             loss_metric: str | None = None) -> Evaluation:
    """Adapt to each fixed task with ``eval_inner_steps`` steps and score every step on its query set.

    ``loss_metric`` is the objective's name for the loss when it is the metric (``"mse"``).
    """
    losses, accuracies = [], []
    with torch.no_grad(), batchnorm_mode(algorithm, bn_batch_stats):
        for task in tasks:
            results = algorithm.run_task(task, algorithm.eval_inner_steps, every_step=True)
            losses.append(torch.stack([r.loss for r in results]).cpu())
            if results[0].accuracy is not None:
                accuracies.append(torch.stack([r.accuracy for r in results]).cpu())
    return Evaluation(
        loss=torch.stack(losses),
        accuracy=torch.stack(accuracies) if accuracies else None,
        ci_z=ci_z,
        loss_metric=loss_metric,
    )


def train_step(
    algorithm: Algorithm,
    optimizer: torch.optim.Optimizer,
    sampler: Sampler,
    meta_batch_size: int,
    grad_clip: float | None,
) -> dict[str, float]:
    """One meta-update: average the meta-loss over ``meta_batch_size`` fresh tasks and step.

    Each task's loss is backpropagated as soon as it is computed, so only one task's graph is
    alive at a time; gradients accumulate into ``.grad`` as the mean over the meta-batch.
    ``train/acc`` is reported only for objectives with an accuracy (not for regression).
    """
    algorithm.train()
    optimizer.zero_grad(set_to_none=True)
    # Kept on the device and read once per meta-batch: a .item() per task would make the CPU wait
    # for the GPU after every task.
    losses, accuracies = [], []
    for _ in range(meta_batch_size):
        results = algorithm.run_task(sampler.sample(), algorithm.inner_steps, every_step=False)
        loss = algorithm.meta_loss(results)
        (loss / meta_batch_size).backward()
        losses.append(loss.detach())
        if results[-1].accuracy is not None:
            accuracies.append(results[-1].accuracy.detach())
    total_loss = torch.stack(losses).sum().item()
    if not math.isfinite(total_loss):
        raise NonFiniteLossError(f"meta-training loss is {total_loss}")
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(algorithm.parameters(), grad_clip)
    optimizer.step()
    metrics = {"train/loss": total_loss / meta_batch_size}
    if accuracies:
        metrics["train/acc"] = torch.stack(accuracies).sum().item() / meta_batch_size
    return metrics


@dataclass
class RunState:
    """What a checkpoint holds besides the model and optimizer: enough to continue exactly."""

    iteration: int = 0  # meta-updates done
    best_val_acc: float = -math.inf  # Evaluation.final_accuracy: accuracy, or minus the loss for regression
    best_iteration: int = -1


def meta_train(
    algorithm: Algorithm,
    optimizer: torch.optim.Optimizer,
    train_sampler: Sampler,
    val_tasks: FixedTasks,
    tracker: Tracker,
    output_dir: Path,
    iterations: int,
    meta_batch_size: int,
    eval_every: int,
    checkpoint_every: int,
    grad_clip: float | None,
    bn_batch_stats: bool,
    ci_z: float,
    resume_from: Path | None = None,
    loss_metric: str | None = None,
) -> RunState:
    """Meta-train, validating every ``eval_every`` iterations and keeping the best checkpoint.

    Writes ``checkpoints/best.pt`` (best mean validation accuracy after the last adaptation
    step; lowest loss for regression) and ``checkpoints/last.pt`` (everything needed to resume).
    ``loss_metric`` is the objective's name for the loss when it is the metric (``"mse"``).
    Returns the final state.
    """
    state = RunState()
    ckpt_dir = output_dir / "checkpoints"
    if resume_from is not None:
        state = checkpoint.load_run(resume_from, algorithm, optimizer, RunState)
        # The best model so far belongs to the resumed run; carry it over so it can still win.
        previous_best = resume_from.parent / "best.pt"
        if previous_best.is_file() and previous_best.resolve() != (ckpt_dir / "best.pt").resolve():
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(previous_best, ckpt_dir / "best.pt")
        log.info("resumed from %s at iteration %d", resume_from, state.iteration)
    tracker.start_training(iterations, state.iteration)
    try:  # the progress bar must stop even when training stops with an error
        while state.iteration < iterations:
            try:
                metrics = train_step(algorithm, optimizer, train_sampler, meta_batch_size, grad_clip)
            except NonFiniteLossError as error:
                raise NonFiniteLossError(
                    f"{error} at iteration {state.iteration + 1}; lower optimizer.lr or algorithm.inner_lr, "
                    f"or set grad_clip (checkpoints so far are in {ckpt_dir})"
                ) from None
            state.iteration += 1
            tracker.log(metrics, state.iteration)
            if state.iteration % eval_every == 0 or state.iteration == iterations:
                val = evaluate(algorithm, val_tasks, bn_batch_stats, ci_z, loss_metric)
                val_metrics = val.final_metrics("val")
                if val.final_accuracy > state.best_val_acc:
                    state.best_val_acc, state.best_iteration = val.final_accuracy, state.iteration
                    checkpoint.save_model(ckpt_dir / "best.pt", algorithm, state.iteration)
                tracker.log(val_metrics, state.iteration)
            if state.iteration % checkpoint_every == 0 or state.iteration == iterations:
                checkpoint.save_run(ckpt_dir / "last.pt", algorithm, optimizer, state)
    finally:
        tracker.end_training()
    return state


class OutputExistsError(FileExistsError):
    """The output directory already holds a finished run."""


def run(cfg: DictConfig, output_dir: Path, wandb_defaults: dict[str, Any] | None = None) -> float:
    """Build the parts, meta-train, test the best-on-validation model, write the results.

    Returns:
        The best mean validation accuracy (after the last adaptation step), or minus the best
        validation loss for objectives without accuracy: the objective that Hydra's sweepers
        maximise.
    """
    output_dir = Path(output_dir)
    if (output_dir / "results.json").exists():
        raise OutputExistsError(f"{output_dir} already holds a finished run (results.json); choose another hydra.run.dir")
    resume_from = checkpoint.resolve(cfg.resume) if cfg.resume else None
    parts = build(cfg, output_dir, wandb_defaults)
    started = time.perf_counter()
    log.info("device %s, %d meta-parameters", parts.device, sum(p.numel() for p in parts.algorithm.parameters()))
    state = meta_train(
        parts.algorithm, parts.optimizer, parts.train_sampler, parts.val_tasks, parts.tracker, output_dir,
        iterations=cfg.iterations, meta_batch_size=cfg.meta_batch_size, eval_every=cfg.eval_every,
        checkpoint_every=cfg.checkpoint_every, grad_clip=cfg.grad_clip, bn_batch_stats=cfg.eval.bn_batch_stats,
        ci_z=cfg.eval.ci_z, resume_from=resume_from, loss_metric=parts.objective.loss_metric,
    )
    train_seconds = time.perf_counter() - started

    checkpoint.load_model(output_dir / "checkpoints" / "best.pt", parts.algorithm)
    curves = {
        split: evaluate(parts.algorithm, tasks, cfg.eval.bn_batch_stats, cfg.eval.ci_z,
                        parts.objective.loss_metric).summary()
        for split, tasks in (("val", parts.val_tasks), ("test", parts.test_tasks))
    }
    parts.tracker.log_adaptation(curves)
    test = curves["test"]
    # The best validation score is an accuracy, or minus a loss: written as what it is.
    best = {"best_val_acc": state.best_val_acc} if "acc_mean" in test else {"best_val_loss": -state.best_val_acc}
    results: dict[str, Any] = {
        "best_iteration": state.best_iteration,
        **best,
        "eval_tasks": len(parts.test_tasks),
        "eval_inner_steps": parts.algorithm.eval_inner_steps,
        "train_seconds": train_seconds,
        "device": str(parts.device),
        "output_dir": str(output_dir),
        "curves": curves,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    for key, values in test.items():  # test/acc_mean, test/acc_ci95, test/loss_mean, ... (test/mse_* for regression)
        results[f"test/{key}"] = values[-1]
    parts.tracker.finish(results)
    return state.best_val_acc
