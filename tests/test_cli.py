"""The ``metarun`` command end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONF, fingerprint, one_line_error, run_cli, tiny


def test_single_run_prints_per_step_table_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*tiny("console=true", f"hydra.run.dir={out}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "query accuracy per adaptation step" in proc.stdout
    assert "test accuracy:" in proc.stdout and "±" in proc.stdout
    # Not a terminal: one progress line per validation instead of a live bar's last frame.
    assert "meta-train 1/2" in proc.stdout and "meta-train 2/2" in proc.stdout and "val/acc" in proc.stdout
    assert "Gym has been unmaintained" not in proc.stderr  # learn2learn's gym banner stays out
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["test/acc_mean"] <= 1.0
    assert (out / "metrics.jsonl").is_file() and (out / "adaptation.png").is_file()


def test_metric_method_with_wider_training_tasks_augmentation_and_within_alphabet_tasks(tmp_path):
    """ProtoNet trained 8-way with 3 queries, Koch's distortions and one-alphabet tasks, tested 5-way: one
    adaptation step (step 0) on the same keys as MAML."""
    out = tmp_path / "run"
    proc = run_cli(*tiny("algorithm=protonet", "train_ways=8", "train_query_shots=3", "augment=koch_affine",
                         "dataset.within_group=true", f"hydra.run.dir={out}"),
                   # two alphabets, so that every split has alphabets with 8 characters
                   "dataset.num_alphabets=2", "dataset.characters_per_alphabet=30", "dataset.split_sizes=[20,20,-1]",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert len(results["curves"]["test"]["acc_mean"]) == 1 and results["eval_inner_steps"] == 0
    assert results["config"]["train_ways"] == 8 and results["config"]["augment"]["_target_"] == "metarun.augment.Compose"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val/acc" in row for row in rows)


def test_multirun_sweeps_four_jobs_each_with_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m", *tiny("algorithm.inner_steps=1,2", "algorithm.first_order=true,false", f"hydra.sweep.dir={sweep}"),
        "wandb.mode=offline", cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "results.json").is_file())
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        config = json.loads((job / "results.json").read_text())["config"]
        seen.add((config["algorithm"]["inner_steps"], config["algorithm"]["first_order"]))
    assert seen == {(1, True), (1, False), (2, True), (2, False)}
    assert all("first_order" in job.name for job in jobs)  # job directories are named by their overrides
    # One W&B run per job, all in the sweep's group (an offline run file holds its group as plain bytes).
    runs = [run for job in jobs for run in (job / "wandb").glob("offline-run-*/*.wandb")]
    assert len(runs) == 4
    group = f"sweep-{tmp_path.name}-sweep".encode()
    assert all(group in run.read_bytes() for run in runs)


def test_wandb_offline_run_is_written_next_to_the_results(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*tiny(f"hydra.run.dir={out}"), "wandb.mode=offline", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_help_lists_the_config_groups(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for group in ("dataset", "algorithm", "backbone", "optimizer", "experiment"):
        assert f"{group}:" in proc.stdout


def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = run_cli("--cfg", "job", "algorithm=fomaml", cwd=tmp_path)
    assert proc.returncode == 0
    assert "first_order: true" in proc.stdout and "_target_: metarun.algorithms.maml.MAML" in proc.stdout


def test_unknown_option_lists_the_valid_ones(tmp_path):
    proc = run_cli("algorithm=nope", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'algorithm/nope'" in proc.stderr and "maml" in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ways=50"], "metarun: error: ways=50 but the train split has only 20 classes"),
        (["shots=15", "query_shots=10"], "metarun: error: shots + query_shots = 25"),
        (["optimizer.lr=-1"], "metarun: error: optimizer.lr must be >= 0"),
        (["algorithm.inner_lr=-1"], "metarun: error: algorithm.inner_lr must be >= 0"),
        (["dataset=omniglot", "dataset.root=/nonexistent/omniglot"], "/nonexistent/omniglot"),
        (["resume=/nonexistent/run"], "metarun: error: no checkpoint to resume"),
        # Training tasks from one alphabet: the tiny glyphs' alphabets have <= 10 training characters.
        (["dataset.within_group=true", "train_ways=12"],
         "metarun: error: within_group tasks need a group with train_ways=12 classes but the largest of the train split"),
        (["dataset=sinusoid", "backbone=conv4"],
         "metarun: error: backbone.in_channels: Interpolation key 'dataset.channels' not found"),
        (["dataset=sinusoid", "backbone=mlp_sinusoid", "dataset.amplitude=[5,1]"],
         "metarun: error: dataset.amplitude must be [low, high] with low <= high"),
        # Values that would train in the wrong direction, or never move (issue 21).
        (["scheduler=cosine", "scheduler.eta_min=-0.1"], "metarun: error: scheduler.eta_min must be >= 0"),
        (["scheduler=step", "scheduler.gamma=-0.5"], "metarun: error: scheduler.gamma must be > 0"),
        (["scheduler=step", "scheduler.step_size=0"], "metarun: error: scheduler.step_size must be >= 1"),
        (["scheduler=step", "scheduler.step_size=-3"], "metarun: error: scheduler.step_size must be >= 1"),
        (["scheduler=warmup", "scheduler.start_factor=0"],
         "metarun: error: scheduler.start_factor must satisfy 0 < start_factor <= 1"),
        (["algorithm=metanet", "algorithm.contrastive_margin=-1"],
         "metarun: error: algorithm.contrastive_margin must be >= 0"),
        # NaN is refused up front wherever a number is configured (one check over the whole config).
        (["optimizer.lr=nan"], "metarun: error: optimizer.lr must be a finite number, got nan"),
        (["algorithm.inner_lr=nan"], "metarun: error: algorithm.inner_lr must be a finite number, got nan"),
        (["grad_clip=nan"], "metarun: error: grad_clip must be a finite number, got nan"),
        (["eval.ci_z=nan"], "metarun: error: eval.ci_z must be a finite number, got nan"),
        (["algorithm=synaptic", "algorithm.rate=nan"], "metarun: error: algorithm.rate must be a finite number"),
        (["algorithm=meta_lstm", "algorithm.input_bias_init=nan"],
         "metarun: error: algorithm.input_bias_init must be a finite number"),
        (["algorithm=meta_lstm", "algorithm.forget_bias_init=inf"],
         "metarun: error: algorithm.forget_bias_init must be a finite number, got inf"),
        (["seed=1099511627776"], "metarun: error: seed must be >= 0 and <= 4294967295"),
        (["iterations=-1"], "metarun: error: iterations must be >= 1, got -1"),
        # A preset's option for its own backbone, kept when another backbone is chosen (issue 22: ResNet-12).
        (["experiment=protonet_miniimagenet_resnet12_5w1s", "dataset=glyphs", "query_shots=1", "train_query_shots=1",
          "backbone=conv4"],
         "metarun: error: metarun.backbones.Conv4 takes no option 'drop_rate'"),
        # Test-time augmentation needs views to take (issue 22).
        (["eval.tta_views=-1"], "metarun: error: eval.tta_views must be >= 0"),
        (["eval.tta_views=4"], "metarun: error: eval.tta_views=4 needs an augmentation to apply to the test tasks"),
    ],
)
def test_bad_input_fails_before_training_with_one_line(tmp_path, overrides, message):
    out = tmp_path / "run"
    proc = run_cli(*tiny(f"hydra.run.dir={out}", *overrides), cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("metarun: error:")]) == 1
    assert not (out / "metrics.jsonl").exists()


def test_existing_results_are_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    proc = run_cli(*tiny(f"hydra.run.dir={out}"), cwd=tmp_path)
    assert proc.returncode == 2 and "already holds a finished run" in proc.stderr
    assert (out / "results.json").read_text() == "{}"


def test_resume_through_the_cli(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli(*tiny(f"hydra.run.dir={first}"), cwd=tmp_path).returncode == 0
    proc = run_cli(*tiny(f"hydra.run.dir={second}", "iterations=3", f"resume={first}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    iterations = [json.loads(line)["iteration"] for line in (second / "metrics.jsonl").read_text().splitlines()
                  if "train/loss" in line]
    assert iterations == [3]


@pytest.mark.data
def test_maml_on_real_omniglot_end_to_end(tmp_path, omniglot_root):
    out = tmp_path / "run"
    proc = run_cli(*tiny("dataset=omniglot", f"dataset.root={omniglot_root}", f"hydra.run.dir={out}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["dataset"]["split_sizes"] == [1100, 100, 423]
    assert 0.0 <= results["test/acc_mean"] <= 1.0


def test_console_script_completes_config_groups_like_hydra(tmp_path):
    """The installed ``metarun`` script (not just ``python -m metarun``) and Hydra's shell completion."""
    script = Path(sys.executable).parent / "metarun"
    env = {**os.environ, "COMP_LINE": "metarun algorithm="}
    proc = subprocess.run([str(script), "-sc", "query=bash"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = {f"algorithm={p.stem}" for p in (CONF / "algorithm").glob("*.yaml")}
    assert len(expected) >= 4 and set(proc.stdout.split()) == expected


@pytest.mark.parametrize("overrides,expected", [
    (["+algorithm.bogus=1"], "metarun.algorithms.maml.MAML: got an unexpected keyword argument 'bogus'; the build passes"),
    (["~algorithm.inner_lr"], "metarun.algorithms.maml.MAML: missing 1 required positional argument: 'inner_lr'"),
    (["~backbone"], "metarun.algorithms.maml.MAML needs a backbone"),
    (["seed=-1"], "seed must be >= 0"),
    (["eval.ci_z=0"], "eval.ci_z must be > 0"),
])
def test_an_algorithm_built_with_wrong_arguments_is_one_line_naming_the_argument(tmp_path, overrides, expected):
    """Written from base.py alone, a constructor that misses or refuses an argument the build passes
    reads as one line, not Hydra's multi-line TypeError; nothing is written."""
    out = tmp_path / "run"
    proc = run_cli(*tiny(*overrides, f"hydra.run.dir={out}"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metarun: error: ") and expected in lines[0], proc.stderr
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("overrides,expected", [
    (["~algorithm"], "~algorithm: every run needs algorithm; choose one (algorithm=NAME"),
    (["algorithm=null"], "algorithm=null: every run needs algorithm; choose one"),
    (["~dataset"], "~dataset: every run needs dataset; choose one (dataset=NAME"),
    (["optimizer=null"], "optimizer=null: every run needs optimizer"),
    (["~ways"], "~ways: every run needs ways; set it instead (ways=VALUE)"),
    (["~eval"], "~eval: every run needs eval"),
    (["-m", "~algorithm", "seed=0,1"], "~algorithm: every run needs algorithm"),
], ids=["del-algorithm", "algorithm-null", "del-dataset", "optimizer-null", "del-ways", "del-eval", "multirun"])
def test_removing_what_every_run_needs_is_one_line_and_writes_nothing(tmp_path, overrides, expected):
    """A group or setting every run needs, removed (issue 21: a traceback or Hydra's interpolation error before);
    the optional groups (backbone, scheduler, augment) may still be removed (``~backbone`` above)."""
    out = tmp_path / "run"
    proc = run_cli(*tiny(*overrides, f"hydra.run.dir={out}", f"hydra.sweep.dir={tmp_path / 'sweep'}"), cwd=tmp_path)
    one_line_error(proc, expected)
    assert fingerprint(tmp_path) == {}


def test_more_top_k_than_validations_is_one_warning_at_start(tmp_path):
    """eval.top_k=5 with 2 validations (iterations=2, eval_every=1): the run warns once, before training, and
    tests the ensemble of the 2 it has."""
    out = tmp_path / "run"
    proc = run_cli(*tiny("eval.top_k=5", f"hydra.run.dir={out}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in (proc.stdout + proc.stderr).splitlines() if "eval.top_k=5" in line]
    assert len(warned) == 1 and "[WARNING]" in warned[0], proc.stdout + proc.stderr
    assert "validate 2 times: the tested ensemble holds 2 models" in warned[0]
    assert "Traceback" not in proc.stderr
    assert len(json.loads((out / "results.json").read_text())["tested_iterations"]) == 2
