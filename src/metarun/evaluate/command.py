"""The ``metarun-eval`` command: score a trained run's checkpoint again, on any tasks.

    metarun-eval RUN_DIR [--checkpoint best|last|top] [--split test|val] [--episodes FILE]
                 [--name NAME] [OVERRIDES ...]

The model is rebuilt from the run's saved config (:mod:`metarun.evaluate.saved_config`), with
Hydra-style ``OVERRIDES`` on top, by the run's own build (:mod:`metarun.build`), and scored by the
very functions the run tested with (:func:`metarun.loop.score_checkpoints`: one checkpoint, or the
ensemble of the kept top-k), on

* the fixed tasks of the run's ``test`` (or ``val``) split, drawn from the same seeds as the run
  drew them: without overrides, the run's own test numbers come out exactly;
* or the fixed episodes of an episodes file (``--episodes``; :mod:`metarun.evaluate.episodes`).

It ends as a run ends (:func:`metarun.loop.report`), in ``RUN_DIR/eval/NAME/`` (``results.json``,
``metrics.jsonl``, ``adaptation.png``, ``wandb/``), plus ``tasks.jsonl`` with every task's curve; it
never touches the run's own files, and logs a W&B run with ``job_type=eval`` in the run's group.
Input it cannot use is one line, ``metarun: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from metarun import checkpoint, config, loop
from metarun.algorithms.base import Algorithm
from metarun.build import (
    augmentation,
    build_algorithm,
    build_data,
    build_tracker,
    resolve_device,
    seed_everything,
)
from metarun.commands import OneLineParser, user_error, user_errors
from metarun.cpu import configure_cpu
from metarun.errors import CheckpointError, ConfigError, one_line
from metarun.evaluate.episodes import EpisodeSet, read_episodes
from metarun.evaluate.saved_config import eval_config, read_saved_config, run_group, saved_choices
from metarun.objectives import Classification, Objective
from metarun.statistics import TaskScores
from metarun.tasks.sampling import FixedTasks
from metarun.tracking import Tracker

log = logging.getLogger(__name__)

SPLITS = ("test", "val")
MAX_NAME_BYTES = 255  # a folder name's limit on the usual file systems (NAME_MAX)


@dataclass
class Request:
    """What to evaluate; the command line's arguments."""

    run_dir: Path
    checkpoint: str | None = None  # best | last | top; None: what the run tested (checkpoint.tested)
    split: str = "test"
    episodes: Path | None = None
    name: str | None = None
    overrides: Sequence[str] = ()


def check_run_dir(run_dir: Path) -> None:
    """Raise (one line) unless ``run_dir`` is a directory holding a checkpoint."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory; pass a metarun run directory (outputs/DATE/TIME)")
    if not checkpoint.has_any(checkpoint.folder(run_dir)):
        raise CheckpointError(f"{run_dir} holds no checkpoint (no checkpoints/best.pt, last.pt or top/*.pt): not a "
                              f"metarun run directory, or its run stopped before the first checkpoint")


def load_weights(path: Path, algorithm: torch.nn.Module, built: str) -> int | None:
    """Load the model weights of ``path`` (``best.pt``, a top-k member, or ``last.pt``) into
    ``algorithm``; returns the iteration they are from.

    Raises:
        CheckpointError: unreadable, or the weights do not fit the model the config built (named
            by ``built``), with the first differences.
    """
    saved = checkpoint.safe_load(path)
    try:
        algorithm.load_state_dict(saved["algorithm"])
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        details = re.sub(r"torch\.Size\((\[[^\]]*\])\)", r"\1", lines[0] if lines else one_line(error)).rstrip(".")
        if len(lines) > 1:
            details += f" (and {len(lines) - 1} more)"
        raise CheckpointError(f"{path} does not fit the model the config builds ({built}): {details}; evaluate "
                              f"with the run's architecture (leave algorithm, backbone and dataset.channels/"
                              f"image_size as the run had them)") from None
    return checkpoint.saved_iteration(saved)


def default_name(which: str, source: str, overrides: Sequence[str]) -> str:
    """``best-test``, ``top-episodes_mine``, ``best-test-ways=3``: the checkpoint, what was scored,
    and the overrides that change the tasks or the model (not paths or how the job runs)."""
    shown = sorted(o for o in overrides if not o.lstrip("~+").startswith(config.JOB_KEYS))
    name = "-".join([which, source, *([",".join(shown)] if shown else [])])
    return re.sub(r"[^\w.,=+~\[\]-]", "_", name)[:200]


def check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"--name {name!r} must be a plain folder name (no /, not starting with .)")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ConfigError(f"--name is {len(name.encode())} bytes long; a folder name has at most {MAX_NAME_BYTES}")
    return name


def per_task_records(scores: TaskScores, episodes: EpisodeSet | None) -> list[dict[str, Any]]:
    """One record per task: its query loss and accuracy after each adaptation step (and, for an
    episodes file, the episode's line, name, ways and sizes)."""
    records = []
    for t in range(scores.loss.shape[0]):
        record: dict[str, Any] = {"task": t}
        if episodes is not None:
            e = episodes.episodes[t]
            record.update({"line": e.line, **({"name": e.name} if e.name is not None else {}), "ways": e.ways,
                           "support": len(e.support_y), "query": len(e.query_y)})
        record["loss"] = scores.loss[t].tolist()
        if scores.accuracy is not None:
            record["acc"] = scores.accuracy[t].tolist()
        records.append(record)
    return records


def scored_tasks(cfg: DictConfig, split: str, episodes_file: Path | None, device: torch.device
                 ) -> tuple[FixedTasks, Objective, EpisodeSet | None, str]:
    """The fixed tasks to score, their objective, the episodes (None for a split) and, for an
    error message, what they ask of the model. An episodes file sets ``cfg.ways`` to its widest
    episode (what the build passes the algorithm as ``ways``)."""
    if episodes_file is None:
        # The run's own data path: the same seeds draw the same fixed tasks.
        _, val_tasks, test_tasks, objective = build_data(cfg, device)
        return {"val": val_tasks, "test": test_tasks}[split], objective, None, f"ways={cfg.ways}"
    objective = Classification()
    episodes = read_episodes(episodes_file, cfg, device, objective.min_ways)
    cfg.ways = max(e.ways for e in episodes.episodes)
    asked = f"the episodes of {episodes_file} have up to {cfg.ways} classes (labels 0..{cfg.ways - 1})"
    return episodes.fixed_tasks(), objective, episodes, asked


def build_model(cfg: DictConfig, device: torch.device, objective: Objective, asked: str, trained_ways: int
                ) -> Algorithm:
    """The run's algorithm, as the build makes it, with its schedules as the run ended (its test).

    Raises:
        ConfigError: the tasks (``asked``) have more ways than the head trained with ``trained_ways``.
    """
    target = cfg.algorithm.get("_target_", "the algorithm")
    try:
        algorithm, _, _ = build_algorithm(cfg, device, objective)
    except Exception as error:
        # Hydra wraps what a constructor raises; a gradient method's refuses ways > train_ways.
        if not isinstance(user_error(error), ConfigError):
            raise
        if cfg.ways > trained_ways:
            raise ConfigError(f"{asked} but the model was trained with train_ways={trained_ways}: {target}'s head "
                              f"has {trained_ways} outputs and cannot answer {cfg.ways}-way tasks; evaluate with at "
                              f"most {trained_ways} ways") from None
        raise
    if cfg.ways > trained_ways:
        # A method without an output head (a metric method) answers any number of ways; the classes of the
        # dataset's split do not bound an episodes file. Scored, but said once.
        log.warning("%s: more than the train_ways=%d the model was trained with; %s has no output head and scores "
                    "them, but such tasks are harder than the run's and the scores are not comparable to its own",
                    asked, trained_ways, target)
    algorithm.on_iteration(max(cfg.iterations - 1, 0), cfg.iterations)
    return algorithm


def eval_tracker(cfg: DictConfig, request: Request, run_dir: Path, output_dir: Path, which: str, source: str,
                 choices: dict[str, str | None], episodes_file: Path | None) -> Tracker:
    """The run's trackers, for the evaluation: files in ``output_dir``, and a W&B run of
    ``job_type=eval`` in the run's group that logs no model."""
    user_set = {line.lstrip("~+").split("=", 1)[0] for line in request.overrides}
    tracker_cfg = copy.deepcopy(cfg)
    with open_dict(tracker_cfg):
        tracker_cfg.wandb.log_model = False  # an evaluation logs no model
        for key in ("job_type", "name"):  # the run's own W&B names are not the evaluation's
            if f"wandb.{key}" not in user_set:
                tracker_cfg.wandb[key] = None
        tracker_cfg.evaluation = {"run_dir": str(run_dir.resolve()), "checkpoint": which, "on": source,
                                  "episodes": str(episodes_file) if episodes_file else None,
                                  "overrides": list(request.overrides)}
    tags = ["eval", f"checkpoint={which}", *(f"{g}={c}" for g, c in choices.items() if c is not None
                                             and g in ("algorithm", "dataset", "backbone"))]
    if episodes_file is None:
        tags.append(f"{cfg.ways}w{cfg.shots}s")
    return build_tracker(tracker_cfg, output_dir, {
        "group": run_group(run_dir, cfg), "job_type": "eval", "name": f"{run_dir.name}/eval/{output_dir.name}",
        "tags": tags,
    })


def evaluate_run(request: Request) -> dict[str, Any]:
    """Evaluate a run's checkpoint as ``request`` asks; write ``RUN_DIR/eval/NAME/`` and return
    its results.

    Raises:
        ConfigError, DatasetError, CheckpointError: input it cannot use, one line each; nothing is
            written then.
    """
    run_dir = Path(request.run_dir).expanduser()
    check_run_dir(run_dir)
    saved, config_source = read_saved_config(run_dir)
    if request.split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {request.split!r}")
    choices = saved_choices(run_dir)
    cfg = eval_config(saved, request.overrides, choices)
    which = request.checkpoint or checkpoint.tested(cfg.eval.top_k)  # default: what the run tested
    if which not in checkpoint.KINDS:
        raise ConfigError(f"--checkpoint must be one of {', '.join(checkpoint.KINDS)}, got {which!r}")
    files = checkpoint.model_files(run_dir, which)
    episodes_file = Path(request.episodes).expanduser().resolve() if request.episodes is not None else None
    source = request.split if episodes_file is None else f"episodes_{episodes_file.stem}"
    name = check_name(request.name if request.name is not None else default_name(which, source, request.overrides))
    output_dir = run_dir / "eval" / name
    if output_dir.exists():
        raise ConfigError(f"{output_dir} already exists: an evaluation named {name!r} was written before; choose "
                          f"another --name, or delete it")

    # The run's build, in its order: CPU settings, device, seeds, tasks, model.
    trained_ways = int(cfg.train_ways)
    configure_cpu(cfg.threads, cfg.keep_freed_memory)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    tasks, objective, episodes, asked = scored_tasks(cfg, request.split, episodes_file, device)
    algorithm = build_model(cfg, device, objective, asked, trained_ways)
    built = f"algorithm={choices.get('algorithm') or cfg.algorithm.get('_target_', 'the algorithm')}, backbone=" + (
        str(choices.get("backbone") or (cfg.backbone or {}).get("_target_")))
    iterations = [load_weights(path, algorithm, built) for path in files]

    log.info("scoring %s of %s on %s (%d tasks)", which, run_dir, source, len(tasks))
    label = "episodes" if episodes is not None else request.split
    scores = loop.score_checkpoints(algorithm, which, files, {label: tasks}, objective, cfg.eval.bn_batch_stats,
                                    cfg.eval.ci_z, tta_views=cfg.eval.tta_views, transform=augmentation(cfg))[label]
    if which == checkpoint.TOP:
        model = f"ensemble of the top-{len(files)} checkpoints, iterations {', '.join(map(str, iterations))}"
    else:
        model = f"{files[0].relative_to(run_dir)}, iteration {iterations[0]}"

    try:
        output_dir.mkdir(parents=True)
    except FileExistsError:
        raise ConfigError(f"{output_dir} was written meanwhile by another evaluation; choose another --name") from None
    except OSError as error:
        raise ConfigError(f"cannot create {output_dir}: {error.strerror or one_line(error)}") from None
    tracker = eval_tracker(cfg, request, run_dir, output_dir, which, source, choices, episodes_file)
    with (output_dir / "tasks.jsonl").open("w") as f:
        for record in per_task_records(scores, episodes):
            f.write(json.dumps(record) + "\n")
    results: dict[str, Any] = {
        "run_dir": str(run_dir.resolve()),
        "config_source": config_source,
        "checkpoint": which,
        "checkpoints": [str(p.resolve()) for p in files],
        "checkpoint_iterations": iterations,
        "model": model,
        "split": label,
        "episodes": str(episodes_file) if episodes_file else None,
        "overrides": list(request.overrides),
        "eval_tasks": len(tasks),
        "eval_inner_steps": algorithm.eval_inner_steps,
        "device": str(device),
        "output_dir": str(output_dir),
        "curves": {label: scores.curves()},  # as the run's results.json holds a split's curves
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    loop.report(tracker, results, label, cfg.console)  # test/acc_mean, ..., as in the run's results.json
    return results


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="metarun-eval",
        description="Score a metarun run's checkpoint on its test (or val) tasks, on another task shape or "
                    "dataset (Hydra-style OVERRIDES on the run's saved config), or on the fixed episodes of a "
                    "file. Writes RUN_DIR/eval/NAME/.",
        epilog="Examples: metarun-eval outputs/2024-05-01/12-00-00;  metarun-eval RUN ways=3 "
               "algorithm.eval_inner_steps=10;  metarun-eval RUN --episodes episodes.jsonl. "
               "Episodes file: one JSON object per line, {\"support\": [[path, label], ...], \"query\": "
               "[[path, label], ...]}, paths relative to the file (README: Evaluating a checkpoint).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a metarun run directory (finished or interrupted)")
    p.add_argument("--checkpoint", choices=checkpoint.KINDS, default=None,
                   help="best.pt, last.pt, or the ensemble of the kept top-k (checkpoints/top/); default: what the "
                        "run tested (top when its eval.top_k > 1, else best)")
    scored = p.add_mutually_exclusive_group()
    scored.add_argument("--split", choices=SPLITS, default="test",
                        help="the run's fixed tasks of this split (same seeds as the run; default test)")
    scored.add_argument("--episodes", type=Path, default=None, metavar="FILE",
                        help="score the fixed episodes of this JSON-lines file instead of a split")
    p.add_argument("--name", default=None,
                   help="the evaluation's folder, RUN_DIR/eval/NAME (default: checkpoint, split or episodes file, "
                        "and the overrides); an existing one is never overwritten")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDES",
                   help="Hydra-style overrides of the run's config: key=value, +key=value, ~key, group=option")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """The ``metarun-eval`` command."""
    args = parser().parse_intermixed_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    request = Request(args.run_dir, args.checkpoint, args.split, args.episodes, args.name, args.overrides)
    with user_errors("interrupted"):
        evaluate_run(request)
