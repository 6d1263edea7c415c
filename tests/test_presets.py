"""Experiment presets: what each one resolves to is pinned, and each holds only its own differences.

``tests/data/presets_resolved.json`` is every ``conf/experiment`` preset composed as a user gets it
(``experiment=<name>``, no other override) and resolved to plain values. It was written from the
presets as they were before they were rewritten as deltas (variants extending their paper preset,
no restated group values), so the rewrite is shown to change no resolved value; from then on it
catches any unintended change to a preset, a group option or conf/config.yaml that reaches a paper
protocol. Values that depend on the machine are left out of it: ``device`` and ``resume`` read
``$METARUN_DEVICE`` and ``$METARUN_RESUME``, which are unset while composing; no preset holds a path
under the checkout or ``$HOME`` (the dataset roots are relative, the caches ``null``).

After an intended change, write the snapshot again and review its diff:

    .venv/bin/python tests/test_presets.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import metarun.config  # noqa: F401  (registers the run_schema that conf/config.yaml starts from)

CONF = Path(__file__).resolve().parents[1] / "conf"
SNAPSHOT = Path(__file__).resolve().parent / "data" / "presets_resolved.json"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
MACHINE_ENV = ("METARUN_DEVICE", "METARUN_RESUME")  # read by conf/config.yaml's device and resume


def resolved(name: str, conf: Path = CONF) -> dict:
    """``experiment=name`` as plain, resolved values, through a JSON round trip (int keys become strings)."""
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={name}"], return_hydra_config=False)
    return json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True)))


def unresolved(name: str, conf: Path) -> dict:
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={name}"], return_hydra_config=False)
    return OmegaConf.to_container(cfg, resolve=False)


@pytest.fixture(autouse=True)
def no_machine_env(monkeypatch):
    for var in MACHINE_ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def snapshot() -> dict:
    return json.loads(SNAPSHOT.read_text())


def test_the_snapshot_has_every_preset(snapshot):
    """A new preset is added to the snapshot (run this file as a script), a removed one leaves it."""
    assert sorted(snapshot) == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_preset_resolves_to_its_snapshot(snapshot, name):
    if name not in snapshot:
        pytest.skip(f"{name} is not in {SNAPSHOT.name} yet")
    assert resolved(name) == snapshot[name]


# ----------------------------------------------------------------------------------------------
# Presets extend, never copy
# ----------------------------------------------------------------------------------------------


def own_values(name: str) -> dict:
    values = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml"))
    values.pop("defaults", None)
    return values


def leaves(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "paper":
            yield from leaves(value, (*prefix, key))
        elif key == "paper" and isinstance(value, dict):  # paper is null in conf/config.yaml: compare its keys
            yield from (((*prefix, key, k), v) for k, v in value.items())
        else:
            yield (*prefix, key), value


def lookup(tree, path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return KeyError  # a sentinel no config value equals
        tree = tree[key]
    return tree


@pytest.fixture(scope="module")
def conf_copy(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("conf") / "conf"
    shutil.copytree(CONF, copy)
    return copy


@pytest.mark.parametrize("name", PRESETS)
def test_preset_holds_only_its_differences(conf_copy, name):
    """Every value a preset sets differs from what it would get without it: from its group options and
    conf/config.yaml, or, for a variant, from the preset it extends. Compared as written (a preset's
    ``train_query_shots: 1`` beside ``query_shots: 1`` is kept: it pins the training value, where the
    config's ``${query_shots}`` would follow a ``query_shots=`` override)."""
    text = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(text) if line.startswith("defaults:"))
    end = next((i for i in range(start + 1, len(text)) if not text[i].startswith("  - ")), len(text))
    reference = f"_reference_{name}"  # the same defaults list and nothing else
    (conf_copy / "experiment" / f"{reference}.yaml").write_text("\n".join(["# @package _global_", *text[start:end]]))
    base = unresolved(reference, conf_copy)
    restated = [".".join(map(str, path)) for path, value in leaves(own_values(name)) if lookup(base, path) == value]
    assert not restated, f"{name} restates values it already gets: {restated}"


@pytest.mark.parametrize("name", [n for n in PRESETS if n.endswith("_code")])
def test_code_variant_extends_its_paper_preset(name):
    """``X_code`` is the paper preset X plus the authors' code's differences: ``defaults: [X, _self_]``."""
    defaults = OmegaConf.load(CONF / "experiment" / f"{name}.yaml").defaults
    assert list(defaults)[0] == name.removesuffix("_code") and list(defaults)[-1] == "_self_"


def write_snapshot() -> None:
    for var in MACHINE_ENV:
        os.environ.pop(var, None)
    presets = {name: resolved(name) for name in PRESETS}
    SNAPSHOT.parent.mkdir(exist_ok=True)
    SNAPSHOT.write_text(json.dumps(presets, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(presets)} presets to {SNAPSHOT}", file=sys.stderr)


if __name__ == "__main__":
    write_snapshot()
