"""Sinusoid regression (Finn et al. 2017, §5.1): task statistics, the regression path end to end, and
MAML beating the "pretrained on all tasks" baseline after one step."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from omegaconf import OmegaConf, open_dict

import sinusoid_figure  # scripts/ (conftest puts it on the path)
from conftest import TINY, dataset_options, run_cli
from metarun.build import build_algorithm, build_data
from metarun.commands import user_error
from metarun.data.base import DatasetError
from metarun.data.sinusoid import Sinusoids
from metarun.errors import ConfigError
from metarun.objectives import Regression

SINUSOID = ["dataset=sinusoid", "backbone=mlp_sinusoid", "algorithm.inner_lr=0.01"]


def sinusoids(**options) -> Sinusoids:
    """Sinusoids with conf/dataset/sinusoid.yaml's ranges (the paper's) but ``options``: no defaults."""
    return Sinusoids(**dataset_options("sinusoid", **options))


def test_task_parameters_and_points_follow_the_paper_distributions():
    sampler = sinusoids().sampler("train", ways=5, shots=10, query_shots=15, device="cpu", augment=None)
    drawn = [sampler.draw() for _ in range(2000)]
    amplitudes = torch.tensor([a for _, a, _ in drawn])
    phases = torch.tensor([p for _, _, p in drawn])
    x = torch.cat([x for x, _, _ in drawn])
    assert amplitudes.min() >= 0.1 and amplitudes.max() <= 5.0
    assert phases.min() >= 0.0 and phases.max() <= math.pi
    assert x.min() >= -5.0 and x.max() <= 5.0 and x.shape == (2000 * 25, 1)
    # Uniform: means at the centres (standard errors 0.03, 0.02 and 0.01), the ranges filled.
    assert amplitudes.mean() == pytest.approx(2.55, abs=0.15)
    assert phases.mean() == pytest.approx(math.pi / 2, abs=0.1)
    assert x.mean() == pytest.approx(0.0, abs=0.06)
    assert amplitudes.min() < 0.2 and amplitudes.max() > 4.9 and x.min() < -4.99 and x.max() > 4.99


def test_support_and_query_are_points_of_one_sinusoid():
    sampler = sinusoids().sampler("val", ways=5, shots=5, query_shots=7, device="cpu", augment=None)
    x, amplitude, phase = sampler.draw()
    task = sampler.materialise(x, amplitude, phase)
    assert task.support.x.shape == task.support.y.shape == (5, 1)
    assert task.query.x.shape == task.query.y.shape == (7, 1)
    assert task.support.ways == task.query.ways == 1  # one function, whatever ways says
    assert torch.equal(torch.cat([task.support.x, task.query.x]), x)
    for split in (task.support, task.query):
        assert torch.equal(split.y, amplitude * torch.sin(split.x - phase))


def test_fixed_tasks_depend_only_on_the_seed_and_restore_the_global_rng():
    sampler = sinusoids().sampler("test", ways=1, shots=5, query_shots=5, device="cpu", augment=None)

    def points(tasks):
        return torch.stack([torch.cat([t.support.y, t.query.y]) for t in tasks])

    random.seed(1)
    torch.manual_seed(1)
    first = points(sampler.fixed_tasks(6, seed=7))
    after = random.random()
    random.seed(2)
    torch.manual_seed(2)
    assert torch.equal(points(sampler.fixed_tasks(6, seed=7)), first)
    assert not torch.equal(points(sampler.fixed_tasks(6, seed=8)), first)
    random.seed(1)
    sampler.fixed_tasks(6, seed=7)
    assert random.random() == after
    assert len(sampler.fixed_tasks(6, seed=7)) == 6


def test_training_tasks_follow_pythons_random_only():
    sampler = sinusoids().sampler("train", ways=1, shots=5, query_shots=5, device="cpu", augment=None)
    random.seed(3)
    torch.manual_seed(0)
    first = sampler.sample().query.y
    random.seed(3)
    torch.manual_seed(1)  # torch's global RNG does not move the tasks
    assert torch.equal(sampler.sample().query.y, first)


def test_bad_sinusoid_options_are_one_clear_error():
    with pytest.raises(DatasetError, match="dataset.amplitude must be .* low <= high"):
        sinusoids(amplitude=(5.0, 0.1))
    with pytest.raises(DatasetError, match="dataset.phase must be two numbers"):
        sinusoids(phase=(0.0,))
    with pytest.raises(DatasetError, match="sinusoid tasks have none; set augment=null"):
        sinusoids().sampler("train", 1, 5, 5, "cpu", augment=lambda x: x)


def test_build_data_takes_the_objective_from_the_dataset_and_ignores_ways(compose_cfg):
    cfg = compose_cfg(*SINUSOID, "ways=20", "train_shots=10", "shots=5", "query_shots=3")  # 20 ways: no class check
    train, val, test, objective = build_data(cfg, torch.device("cpu"))
    assert isinstance(objective, Regression)
    assert train.sample().support.x.shape == (10, 1)
    task = next(iter(test))
    assert task.support.x.shape == (5, 1) and task.query.x.shape == (3, 1)
    assert len(val) == cfg.eval.val_tasks and len(test) == cfg.eval.tasks
    algorithm, _, _ = build_algorithm(cfg, torch.device("cpu"), objective)
    assert algorithm.head_outputs == 1  # 1-40-40-1
    assert [p.shape for p in algorithm.parameters()] == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]


class RecordingSource(Sinusoids):
    """A TaskSource that records what build_data asks of it."""

    calls: list[tuple] = []

    def sampler(self, split_name, ways, shots, query_shots, device, augment):
        RecordingSource.calls.append((split_name, ways, shots, query_shots, augment))
        return super().sampler(split_name, ways, shots, query_shots, device, None)


def flip(x: torch.Tensor) -> torch.Tensor:
    return -x


def test_build_data_asks_any_task_source_for_three_samplers_augmenting_training_only(compose_cfg):
    cfg = compose_cfg("ways=3", "train_ways=7", "shots=2", "train_shots=4", "query_shots=5", "train_query_shots=6")
    with open_dict(cfg):
        cfg.dataset = {"_target_": "test_sinusoid.RecordingSource", **dataset_options("sinusoid")}
        cfg.augment = {"_target_": "hydra.utils.get_method", "path": "test_sinusoid.flip"}
    RecordingSource.calls.clear()
    build_data(cfg, torch.device("cpu"))
    assert RecordingSource.calls == [("train", 7, 4, 6, flip), ("val", 3, 2, 5, None), ("test", 3, 2, 5, None)]


def test_pretrained_trains_without_an_inner_loop(compose_cfg):
    cfg = compose_cfg(*SINUSOID, "algorithm=pretrained", "shots=5", "query_shots=5")
    train, _, _, objective = build_data(cfg, torch.device("cpu"))
    algorithm, _, _ = build_algorithm(cfg, torch.device("cpu"), objective)
    task = train.sample()
    [result] = algorithm.run_task(task, algorithm.inner_steps, every_step=False)
    unadapted = algorithm.learnable(task.query.x)
    assert result.accuracy is None
    assert torch.equal(result.loss, torch.nn.functional.mse_loss(unadapted, task.query.y))
    with pytest.raises(Exception, match="inner_steps must be 0") as error:  # wrapped by Hydra's instantiate
        build_algorithm(compose_cfg(*SINUSOID, "algorithm=pretrained", "algorithm.inner_steps=1"), torch.device("cpu"))
    assert isinstance(user_error(error.value), ConfigError)  # the CLI prints it as one line


def test_sinusoid_presets_are_the_paper_protocol():
    from test_config import preset

    cfg = preset("maml_sinusoid")
    assert (cfg.train_shots, cfg.meta_batch_size, cfg.iterations, cfg.optimizer.lr) == (10, 25, 70000, 0.001)
    assert (cfg.algorithm.inner_lr, cfg.algorithm.inner_steps, cfg.algorithm.eval_inner_steps) == (0.01, 1, 10)
    assert cfg.dataset.amplitude == [0.1, 5.0] and cfg.dataset.x_range == [-5.0, 5.0]
    assert cfg.dataset.phase[1] == pytest.approx(math.pi)
    baseline = preset("pretrained_sinusoid")
    assert baseline.algorithm._target_.endswith("Pretrained") and baseline.algorithm.inner_steps == 0
    assert (baseline.train_shots, baseline.iterations, baseline.backbone) == (10, 70000, cfg.backbone)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_regression_run_reports_mse_under_the_accuracy_keys_names_and_no_accuracy(compose_cfg, tmp_path):
    from metarun.loop import run

    objective = run(compose_cfg(*SINUSOID, "iterations=3", "shots=5", "query_shots=10",
                                "algorithm.eval_inner_steps=2"), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert not [key for key in results if "acc" in key]
    # The sweepers' objective is the MSE itself (lower is better), not minus it in an "accuracy".
    assert results["best_val_mse"] == pytest.approx(objective) and results["best_val_mse"] > 0
    assert results["best_val_mse"] == min(r["val/mse"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "val/mse" in r)
    assert results["test/loss_mean"] == results["test/mse_mean"] == results["curves"]["test"]["mse_mean"][-1] > 0
    assert results["test/loss_ci95"] > 0
    assert len(results["curves"]["test"]["mse_mean"]) == 3  # steps 0, 1, 2
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert not [key for r in records for key in r if "acc" in key]  # no train/acc = 0, no val/acc = -MSE
    assert [r["iteration"] for r in records if "val/mse" in r] == [1, 2, 3]
    assert [r["adapt/step"] for r in records if "adapt/step" in r] == [0, 1, 2]
    assert {"adapt/val_mse", "adapt/test_mse", "adapt/test_mse_ci95"} <= set(records[-1])
    assert (tmp_path / "adaptation.png").stat().st_size > 1000
    assert (tmp_path / "checkpoints" / "best.pt").is_file()

    # The figure script reads the finished run: its best checkpoint on the run's own test tasks.
    cfg = OmegaConf.create(results["config"])
    sinusoid_figure.plot_fits(tmp_path, cfg, tasks_shown=2, steps=[0, 1, 2], out=tmp_path / "fits.png")
    assert (tmp_path / "fits.png").stat().st_size > 1000
    table = sinusoid_figure.mse_table(tmp_path, cfg, shots=[5, 10])
    assert len(table) == 4 and table[2].startswith("| 5 | ") and table[3].startswith("| 10 | ")


def test_cli_runs_sinusoid_regression_and_prints_mse(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*TINY, *SINUSOID, "console=true", "shots=5", "query_shots=5", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "query MSE per adaptation step" in proc.stdout and "test MSE:" in proc.stdout
    assert "val/mse" in proc.stdout and "train/acc" not in proc.stdout and "accuracy" not in proc.stdout
    assert json.loads((out / "results.json").read_text())["test/mse_mean"] > 0


def test_maml_beats_the_pretrained_baseline_after_one_step(compose_cfg, tmp_path):
    """The paper's ordering (Finn et al. 2017, Figure 2): after one gradient step on K = 5 points,
    the meta-learned initialisation fits a new sinusoid far better than joint pretraining."""
    from metarun.loop import run

    def one_step_mse(algorithm: str) -> float:
        out = tmp_path / algorithm
        # The paper's network, K and inner step; a 10x larger meta step size than its Adam 1e-3 makes
        # 400 iterations enough (seeds 0-3 at 300 iterations: MAML/pretrained MSE ratios 0.55-0.59).
        run(compose_cfg(*SINUSOID, f"algorithm={algorithm}", "iterations=400", "meta_batch_size=10",
                        "optimizer.lr=0.01", "eval_every=400", "train_shots=10", "train_query_shots=10", "shots=5",
                        "query_shots=20", "eval.val_tasks=10", "eval.tasks=200", "algorithm.eval_inner_steps=1"), out)
        return json.loads((out / "results.json").read_text())["curves"]["test"]["mse_mean"][1]

    maml, pretrained = one_step_mse("maml"), one_step_mse("pretrained")  # the same 200 test tasks (same seed)
    assert maml < 0.75 * pretrained, (maml, pretrained)
