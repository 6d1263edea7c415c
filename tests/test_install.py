"""The learn2learn wheel built by scripts/build_learn2learn_wheel.py, as installed."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import torch

from metarun._learn2learn import l2l


def test_learn2learn_requirements_were_patched():
    assert metadata.version("learn2learn") == "0.2.0"
    requires = metadata.requires("learn2learn") or []
    assert not any(r.startswith("gsutil") for r in requires)
    qpth = [r for r in requires if r.startswith("qpth")]
    assert qpth and all("extra ==" in r for r in qpth)  # optional, so numpy 2 can be installed


def test_nways_after_filterlabels_works_on_this_python():
    """Unpatched, random.sample gets a set here and raises 'Population must be a sequence' (Python >= 3.11)."""
    dataset = torch.utils.data.TensorDataset(torch.arange(60), torch.arange(60) % 10)
    meta = l2l.data.MetaDataset(dataset)
    taskset = l2l.data.TaskDataset(meta, task_transforms=[
        l2l.data.transforms.FilterLabels(meta, [1, 3, 5, 7]),
        l2l.data.transforms.NWays(meta, 3),
        l2l.data.transforms.KShots(meta, 2),
        l2l.data.transforms.LoadData(meta),
    ], num_tasks=-1)
    for _ in range(10):
        _, labels = taskset.sample()
        assert set(labels.tolist()) <= {1, 3, 5, 7} and len(set(labels.tolist())) == 3


def test_importing_learn2learn_through_metarun_prints_nothing():
    proc = subprocess.run([sys.executable, "-c", "import metarun._learn2learn"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stderr == "" and proc.stdout == ""
