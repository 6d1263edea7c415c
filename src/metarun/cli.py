"""The ``metarun`` command: compose the config with Hydra, print it, run, return the objective.

Errors a user can fix (bad values, missing or corrupt data, a bad checkpoint, a non-finite
loss) are printed as one line, ``metarun: error: ...``, with exit status 2
(:func:`metarun.commands.user_errors`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from metarun import (  # config registers the run_schema with Hydra's ConfigStore
    checkpoint,
    config,
    distributed,
)
from metarun.commands import CONFIG_DIR, GROUPS, fail, user_errors
from metarun.errors import RankFailure
from metarun.loop import run


def wandb_defaults(cfg: DictConfig) -> dict[str, Any]:
    """W&B group/job_type/name/tags derived from the Hydra job: one group per sweep, one name per
    job, and the chosen groups and task shape as tags."""
    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep = Path(hydra_cfg.sweep.dir)
    groups = [f"{group}={choices.get(group)}" for group in ("algorithm", "dataset", "backbone")
              if choices.get(group) is not None]
    return {
        "group": f"sweep-{sweep.parent.name}-{sweep.name}" if multirun else None,
        "job_type": f"{choices.get('algorithm')}-{choices.get('dataset')}",
        "name": hydra_cfg.job.override_dirname or None,
        "tags": [*groups, f"{cfg.ways}w{cfg.shots}s"],
    }


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def run_job(cfg: DictConfig) -> float:
    output_dir = Path(cfg.output_dir or HydraConfig.get().runtime.output_dir)
    interrupted = f"interrupted; checkpoints so far are in {checkpoint.folder(output_dir)}: continue with " \
                  f"resume={output_dir}"
    with user_errors(interrupted):
        ranks = distributed.join()  # torchrun joined in main(); a Slurm task of a sweep joins here
    with user_errors(interrupted, ranks.label):
        if not ranks.writes:  # one writer: the other ranks only report errors, and never into rank 0's log file
            root = logging.getLogger()
            root.setLevel(logging.ERROR)
            for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
                root.removeHandler(handler)
        config.check_references(cfg)  # before printing the resolved config
        ranks.check_same("configs", OmegaConf.to_yaml(cfg, resolve=True))
        if cfg.console and ranks.writes:
            print(OmegaConf.to_yaml(cfg, resolve=True))
        try:
            objective = run(cfg, output_dir, wandb_defaults(cfg), ranks)
        except RankFailure as error:
            raise RankFailure(f"{error}: continue with resume={output_dir}") from None
        distributed.leave()
        return objective


def join_ranks(args: list[str]) -> list[str]:
    """Under torchrun (or Slurm tasks started by hand): join the process group before Hydra starts,
    and return the arguments every rank then runs with: rank 0's run directory (Hydra names it after
    the time, which the ranks would not agree on to the second) and, on the other ranks, no
    ``.hydra/`` and no log file (rank 0 alone writes). One process: ``args`` unchanged."""
    if distributed.from_environment() is None:
        return args
    with user_errors("interrupted while joining the other ranks"):
        ranks = distributed.join()
        if not ranks.active:
            return args
        if any(a in ("-m", "--multirun") for a in args):
            fail(f"{ranks.label}a torchrun launch runs one job on all its ranks; sweep with -m hydra/launcher=slurm "
                 f"hydra.launcher.tasks_per_node=N (every task of a job is one rank)")
        given = [a for a in args if a.split("=", 1)[0] in ("hydra.run.dir", "+hydra.run.dir")]
        run_dir = ranks.exchange(composed_run_dir(args) if ranks.writes and not given else "")[0]
        extra = [f"hydra.run.dir={quote(run_dir)}"] if run_dir else []
        if not ranks.writes:
            extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return [*args, *extra]


def composed_run_dir(args: list[str]) -> str:
    """The run directory Hydra would make for ``args`` now ("" when the config does not compose:
    Hydra then reports it on every rank)."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[a for a in args if "=" in a], return_hydra_config=True)
        return str(cfg.hydra.run.dir)
    except Exception:  # noqa: BLE001 - reported by Hydra itself
        return ""


def quote(value: str) -> str:
    """``value`` as one Hydra override value (quoted when it holds characters the grammar reads)."""
    if all(c.isalnum() or c in "/._-:~" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_arguments(args: list[str]) -> None:
    """What Hydra would report as a stack-trace-like message, as one line instead: an option the
    chosen group does not have (``algorithm=protonet algorithm.inner_lr=0.1``: the line lists the
    options protonet takes), and a run directory that is an existing file. Hydra's own messages
    for unknown groups, keys and types are left as Hydra prints them."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep
    from hydra.errors import ConfigCompositionException

    overrides = [a for a in args if ("=" in a or a.startswith("~")) and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - Hydra reports a malformed override itself
        return
    for override in parsed:
        if override.key_or_group in ("hydra.run.dir", "output_dir") and not override.is_sweep_override():
            path = Path(str(override.value())).expanduser()
            if path.exists() and not path.is_dir():
                fail(f"{override.key_or_group}={path} is an existing file, not a directory; choose another")
    check_removed_groups(parsed)
    if "-m" in args or "--multirun" in args:
        check_sweep([o.input_line for o in parsed if o.key_or_group.startswith("hydra")])
        check_sweep_job_dirs(args)
    # A sweeper's interval (``interval(0.01, 0.5)``, Optuna) has no first value to check: left to Hydra.
    parsed = [o for o in parsed if not isinstance(o.value(), IntervalSweep)]
    options = [o for o in parsed if "." in o.key_or_group and o.key_or_group.split(".")[0] in GROUPS
               and not o.is_add() and not o.is_delete() and not o.is_force_add()]
    if not options:
        return
    # Sweeps are checked with their first value: options do not depend on the value.
    plain = [o.input_line if not o.is_sweep_override() else f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
             for o in parsed if not o.key_or_group.startswith("hydra")]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        try:
            compose(config_name="config", overrides=plain)
            return
        except ConfigCompositionException:
            pass
        for option in options:
            rest = [line for line in plain if line.split("=")[0] != option.get_key_element()]
            try:
                cfg = compose(config_name="config", overrides=rest, return_hydra_config=True)
            except ConfigCompositionException:
                continue
            group, key = option.key_or_group.split(".", 1)
            node = cfg.get(group)
            if node is not None and key.split(".")[0] not in node:
                choice = cfg.hydra.runtime.choices.get(group)
                known = ", ".join(k for k in node if not str(k).startswith("_"))
                fail(f"{group}{'=' + choice if choice else ''} has no option {key}; its options: {known} "
                     f"(add a new key with +{option.key_or_group}=...)")


def check_sweep(overrides: list[str]) -> None:
    """A multirun's sweeper and launcher settings that would end in a traceback once Hydra has started (and
    written the sweep directory), as one line before: the number of parallel jobs (``hydra.launcher.n_jobs=0``:
    joblib's negative counts are "all CPUs but ...", 0 means nothing; ``hydra.sweeper.n_jobs``, Optuna's trials
    per batch, and ``n_trials`` must be >= 1) and the study's storage (``hydra.sweeper.storage``: a database
    URL, and for SQLite a file whose folder exists). The settings are read from the composed ``hydra`` node
    (``overrides``: the command line's ``hydra...`` ones), so a preset's values are checked too."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            hydra_cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True).hydra
    except Exception:  # noqa: BLE001 - Hydra reports an override that does not compose
        return
    launcher, sweeper = hydra_cfg.get("launcher") or {}, hydra_cfg.get("sweeper") or {}
    if launcher.get("n_jobs") == 0:
        fail("hydra.launcher.n_jobs=0 runs no job; use the number of jobs to run at once (>= 1; -1: one per CPU)")
    for key in ("n_jobs", "n_trials"):
        value = sweeper.get(key)
        if isinstance(value, int) and value < 1:
            what = "trials launched together" if key == "n_jobs" else "trials of the study"
            fail(f"hydra.sweeper.{key} must be >= 1 ({what}), got {value}")
    storage = sweeper.get("storage")
    if storage is not None:
        check_study_storage(str(storage))


def check_sweep_job_dirs(args: list[str]) -> None:
    """Before Hydra writes ``multirun.yaml`` and the jobs' ``.hydra/``: a multirun whose job directory
    would replace an earlier run (:func:`metarun.loop.check_run_dir`, as for a single run) is refused
    with one line naming the job, and nothing is written. Each job's directory is computed as Hydra's
    BasicSweeper will make it (its cartesian product of the sweeps, jobs numbered in order, each job's
    ``hydra.sweep.subdir`` from its own overrides). Only when the sweep directory (or a fixed output_dir)
    already exists: a new sweep directory holds no run. Other sweepers (Optuna) choose their jobs while
    they run: their jobs are checked when they start (after Hydra's files)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from metarun.errors import OutputExistsError
    from metarun.loop import check_run_dir

    lines = [a for a in args if ("=" in a or a.startswith("~")) and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
        settings = [o.input_line for o in parsed if o.key_or_group.startswith("hydra")]
        arguments = [o for o in parsed if not o.key_or_group.startswith("hydra")]
        first = [o.input_line if not o.is_sweep_override() else
                 f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" for o in arguments]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            master = compose(config_name="config", overrides=[*settings, *first], return_hydra_config=True)
            if master.hydra.sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
                return
            if not Path(str(master.hydra.sweep.dir)).exists() and not master.output_dir:
                return
            swept_keys = {o.get_key_element() for o in arguments if o.is_sweep_override()}
            jobs = [job for batch in BasicSweeper.split_arguments(arguments, master.hydra.sweeper.get("max_batch_size"))
                    for job in batch]
            for num, job in enumerate(jobs):
                cfg = compose(config_name="config", overrides=[*settings, *job], return_hydra_config=True)
                with open_dict(cfg):
                    cfg.hydra.job.num = num  # what Hydra's launcher sets
                job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
                output_dir = Path(str(cfg.output_dir)) if cfg.output_dir else job_dir
                try:
                    if job_dir.resolve() != output_dir.resolve():  # Hydra's files go into the job directory
                        check_run_dir(job_dir, None)
                    check_run_dir(output_dir, cfg.resume)
                except OutputExistsError as error:
                    swept = " ".join(line for line in job if line.split("=", 1)[0] in swept_keys)
                    fail(f"job {num}{f' ({swept})' if swept else ''}: "
                         f"{str(error).replace('hydra.run.dir', 'hydra.sweep.dir')}; nothing of the sweep was run")
    except Exception:  # noqa: BLE001 - Hydra reports what does not parse or compose; the jobs check themselves
        return


def check_study_storage(storage: str) -> None:
    """``hydra.sweeper.storage``: a database URL Optuna can open, one line otherwise (SQLite: a file, whose
    folder exists)."""
    try:
        from sqlalchemy.engine.url import make_url
        from sqlalchemy.exc import ArgumentError
    except ImportError:  # no sweeps extra: Hydra reports the missing sweeper
        return
    example = "sqlite:///optuna.db (a file, relative to this directory) or sqlite:////abs/path/optuna.db"
    try:
        url = make_url(storage)
    except (ArgumentError, ValueError):
        fail(f"hydra.sweeper.storage={storage} is not a database URL; use {example}")
    if url.drivername.split("+")[0] != "sqlite" or url.database in (None, "", ":memory:"):
        return
    path = Path(url.database)
    if path.is_dir():
        fail(f"hydra.sweeper.storage={storage}: {path} is a directory, and the study is an SQLite file; use "
             f"sqlite:///{path / 'optuna.db'}")
    if not path.parent.is_dir():
        fail(f"hydra.sweeper.storage={storage}: the folder {path.parent} does not exist; create it or use {example}")


def check_removed_groups(parsed: list) -> None:
    """A group the run cannot do without, removed (``~algorithm``, ``algorithm=null``, ``~dataset``), or a
    top-level setting removed (``~ways``), as one line: Hydra would compose the config and the run would stop
    with a traceback or an interpolation error. Optional groups (backbone, scheduler, augment) may be removed."""
    from metarun.config import required_settings

    required = required_settings()
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra") or "." in key or "/" in key or key not in required:
            continue
        removed = override.is_delete() or (not override.is_sweep_override() and override.value() is None
                                           and key in GROUPS)
        if removed:
            how = "~" + key if override.is_delete() else f"{key}=null"
            what = f"choose one ({key}=NAME; `metarun --help` lists them)" if key in GROUPS else \
                f"set it instead ({key}=VALUE)"
            fail(f"{how}: every run needs {key}; {what}")


def check_run_directory(args: list[str]) -> None:
    """Before Hydra writes ``.hydra/`` and ``metarun.log`` into the run directory: a command that
    would replace an earlier run there (a finished one, or an interrupted one that ``resume`` does
    not continue: :func:`metarun.loop.check_run_dir`) is refused with one line, and ``resume=auto``
    into a finished run ends at once with exit 0; either way every byte of that run stays as it was.
    Left to the job (after Hydra's files): multirun jobs, other configs (``-cn``), and a config
    that does not compose (Hydra reports it)."""
    from hydra import compose, initialize_config_dir

    from metarun.errors import OutputExistsError
    from metarun.loop import check_run_dir

    if any(a.startswith("-") for a in args):  # -m, --cfg, --help, -cn ...: Hydra's own modes
        return
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[a for a in args if "=" in a], return_hydra_config=True)
        if str(cfg.hydra.get("mode")) in ("MULTIRUN", "RunMode.MULTIRUN"):
            return
        hydra_dir = Path(str(cfg.hydra.run.dir))
        output_dir = Path(str(cfg.output_dir)) if cfg.output_dir else hydra_dir
        resume = cfg.resume
    except Exception:  # noqa: BLE001 - Hydra reports a config that does not compose, and the job the rest
        return
    try:
        if hydra_dir.resolve() != output_dir.resolve():  # Hydra's files go into hydra.run.dir
            check_run_dir(hydra_dir, None)
        if check_run_dir(output_dir, resume):
            print(f"metarun: {output_dir} already holds a finished run; resume=auto leaves it as it is")
            sys.exit(0)
    except OutputExistsError as error:
        fail(str(error))


def main() -> None:
    """The ``metarun`` command: under torchrun, join the other ranks; one-line checks of the
    arguments and of the run directory; then the Hydra job."""
    sys.argv[1:] = join_ranks(sys.argv[1:])
    check_arguments(sys.argv[1:])
    check_run_directory(sys.argv[1:])
    run_job()


if __name__ == "__main__":
    main()
