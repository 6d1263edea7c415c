"""Meta-training and evaluation, in plain functions a newcomer reads top to bottom.

The loop owns sampling, the meta-optimizer and its schedule, the non-finite check, clipping,
metrics and checkpoints; it calls the algorithm only through its contract (``on_iteration``,
``meta_step``, ``run_tasks``, ``eval_inner_steps``) and never looks inside it. Validation and
testing share :func:`evaluate`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from metarun import checkpoint, config
from metarun.algorithms.base import Algorithm, MetaUpdate
from metarun.build import build
from metarun.errors import ConfigError, NonFiniteLossError
from metarun.objectives import Curve, Objective, TaskResult
from metarun.tasks.device import sample_tasks
from metarun.tasks.sampling import FixedTasks, Sampler
from metarun.tracking import Tracker, final_line

log = logging.getLogger(__name__)


@dataclass
class AxisValues:
    """Every task's metrics on one axis other than the adaptation step (e.g. the instance number of a class
    within a sequential episode).

    Attributes:
        positions: the axis values that occur in any task, increasing.
        metrics: metric name -> ``[tasks, len(positions)]`` float64, NaN where a task has no value.
    """

    positions: list[int]
    metrics: dict[str, torch.Tensor]

    @classmethod
    def of(cls, curves: list[Curve | None]) -> AxisValues:
        """From one curve per task (None: the task has none), aligned on the union of their positions."""
        present = [c for c in curves if c is not None]
        positions = sorted({int(p) for c in present for p in c.positions.tolist()})
        column = {p: i for i, p in enumerate(positions)}
        names = list(dict.fromkeys(name for c in present for name in c.metrics))
        metrics = {name: torch.full((len(curves), len(positions)), math.nan, dtype=torch.float64) for name in names}
        for t, curve in enumerate(curves):
            if curve is None:
                continue
            columns = torch.tensor([column[int(p)] for p in curve.positions.tolist()], dtype=torch.long)
            for name, values in curve.metrics.items():
                metrics[name][t, columns] = values.detach().to(device="cpu", dtype=torch.float64)
        return cls(positions=positions, metrics=metrics)


@dataclass
class Evaluation:
    """Query metrics of fixed tasks after each adaptation step.

    Attributes:
        loss: ``[tasks, steps + 1]`` query loss after 0..steps adaptation steps.
        accuracy: same shape, query accuracy in [0, 1]; None for regression.
        ci_z: z-value of the confidence interval (1.96 for 95%).
        loss_metric: the objective's name for the loss when it is the task's metric (``"mse"``
            for regression), reported under that name too; None for classification.
        axes: the fully adapted learners' curves on other axes (``TaskResult.curves``), by axis
            name (``"instance"``); empty for the methods that give none.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor | None
    ci_z: float
    loss_metric: str | None = None
    axes: dict[str, AxisValues] = field(default_factory=dict)

    @classmethod
    def of(cls, results: list[list[TaskResult]], ci_z: float, loss_metric: str | None) -> Evaluation:
        """From ``results[task][step]``; the curves on other axes are those of the last step."""
        loss = torch.stack([torch.stack([r.loss for r in task]) for task in results]).cpu()
        accuracy = None
        if results[0][0].accuracy is not None:
            accuracy = torch.stack([torch.stack([r.accuracy for r in task]) for task in results]).cpu()
        final = [task[-1].curves or {} for task in results]
        names = list(dict.fromkeys(axis for curves in final for axis in curves))
        axes = {axis: AxisValues.of([curves.get(axis) for curves in final]) for axis in names}
        return cls(loss=loss, accuracy=accuracy, ci_z=ci_z, loss_metric=loss_metric, axes=axes)

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

    def axis_summaries(self) -> dict[str, dict[str, list]]:
        """Mean and CI half-width over the tasks that have a value, per position of every other
        axis: ``{"instance": {"position": [1, 2, ...], "acc_mean": [...], "acc_ci95": [...]}}``.
        A position no task has is None (JSON null); one task alone has a CI of 0."""
        out: dict[str, dict[str, list]] = {}
        for axis, values in self.axes.items():
            summary: dict[str, list] = {"position": list(values.positions)}
            for name, table in values.metrics.items():
                valid = ~torch.isnan(table)
                n = valid.sum(0).to(torch.float64)  # [P] tasks with a value
                mean = torch.where(valid, table, 0.0).sum(0) / n
                squares = torch.where(valid, table - mean, 0.0).pow(2).sum(0)
                std = torch.where(n > 1, squares / (n - 1).clamp(min=1), 0.0).sqrt()
                ci = self.ci_z * std / n.sqrt()
                summary[f"{name}_mean"] = [None if k == 0 else float(m) for m, k in zip(mean, n, strict=True)]
                summary[f"{name}_ci95"] = [None if k == 0 else float(c) for c, k in zip(ci, n, strict=True)]
            out[axis] = summary
        return out

    def curves(self) -> dict[str, Any]:
        """What results.json holds for a split: :meth:`summary`, and :meth:`axis_summaries` under
        their axis names."""
        return {**self.summary(), **self.axis_summaries()}

    def final_metrics(self, split: str) -> dict[str, float]:
        """Means after the last adaptation step: ``{"val/loss": ..., "val/acc": ...}`` (``val/mse`` for regression)."""
        return {f"{split}/{key.removesuffix('_mean')}": values[-1]
                for key, values in self.summary().items() if key.endswith("_mean")}

    def score(self, metric: str) -> float:
        """The mean of ``metric`` (``"acc"``, ``"mse"``, ``"loss"``) after the last adaptation step."""
        return self.summary()[f"{metric}_mean"][-1]


@contextlib.contextmanager
def batchnorm_mode(module: nn.Module, batch_stats: bool) -> Iterator[None]:
    """Evaluation mode, with BatchNorm on batch statistics (``batch_stats``) or running statistics.

    Every layer is put in eval mode (Dropout is off), and then only the BatchNorm layers are
    switched to training mode when ``batch_stats``: MAML evaluates with the statistics of each
    task's batch (transductive, Finn et al. 2017). Buffers are never written here:
    ``Algorithm.run_task`` runs on private copies of them. The modes are restored on exit.
    """
    modes = {m: m.training for m in module.modules()}
    module.eval()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(batch_stats)
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def task_results(algorithm: Algorithm, tasks: FixedTasks, bn_batch_stats: bool) -> list[list[TaskResult]]:
    """``results[task][step]``: adapt to each fixed task with ``eval_inner_steps`` steps and score
    every step on its query set."""
    with torch.no_grad(), batchnorm_mode(algorithm, bn_batch_stats):
        return algorithm.run_tasks(tasks, algorithm.eval_inner_steps, every_step=True)


def final_values(split: str, curves: dict[str, Any]) -> dict[str, float | None]:
    """The flat keys of a split's curves (:meth:`Evaluation.curves`): every per-step metric after
    the last adaptation step (``test/acc_mean``, ``test/acc_ci95``, ...), and every position of
    every other axis (``test/acc_instance_2_mean``, ``test/acc_instance_2_ci95``, ...)."""
    out: dict[str, float | None] = {}
    for key, values in curves.items():
        if isinstance(values, dict):  # another axis: {"position": [...], "acc_mean": [...], ...}
            for name, column in values.items():
                if name != "position":
                    metric, _, statistic = name.rpartition("_")
                    for position, value in zip(values["position"], column, strict=True):
                        out[f"{split}/{metric}_{key}_{position}_{statistic}"] = value
        else:
            out[f"{split}/{key}"] = values[-1]
    return out


def evaluate(algorithm: Algorithm, tasks: FixedTasks, bn_batch_stats: bool, ci_z: float,
             loss_metric: str | None = None) -> Evaluation:
    """Query metrics of every fixed task after every adaptation step.

    ``loss_metric`` is the objective's name for the loss when it is the metric (``"mse"``).
    """
    return Evaluation.of(task_results(algorithm, tasks, bn_batch_stats), ci_z, loss_metric)


def evaluate_ensemble(algorithm: Algorithm, checkpoints: list[Path], tasks: FixedTasks, objective: Objective,
                      bn_batch_stats: bool, ci_z: float) -> Evaluation:
    """Query metrics of the ensemble of the models saved in ``checkpoints``, after every step.

    Each model adapts to each task on its own; the ensemble's prediction after step k is the
    mean of the members' predictions after step k (Antoniou et al. 2019 test MAML++ as the
    ensemble of its top-5 validation checkpoints). ``algorithm`` ends holding the last member.
    """
    members = []
    for path in checkpoints:
        checkpoint.load_model(path, algorithm)
        members.append(task_results(algorithm, tasks, bn_batch_stats))
    combined = [
        [objective.ensemble([member[t][k] for member in members], task.query) for k in range(len(members[0][t]))]
        for t, task in enumerate(tasks)
    ]
    return Evaluation.of(combined, ci_z, objective.loss_metric)


@dataclass
class RunState:
    """What a checkpoint holds besides the model, optimizer and schedule: enough to continue exactly.

    ``best_val`` is the objective's metric (accuracy, or MSE for regression) in its own
    direction; ``top`` lists the ``(val, iteration)`` of the kept top-k checkpoints, best first.
    """

    iteration: int = 0  # meta-updates done
    best_val: float | None = None
    best_iteration: int = -1
    top: list[tuple[float, int]] = field(default_factory=list)

    @classmethod
    def from_saved(cls, saved: dict[str, Any], objective: Objective) -> RunState:
        """The state in a checkpoint, including those written before ``best_val`` had its own
        direction (``best_val_acc`` held minus the loss for regression)."""
        saved = dict(saved)
        if "best_val_acc" in saved:
            old = saved.pop("best_val_acc")
            saved["best_val"] = None if not math.isfinite(old) else (old if objective.higher_is_better else -old)
        saved["top"] = [tuple(entry) for entry in saved.get("top", [])]
        return cls(**saved)


def top_checkpoint(ckpt_dir: Path, iteration: int) -> Path:
    return ckpt_dir / "top" / f"iteration_{iteration:07d}.pt"


def keep_top(state: RunState, score: float, algorithm: Algorithm, ckpt_dir: Path, top_k: int,
             objective: Objective) -> None:
    """Keep the ``top_k`` best validation checkpoints in ``checkpoints/top/`` (for an ensemble test)."""
    ranked = sorted([*state.top, (score, state.iteration)], key=lambda e: e[0], reverse=objective.higher_is_better)
    kept, dropped = ranked[:top_k], ranked[top_k:]
    if (score, state.iteration) in kept:
        checkpoint.save_model(top_checkpoint(ckpt_dir, state.iteration), algorithm, state.iteration)
    for _, iteration in dropped:
        top_checkpoint(ckpt_dir, iteration).unlink(missing_ok=True)
    state.top = kept


def meta_train(
    algorithm: Algorithm,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    train_sampler: Sampler,
    val_tasks: FixedTasks,
    tracker: Tracker,
    output_dir: Path,
    objective: Objective,
    iterations: int,
    meta_batch_size: int,
    eval_every: int,
    checkpoint_every: int,
    grad_clip: float | None,
    bn_batch_stats: bool,
    ci_z: float,
    top_k: int = 1,
    run_config: dict[str, Any] | None = None,
    resume: tuple[Path, dict[str, Any]] | None = None,
) -> RunState:
    """Meta-train, validating every ``eval_every`` iterations and keeping the best checkpoint.

    Writes ``checkpoints/best.pt`` (best validation metric after the last adaptation step:
    highest accuracy, lowest MSE for regression), ``checkpoints/last.pt`` (everything needed to
    resume) and, with ``top_k > 1``, the ``top_k`` best in ``checkpoints/top/``. ``run_config`` (the
    unresolved config) goes into ``last.pt``; ``resume`` is a checkpoint's path and its contents
    (:func:`checkpoint.read_run`). Returns the final state.
    """
    state = RunState()
    ckpt_dir = output_dir / "checkpoints"
    checkpoint.remove_temporaries(ckpt_dir)
    if resume is not None:
        resume_from, saved = resume
        state = RunState.from_saved(checkpoint.restore_run(saved, resume_from, algorithm, optimizer, scheduler),
                                    objective)
        # The best models so far belong to the resumed run; carry them over so they can still win.
        checkpoint.carry_over(resume_from.parent, ckpt_dir, ["best.pt", *(str(top_checkpoint(Path(), i))
                                                                          for _, i in state.top)])
        log.info("resumed from %s at iteration %d", resume_from, state.iteration)
    update = MetaUpdate(optimizer, grad_clip)
    tracker.start_training(iterations, state.iteration)
    try:  # the progress bar must stop even when training stops with an error
        while state.iteration < iterations:
            algorithm.on_iteration(state.iteration, iterations)
            tasks = sample_tasks(train_sampler, meta_batch_size)  # one draw from the device sampler
            algorithm.train()
            try:
                metrics = algorithm.meta_step(tasks, update)
            except NonFiniteLossError as error:
                raise NonFiniteLossError(
                    f"{error} at iteration {state.iteration + 1}; lower optimizer.lr or algorithm.inner_lr, "
                    f"or set grad_clip (checkpoints so far are in {ckpt_dir})"
                ) from None
            if scheduler is not None:
                metrics["train/lr"] = optimizer.param_groups[0]["lr"]  # the rate this update used
                scheduler.step()
            state.iteration += 1
            tracker.log(metrics, state.iteration)
            if state.iteration % eval_every == 0 or state.iteration == iterations:
                val = evaluate(algorithm, val_tasks, bn_batch_stats, ci_z, objective.loss_metric)
                score = val.score(objective.metric)
                if objective.better(score, state.best_val):
                    state.best_val, state.best_iteration = score, state.iteration
                    checkpoint.save_model(ckpt_dir / "best.pt", algorithm, state.iteration)
                if top_k > 1:
                    keep_top(state, score, algorithm, ckpt_dir, top_k, objective)
                tracker.log(val.final_metrics("val"), state.iteration)
            if state.iteration % checkpoint_every == 0 or state.iteration == iterations:
                checkpoint.save_run(ckpt_dir / "last.pt", algorithm, optimizer, scheduler, state, run_config or {},
                                    tracker.run_id)
    finally:
        tracker.end_training()
    return state


class OutputExistsError(FileExistsError):
    """The output directory already holds a finished run."""


def check_writable(output_dir: Path) -> None:
    """Raise ConfigError (one line) when the run's directory cannot take its files."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"the run directory {output_dir} is an existing file; choose another hydra.run.dir or output_dir")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise ConfigError(f"cannot write into the run directory {output_dir}: {error.strerror or error}; choose a "
                          f"writable hydra.run.dir or output_dir") from None


def hardware(device: torch.device) -> str:
    """The machine a run ran on, for tables: the GPU's name (on CUDA), the CPU model and its cores,
    the OS, and the torch build."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    parts = [torch.cuda.get_device_name(device)] if device.type == "cuda" else []
    parts += [f"{cpu} ({os.cpu_count()} cores)", platform.platform(terse=True), f"torch {torch.__version__}"]
    return "; ".join(parts)


def run(cfg: DictConfig, output_dir: Path, wandb_defaults: dict[str, Any] | None = None) -> float:
    """Build the parts, meta-train, test the best-on-validation model (or the ensemble of the
    ``eval.top_k`` best), write the results.

    Returns:
        The best mean validation metric after the last adaptation step, in its own direction
        (accuracy: higher is better; MSE for regression: lower is better): the objective that
        Hydra's sweepers maximise or minimise.
    """
    run_started = time.perf_counter()
    output_dir = Path(output_dir)
    check_writable(output_dir)
    auto = cfg.resume == config.RESUME_AUTO
    if auto and (output_dir / "results.json").is_file():
        # A requeued (or re-launched) job that had already finished: its objective, not an error.
        finished = json.loads((output_dir / "results.json").read_text())
        log.info("resume=auto: %s already holds a finished run; nothing to do", output_dir)
        return next(value for key, value in finished.items() if key.startswith("best_val_"))
    if (output_dir / "results.json").exists():
        raise OutputExistsError(f"{output_dir} already holds a finished run (results.json); choose another hydra.run.dir")
    run_config = OmegaConf.to_container(cfg, resolve=False)
    resume = None
    # resume=auto: this job's own last.pt (a requeued or relaunched job), else a new run.
    resume_target = (output_dir if (output_dir / "checkpoints" / "last.pt").is_file() else None) if auto else cfg.resume
    if resume_target:
        resume_from = checkpoint.resolve(resume_target)
        resume = (resume_from, checkpoint.read_run(resume_from, run_config))
        # The resumed run continues its W&B run rather than starting another.
        wandb_defaults = {**(wandb_defaults or {}), "id": resume[1].get("wandb_id")}
    parts = build(cfg, output_dir, wandb_defaults)
    objective = parts.objective
    started = time.perf_counter()
    log.info("device %s, %d meta-parameters", parts.device, sum(p.numel() for p in parts.algorithm.parameters()))
    state = meta_train(
        parts.algorithm, parts.optimizer, parts.scheduler, parts.train_sampler, parts.val_tasks, parts.tracker,
        output_dir, objective, iterations=cfg.iterations, meta_batch_size=cfg.meta_batch_size,
        eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every, grad_clip=cfg.grad_clip,
        bn_batch_stats=cfg.eval.bn_batch_stats, ci_z=cfg.eval.ci_z, top_k=cfg.eval.top_k, run_config=run_config,
        resume=resume,
    )
    train_seconds = time.perf_counter() - started

    ckpt_dir = output_dir / "checkpoints"
    if cfg.eval.top_k > 1:
        tested = [top_checkpoint(ckpt_dir, iteration) for _, iteration in state.top]
        curves = {
            split: evaluate_ensemble(parts.algorithm, tested, tasks, objective, cfg.eval.bn_batch_stats,
                                     cfg.eval.ci_z).summary()
            for split, tasks in (("val", parts.val_tasks), ("test", parts.test_tasks))
        }
    else:
        checkpoint.load_model(ckpt_dir / "best.pt", parts.algorithm)
        curves = {
            split: evaluate(parts.algorithm, tasks, cfg.eval.bn_batch_stats, cfg.eval.ci_z,
                            objective.loss_metric).curves()
            for split, tasks in (("val", parts.val_tasks), ("test", parts.test_tasks))
        }
    parts.tracker.log_adaptation(curves)
    test = curves["test"]
    results: dict[str, Any] = {
        "best_iteration": state.best_iteration,
        f"best_val_{objective.metric}": state.best_val,
        "tested_iterations": [iteration for _, iteration in state.top] if cfg.eval.top_k > 1 else [state.best_iteration],
        "eval_tasks": len(parts.test_tasks),
        "eval_inner_steps": parts.algorithm.eval_inner_steps,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - run_started,  # this process: since a resume only
        "device": str(parts.device),
        "hardware": hardware(parts.device),
        "output_dir": str(output_dir),
        "curves": curves,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    # test/acc_mean, test/acc_ci95, test/loss_mean, ... (test/mse_* for regression), test/acc_instance_2_mean, ...
    results.update(final_values("test", test))
    parts.tracker.finish(results)
    if not cfg.console:
        # Quiet runs (no progress bar, no table) still end with the test result and where it is.
        print(final_line(results), flush=True)
    return state.best_val
