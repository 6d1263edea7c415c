"""Sweeps beyond one process: the joblib, Slurm (submitit) and Optuna presets of conf/hydra/, one GPU per
job, and ``resume=auto`` (a requeued job continues from its own last.pt). End to end through the CLI on
tiny glyphs; the submitit requeue and the resumed Optuna study are ``slow``."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from conftest import CONF, fingerprint, one_line_error, run_cli, tiny
from metarun.loop import run


def hydra_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


# ----------------------------------------------------------------------------------------------
# Presets and resolvers
# ----------------------------------------------------------------------------------------------


def test_launcher_and_sweeper_presets_compose():
    joblib = hydra_cfg("hydra/launcher=joblib_gpus").hydra
    assert joblib.launcher._target_.endswith("JoblibLauncher") and joblib.launcher.n_jobs == 2
    assert OmegaConf.to_container(joblib.job.env_set) == {"METARUN_DEVICE": "${metarun.job_gpu:}"}
    for name, target in (("slurm", "SlurmLauncher"), ("slurm_local", "LocalLauncher")):
        launcher_cfg = hydra_cfg(f"hydra/launcher={name}").hydra
        assert launcher_cfg.launcher._target_.endswith(target)
        assert launcher_cfg.job.env_set.METARUN_RESUME == "auto"
    slurm = hydra_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert slurm.partition == "gpu" and slurm.max_num_timeout > 0 and slurm.gpus_per_node == 1
    optuna = hydra_cfg("hydra/sweeper=optuna_lr").hydra.sweeper
    assert optuna.direction == "maximize" and optuna.storage.startswith("sqlite:///") and optuna.study_name
    assert set(optuna.params) == {"algorithm.inner_lr", "optimizer.lr"}
    assert hydra_cfg("hydra/sweeper=optuna_lr_mse").hydra.sweeper.direction == "minimize"


def test_a_sweepers_interval_on_the_command_line_passes_the_argument_check():
    """Optuna's sweeps may come as ``algorithm.inner_lr=interval(0.01, 1)``: it has no first value to check
    the option with, and is left to Hydra (the check used to stop with Hydra's enumeration error)."""
    from metarun.cli import check_arguments

    check_arguments(["algorithm.inner_lr=tag(log, interval(0.01, 1.0))", "optimizer.lr=interval(0.0001, 0.01)"])
    with pytest.raises(SystemExit):  # the other options are still checked
        check_arguments(["algorithm.inner_lr=interval(0.01, 1.0)", "algorithm=protonet", "algorithm.nope=1"])


@pytest.mark.parametrize("overrides,expected", [
    (["hydra/sweeper=optuna_lr", "hydra.sweeper.storage=sqlite:///{tmp}"],
     "hydra.sweeper.storage=sqlite:///{tmp}: {tmp} is a directory, and the study is an SQLite file; use sqlite:///"),
    (["hydra/sweeper=optuna_lr", "hydra.sweeper.storage={tmp}"], "hydra.sweeper.storage={tmp} is not a database URL"),
    (["hydra/sweeper=optuna_lr", "hydra.sweeper.storage=sqlite//optuna.db"], "is not a database URL; use sqlite:///"),
    (["hydra/sweeper=optuna_lr", "hydra.sweeper.storage=sqlite:///{tmp}/no/optuna.db"],
     "the folder {tmp}/no does not exist"),
    (["hydra/sweeper=optuna_lr", "hydra.sweeper.n_jobs=0"], "hydra.sweeper.n_jobs must be >= 1"),
    (["hydra/sweeper=optuna_lr", "hydra.sweeper.n_jobs=-2"], "hydra.sweeper.n_jobs must be >= 1"),
    (["hydra/sweeper=optuna_lr", "hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials must be >= 1"),
    (["hydra/launcher=joblib_gpus", "hydra.launcher.n_jobs=0", "seed=0,1"], "hydra.launcher.n_jobs=0 runs no job"),
], ids=["storage-dir-url", "storage-dir", "storage-malformed", "storage-no-folder", "sweeper-n_jobs-0",
        "sweeper-n_jobs-negative", "n_trials-0", "launcher-n_jobs-0"])
def test_bad_sweep_settings_are_one_line_before_hydra_writes_anything(tmp_path, overrides, expected):
    """Each of these used to end in an 18- to 122-line traceback from the sweeper or the launcher, after Hydra
    had made the sweep directory (issue 21)."""
    tmp = tmp_path.resolve()
    proc = run_cli("-m", *[o.format(tmp=tmp) for o in overrides], *tiny(f"hydra.sweep.dir={tmp / 'sweep'}"),
                   cwd=tmp)
    one_line_error(proc, expected.format(tmp=tmp))
    assert fingerprint(tmp) == {}  # no sweep directory, no study file


def test_sweep_settings_are_checked_only_for_a_multirun(tmp_path):
    """A single run uses no sweeper: its settings do not stop it."""
    from metarun.cli import check_arguments

    check_arguments(["hydra/sweeper=optuna_lr", "hydra.sweeper.n_jobs=0", f"hydra.sweeper.storage={tmp_path}"])
    with pytest.raises(SystemExit):
        check_arguments(["-m", "hydra/sweeper=optuna_lr", "hydra.sweeper.n_jobs=0"])
    check_arguments(["-m", "hydra/sweeper=optuna_lr", f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}"])


def test_device_and_resume_follow_the_environment_the_presets_set(monkeypatch):
    cfg = hydra_cfg()
    assert cfg.device == "auto" and cfg.resume is None
    monkeypatch.setenv("METARUN_DEVICE", "cuda:3")
    monkeypatch.setenv("METARUN_RESUME", "auto")
    cfg = hydra_cfg()
    assert cfg.device == "cuda:3" and cfg.resume == "auto"
    assert hydra_cfg("device=cpu").device == "cpu"  # the command line still wins


@pytest.fixture
def hydra_job():
    """Set HydraConfig as in job ``num`` of a sweep."""

    def _set(num: int) -> None:
        cfg = hydra_cfg(f"hydra.job.num={num}")
        HydraConfig.instance().set_config(cfg)

    yield _set
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize(("num", "count", "device"),
                         [(0, 2, "cuda:0"), (1, 2, "cuda:1"), (2, 2, "cuda:0"), (7, 4, "cuda:3"), (5, 1, "cuda:0"),
                          (3, 0, "cpu")])
def test_each_job_gets_its_own_gpu_modulo_the_gpu_count(hydra_job, num, count, device):
    hydra_job(num)
    assert OmegaConf.create({"device": f"${{metarun.job_gpu:{count}}}"}).device == device


def test_without_a_count_the_resolver_counts_torch_gpus(hydra_job, monkeypatch):
    import metarun.config

    hydra_job(3)
    monkeypatch.setattr(metarun.config, "_cuda_device_count", lambda: 2)
    assert OmegaConf.create({"device": "${metarun.job_gpu:}"}).device == "cuda:1"
    monkeypatch.setattr(metarun.config, "_cuda_device_count", lambda: 0)
    assert OmegaConf.create({"device": "${metarun.job_gpu:}"}).device == "cpu"


def test_resume_auto_continues_the_jobs_own_last_checkpoint(compose_cfg, tmp_path):
    out = tmp_path / "job"
    first = run(compose_cfg("resume=auto"), out)  # nothing to resume: a new run
    assert (out / "results.json").is_file()
    lines = (out / "metrics.jsonl").read_text()
    # relaunched after it finished: its objective, nothing rerun
    assert run(compose_cfg("resume=auto"), out) == first
    assert (out / "metrics.jsonl").read_text() == lines
    # killed after its last checkpoint, before results.json: it continues from checkpoints/last.pt
    (out / "results.json").unlink()
    run(compose_cfg("resume=auto", "iterations=3"), out)
    trained = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()
               if "train/loss" in line]
    assert trained == [1, 2, 3]


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------


def test_joblib_runs_two_jobs_in_parallel_processes(tmp_path):
    import torch

    sweep = tmp_path / "sweep"
    # No device=cpu: the preset chooses each job's device (METARUN_DEVICE=${metarun.job_gpu:}).
    overrides = [o for o in tiny(f"hydra.sweep.dir={sweep}") if not o.startswith("device=")]
    proc = run_cli("-m", "hydra/launcher=joblib_gpus", "hydra.launcher.n_jobs=2", "seed=0,1", *overrides,
                   cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    results = sorted((json.loads(p.read_text()) for p in sweep.glob("*/results.json")), key=lambda r: r["config"]["seed"])
    assert [r["config"]["seed"] for r in results] == [0, 1]
    gpus = torch.cuda.device_count()
    expected = [f"cuda:{n % gpus}" for n in range(2)] if gpus else ["cpu", "cpu"]  # no GPU here: the CPU
    assert [r["config"]["device"] for r in results] == expected


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the submitit job's process in /proc")
def test_submitit_job_preempted_is_requeued_and_finishes_as_an_uninterrupted_run(tmp_path):
    """hydra/launcher=slurm_local: the job gets USR2, as submitit's jobs do on a Slurm timeout or
    preemption; submitit requeues it with the same arguments, and METARUN_RESUME=auto makes it continue
    from its own checkpoints/last.pt. Its results equal those of a run never interrupted."""
    overrides = tiny("iterations=60", "checkpoint_every=5", "eval_every=20")
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "metarun", "-m", "hydra/launcher=slurm_local", "seed=0",
                                 f"hydra.sweep.dir={sweep}", *overrides], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while not list(sweep.glob("*/checkpoints/last.pt")):
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "sweep.log").read_text()
                time.sleep(0.1)
            jobs = [pid for pid in _descendants(proc.pid)
                    if b"submitit.core._submit" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            assert len(jobs) == 1
            os.kill(jobs[0], signal.SIGUSR2)
            assert proc.wait(timeout=600) == 0, (tmp_path / "sweep.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    [job] = [p.parent for p in sweep.glob("*/results.json")]
    submitit_log = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.out"))
    assert "Requeued job" in submitit_log
    assert "resumed from" in submitit_log and str(job / "checkpoints" / "last.pt") in submitit_log
    iterations = [json.loads(line)["iteration"] for line in (job / "metrics.jsonl").read_text().splitlines()
                  if "train/loss" in line]
    # The first process logged 1..m, the requeued one N+1..60 after resuming at last.pt's iteration N <= m.
    resumed_at = int(re.search(r"resumed from .* at iteration (\d+)", submitit_log).group(1))
    assert 5 <= resumed_at < 60 and resumed_at % 5 == 0
    after = 60 - resumed_at
    first_process = iterations[:-after]
    assert iterations[-after:] == list(range(resumed_at + 1, 61))
    assert first_process == list(range(1, len(first_process) + 1)) and len(first_process) >= resumed_at

    reference = tmp_path / "reference"
    ref = run_cli(*overrides, "seed=0", f"hydra.run.dir={reference}", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    requeued, uninterrupted = (json.loads((d / "results.json").read_text()) for d in (job, reference))
    for key in ("test/acc_mean", "test/acc_ci95", "best_iteration", "best_val_acc", "curves"):
        assert requeued[key] == uninterrupted[key], key


def _trials(db: Path, study: str) -> list[str]:
    with sqlite3.connect(db) as connection:
        return [state for (state,) in connection.execute(
            "SELECT t.state FROM trials t JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = ?", (study,))]


@pytest.mark.slow
def test_optuna_study_in_sqlite_resumes_with_more_trials(tmp_path):
    """hydra/sweeper=optuna_lr, 3 trials, run twice: the second invocation adds 3 trials to the same
    study in the same SQLite file."""
    db = tmp_path / "study.db"
    common = ["-m", "hydra/sweeper=optuna_lr", "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage=sqlite:///{db}",
              "hydra.sweeper.study_name=test-lr", "hydra.sweep.subdir=${hydra.job.num}", *tiny()]
    first = run_cli(*common, f"hydra.sweep.dir={tmp_path / 'first'}", cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _trials(db, "test-lr") == ["COMPLETE"] * 3
    values = [json.loads(p.read_text())["best_val_acc"] for p in (tmp_path / "first").glob("*/results.json")]
    assert len(values) == 3
    second = run_cli(*common, f"hydra.sweep.dir={tmp_path / 'second'}", cwd=tmp_path, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _trials(db, "test-lr") == ["COMPLETE"] * 6
    with sqlite3.connect(db) as connection:
        stored = sorted(v for (v,) in connection.execute("SELECT value FROM trial_values"))
        searched = {name for (name,) in connection.execute("SELECT DISTINCT param_name FROM trial_params")}
    assert searched == {"algorithm.inner_lr", "optimizer.lr"}
    assert all(v in stored for v in values)  # the study maximised what metarun returned: best val acc
    assert "Best value" in (second.stdout + second.stderr)
