"""The Omniglot challenge's one-shot protocol (Lake et al. 2015; Lake, Salakhutdinov & Tenenbaum 2019):
``dataset=omniglot_challenge`` and ``experiment=protonet_omniglot_challenge``.

Train on the background alphabets with rotated characters as extra classes, validate on background alphabets
held out whole, test 20-way 1-shot tasks drawn within one evaluation alphabet, never rotated. The fast tests
use a tiny fake Omniglot whose alphabets carry real names (the split reads which alphabets are the evaluation
ones from their names); the tests marked ``data`` use the real dataset from ``../shared/data`` and skip when
it is absent.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from conftest import CONF, TINY, run_cli
from metarun.build import build_data
from metarun.data.base import ClassSplits
from metarun.data.omniglot import EVALUATION_ALPHABETS
from test_data_omniglot import _write_fake_folders

ROTATED = re.compile(r"/rot\d{3}$")

# The real dataset: 964 background characters in 30 alphabets, 659 evaluation characters in 20. The 5 validation
# alphabets that split_seed 1 holds out: 160 characters, which leaves 25 alphabets, 804 characters, to train.
BACKGROUND, EVALUATION = 964, 659
VAL_ALPHABETS = {"Cyrillic", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)", "Sanskrit"}
VAL_CHARACTERS = 160
TRAIN_CHARACTERS = BACKGROUND - VAL_CHARACTERS  # 804, x 4 rotations = 3216 training classes


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def base_name(class_name: str) -> str:
    """``Alphabet/characterNN`` of ``Alphabet/characterNN/rotNNN``."""
    return ROTATED.sub("", class_name)


def check_protocol(splits: ClassSplits, background: set[str], evaluation: set[str]) -> None:
    """What the challenge's split is, whatever the data: by alphabet, rotations in train only, within-alphabet
    evaluation tasks."""
    train, val, test = splits.train, splits.val, splits.test
    assert set(train.groups) <= background and set(val.groups) <= background
    assert not set(train.groups) & set(val.groups), "a validation alphabet is also trained on"
    assert set(test.groups) == evaluation, "the test split is every evaluation alphabet and nothing else"
    # Rotations: every training character in its 4 orientations; no rotated (or renamed) class elsewhere.
    assert all(ROTATED.search(name) for name in train.class_names)
    assert sorted(name.rsplit("/", 1)[1] for name in train.class_names) == sorted(
        f"rot{a:03d}" for a in (0, 90, 180, 270) for _ in range(train.num_classes // 4))
    assert not any(ROTATED.search(name) for name in (*val.class_names, *test.class_names))
    characters = [{base_name(n) for n in part.class_names} for part in (train, val, test)]
    assert not (characters[0] & characters[1] or characters[0] & characters[2] or characters[1] & characters[2])
    assert set(splits.within_group) == {"val", "test"}


def task_alphabets(tasks, split) -> list[set[str]]:
    """The alphabets of each fixed task's classes (the tasks' image indices -> the split's classes -> groups)."""
    out = []
    for index, _ in tasks.drawn:
        out.append({split.groups[int(c)] for c in split.labels[index.cpu()].tolist()})
    return out


# A tiny Omniglot with real alphabet names: 3 background alphabets, 2 evaluation ones.
FAKE = {
    "images_background": {"Latin": 4, "Greek": 3, "Korean": 3},
    "images_evaluation": {"Angelic": 3, "Tengwar": 3},
}
DRAWINGS = 6  # a 60-way-style training task needs 1 shot + 5 queries


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("omniglot-challenge")
    _write_fake_folders(root, FAKE, DRAWINGS)
    return root


# The fake's task shape: 3-way tasks (the smallest alphabets have 3 characters), 6-way training tasks.
FAKE_TASKS = ["dataset.val_alphabets=1", "ways=3", "train_ways=6"]


# ----------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------


def test_the_challenge_extends_omniglot_and_sets_only_the_protocol(compose_cfg):
    """dataset=omniglot_challenge is omniglot with the protocol's four values; everything else (image size,
    cache, root, seed) comes from conf/dataset/omniglot.yaml, so each default lives in one place."""
    omniglot = OmegaConf.to_container(compose_cfg("dataset=omniglot").dataset)
    challenge = OmegaConf.to_container(compose_cfg("dataset=omniglot_challenge").dataset)
    protocol = {"split": "alphabets", "val_alphabets": 5, "rotations": "train", "within_group": "eval"}
    assert challenge == {**omniglot, **protocol}
    own = OmegaConf.to_container(OmegaConf.load(CONF / "dataset" / "omniglot_challenge.yaml"))
    assert own.pop("defaults") == ["omniglot", "_self_"]
    assert own.pop("_target_") == omniglot["_target_"]
    assert own == protocol, "the challenge file restates or adds values beyond the protocol"


def preset() -> DictConfig:
    """``experiment=protonet_omniglot_challenge`` as a user gets it (no test overrides)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["experiment=protonet_omniglot_challenge"])


def test_the_preset_is_protonet_60_way_training_and_20_way_one_shot_tests():
    cfg = preset()
    assert cfg.dataset.split == "alphabets" and cfg.dataset.image_size == 28
    assert cfg.algorithm._target_.endswith("ProtoNet")
    assert (cfg.ways, cfg.shots, cfg.query_shots) == (20, 1, 1)  # Lake's runs: 20 classes, one test image each
    assert (cfg.train_ways, cfg.train_shots, cfg.train_query_shots) == (60, 1, 5)  # Snell et al.
    assert cfg.iterations == 8000 and cfg.meta_batch_size == 1
    paper = OmegaConf.to_container(cfg.paper)
    assert paper["metric"] == "acc" and paper["mean"] == 95.5
    assert {r["acc"] for r in paper["references"]} == {95.5, 96.7, 92.0}
    assert all(math.isclose(r["acc"] + r["error"], 100) for r in paper["references"])


# ----------------------------------------------------------------------------------------------
# A tiny fake Omniglot (default suite)
# ----------------------------------------------------------------------------------------------


def test_fake_omniglot_splits_and_tasks_follow_the_protocol(compose_cfg, fake_root, tmp_path):
    cfg = compose_cfg("experiment=protonet_omniglot_challenge", f"dataset.root={fake_root}",
                      f"dataset.cache_dir={tmp_path / 'cache'}", *FAKE_TASKS, "eval.tasks=30", "eval.val_tasks=30")
    splits = instantiate(cfg.dataset, _convert_="all")
    check_protocol(splits, set(FAKE["images_background"]), set(FAKE["images_evaluation"]))
    assert len(set(splits.val.groups)) == 1 and len(set(splits.train.groups)) == 2
    background_characters = sum(FAKE["images_background"].values())
    assert splits.train.num_classes == 4 * (background_characters - splits.val.num_classes)
    assert splits.test.num_classes == sum(FAKE["images_evaluation"].values())

    _, val, test, _ = build_data(cfg, torch.device("cpu"))
    test_alphabets = task_alphabets(test, splits.test)
    assert all(len(a) == 1 for a in test_alphabets), "a test task mixes alphabets"
    assert {a for (a,) in test_alphabets} == set(FAKE["images_evaluation"]), "tasks come from every alphabet"
    assert all(len(a) == 1 for a in task_alphabets(val, splits.val))


def test_fake_omniglot_runs_the_preset_end_to_end(fake_root, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("experiment=protonet_omniglot_challenge", f"dataset.root={fake_root}",
                   f"dataset.cache_dir={tmp_path / 'cache'}", *FAKE_TASKS, *TINY, "threads=1",
                   f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["test/acc_mean"] <= 1
    assert results["config"]["paper"]["mean"] == 95.5 and results["config"]["dataset"]["split"] == "alphabets"


# ----------------------------------------------------------------------------------------------
# The real Omniglot (../shared/data)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(omniglot_root: Path, data_cache: Path):
    """The preset on the real Omniglot: its config (200 test, 100 validation tasks), its splits, the parts'
    alphabets as the folders have them."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=protonet_omniglot_challenge", f"dataset.root={omniglot_root}",
            f"dataset.cache_dir={data_cache}", "eval.tasks=200", "eval.val_tasks=100", "device=cpu"])
    splits = instantiate(cfg.dataset, _convert_="all")
    parts = {part: {p.name for p in (omniglot_root / part).iterdir() if p.is_dir()}
             for part in ("images_background", "images_evaluation")}
    return cfg, splits, parts


@pytest.mark.data
def test_real_omniglot_challenge_splits(real):
    _, splits, parts = real
    assert len(parts["images_background"]) == 30 and len(parts["images_evaluation"]) == 20
    assert parts["images_evaluation"] == set(EVALUATION_ALPHABETS)
    check_protocol(splits, parts["images_background"], parts["images_evaluation"])

    train, val, test = splits.train, splits.val, splits.test
    assert set(val.groups) == VAL_ALPHABETS and len(set(train.groups)) == 25
    assert (train.num_classes, val.num_classes, test.num_classes) == (4 * TRAIN_CHARACTERS, VAL_CHARACTERS, EVALUATION)
    assert (train.num_classes, val.num_classes, test.num_classes) == (3216, 160, 659)
    assert len({base_name(n) for n in train.class_names}) + val.num_classes == BACKGROUND
    assert [part.images.shape[0] for part in (train, val, test)] == [3216 * 20, 160 * 20, 659 * 20]
    # Every validation alphabet has the 20 characters a 20-way within-alphabet task needs: none is skipped.
    assert min(val.groups.count(a) for a in VAL_ALPHABETS) >= 20
    # A rotated class is its character turned: 90 degrees of rot000 is rot090.
    name = train.class_names[0].rsplit("/", 1)[0]
    upright = train.images[train.labels == train.class_names.index(f"{name}/rot000")]
    turned = train.images[train.labels == train.class_names.index(f"{name}/rot090")]
    assert torch.equal(turned, torch.rot90(upright, k=1, dims=(2, 3)))


@pytest.mark.data
def test_real_omniglot_challenge_tasks_are_within_one_alphabet(real):
    cfg, splits, _ = real
    train, val, test, _ = build_data(cfg, torch.device("cpu"))
    assert len(test) == 200 and len(val) == 100
    for tasks, split in ((test, splits.test), (val, splits.val)):
        alphabets = task_alphabets(tasks, split)
        assert all(len(a) == 1 for a in alphabets), "an evaluation task mixes alphabets"
        for index, label in tasks.drawn:
            assert sorted(set(label.tolist())) == list(range(20)) and len(index) == 20 * 2  # 1 shot + 1 query
    assert len({a for (a,) in task_alphabets(test, splits.test)}) >= 15, "test tasks should spread over alphabets"
    task = test.sampler.materialise(*test.drawn[0])
    assert task.support.x.shape == (20, 1, 28, 28) and task.query.x.shape == (20, 1, 28, 28)
    # Training tasks are 60-way across alphabets, from the rotated training classes.
    task = train.sample()
    assert task.support.x.shape == (60, 1, 28, 28) and task.query.x.shape == (300, 1, 28, 28)
