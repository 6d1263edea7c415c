"""A run's config rebuilt from its directory, for ``metarun-eval``.

The config comes from ``RUN_DIR/checkpoints/last.pt`` (the config saved with the weights), else
``RUN_DIR/.hydra/config.yaml`` (which Hydra writes into every job directory), else the ``config`` of
``results.json``, on the run schema. Settings that metarun gained after the run was saved take today's defaults from ``conf/``
(:func:`fill_new_settings`); Hydra-style overrides go on top (:func:`apply_overrides`); the training
task shape stays the run's (:func:`eval_config`).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from metarun import checkpoint, config
from metarun.commands import CONFIG_DIR, GROUPS
from metarun.errors import CheckpointError, ConfigError, one_line

log = logging.getLogger(__name__)

# The training task shape decides the model (a gradient method's head has train_ways outputs): it
# stays the run's unless an override names it, even where the saved config reads ``${ways}``.
TRAINING_SHAPE = ("train_ways", "train_shots", "train_query_shots")


def read_saved_config(run_dir: Path) -> tuple[DictConfig, str]:
    """The run's config and where it came from: ``checkpoints/last.pt``'s (unresolved, saved with the
    weights: the config that trained them, even when ``.hydra/`` was rewritten since or a resume changed
    it; ``best.pt`` holds weights only), else ``.hydra/config.yaml`` (unresolved, as the run composed it),
    else ``results.json``'s (resolved), on the run schema (types checked, unknown keys refused)."""
    sources: list[tuple[Path, Callable[[Path], Any]]] = [
        (checkpoint.last_file(checkpoint.folder(run_dir)), lambda p: checkpoint.safe_load(p).get("config")),
        (run_dir / ".hydra" / "config.yaml", lambda p: OmegaConf.to_container(OmegaConf.load(p))),
        (run_dir / "results.json", lambda p: json.loads(p.read_text())["config"]),
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
        if saved is None or (isinstance(saved, dict) and not saved):
            continue  # nothing saved there (an empty file, a checkpoint without its config): the next source
        if not isinstance(saved, dict):
            raise ConfigError(f"the config saved in {path} is a {type(saved).__name__}, not a mapping of settings; "
                              f"restore the run's config there, or delete the file to use the next saved one")
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
