"""The ``metarun-eval`` command: score a trained run's checkpoint again, on any tasks.

    metarun-eval RUN_DIR [--checkpoint best|last|top] [--split test|val] [--episodes FILE]
                 [--name NAME] [OVERRIDES ...]

The model is rebuilt from the run's saved config (``RUN_DIR/.hydra/config.yaml``, which Hydra
writes into every job directory; else the ``config`` of ``results.json``, else of
``checkpoints/last.pt``), with Hydra-style ``OVERRIDES`` applied on top (``ways=3``,
``algorithm.eval_inner_steps=10``, ``eval.tasks=100``, ``dataset=omniglot dataset.root=...``).
The training task shape (``train_ways``, ``train_shots``, ``train_query_shots``) stays the run's:
it decides the model's head, so ``ways=3`` on a 5-way run tests 3-way tasks with the run's 5-way
head. It then scores, through the very functions the run tested with
(:func:`metarun.loop.evaluate`, or :func:`metarun.loop.evaluate_ensemble` for ``top``):

* the fixed tasks of the run's ``test`` (or ``val``) split, drawn from the same seeds as the run
  drew them: without overrides, the run's own test numbers come out exactly;
* or the fixed episodes of an episodes file (``--episodes``; format in :func:`read_episodes`),
  whose images are decoded by the dataset module's own ``load_image``, as its loader decodes them.

It writes ``RUN_DIR/eval/NAME/`` (``results.json``, ``metrics.jsonl``, ``adaptation.png`` through the
run's FileTracker, ``tasks.jsonl`` with every task's curve, ``wandb/``), never touches the run's own
files, prints the per-step table and the final line, and logs a W&B run with ``job_type=eval`` in
the run's group. Input it cannot use is one line, ``metarun: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from metarun import checkpoint, config, loop
from metarun.build import build_algorithm, build_data, build_tracker, resolve_device, seed_everything
from metarun.checkpoint import CheckpointError
from metarun.cli import CONFIG_DIR, GROUPS, fail, user_error, user_errors
from metarun.errors import ConfigError, DatasetError, one_line
from metarun.objectives import Classification, Objective
from metarun.runtime import configure_cpu
from metarun.tasks.sampling import FixedTasks, image_tensor
from metarun.tasks.types import Task, TaskSplit
from metarun.tracking import final_line

log = logging.getLogger(__name__)

CHECKPOINTS = ("best", "last", "top")
SPLITS = ("test", "val")
# The training task shape decides the model (a gradient method's head has train_ways outputs): it
# stays the run's unless an override names it, even where the saved config reads ``${ways}``.
TRAINING_SHAPE = ("train_ways", "train_shots", "train_query_shots")


@dataclass
class Request:
    """What to evaluate; the command line's arguments."""

    run_dir: Path
    checkpoint: str | None = None  # best | last | top; None: what the run tested (top when eval.top_k > 1)
    split: str = "test"
    episodes: Path | None = None
    name: str | None = None
    overrides: Sequence[str] = ()


# ----------------------------------------------------------------------------------------------
# The run: its checkpoints and its config
# ----------------------------------------------------------------------------------------------


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory; pass a metarun run directory (outputs/DATE/TIME)")
    ckpt = run_dir / "checkpoints"
    if not any(p.is_file() for p in (ckpt / "best.pt", ckpt / "last.pt")) and not any(ckpt.glob("top/*.pt")):
        raise CheckpointError(f"{run_dir} holds no checkpoint (no checkpoints/best.pt, last.pt or top/*.pt): not a "
                              f"metarun run directory, or its run stopped before the first checkpoint")


def read_saved_config(run_dir: Path) -> tuple[DictConfig, str]:
    """The run's config and where it came from: ``.hydra/config.yaml`` (unresolved, as the run
    composed it), else ``results.json``'s (resolved), else ``checkpoints/last.pt``'s (unresolved),
    on the run schema (types checked, unknown keys refused)."""
    sources: list[tuple[Path, Callable[[Path], Any]]] = [
        (run_dir / ".hydra" / "config.yaml", lambda p: OmegaConf.to_container(OmegaConf.load(p))),
        (run_dir / "results.json", lambda p: json.loads(p.read_text())["config"]),
        (run_dir / "checkpoints" / "last.pt", lambda p: checkpoint.safe_load(p)["config"]),
    ]
    for path, read in sources:
        if not path.is_file():
            continue
        try:
            saved = read(path)
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - an unreadable file is one line for the user
            raise ConfigError(f"cannot read the run's config from {path}: {one_line(error)}") from None
        if not isinstance(saved, dict) or not saved:
            continue
        try:
            cfg = OmegaConf.merge(OmegaConf.structured(config.RunConfig), saved)
        except OmegaConfBaseException as error:
            raise ConfigError(f"the config saved in {path} does not fit this metarun: {one_line(error)}") from None
        OmegaConf.set_struct(cfg, True)
        return cfg, str(path)
    raise ConfigError(f"{run_dir} has no saved config (.hydra/config.yaml, results.json or checkpoints/last.pt)")


def compose_default(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/config.yaml composed as the metarun command composes it, with ``overrides``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def compose_group(group: str, choice: str) -> DictConfig:
    """The config of option ``choice`` of ``group`` (``dataset``, ``omniglot``) as the metarun
    command composes it (its own defaults list included), from ``conf/``."""
    from hydra.errors import HydraException

    try:
        composed = compose_default([f"{group}={choice}"])
    except HydraException as error:
        options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
        raise ConfigError(f"{group}={choice}: {one_line(error)}; options: {', '.join(options)}") from None
    return OmegaConf.create(OmegaConf.to_container(composed[group], resolve=False))


def _raw(node: DictConfig, key: str) -> Any:
    """The value at ``key`` of ``node`` as the config writes it (an interpolation stays one)."""
    return OmegaConf.to_container(node, resolve=False)[key]


def fill_new_settings(cfg: DictConfig, choices: dict[str, str | None]) -> None:
    """Settings that the run's metarun did not have yet, in place: keys the schema or a chosen
    group's option (``choices``) gained since take today's default from ``conf/``; the saved
    values are never changed. Logged, since the run itself never read them."""
    chosen = [f"{group}={choice}" for group, choice in choices.items() if choice is not None]
    missing = sorted(OmegaConf.missing_keys(cfg))
    if not missing and not chosen:
        return
    from hydra.errors import HydraException

    try:
        today = compose_default(chosen)
    except HydraException as error:  # an option renamed since: fill the top level only
        log.info("conf/ no longer composes the run's choices (%s); only top-level defaults are filled", one_line(error))
        today = compose_default()
        chosen = []
    added = []
    for key in missing:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(today, parent_key) if parent_key else today
        if isinstance(parent, DictConfig) and leaf in parent.keys() and not OmegaConf.is_missing(parent, leaf):
            OmegaConf.update(cfg, key, _raw(parent, leaf), merge=False)
            added.append(key)
    for group in (line.split("=", 1)[0] for line in chosen):
        node, fresh = cfg.get(group), today.get(group)
        if not isinstance(node, DictConfig) or not isinstance(fresh, DictConfig) or \
                node.get("_target_") != fresh.get("_target_"):
            continue
        with open_dict(node):
            for key in fresh.keys():
                if key not in node.keys():
                    node[key] = _raw(fresh, key)
                    added.append(f"{group}.{key}")
    if added:
        log.info("the run's config has no %s (saved by an older metarun): using today's defaults from conf/",
                 ", ".join(added))


def _exists(cfg: DictConfig, key: str) -> bool:
    parent_key, _, leaf = key.rpartition(".")
    try:
        parent = OmegaConf.select(cfg, parent_key, throw_on_missing=True) if parent_key else cfg
    except OmegaConfBaseException:
        return False
    return isinstance(parent, DictConfig) and leaf in parent.keys()


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], choices: dict[str, str | None]) -> None:
    """Hydra-style overrides on the saved config, in place: ``key=value`` (the key must exist),
    ``+key=value`` (add), ``++key=value`` (add or set), ``~key`` (delete), ``group=option``
    (replace the group's node by that option of ``conf/``; ``backbone=null`` or ``~backbone``
    removes it; ``experiment`` presets, which rewrite the whole run, are refused). ``choices``
    (group -> option) is updated with the groups swapped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as error:  # noqa: BLE001 - Hydra's parse errors are several lines
        raise ConfigError(f"cannot parse the overrides {' '.join(overrides)}: {one_line(error)}") from None
    for override in parsed:
        key, line = override.key_or_group, override.input_line
        if override.package is not None or key.startswith("hydra") or key == "experiment":
            raise ConfigError(f"{line}: metarun-eval applies key and group overrides to the run's saved config; "
                              f"{'experiment presets' if key == 'experiment' else 'this override'} cannot be "
                              f"applied to it (override the keys themselves)")
        if override.is_sweep_override():
            raise ConfigError(f"{line}: metarun-eval scores one configuration; run it once per value")
        value = override.value()
        try:
            if key in GROUPS:
                cfg[key] = None if override.is_delete() or value is None else compose_group(key, str(value))
                choices[key] = None if cfg[key] is None else str(value)
            elif override.is_delete():
                if not _exists(cfg, key):
                    raise ConfigError(f"{line}: the run's config has no key {key}")
                parent_key, _, leaf = key.rpartition(".")
                parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
                with open_dict(parent):
                    del parent[leaf]
            elif override.is_add() or override.is_force_add():
                if override.is_add() and _exists(cfg, key):
                    raise ConfigError(f"{line}: {key} is already in the run's config; set it with {key}=...")
                with open_dict(cfg):
                    OmegaConf.update(cfg, key, value, merge=True)
            else:
                if not _exists(cfg, key):
                    raise ConfigError(f"{line}: the run's config has no key {key} (add a new key with +{key}=...)")
                OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as error:
            raise ConfigError(f"{line}: {one_line(error)}") from None


def eval_config(saved: DictConfig, overrides: Sequence[str], choices: dict[str, str | None]) -> DictConfig:
    """The saved config with the training task shape pinned to the run's values and ``overrides``
    applied, checked like a run's config."""
    cfg = copy.deepcopy(saved)
    overridden = {line.lstrip("~+").split("=", 1)[0] for line in overrides}
    for key in TRAINING_SHAPE:
        if key not in overridden:
            try:
                cfg[key] = int(cfg[key])
            except OmegaConfBaseException as error:
                raise ConfigError(f"the run's {key} cannot be read: {one_line(error)}") from None
    fill_new_settings(cfg, choices)
    apply_overrides(cfg, overrides, choices)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"the run's saved config has no value for {', '.join(missing)}, and conf/ has no default "
                          f"for it; pass {missing[0]}=...")
    config.validate(cfg)  # also resolves every interpolation (one line if one does not fit)
    return cfg


def saved_choices(run_dir: Path) -> dict[str, str | None]:
    """The config groups the run chose (``.hydra/hydra.yaml``), for W&B tags; empty when unknown."""
    try:
        choices = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices
        return {group: choices.get(group) for group in GROUPS}
    except Exception:  # noqa: BLE001 - tags are a courtesy
        return {}


def run_group(run_dir: Path, cfg: DictConfig) -> str | None:
    """The run's W&B group: ``wandb.group`` when the run set it, else the sweep's group, named as
    :func:`metarun.cli.wandb_defaults` names it (a sweep's jobs live in ``<sweep dir>/<job>``)."""
    if cfg.wandb.get("group"):
        return cfg.wandb.group
    try:
        multirun = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.mode == "MULTIRUN"
    except Exception:  # noqa: BLE001 - no hydra.yaml: not a sweep's job as far as we can tell
        multirun = False
    sweep = run_dir.resolve().parent
    return f"sweep-{sweep.parent.name}-{sweep.name}" if multirun else None


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def top_members(run_dir: Path) -> list[Path]:
    """The run's kept top-k checkpoints, best first, as the run tested them: the order of
    ``results.json``'s ``tested_iterations``, else of ``last.pt``'s run state (an interrupted run),
    else by file name. The order matters: the ensemble sums the members' predictions in it."""
    ckpt = run_dir / "checkpoints"
    iterations: list[int] | None = None
    if (run_dir / "results.json").is_file():
        try:
            iterations = list(json.loads((run_dir / "results.json").read_text())["tested_iterations"])
        except Exception:  # noqa: BLE001 - fall through to the other sources
            iterations = None
    if iterations is None and (ckpt / "last.pt").is_file():
        try:
            iterations = [int(i) for _, i in checkpoint.safe_load(ckpt / "last.pt")["state"]["top"]]
        except Exception:  # noqa: BLE001
            iterations = None
    members = ([loop.top_checkpoint(ckpt, i) for i in iterations] if iterations
               else sorted(ckpt.glob("top/*.pt")))
    if not members or not (ckpt / "top").is_dir():
        raise CheckpointError(f"{run_dir} kept no top-k checkpoints (checkpoints/top/; a run keeps them with "
                              f"eval.top_k > 1); use --checkpoint best or last")
    for path in members:
        if not path.is_file():
            raise CheckpointError(f"{path}, a member of the run's top-k ensemble, is missing")
    return members


def checkpoint_paths(run_dir: Path, which: str) -> list[Path]:
    if which == "top":
        return top_members(run_dir)
    path = run_dir / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        hint = {"best": "the run has not validated yet: --checkpoint last scores checkpoints/last.pt",
                "last": "--checkpoint best scores checkpoints/best.pt"}[which]
        raise CheckpointError(f"{path} not found; {hint}")
    return [path]


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
    state = saved.get("state")
    return saved.get("iteration", state.get("iteration") if isinstance(state, dict) else None)


# ----------------------------------------------------------------------------------------------
# Episodes files
# ----------------------------------------------------------------------------------------------


@dataclass
class Episode:
    """One episode of an episodes file: image indices into :attr:`EpisodeSet.images` and labels."""

    line: int
    support_index: list[int]
    support_y: list[int]
    query_index: list[int]
    query_y: list[int]
    ways: int
    name: str | None = None


class EpisodeSet:
    """The episodes of a file, each image decoded once (``[M, C, S, S]`` float on the device);
    :class:`metarun.tasks.FixedTasks` materialises them through :meth:`materialise` like any
    sampler's fixed tasks."""

    def __init__(self, images: torch.Tensor, episodes: list[Episode]) -> None:
        self.images = images
        self.episodes = episodes

    def fixed_tasks(self) -> FixedTasks:
        device = self.images.device
        drawn = [tuple(torch.tensor(v, dtype=torch.int64, device=device)
                       for v in (e.support_index, e.support_y, e.query_index, e.query_y)) + (e.ways,)
                 for e in self.episodes]
        return FixedTasks(self, drawn)  # type: ignore[arg-type]  (a Sampler's materialise is all it uses)

    def materialise(self, support_index: torch.Tensor, support_y: torch.Tensor, query_index: torch.Tensor,
                    query_y: torch.Tensor, ways: int) -> Task:
        return Task(support=TaskSplit(self.images.index_select(0, support_index), support_y, ways),
                    query=TaskSplit(self.images.index_select(0, query_index), query_y, ways))


def _pairs(value: Any, where: str, side: str) -> list[tuple[str, int]]:
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: \"{side}\" must be a non-empty list of [path, label] pairs")
    pairs = []
    for item in value:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str) or not item[0]
                or not isinstance(item[1], int) or isinstance(item[1], bool) or item[1] < 0):
            raise DatasetError(f"{where}: every {side} entry must be [path, label] with a path string and a label "
                               f"int >= 0, got {json.dumps(item)}")
        pairs.append((item[0], item[1]))
    return pairs


def parse_episodes(path: Path, min_ways: int) -> list[tuple[int, list[tuple[str, int]], list[tuple[str, int]], Any]]:
    """The episodes of a JSON-lines file, checked: ``(line, support pairs, query pairs, name)``.

    The format (README, "Evaluating a checkpoint"): one episode per line,
    ``{"support": [[path, label], ...], "query": [[path, label], ...]}``, optionally ``"name"``;
    blank lines are skipped. Labels of an N-way episode are 0..N-1: every class has the same
    number of support images (K-shot), and every query label has support images.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DatasetError(f"episodes file {path} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read the episodes file {path}: {one_line(error)}") from None
    episodes = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{where} is not a JSON object ({error.msg} at column {error.colno}); an episodes file "
                               f"holds one {{\"support\": [[path, label], ...], \"query\": [...]}} per line") from None
        if not isinstance(record, dict) or not {"support", "query"} <= record.keys():
            raise DatasetError(f"{where}: an episode is an object with \"support\" and \"query\" lists")
        unknown = sorted(record.keys() - {"support", "query", "name"})
        if unknown:
            raise DatasetError(f"{where}: unknown key {unknown[0]!r}; an episode has support, query and name")
        support, query = _pairs(record["support"], where, "support"), _pairs(record["query"], where, "query")
        counts = np.bincount([label for _, label in support])
        ways = len(counts)
        if (counts == 0).any():
            missing = [c for c in range(ways) if counts[c] == 0]
            raise DatasetError(f"{where}: support labels must be 0..N-1 with every class present; label {missing[0]} "
                               f"has no support image (labels up to {ways - 1})")
        if len(set(counts.tolist())) > 1:
            raise DatasetError(f"{where}: every class needs the same number of support images (N-way K-shot), got "
                               f"{dict(enumerate(counts.tolist()))}")
        if ways < min_ways:
            raise DatasetError(f"{where}: an episode needs >= {min_ways} classes, got {ways}")
        stray = sorted({label for _, label in query if label >= ways})
        if stray:
            raise DatasetError(f"{where}: query label {stray[0]} has no support images (support labels 0..{ways - 1})")
        episodes.append((number, support, query, record.get("name")))
    if not episodes:
        raise DatasetError(f"episodes file {path} holds no episodes")
    return episodes


def image_loader(cfg: DictConfig) -> Callable[[Path, int], np.ndarray]:
    """The dataset module's public ``load_image(path, image_size)``: how its loader turns an image
    file into one of its images (uint8 ``[C, S, S]``)."""
    target = str(cfg.dataset.get("_target_", ""))
    module_name = target.rpartition(".")[0]
    try:
        load = getattr(importlib.import_module(module_name), "load_image", None) if module_name else None
    except ImportError as error:
        raise ConfigError(f"cannot import the dataset module {module_name}: {one_line(error)}") from None
    if load is None or "image_size" not in cfg.dataset:
        raise ConfigError(f"--episodes needs an image dataset whose module reads image files (load_image); "
                          f"{target or 'this dataset'} has none (e.g. dataset=glyphs or dataset=omniglot)")
    return load


def read_episodes(path: Path, cfg: DictConfig, device: torch.device, min_ways: int) -> EpisodeSet:
    """The episodes of ``path`` with their images, decoded by the dataset module's ``load_image`` at
    ``dataset.image_size`` and made model inputs by :func:`metarun.tasks.image_tensor`, as the
    samplers make them. Image paths are relative to the file's folder (or absolute)."""
    parsed = parse_episodes(path, min_ways)
    load = image_loader(cfg)
    image_size, channels = int(cfg.dataset.image_size), cfg.dataset.get("channels")
    index: dict[Path, int] = {}
    episodes = []
    for number, support, query, name in parsed:
        indices = {}
        for side, pairs in (("support", support), ("query", query)):
            positions = []
            for image, _ in pairs:
                file = (path.parent / image).resolve()
                if not file.is_file():
                    raise DatasetError(f"{path} line {number}: image {image} not found ({file}); paths are relative "
                                       f"to the episodes file's folder")
                positions.append(index.setdefault(file, len(index)))
            indices[side] = positions
        episodes.append(Episode(number, indices["support"], [label for _, label in support], indices["query"],
                                [label for _, label in query], max(label for _, label in support) + 1, name))
    arrays = []
    for file in index:
        array = np.asarray(load(file, image_size))
        expected = (channels if channels is not None else array.shape[0], image_size, image_size)
        if array.shape != expected or array.dtype != np.uint8:
            raise DatasetError(f"{file} decodes to {array.dtype} {array.shape}, not the dataset's uint8 {expected}")
        arrays.append(array)
    images = image_tensor(torch.from_numpy(np.stack(arrays)), device)
    log.info("%d episodes, %d images from %s", len(episodes), len(arrays), path)
    return EpisodeSet(images, episodes)


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------


def default_name(which: str, source: str, overrides: Sequence[str]) -> str:
    """``best-test``, ``top-episodes_mine``, ``best-test-ways=3``: the checkpoint, what was scored,
    and the overrides that change the tasks or the model (not paths or how the job runs)."""
    shown = sorted(o for o in overrides if not o.lstrip("~+").startswith(config.JOB_KEYS))
    name = "-".join([which, source, *([",".join(shown)] if shown else [])])
    return re.sub(r"[^\w.,=+~\[\]-]", "_", name)[:200]


def check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"--name {name!r} must be a plain folder name (no /, not starting with .)")
    return name


def per_task_records(evaluation: loop.Evaluation, episodes: EpisodeSet | None) -> list[dict[str, Any]]:
    """One record per task: its query loss and accuracy after each adaptation step (and, for an
    episodes file, the episode's line, name, ways and sizes)."""
    records = []
    for t in range(evaluation.loss.shape[0]):
        record: dict[str, Any] = {"task": t}
        if episodes is not None:
            e = episodes.episodes[t]
            record.update({"line": e.line, **({"name": e.name} if e.name is not None else {}), "ways": e.ways,
                           "support": len(e.support_y), "query": len(e.query_y)})
        record["loss"] = evaluation.loss[t].tolist()
        if evaluation.accuracy is not None:
            record["acc"] = evaluation.accuracy[t].tolist()
        records.append(record)
    return records


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
    which = request.checkpoint or ("top" if cfg.eval.top_k > 1 else "best")  # what the run tested
    if which not in CHECKPOINTS:
        raise ConfigError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
    paths = checkpoint_paths(run_dir, which)
    episodes_file = Path(request.episodes).expanduser().resolve() if request.episodes is not None else None
    source = request.split if episodes_file is None else f"episodes_{episodes_file.stem}"
    name = check_name(request.name if request.name is not None else default_name(which, source, request.overrides))
    output_dir = run_dir / "eval" / name
    if output_dir.exists():
        raise ConfigError(f"{output_dir} already exists: an evaluation named {name!r} was written before; choose "
                          f"another --name, or delete it")

    trained_ways = int(cfg.train_ways)
    configure_cpu(cfg.threads, cfg.keep_freed_memory)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)

    episodes = None
    if episodes_file is not None:
        objective: Objective = Classification()
        episodes = read_episodes(episodes_file, cfg, device, objective.min_ways)
        tasks = episodes.fixed_tasks()
        cfg.ways = max(e.ways for e in episodes.episodes)  # what the build passes the algorithm as ``ways``
        asked = f"the episodes of {episodes_file} have up to {cfg.ways} classes (labels 0..{cfg.ways - 1})"
    else:
        # The run's own data path: the same seeds draw the same fixed tasks.
        _, val_tasks, test_tasks, objective = build_data(cfg, device)
        tasks = {"val": val_tasks, "test": test_tasks}[request.split]
        asked = f"ways={cfg.ways}"
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
    algorithm.on_iteration(max(cfg.iterations - 1, 0), cfg.iterations)  # the schedules as the run ended (its test)
    built = f"algorithm={choices.get('algorithm') or target}, backbone=" + (
        str(choices.get("backbone") or (cfg.backbone or {}).get("_target_")))
    iterations = [load_weights(path, algorithm, built) for path in paths]

    log.info("scoring %s of %s on %s (%d tasks)", which, run_dir, source, len(tasks))
    if which == "top":
        evaluation = loop.evaluate_ensemble(algorithm, paths, tasks, objective, cfg.eval.bn_batch_stats, cfg.eval.ci_z)
        model = f"ensemble of the top-{len(paths)} checkpoints, iterations {', '.join(map(str, iterations))}"
    else:
        evaluation = loop.evaluate(algorithm, tasks, cfg.eval.bn_batch_stats, cfg.eval.ci_z, objective.loss_metric)
        model = f"checkpoints/{which}.pt, iteration {iterations[0]}"
    label = "episodes" if episodes is not None else request.split
    curves = {label: evaluation.curves()}  # as the run's results.json holds a split's curves

    try:
        output_dir.mkdir(parents=True)
    except FileExistsError:
        raise ConfigError(f"{output_dir} was written meanwhile by another evaluation; choose another --name") from None
    except OSError as error:
        raise ConfigError(f"cannot create {output_dir}: {error.strerror or one_line(error)}") from None
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
    if episodes is None:
        tags.append(f"{cfg.ways}w{cfg.shots}s")
    tracker = build_tracker(tracker_cfg, output_dir, {
        "group": run_group(run_dir, cfg), "job_type": "eval", "name": f"{run_dir.name}/eval/{name}", "tags": tags,
    })
    tracker.log_adaptation(curves)
    with (output_dir / "tasks.jsonl").open("w") as f:
        for record in per_task_records(evaluation, episodes):
            f.write(json.dumps(record) + "\n")
    results: dict[str, Any] = {
        "run_dir": str(run_dir.resolve()),
        "config_source": config_source,
        "checkpoint": which,
        "checkpoints": [str(p.resolve()) for p in paths],
        "checkpoint_iterations": iterations,
        "model": model,
        "split": label,
        "episodes": str(episodes_file) if episodes_file else None,
        "overrides": list(request.overrides),
        "eval_tasks": len(tasks),
        "eval_inner_steps": algorithm.eval_inner_steps,
        "device": str(device),
        "output_dir": str(output_dir),
        "curves": curves,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    results.update(loop.final_values(label, curves[label]))  # test/acc_mean, ..., as in the run's results.json
    tracker.finish(results)
    if not cfg.console:
        print(final_line(results), flush=True)
    return results


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad argument as one line ``metarun: error: ...`` and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(f"{message} (metarun-eval --help)")


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
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default=None,
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


if __name__ == "__main__":
    main()
