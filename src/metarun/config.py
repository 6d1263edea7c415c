"""The structured schema of a run's top-level settings, registered with Hydra's ConfigStore.

conf/config.yaml starts from this schema (``defaults: [run_schema, ...]``), so a mistyped key
or a value of the wrong type fails when the config is composed, before anything is built.
Range checks that a type cannot express are in :func:`validate`.
"""

import inspect
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, OmegaConfBaseException

from metarun.errors import ConfigError, one_line

log = logging.getLogger(__name__)

# Settings that say where things are and how the job runs, never what it computes (a key, or a
# prefix ending in "."): a resumed run may change them, and they name neither an evaluation nor a
# table row.
JOB_KEYS = ("device", "threads", "keep_freed_memory", "console", "wandb.", "dataset.root", "dataset.download",
            "dataset.cache_dir")

# Settings that name no multirun job directory: the job keys, the seed (the job number tells the repetitions
# apart) and where a run writes or resumes from. conf/config.yaml's hydra.job.config.override_dirname.exclude_keys
# is this list with each prefix written out as the keys under it (Hydra matches whole keys; a test checks that the
# two are equal); metarun-table's RUNTIME_KEYS start from it.
UNNAMED_KEYS = ("seed", "resume", "output_dir", *JOB_KEYS)


@dataclass
class EvalConfig:
    """Meta-validation and meta-test protocol. Values: conf/config.yaml (``eval:``)."""

    tasks: int = MISSING  # fixed test tasks (MAML and RelationNet use 600)
    val_tasks: int = MISSING  # fixed validation tasks
    ci_z: float = MISSING  # CI half-width = ci_z * std / sqrt(tasks); 1.96 for 95%
    bn_batch_stats: bool = MISSING  # BatchNorm uses the task's batch statistics at evaluation (MAML, transductive)
    top_k: int = MISSING  # test the ensemble of the top_k validation checkpoints (MAML++: 5); 1: best.pt alone
    tta_views: int = MISSING  # test-time augmentation: also test on this many copies of each task augmented by augment
    # warn (once) and record in results.json when, on the validation tasks, the mean query loss after the last
    # adaptation step is more than divergence_factor times its value at step 0; null: no check
    divergence_factor: float | None = MISSING


@dataclass
class RunConfig:
    """Top-level settings: their types and meaning. Their values are declared once, in
    conf/config.yaml (or an experiment preset); nothing here is a default. The component groups
    (dataset, algorithm, backbone, optimizer, scheduler, augment) carry a ``_target_``."""

    dataset: Any = MISSING
    algorithm: Any = MISSING
    # Optional groups: None is what "no option chosen" (``backbone=null``) leaves, not a default value.
    backbone: Any = None  # unused by algorithms that build their own network; ~backbone removes it
    optimizer: Any = MISSING
    scheduler: Any = None  # meta learning-rate schedule (conf/scheduler/), null: constant
    wandb: Any = MISSING
    augment: Any = None  # training-only image augmentation (conf/augment/), null: none

    seed: int = MISSING
    device: str = MISSING  # auto | cpu | cuda | cuda:N ; auto picks cuda when available; ${metarun.job_gpu:} in sweeps
    threads: int = MISSING  # torch CPU threads; 0 keeps torch's default (one per core), which crawls on a busy CPU
    keep_freed_memory: bool = MISSING  # glibc malloc keeps freed memory (metarun.cpu.keep_freed_memory_for_reuse)
    iterations: int = MISSING  # meta-training iterations (one meta-batch each)
    meta_batch_size: int = MISSING  # tasks per meta-update
    sampler: str = MISSING  # meta-training tasks: device (a meta-batch in a few tensor ops, metarun.tasks.device)
    # | learn2learn (its TaskDataset, task by task; within_group tasks always use it)
    grad_clip: float | None = MISSING  # clip the meta-gradient's global norm; null: no clipping
    ways: int = MISSING  # classes per evaluation task
    shots: int = MISSING  # support samples per class at evaluation (K points for regression)
    query_shots: int = MISSING  # query samples per class at evaluation
    train_ways: int = MISSING  # classes per training task
    train_shots: int = MISSING  # support samples per class in training
    train_query_shots: int = MISSING  # query samples per class in training
    eval_every: int = MISSING  # validate every N iterations (and after the last)
    checkpoint_every: int = MISSING  # write checkpoints/last.pt every N iterations
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str | None = MISSING  # null: Hydra's output directory of the job
    resume: str | None = MISSING  # a checkpoint file or a run directory holding checkpoints/last.pt;
    # auto: this job's own checkpoints/last.pt when there is one (a requeued job), else a new run
    console: bool = MISSING  # rich progress bar and tables
    # The published result an experiment preset aims for, read by ``metarun-table`` only: e.g.
    # {source: "Finn et al. 2017, Table 1", metric: acc, mean: 98.7, ci95: 0.4}; training never reads it.
    paper: Any = None


ConfigStore.instance().store(name="run_schema", node=RunConfig)


def required_settings() -> tuple[str, ...]:
    """The top-level settings every run needs: those of :class:`RunConfig` that cannot be None (a group
    that is optional, ``backbone``, says so with its None)."""
    return tuple(f.name for f in fields(RunConfig) if f.default is not None)


RESUME_AUTO = "auto"  # resume=auto: the job's own checkpoints/last.pt if present


def job_gpu(count: int | str | None = None) -> str:
    """``${metarun.job_gpu:}``: the device of the current Hydra job in a sweep, one GPU per job.

    Job ``n`` gets ``cuda:{n % count}``; ``count`` defaults to the GPUs torch sees. Without a GPU
    it is ``cpu``; outside a sweep (no job number) job 0.
    """
    from hydra.core.hydra_config import HydraConfig

    count = int(count) if count not in (None, "") else _cuda_device_count()
    if count < 1:
        return "cpu"
    num = OmegaConf.select(HydraConfig.get(), "job.num", default=0) if HydraConfig.initialized() else 0
    return f"cuda:{int(num or 0) % count}"


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


OmegaConf.register_new_resolver("metarun.job_gpu", job_gpu, replace=True)


def product(*factors: Any) -> int | float:
    """``${metarun.product:a,b,...}``: the product of numbers, e.g. an MLP's input size from the dataset's
    images, ``${metarun.product:${dataset.channels},${dataset.image_size},${dataset.image_size}}``."""
    for factor in factors:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise ConfigError(f"${{metarun.product:...}} multiplies numbers, got {factor!r}")
    return math.prod(factors)


def input_dims(bounds: Any) -> int:
    """``${metarun.input_dims:${dataset.x_range}}``: the coordinates of an input drawn from the box
    ``bounds``, 1 for ``[low, high]`` and n for a list of n such pairs. A backbone sized by it takes
    such inputs (the sinusoid's scalar x), and does not fit a dataset without that key (images)."""
    if isinstance(bounds, ListConfig):
        bounds = OmegaConf.to_container(bounds)
    if isinstance(bounds, (list, tuple)) and bounds and all(isinstance(b, (list, tuple)) for b in bounds):
        return len(bounds)
    return 1  # [low, high] (a malformed range is the dataset's to report)


OmegaConf.register_new_resolver("metarun.product", product, replace=True)
OmegaConf.register_new_resolver("metarun.input_dims", input_dims, replace=True)


def config_dir() -> Path:
    """The config tree the metarun command composes: ``$METARUN_CONFIG_DIR``, else this checkout's conf/."""
    return Path(os.environ.get("METARUN_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf")))


def takes_features(target: str) -> bool:
    """Whether the algorithm ``target``'s constructor has a ``features`` parameter (the backbone),
    True when the target cannot be imported: instantiating it then reports that."""
    try:
        return "features" in inspect.signature(get_class(target).__init__).parameters
    except Exception:  # noqa: BLE001
        return True


def option_values(group: str, name: str) -> dict[str, Any]:
    """``conf/<group>/<name>.yaml``'s own values, unresolved, on top of the options of the same group that its
    defaults list extends (conv4_maxpool is conv4 with ``pool: max``), in Hydra's order (``_self_`` where it is
    listed, else last). The list's overrides of other groups (dataset=sinusoid's backbone) are not values."""
    own = OmegaConf.to_container(OmegaConf.load(config_dir() / group / f"{name}.yaml"), resolve=False)
    entries = own.pop("defaults", [])
    if "_self_" not in entries:
        entries = [*entries, "_self_"]
    values: dict[str, Any] = {}
    for entry in entries:
        if entry == "_self_":
            values.update(own)
        elif isinstance(entry, str):
            values.update(option_values(group, entry))
    return values


def fitting_backbones(cfg: DictConfig) -> list[str]:
    """The options of conf/backbone/ that fit ``cfg``'s dataset: those whose values resolve against it.

    A backbone says what input it takes by the dataset keys it reads (``in_channels: ${dataset.channels}``,
    ``in_features: ${metarun.input_dims:${dataset.x_range}}``), so trying each one against the dataset, as
    the run chose and overrode it, is what decides: there is no table of datasets and backbones.
    """
    base = OmegaConf.to_container(cfg, resolve=False)
    fitting = []
    for path in sorted((config_dir() / "backbone").glob("*.yaml")):
        try:
            option = option_values("backbone", path.stem)
            probe = OmegaConf.create({**base, "backbone": option})
            OmegaConf.to_container(probe.backbone, resolve=True)
        except (OmegaConfBaseException, ConfigError, OSError, AttributeError):
            continue
        fitting.append(path.stem)
    return fitting


def check_references(cfg: DictConfig) -> None:
    """Raise ConfigError (one line) when a value refers to a key the chosen groups do not have.

    Groups meet through interpolations (``backbone.in_channels: ${dataset.channels}``), so a
    backbone for images on a dataset without images (``dataset=sinusoid backbone=conv4``) fails
    here, naming both keys and the backbones that fit (:func:`fitting_backbones`), rather than with
    a stack trace from the resolver. An algorithm that builds its own network uses no backbone: the
    backbone is set to null first, so it need not fit.
    """
    if cfg.get("backbone") is not None and not takes_features(cfg.algorithm.get("_target_", "")):
        cfg.backbone = None
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationKeyError as error:
        group = error.full_key.split(".")[0]
        reason = f"{error.full_key}: {one_line(error)}"
        if group == "backbone":
            fitting = fitting_backbones(cfg)
            advice = (f"use backbone={fitting[0]}" if len(fitting) == 1 else
                      f"use one of {', '.join(f'backbone={name}' for name in fitting)}" if fitting else
                      f"no backbone in {config_dir() / 'backbone'} reads this dataset's keys; add one that does")
            raise ConfigError(f"{reason}; the backbone does not fit this dataset: {advice}") from None
        raise ConfigError(
            f"{reason}; the chosen config groups do not fit together: choose a {group} made for this dataset"
        ) from None


# The seeds a run accepts: numpy's global RNG (np.random.seed) takes 0..2**32 - 1; torch and random take more.
MAX_SEED = 2**32 - 1


def check_finite(cfg: DictConfig) -> None:
    """Raise ConfigError (one line) naming the first configured number that is NaN or infinite,
    wherever it is (a learning rate, grad_clip, an algorithm's option, eval.ci_z, ...): such a value
    would only stop the run at its first non-finite loss, or run with a meaningless result."""

    def walk(node: Any, key: str) -> None:
        if isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"{key} must be a finite number, got {node}")
        if isinstance(node, dict):
            for name, value in node.items():
                walk(value, f"{key}.{name}" if key else str(name))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{key}[{index}]")

    walk(OmegaConf.to_container(cfg, resolve=True), "")


def check_scheduler(cfg: DictConfig) -> None:
    """Raise ConfigError (one line) for a learning-rate schedule that would train in the wrong direction
    (a negative rate) or never move: the options of conf/scheduler/ by their keys."""
    scheduler = cfg.get("scheduler")
    if scheduler is None:
        return
    eta_min = scheduler.get("eta_min")
    if eta_min is not None and eta_min < 0:
        raise ConfigError(f"scheduler.eta_min must be >= 0 (a negative learning rate ascends the loss), got {eta_min}")
    gamma = scheduler.get("gamma")
    if gamma is not None and gamma <= 0:
        raise ConfigError(f"scheduler.gamma must be > 0 (0.5 halves the learning rate), got {gamma}")
    step_size = scheduler.get("step_size")
    if step_size is not None and step_size < 1:
        raise ConfigError(f"scheduler.step_size must be >= 1 (meta-updates between decays), got {step_size}")
    for key in ("start_factor", "end_factor"):
        factor = scheduler.get(key)
        low_ok = factor is None or (factor > 0 if key == "start_factor" else factor >= 0)
        if not low_ok or (factor is not None and factor > 1):
            bound = "0 < start_factor <= 1" if key == "start_factor" else "0 <= end_factor <= 1"
            raise ConfigError(f"scheduler.{key} must satisfy {bound} (a factor of optimizer.lr), got {factor}")
    total_iters = scheduler.get("total_iters")
    if total_iters is not None and total_iters < 0:
        raise ConfigError(f"scheduler.total_iters must be >= 0, got {total_iters}")


def validations(iterations: int, eval_every: int) -> int:
    """How many times a run of ``iterations`` validates (and may keep a checkpoint): every ``eval_every``
    iterations and after the last one (:func:`metarun.loop.meta_train`)."""
    return -(-iterations // eval_every)


def check_top_k(cfg: DictConfig) -> None:
    """Warn (one line) when ``eval.top_k`` is more than the validations the run makes: not an error, the
    tested ensemble then holds one model per validation."""
    made = validations(cfg.iterations, cfg.eval_every)
    if cfg.eval.top_k > made:
        log.warning("eval.top_k=%d but iterations=%d with eval_every=%d validate %d time%s: the tested ensemble "
                    "holds %d model%s; lower eval.top_k or eval_every to test %d", cfg.eval.top_k, cfg.iterations,
                    cfg.eval_every, made, "" if made == 1 else "s", made, "" if made == 1 else "s", cfg.eval.top_k)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError (one line) for values no run can use."""
    check_references(cfg)
    check_finite(cfg)
    positive = {
        "iterations": cfg.iterations,
        "meta_batch_size": cfg.meta_batch_size,
        "eval_every": cfg.eval_every,
        "checkpoint_every": cfg.checkpoint_every,
        "eval.tasks": cfg.eval.tasks,
        "eval.val_tasks": cfg.eval.val_tasks,
        "eval.top_k": cfg.eval.top_k,
        "ways": cfg.ways,
        "shots": cfg.shots,
        "query_shots": cfg.query_shots,
        "train_ways": cfg.train_ways,
        "train_shots": cfg.train_shots,
        "train_query_shots": cfg.train_query_shots,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"seed must be >= 0 and <= {MAX_SEED} (the range numpy's RNG accepts), got {cfg.seed}")
    if cfg.eval.ci_z <= 0:
        raise ConfigError(f"eval.ci_z must be > 0 (1.96 for a 95% interval), got {cfg.eval.ci_z}")
    if cfg.eval.tta_views < 0:
        raise ConfigError(f"eval.tta_views must be >= 0 (0: no test-time augmentation), got {cfg.eval.tta_views}")
    if cfg.eval.tta_views and cfg.augment is None:
        raise ConfigError(f"eval.tta_views={cfg.eval.tta_views} needs an augmentation to apply to the test tasks: "
                          "choose one with augment=... (conf/augment/), or set eval.tta_views=0")
    if cfg.threads < 0:
        raise ConfigError(f"threads must be >= 0 (0: torch's default), got {cfg.threads}")
    if cfg.grad_clip is not None and cfg.grad_clip <= 0:
        raise ConfigError(f"grad_clip must be > 0 or null, got {cfg.grad_clip}")
    lr = cfg.optimizer.get("lr")
    if lr is not None and lr < 0:
        raise ConfigError(f"optimizer.lr must be >= 0, got {lr}")
    check_scheduler(cfg)
    check_top_k(cfg)
    if cfg.resume is not None and not str(cfg.resume).strip():
        raise ConfigError("resume must be a run directory, a checkpoint file, auto or null, got an empty string")
    if cfg.sampler not in ("device", "learn2learn"):
        raise ConfigError(f"sampler must be device or learn2learn, got {cfg.sampler!r}")
    if not (cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
