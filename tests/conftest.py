"""Shared fixtures: a tiny composed config, seeds, one thread, and a per-session data cache."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import metarun.config  # noqa: F401  (registers the run_schema that conf/config.yaml starts from)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHARED_DATA = REPO.parent / "shared" / "data"
OMNIGLOT_TAR = SHARED_DATA / "omniglot" / "omniglot_standard.tar.gz"

# Tests share helpers with the measurement scripts (e.g. the glyphs 1-NN baseline).
sys.path.insert(0, str(REPO / "scripts"))

# A run that takes seconds: a small generated dataset, two iterations, no W&B, no console.
TINY_GLYPHS = ["dataset.num_alphabets=4", "dataset.characters_per_alphabet=10", "dataset.split_sizes=[20,10,-1]"]
TINY = [  # plus TINY_GLYPHS when the dataset is the default
    "iterations=2",
    "meta_batch_size=2",
    "eval.tasks=4",
    "eval.val_tasks=4",
    "eval_every=1",
    "checkpoint_every=1",
    "wandb.mode=disabled",
    "console=false",
    "device=cpu",
]


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated and decoded datasets are cached once per test session, never in the user's cache."""
    cache = tmp_path_factory.mktemp("metarun-cache")
    os.environ["METARUN_CACHE"] = str(cache)
    os.environ["WANDB_MODE"] = "disabled"
    return cache


@pytest.fixture(autouse=True)
def deterministic() -> None:
    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def compose_cfg():
    """``compose_cfg(*overrides)``: conf/config.yaml with the TINY overrides (and a tiny glyphs
    dataset unless another dataset is chosen), then ``overrides``."""

    def _compose(*overrides: str):
        other_data = any(o.startswith(("dataset=", "experiment=")) for o in overrides)
        tiny = TINY if other_data else [*TINY_GLYPHS, *TINY]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=[*tiny, *overrides])

    return _compose


def backbone(name: str = "conv4", **options):
    """``conf/backbone/<name>.yaml`` built on the glyphs' images (its ``${dataset.*}``), ``options`` replacing
    its values: the networks' values live in the config only (the constructors have no defaults for them)."""
    cfg = OmegaConf.create({"dataset": OmegaConf.load(CONF / "dataset" / "glyphs.yaml"),
                            "backbone": metarun.config.option_values("backbone", name)})
    return instantiate(cfg.backbone, _convert_="all", **options)


def glyphs_options(**overrides) -> dict:
    """The arguments of ``metarun.data.glyphs.load_glyphs``: conf/dataset/glyphs.yaml's values, ``overrides``
    replacing some (the loader has no defaults: its values live in the config)."""
    values = OmegaConf.to_container(OmegaConf.load(CONF / "dataset" / "glyphs.yaml"))
    del values["_target_"]
    values.pop("defaults", None)  # what the dataset brings to other groups (sinusoid: its backbone)
    return {**values, **overrides}


def glyph_generation_options(**overrides) -> dict:
    """The arguments of ``metarun.data.glyphs.generate_glyphs``, as :func:`glyphs_options`."""
    from metarun.data.glyphs import generate_glyphs

    names = inspect.signature(generate_glyphs).parameters
    return {key: value for key, value in glyphs_options(**overrides).items() if key in names}


def dataset_options(name: str, **overrides) -> dict:
    """The arguments of ``conf/dataset/<name>.yaml``'s ``_target_``: the file's values, ``overrides`` replacing
    some (the loaders have no defaults for what the config sets: its values live in the config)."""
    values = OmegaConf.to_container(OmegaConf.load(CONF / "dataset" / f"{name}.yaml"))
    del values["_target_"]
    values.pop("defaults", None)  # what the dataset brings to other groups (sinusoid: its backbone)
    return {**values, **overrides}


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m metarun ARGS`` in a subprocess, as a user would run it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "metarun", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def omniglot_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """../shared's Omniglot tarball, extracted once per session; skips when it is absent."""
    if not OMNIGLOT_TAR.is_file():
        pytest.skip(f"real Omniglot not found at {OMNIGLOT_TAR}")
    import tarfile

    root = tmp_path_factory.mktemp("omniglot")
    with tarfile.open(OMNIGLOT_TAR) as tar:
        tar.extractall(root, filter="data")
    return root


@contextlib.contextmanager
def float64():
    """Float64 as torch's default dtype inside the block (exact comparisons of two computations)."""
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


def one_line_error(proc: subprocess.CompletedProcess, *expected: str) -> None:
    """``proc`` failed as a user error should: exit 2, one ``metarun: error:`` line holding ``expected``."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metarun: error: "), proc.stderr
    for part in expected:
        assert part in lines[0], lines[0]


def tiny(*extra: str) -> list[str]:
    """The tiny test run's command line; on the small generated dataset unless ``extra`` picks another."""
    other_data = any(o.startswith("dataset=") for o in extra)
    return [*TINY, *extra] if other_data else [*TINY_GLYPHS, *TINY, *extra]


def fingerprint(folder: Path) -> dict[str, str]:
    """Everything below ``folder``: the SHA-256 of every file's bytes, and every folder (empty ones too)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run (MAML on tiny glyphs) made by the command: it has .hydra/ and metarun.log."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = run_cli(*tiny(f"hydra.run.dir={out}"), cwd=out.parent)
    assert proc.returncode == 0, proc.stderr
    return out
