"""Trackers: per-step rows, W&B modes and defaults, and W&B failures that never stop training."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import wandb

from metarun.loop import run
from metarun.tracking import WandbTracker, adaptation_rows

CURVES = {
    "val": {"acc_mean": [0.2, 0.9], "acc_ci95": [0.01, 0.02], "loss_mean": [1.6, 0.3], "loss_ci95": [0.1, 0.05]},
    "test": {"acc_mean": [0.21, 0.88], "acc_ci95": [0.03, 0.04], "loss_mean": [1.5, 0.4], "loss_ci95": [0.2, 0.1]},
}


def test_adaptation_rows_are_one_record_per_step_on_the_adapt_axis():
    rows = adaptation_rows(CURVES)
    assert rows == [
        {"adapt/step": 0, "adapt/val_acc": 0.2, "adapt/val_acc_ci95": 0.01, "adapt/val_loss": 1.6,
         "adapt/val_loss_ci95": 0.1, "adapt/test_acc": 0.21, "adapt/test_acc_ci95": 0.03, "adapt/test_loss": 1.5,
         "adapt/test_loss_ci95": 0.2},
        {"adapt/step": 1, "adapt/val_acc": 0.9, "adapt/val_acc_ci95": 0.02, "adapt/val_loss": 0.3,
         "adapt/val_loss_ci95": 0.05, "adapt/test_acc": 0.88, "adapt/test_acc_ci95": 0.04, "adapt/test_loss": 0.4,
         "adapt/test_loss_ci95": 0.1},
    ]


def test_adaptation_rows_without_accuracy_carry_the_loss_only():
    rows = adaptation_rows({"test": {"loss_mean": [2.0, 1.0], "loss_ci95": [0.5, 0.25]}})
    assert rows == [{"adapt/step": 0, "adapt/test_loss": 2.0, "adapt/test_loss_ci95": 0.5},
                    {"adapt/step": 1, "adapt/test_loss": 1.0, "adapt/test_loss_ci95": 0.25}]


class FakeRun:
    """Records what a W&B run is given; ``fail_on`` names the method that raises."""

    def __init__(self, fail_on: str | None = None, **init_kwargs) -> None:
        self.init_kwargs, self.fail_on, self.logged, self.axes = init_kwargs, fail_on, [], {}
        self.name, self.id, self.summary, self.finished = None, init_kwargs.get("id", "abc123"), {}, False
        self.summaries, self.artifacts = {}, []

    def define_metric(self, name, step_metric=None, summary=None):
        self.axes[name] = step_metric
        if summary is not None:
            self.summaries[name] = summary

    def log_artifact(self, artifact, aliases=None):
        self.artifacts.append((artifact, aliases))

    def log(self, record):
        if self.fail_on == "log":
            raise ConnectionError("W&B is unreachable")
        self.logged.append(record)

    def finish(self):
        self.finished = True


def wandb_tracker(**options) -> WandbTracker:
    """A WandbTracker with conf/config.yaml's wandb options, then ``options``."""
    from omegaconf import OmegaConf

    from conftest import CONF

    configured = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml").wandb)
    configured.pop("_target_")
    return WandbTracker(**{**configured, **options})


@pytest.fixture
def no_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_auto_mode_is_offline_without_an_api_key_and_takes_the_sweep_defaults(monkeypatch, no_api_key):
    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    tracker = wandb_tracker(mode="auto", defaults={"group": "sweep-x", "job_type": "maml-glyphs", "name": "ways=3"})
    assert tracker.mode == "offline"
    kwargs = runs[0].init_kwargs
    assert (kwargs["mode"], kwargs["group"], kwargs["job_type"], kwargs["name"]) == (
        "offline", "sweep-x", "maml-glyphs", "ways=3")
    assert runs[0].axes["adapt/*"] == "adapt/step" and "adapt/step" in runs[0].axes
    assert runs[0].axes["train/*"] == "iteration"
    tracker.log_adaptation(CURVES)
    assert [r["adapt/step"] for r in runs[0].logged if "adapt/step" in r] == [0, 1]
    tracker.finish({"test/acc_mean": 0.88, "output_dir": "/x"})
    assert runs[0].summary == {"test/acc_mean": 0.88} and runs[0].finished


def test_auto_mode_is_online_with_an_api_key(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun(**kw))
    assert wandb_tracker(mode="auto").run.init_kwargs["mode"] == "online"


def test_a_failing_wandb_log_disables_wandb_with_a_warning(monkeypatch, no_api_key, caplog):
    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun(fail_on="log", **kw))
    tracker = wandb_tracker(mode="offline")
    with caplog.at_level(logging.WARNING, logger="metarun.tracking"):
        tracker.log({"train/loss": 1.0}, 1)
    assert tracker.run is None
    assert "W&B disabled after an error: W&B is unreachable" in caplog.text
    tracker.log({"train/loss": 1.0}, 2)  # later calls are no-ops
    tracker.finish({"test/acc_mean": 0.5})


def test_wandb_failing_to_start_never_stops_training(compose_cfg, tmp_path, monkeypatch):
    calls = []

    def broken_init(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("wandb.init timed out")

    monkeypatch.setattr(wandb, "init", broken_init)
    run(compose_cfg("wandb.mode=online"), tmp_path)
    assert len(calls) == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= results["test/acc_mean"] <= 1.0


def test_wandb_run_takes_tags_best_validation_summaries_and_the_adaptation_table(monkeypatch, no_api_key, tmp_path):
    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    (tmp_path / "adaptation.png").write_bytes(b"png")
    monkeypatch.setattr(wandb, "Image", lambda path: ("image", path))
    tracker = wandb_tracker(mode="offline", tags=["mine"], dir=str(tmp_path),
                            defaults={"tags": ["algorithm=maml", "dataset=glyphs", "5w1s"]})
    run = runs[0]
    assert run.init_kwargs["tags"] == ["mine", "algorithm=maml", "dataset=glyphs", "5w1s"]
    assert "resume" not in run.init_kwargs
    assert run.summaries == {"val/acc": "max", "val/loss": "min", "val/mse": "min"}
    tracker.log_adaptation(CURVES)
    [media] = [r for r in run.logged if "adapt/table" in r]
    table = media["adapt/table"]
    assert table.columns[0] == "adapt/step" and "adapt/test_acc_ci95" in table.columns
    assert [row[table.columns.index("adapt/test_acc")] for row in table.data] == [0.21, 0.88]
    assert media["adapt/plot"] == ("image", str(tmp_path / "adaptation.png"))


def test_a_resumed_run_continues_its_wandb_run(compose_cfg, tmp_path, monkeypatch):
    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    run(compose_cfg("wandb.mode=offline", "iterations=2"), tmp_path / "a")
    assert torch.load(tmp_path / "a" / "checkpoints" / "last.pt")["wandb_id"] == "abc123"
    runs.clear()
    run(compose_cfg("wandb.mode=offline", "iterations=3", f"resume={tmp_path / 'a'}"), tmp_path / "b")
    assert runs[0].init_kwargs["id"] == "abc123" and runs[0].init_kwargs["resume"] == "allow"


def test_the_best_checkpoint_is_a_model_artifact_with_its_numbers(compose_cfg, tmp_path, monkeypatch):
    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    run(compose_cfg("wandb.mode=offline", "wandb.log_model=true"), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    [(artifact, aliases)] = runs[0].artifacts
    assert artifact.type == "model" and aliases == ["best"]
    assert artifact.metadata["test/acc_mean"] == results["test/acc_mean"]
    assert artifact.metadata["test/acc_ci95"] == results["test/acc_ci95"]
    assert artifact.metadata["iteration"] == results["best_iteration"] and len(artifact.metadata["config_sha256"]) == 64
    assert runs[0].summary["test/acc_mean"] == results["test/acc_mean"] and runs[0].summary["eval_tasks"] == 4
