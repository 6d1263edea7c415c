"""Config -> parts. The only caller of ``hydra.utils.instantiate``.

Everything that can fail on a bad config or missing data fails here, before training starts.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metarun import config
from metarun.algorithms.base import Algorithm
from metarun.augment import Transform
from metarun.config import takes_features
from metarun.cpu import configure_cpu
from metarun.distributed import SINGLE, Ranks, check_world, device_for
from metarun.errors import ConfigError, one_line
from metarun.objectives import Classification, Objective
from metarun.tasks.device import training_sampler
from metarun.tasks.sampling import FixedTasks, Sampler, TaskSource
from metarun.tracking import ConsoleTracker, FileTracker, Tracker, Trackers

log = logging.getLogger(__name__)

# Fixed evaluation tasks are drawn with seeds derived from the run seed, away from it, so that
# they never coincide with the training task stream and stay the same whatever else changes.
VAL_TASK_SEED_OFFSET = 1_000_003
TEST_TASK_SEED_OFFSET = 2_000_003


@dataclass
class Parts:
    """Everything a run needs, built from the config."""

    device: torch.device
    algorithm: Algorithm
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    train_sampler: Sampler
    val_tasks: FixedTasks
    test_tasks: FixedTasks
    tracker: Tracker
    objective: Objective


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=auto or device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Python's RNG (learn2learn draws tasks with it), NumPy's and torch's."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augmentation(cfg: DictConfig) -> Transform | None:
    """``cfg.augment`` (a config group, default none), built: it transforms the training tasks' images, and
    the test's views with test-time augmentation (``eval.tta_views``)."""
    return instantiate(cfg.augment) if cfg.augment is not None else None


def build_data(cfg: DictConfig, device: torch.device) -> tuple[Sampler, FixedTasks, FixedTasks, Objective]:
    """The training task sampler, the fixed validation and test tasks, and the tasks' objective.

    The dataset target returns a :class:`metarun.tasks.TaskSource` (image classes or a
    regression task distribution), which makes the sampler of each split and says what the
    tasks ask for. ``cfg.augment`` (a config group, default none) transforms the training
    tasks' images only.
    """
    source: TaskSource = instantiate(cfg.dataset, _convert_="all")
    fewest = source.objective.min_ways
    for key in ("ways", "train_ways"):
        if cfg[key] < fewest:
            raise ConfigError(f"{key}={cfg[key]}: a {type(source.objective).__name__.lower()} task needs >= {fewest} "
                              f"classes (with one class every answer is right, so its accuracy says nothing)")
    train = source.sampler("train", cfg.train_ways, cfg.train_shots, cfg.train_query_shots, device, augmentation(cfg))
    train = training_sampler(train, cfg.sampler)  # sampler=device: whole meta-batches on the device
    val = source.sampler("val", cfg.ways, cfg.shots, cfg.query_shots, device, None)
    test = source.sampler("test", cfg.ways, cfg.shots, cfg.query_shots, device, None)
    return (
        train,
        val.fixed_tasks(cfg.eval.val_tasks, seed=cfg.seed + VAL_TASK_SEED_OFFSET),
        test.fixed_tasks(cfg.eval.tasks, seed=cfg.seed + TEST_TASK_SEED_OFFSET),
        source.objective,
    )


# What the build passes to every algorithm's constructor, besides the options of its config;
# ``features`` (the backbone) only to an algorithm whose constructor takes it: one that builds its
# own network (the synaptic rule's) does not. The README's "Adding an algorithm" lists them.
BUILD_ARGUMENTS = ("features", "ways", "train_ways", "objective")

def argument_error(error: BaseException | None) -> TypeError | None:
    """The TypeError of a constructor called with arguments it does not take, or without ones it needs,
    wherever Hydra's wrapping put it in ``error``'s chain; None when there is none."""
    while error is not None:
        if isinstance(error, TypeError) and "argument" in str(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def constructor_error(error: BaseException, target: str) -> ConfigError | None:
    """One line for an algorithm constructor called with arguments it does not take, or without
    ones it needs (Hydra reports these as a multi-line TypeError)."""
    cause = argument_error(error)
    if cause is None:
        return None
    message = one_line(cause).split("__init__() ")[-1]
    return ConfigError(
        f"{target}: {message}; the build passes {', '.join(BUILD_ARGUMENTS)} (features only to a "
        f"constructor that has it) and the options of its conf/algorithm/ file (README: Adding an algorithm)"
    )


def backbone_error(error: BaseException, target: str) -> ConfigError | None:
    """One line for a backbone given an option it does not take: an experiment preset's setting for one
    backbone (``backbone.drop_rate`` of a ResNet-12 preset) kept after ``backbone=`` chose another (Hydra reports a
    multi-line TypeError). The presets' Conv4 settings are backbone options of their own (conv4_maxpool), not keys."""
    cause = argument_error(error)
    if cause is None or "unexpected keyword argument" not in str(cause):
        return None
    key = str(cause).split("argument ")[-1].strip("'\"")
    return ConfigError(f"{target} takes no option {key!r}, which the config sets (an experiment preset's "
                       f"setting for another backbone?); remove it with ~backbone.{key}")


def build_algorithm(cfg: DictConfig, device: torch.device, objective: Objective | None = None
                    ) -> tuple[Algorithm, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The algorithm (on ``device``), its meta-optimizer and the optimizer's schedule (None
    without one); ``objective`` comes from the dataset."""
    passed: dict[str, Any] = {"ways": cfg.ways, "train_ways": cfg.train_ways, "objective": objective or Classification()}
    target = cfg.algorithm.get("_target_", "algorithm")
    if not takes_features(target):
        log.info("%s builds its own network: no backbone is built", target)
    elif cfg.backbone is None:
        raise ConfigError(f"{target} needs a backbone (its features), and the config has none (~backbone); "
                          f"choose one, e.g. backbone=conv4")
    else:
        try:
            passed["features"] = instantiate(cfg.backbone)
        except Exception as error:
            cause = backbone_error(error, cfg.backbone.get("_target_", "the backbone"))
            if cause is None:
                raise
            raise cause from None
    try:
        algorithm = instantiate(cfg.algorithm, **passed)
    except Exception as error:
        cause = constructor_error(error, target)
        if cause is None:
            raise
        raise cause from None
    algorithm = algorithm.to(device)
    optimizer = instantiate(cfg.optimizer)(params=algorithm.parameters())
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer) if cfg.scheduler is not None else None
    return algorithm, optimizer, scheduler


def build_tracker(cfg: DictConfig, output_dir: Path, wandb_defaults: dict[str, Any] | None,
                  ranks: Ranks = SINGLE) -> Tracker:
    """The run's files, W&B and console; none on a rank other than 0 (one writer). The W&B config of
    a distributed run also records its ranks (``distributed``: world size, backend, devices)."""
    if not ranks.writes:
        return Trackers([])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if ranks.active:
        resolved["distributed"] = ranks.record()
    trackers: list[Tracker] = [FileTracker(output_dir)]
    trackers.append(instantiate(cfg.wandb, run_config=resolved, dir=str(output_dir), defaults=wandb_defaults or {},
                                _convert_="all", _recursive_=False))
    if cfg.console:
        trackers.append(ConsoleTracker())
    return Trackers(trackers)


def build(cfg: DictConfig, output_dir: Path, wandb_defaults: dict[str, Any] | None = None,
          ranks: Ranks = SINGLE) -> Parts:
    """Validate ``cfg`` and build every part of the run, trackers last (nothing is logged for a
    run that cannot start). Every rank of a distributed run builds the same parts (same seed, so
    the same fixed tasks and the same meta-batches), each on its own device."""
    config.validate(cfg)
    check_world(ranks, cfg.meta_batch_size, [cfg.eval.tasks, cfg.eval.val_tasks])
    configure_cpu(cfg.threads, cfg.keep_freed_memory)
    device = resolve_device(device_for(cfg.device, ranks))
    if ranks.active:
        ranks.devices = ranks.exchange(str(device))  # every rank's, in rank order
    seed_everything(cfg.seed)
    train_sampler, val_tasks, test_tasks, objective = build_data(cfg, device)
    algorithm, optimizer, scheduler = build_algorithm(cfg, device, objective)
    tracker = build_tracker(cfg, output_dir, wandb_defaults, ranks)
    return Parts(device, algorithm, optimizer, scheduler, train_sampler, val_tasks, test_tasks, tracker, objective)
