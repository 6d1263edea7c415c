"""Meta-training and testing, in plain functions a newcomer reads top to bottom.

The loop owns sampling, the meta-optimizer and its schedule, the non-finite check, clipping,
metrics and checkpoints; it calls the algorithm only through its contract (``on_iteration``,
``meta_step``, ``run_tasks``, ``eval_inner_steps``) and never looks inside it. Validation and
testing share :func:`score_tasks`; a run and ``metarun-eval`` test a saved model with
:func:`score_checkpoints` and write what it scored with :func:`report`.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from metarun import checkpoint, config
from metarun.algorithms.base import Algorithm, MetaUpdate
from metarun.augment import Transform
from metarun.build import augmentation, build
from metarun.distributed import SINGLE, Ranks
from metarun.errors import ConfigError, NonFiniteLossError, OutputExistsError
from metarun.objectives import Objective, TaskResult
from metarun.statistics import TaskScores, final_values
from metarun.tasks.device import sample_tasks
from metarun.tasks.sampling import AugmentedTasks, FixedTasks, Sampler
from metarun.tasks.types import Task, with_seeds
from metarun.tracking import Tracker, final_line

log = logging.getLogger(__name__)


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


def task_results(algorithm: Algorithm, tasks: Iterable[Task], bn_batch_stats: bool) -> list[list[TaskResult]]:
    """``results[task][step]``: adapt to each fixed task with ``eval_inner_steps`` steps and score
    every step on its query set."""
    with torch.no_grad(), batchnorm_mode(algorithm, bn_batch_stats):
        return algorithm.run_tasks(tasks, algorithm.eval_inner_steps, every_step=True)


def gather(ranks: Ranks, scores: TaskScores) -> TaskScores:
    """The scores of every rank's share of the fixed tasks, in task order (one rank: ``scores``)."""
    if not ranks.active:
        return scores
    parts = [json.loads(text) for text in ranks.exchange(json.dumps(scores.to_json()))]
    return TaskScores.concatenate(parts, scores.ci_z, scores.loss_metric)


def score_tasks(algorithm: Algorithm, tasks: FixedTasks, bn_batch_stats: bool, ci_z: float,
                loss_metric: str | None = None, ranks: Ranks = SINGLE) -> TaskScores:
    """Query metrics of every fixed task after every adaptation step.

    ``loss_metric`` is the objective's name for the loss when it is the metric (``"mse"``). With
    several ``ranks`` each runs its share of the tasks (:meth:`Ranks.share`) and every rank gets all
    the scores, in task order: the same numbers as one process.
    """
    if ranks.active:
        tasks = tasks.part(ranks.share(len(tasks)))
    return gather(ranks, TaskScores.of(task_results(algorithm, tasks, bn_batch_stats), ci_z, loss_metric))


def views(tasks: FixedTasks, tta_views: int, transform: Transform | None) -> list[Iterable[Task]]:
    """The tasks themselves, then ``tta_views`` augmented copies of them (:class:`AugmentedTasks`);
    ``config.validate`` makes sure there is a ``transform`` when ``tta_views > 0``."""
    return [tasks, *(AugmentedTasks(tasks, transform, view) for view in range(1, tta_views + 1))]


def score_checkpoints(algorithm: Algorithm, which: str, files: list[Path], splits: dict[str, FixedTasks],
                      objective: Objective, bn_batch_stats: bool, ci_z: float, ranks: Ranks = SINGLE,
                      tta_views: int = 0, transform: Transform | None = None) -> dict[str, TaskScores]:
    """Query metrics of a saved model on the fixed tasks of each split (``{"val": tasks, ...}``),
    after every adaptation step, as a run tests it: one model (``files``: best.pt), or with ``which``
    :data:`checkpoint.TOP` the ensemble of ``files``.

    An ensemble's prediction after step k is the mean of its members' predictions after step k, each
    member adapting to each task on its own (Antoniou et al. 2019 test MAML++ as the ensemble of its
    top-5 validation checkpoints). Test-time augmentation makes every model a member ``1 +
    tta_views`` times: once on the tasks as they are, once on each view of them augmented by
    ``transform`` (:func:`views`). With one member the scores are that member's own. ``algorithm``
    ends holding the last file's weights. Several ``ranks`` each score their share of the tasks
    (:meth:`Ranks.share`) and every rank gets all the scores, in task order.
    """
    if which != checkpoint.TOP and len(files) != 1:
        raise ValueError(f"{which} names one checkpoint, got {len(files)} files")
    if ranks.active:
        splits = {split: tasks.part(ranks.share(len(tasks))) for split, tasks in splits.items()}
    members: dict[str, list[list[list[TaskResult]]]] = {split: [] for split in splits}
    for path in files:
        checkpoint.load_model(path, algorithm)
        for split, tasks in splits.items():
            for view in views(tasks, tta_views, transform):
                members[split].append(task_results(algorithm, view, bn_batch_stats))
    scores = {}
    for split, tasks in splits.items():
        results = members[split]
        if len(results) > 1:
            results = [[objective.ensemble([member[t][k] for member in members[split]], task.query)
                        for k in range(len(members[split][0][t]))]
                       for t, task in enumerate(tasks)]
        else:
            (results,) = results
        scores[split] = gather(ranks, TaskScores.of(results, ci_z, objective.loss_metric))
    return scores


def report(tracker: Tracker, results: dict[str, Any], split: str, console: bool) -> None:
    """Write what a tested model scored, as a run and ``metarun-eval`` both end.

    The trackers get the curves of ``results["curves"]`` (``metrics.jsonl``, ``adaptation.png``,
    the console's per-step table, W&B); ``results`` gains the flat keys of ``split``'s curves
    (``test/acc_mean``, ``test/acc_ci95``, ... ``test/mse_*`` for regression,
    ``test/acc_instance_2_mean``, ...), and for classification the error rate ``test/error_mean`` (1 - accuracy,
    with the accuracy's CI), and goes to ``results.json`` and the trackers' summaries.
    Quiet commands (``console`` off: no table) still end with the result and where it is on stdout.
    """
    tracker.log_adaptation(results["curves"])
    results.update(final_values(split, results["curves"][split]))
    if f"{split}/acc_mean" in results:  # the error rate, as the Omniglot challenge (Lake et al.) reports it
        results[f"{split}/error_mean"] = 1.0 - results[f"{split}/acc_mean"]
        results[f"{split}/error_ci95"] = results[f"{split}/acc_ci95"]
    tracker.finish(results)
    if not console:
        print(final_line(results), flush=True)


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
    divergence: dict[str, Any] | None = None  # the worst validation that diverged (:func:`check_divergence`)

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


def check_divergence(val: TaskScores, threshold: float | None, state: RunState, tracker: Tracker) -> None:
    """The divergence guard: training goes on, but when adaptation made the validation query loss explode
    (:meth:`TaskScores.divergence`: after the last step more than ``threshold`` times the loss at step 0),
    ``val/divergence_factor`` is logged, the first time in a run one warning line says so, and
    ``state.divergence`` keeps the worst such validation (``iteration``, ``step``, ``factor``, ``threshold``,
    and the ``first_iteration`` that warned) for results.json. ``threshold`` None: no check."""
    found = val.divergence(threshold) if threshold is not None else None
    if found is None:
        return
    step, factor = found
    tracker.log({"val/divergence_factor": factor}, state.iteration)
    worst = state.divergence
    if worst is None:
        log.warning("adaptation diverged at iteration %d: on the validation tasks the mean query loss after step %d "
                    "is %.3g times its value at step 0 (eval.divergence_factor=%g); training goes on and "
                    "results.json records it (diverged: true): lower algorithm.inner_lr or the inner steps",
                    state.iteration, step, factor, threshold)
    if worst is None or factor > worst["factor"]:
        state.divergence = {"iteration": state.iteration, "step": step, "factor": factor, "threshold": threshold,
                            "first_iteration": worst["first_iteration"] if worst else state.iteration}


def check_test_divergence(test: TaskScores, threshold: float | None, state: RunState) -> None:
    """The divergence guard on the tested model's test tasks: where the validation tasks did not show it (one
    test task in 600 whose inner loop blows up makes the mean explode; docs/fidelity.md, the sinusoid), one
    warning line, and ``state.divergence`` records it with ``split: test`` (``step``, ``factor``,
    ``threshold``) for results.json. A run that diverged on validation keeps that record."""
    found = test.divergence(threshold) if threshold is not None else None
    if found is None:
        return
    step, factor = found
    log.warning("adaptation diverged on the test tasks: the mean query loss after step %d is %.3g times its value at "
                "step 0 (eval.divergence_factor=%g); results.json records it (diverged: true); look for the tasks "
                "that blow up (scripts/fidelity/task_outliers.py) or lower algorithm.inner_lr", step, factor,
                threshold)
    if state.divergence is None:
        state.divergence = {"split": "test", "step": step, "factor": factor, "threshold": threshold}


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
    divergence_factor: float | None = None,
    run_config: dict[str, Any] | None = None,
    resume: tuple[Path, dict[str, Any]] | None = None,
    ranks: Ranks = SINGLE,
) -> RunState:
    """Meta-train, validating every ``eval_every`` iterations and keeping the best checkpoint.

    Writes ``checkpoints/best.pt`` (best validation metric after the last adaptation step:
    highest accuracy, lowest MSE for regression), ``checkpoints/last.pt`` (everything needed to
    resume) and, with ``top_k > 1``, the ``top_k`` best in ``checkpoints/top/``. ``run_config`` (the
    unresolved config) goes into ``last.pt``; ``resume`` is a checkpoint's path and its contents
    (:func:`checkpoint.read_run`). Each validation is checked for divergence against ``divergence_factor``
    (:func:`check_divergence`; None: not checked). With several ``ranks`` each runs its share of every
    meta-batch (:meth:`MetaUpdate.shared`) and of the validation tasks, and rank 0 alone writes the
    checkpoints. Returns the final state.
    """
    state = RunState()
    ckpt_dir = checkpoint.folder(output_dir)
    if ranks.writes:
        checkpoint.remove_temporaries(ckpt_dir)
    if resume is not None:
        resume_from, saved = resume
        state = RunState.from_saved(checkpoint.restore_run(saved, resume_from, algorithm, optimizer, scheduler),
                                    objective)
        # The best models so far belong to the resumed run; carry them over so they can still win.
        if ranks.writes:
            checkpoint.carry_over(resume_from.parent, ckpt_dir, [iteration for _, iteration in state.top])
        log.info("resumed from %s at iteration %d", resume_from, state.iteration)
    update = MetaUpdate(optimizer, grad_clip, ranks)
    tracker.start_training(iterations, state.iteration)
    try:  # the progress bar must stop even when training stops with an error
        while state.iteration < iterations:
            algorithm.on_iteration(state.iteration, iterations)
            # One draw from the device sampler, the same on every rank; each task gets its own seed for
            # what adapting to it draws (its randomness then does not depend on where it runs).
            tasks = with_seeds(sample_tasks(train_sampler, meta_batch_size), state.iteration)
            algorithm.train()
            try:
                with update.shared(algorithm, tasks) as share:  # this rank's slice (one rank: all of them)
                    metrics = algorithm.meta_step(share, update)
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
                val = score_tasks(algorithm, val_tasks, bn_batch_stats, ci_z, objective.loss_metric, ranks)
                score = val.score(objective.metric)
                if objective.better(score, state.best_val):
                    state.best_val, state.best_iteration = score, state.iteration
                    if ranks.writes:
                        checkpoint.save_model(checkpoint.best_file(ckpt_dir), algorithm, state.iteration)
                if checkpoint.tested(top_k) == checkpoint.TOP:
                    state.top = checkpoint.keep_top(ckpt_dir, state.top, score, state.iteration, algorithm, top_k,
                                                    objective.higher_is_better, write=ranks.writes)
                tracker.log(val.final_metrics("val"), state.iteration)
                check_divergence(val, divergence_factor, state, tracker)
            if ranks.writes and (state.iteration % checkpoint_every == 0 or state.iteration == iterations):
                checkpoint.save_run(checkpoint.last_file(ckpt_dir), algorithm, optimizer, scheduler, state, run_config or {},
                                    tracker.run_id)
    finally:
        tracker.end_training()
    return state


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


def check_run_dir(output_dir: Path, resume: Any) -> bool:
    """Whether ``output_dir`` holds a finished run that ``resume=auto`` leaves as it is (True).

    Raises:
        OutputExistsError: (one line) the run would replace what a run before wrote there: a finished
            run (``results.json``), or an interrupted one (``checkpoints/last.pt``) that ``resume`` does
            not continue (``resume=auto``, or ``resume=`` this directory or one of its checkpoints).
    """
    output_dir = Path(output_dir)
    finished = output_dir / "results.json"
    if finished.exists():
        if resume == config.RESUME_AUTO and finished.is_file():
            return True
        raise OutputExistsError(f"{output_dir} already holds a finished run (results.json); choose another hydra.run.dir")
    own_last = checkpoint.last_file(checkpoint.folder(output_dir))
    if own_last.is_file() and resume != config.RESUME_AUTO:
        target = Path(str(resume)).expanduser().resolve() if resume else None
        own = checkpoint.folder(output_dir).resolve()
        if target is None or (target != output_dir.resolve() and target.parent != own):
            raise OutputExistsError(f"{output_dir} holds an interrupted run (checkpoints/last.pt): continue it with "
                                    f"resume={output_dir}, or choose another hydra.run.dir")
    return False


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


def run(cfg: DictConfig, output_dir: Path, wandb_defaults: dict[str, Any] | None = None,
        ranks: Ranks = SINGLE) -> float:
    """Build the parts, meta-train, test the best-on-validation model (or the ensemble of the
    ``eval.top_k`` best), write the results.

    With several ``ranks`` (:mod:`metarun.distributed`) every rank trains and tests its share, and
    rank 0 alone writes.

    Returns:
        The best mean validation metric after the last adaptation step, in its own direction
        (accuracy: higher is better; MSE for regression: lower is better): the objective that
        Hydra's sweepers maximise or minimise.
    """
    run_started = time.perf_counter()
    output_dir = Path(output_dir)
    check_writable(output_dir)
    auto = cfg.resume == config.RESUME_AUTO
    if check_run_dir(output_dir, cfg.resume):
        # A requeued (or re-launched) job that had already finished: its objective, not an error.
        finished = json.loads((output_dir / "results.json").read_text())
        log.info("resume=auto: %s already holds a finished run; nothing to do", output_dir)
        return next(value for key, value in finished.items() if key.startswith("best_val_"))
    run_config = OmegaConf.to_container(cfg, resolve=False)
    resume = None
    # resume=auto: this job's own last.pt (a requeued or relaunched job), else a new run.
    own_last = checkpoint.last_file(checkpoint.folder(output_dir))
    resume_target = (output_dir if own_last.is_file() else None) if auto else cfg.resume
    if resume_target:
        resume_from = checkpoint.resolve(resume_target)
        resume = (resume_from, checkpoint.read_run(resume_from, run_config))
        # The resumed run continues its W&B run rather than starting another.
        wandb_defaults = {**(wandb_defaults or {}), "id": resume[1].get("wandb_id")}
    parts = build(cfg, output_dir, wandb_defaults, ranks)
    objective = parts.objective
    started = time.perf_counter()
    log.info("device %s, %d meta-parameters", parts.device, sum(p.numel() for p in parts.algorithm.parameters()))
    if ranks.active:
        log.info("%d ranks (%s), devices %s", ranks.world_size, ranks.backend, ", ".join(ranks.devices))
    state = meta_train(
        parts.algorithm, parts.optimizer, parts.scheduler, parts.train_sampler, parts.val_tasks, parts.tracker,
        output_dir, objective, iterations=cfg.iterations, meta_batch_size=cfg.meta_batch_size,
        eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every, grad_clip=cfg.grad_clip,
        bn_batch_stats=cfg.eval.bn_batch_stats, ci_z=cfg.eval.ci_z, top_k=cfg.eval.top_k,
        divergence_factor=cfg.eval.divergence_factor, run_config=run_config,
        resume=resume, ranks=ranks,
    )
    train_seconds = time.perf_counter() - started
    ranks.barrier()  # rank 0 has written the checkpoints every rank tests

    ckpt_dir = checkpoint.folder(output_dir)
    which = checkpoint.tested(cfg.eval.top_k)
    if which == checkpoint.TOP:
        tested_iterations = [iteration for _, iteration in state.top]
        files = [checkpoint.top_file(ckpt_dir, iteration) for iteration in tested_iterations]
    else:
        tested_iterations, files = [state.best_iteration], [checkpoint.best_file(ckpt_dir)]
    scores = score_checkpoints(parts.algorithm, which, files, {"val": parts.val_tasks, "test": parts.test_tasks},
                               objective, cfg.eval.bn_batch_stats, cfg.eval.ci_z, ranks, cfg.eval.tta_views,
                               augmentation(cfg))
    check_test_divergence(scores["test"], cfg.eval.divergence_factor, state)
    results: dict[str, Any] = {
        "best_iteration": state.best_iteration,
        f"best_val_{objective.metric}": state.best_val,
        "tested_iterations": tested_iterations,
        "eval_tasks": len(parts.test_tasks),
        "eval_inner_steps": parts.algorithm.eval_inner_steps,
        "diverged": state.divergence is not None,  # adaptation made the validation (or test) query loss explode
        "divergence": state.divergence,  # the worst such validation (iteration, step, factor), or the test's; null: none
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - run_started,  # this process: since a resume only
        "device": str(parts.device),
        "distributed": ranks.record() if ranks.active else {"world_size": 1, "backend": None,
                                                            "devices": [str(parts.device)]},
        "hardware": hardware(parts.device),
        "output_dir": str(output_dir),
        "curves": {split: split_scores.curves() for split, split_scores in scores.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if ranks.writes:
        report(parts.tracker, results, "test", cfg.console)
    return state.best_val
