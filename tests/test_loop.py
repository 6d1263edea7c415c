"""The meta-training loop: evaluation statistics, BatchNorm mode, resume, non-finite losses, outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from metarun import checkpoint
from metarun.errors import CheckpointError, NonFiniteLossError, OutputExistsError
from metarun.loop import batchnorm_mode, run, score_tasks
from metarun.statistics import TaskScores


def test_ci_is_z_times_std_over_sqrt_n():
    acc = torch.tensor([[0.2, 0.4], [0.6, 0.8], [1.0, 0.6], [0.2, 1.0]])
    summary = TaskScores(loss=torch.zeros(4, 2), accuracy=acc, ci_z=1.96).summary()
    expected = 1.96 * np.std(acc.numpy(), axis=0, ddof=1) / math.sqrt(4)
    np.testing.assert_allclose(summary["acc_ci95"], expected, rtol=1e-6)
    np.testing.assert_allclose(summary["acc_mean"], [0.5, 0.7], rtol=1e-6)


def test_batchnorm_mode_switches_batchnorm_only_and_restores_the_modes():
    bn = nn.BatchNorm1d(3)
    bn.running_mean.fill_(5.0)
    model = nn.Sequential(bn, nn.Dropout(0.5))
    model.train()
    x = torch.randn(8, 3) * 2 + 1
    with batchnorm_mode(model, batch_stats=True):
        assert bn.training and not model[1].training  # Dropout is never active while evaluating
        out = model(x)
        assert torch.equal(out, model(x)), "dropout was active"
    # Batch statistics: each feature of the output is standardised over the batch.
    np.testing.assert_allclose(out.mean(0).detach().numpy(), 0, atol=1e-5)
    assert model.training and bn.training and model[1].training
    bn.reset_running_stats()  # the training-mode pass above moved them
    bn.running_mean.fill_(5.0)
    with batchnorm_mode(model, batch_stats=False):
        assert not bn.training and not model[1].training
        out = model(x)
    np.testing.assert_allclose(out.detach().numpy(), ((x - 5.0) / torch.sqrt(torch.ones(3) + bn.eps)).numpy(), atol=1e-5)


def test_evaluation_leaves_every_parameter_and_buffer_unchanged(compose_cfg, tmp_path):
    from metarun.build import build

    parts = build(compose_cfg(), tmp_path / "parts")
    before = {k: v.clone() for k, v in parts.algorithm.state_dict().items()}
    score_tasks(parts.algorithm, parts.val_tasks, bn_batch_stats=True, ci_z=1.96)
    for k, v in parts.algorithm.state_dict().items():
        assert torch.equal(v, before[k]), k


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_writes_results_metrics_plot_and_checkpoints(compose_cfg, tmp_path):
    objective = run(compose_cfg("iterations=3", "algorithm.eval_inner_steps=2"), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["best_val_acc"] == pytest.approx(objective)
    assert 0.0 <= results["test/acc_mean"] <= 1.0 and results["test/acc_ci95"] > 0
    assert len(results["curves"]["test"]["acc_mean"]) == 3  # steps 0, 1, 2
    assert results["test/acc_mean"] == results["curves"]["test"]["acc_mean"][-1]
    assert results["test/error_mean"] == 1.0 - results["test/acc_mean"]  # the Omniglot challenge's error rate
    assert results["test/error_ci95"] == results["test/acc_ci95"]
    assert results["config"]["iterations"] == 3
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in records if "train/loss" in r] == [1, 2, 3]
    assert len([r for r in records if "val/acc" in r]) == 3
    assert [r["adapt/step"] for r in records if "adapt/step" in r] == [0, 1, 2]
    assert {"adapt/val_acc", "adapt/test_acc", "adapt/test_acc_ci95"} <= set(records[-1])
    assert (tmp_path / "adaptation.png").stat().st_size > 1000
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"best.pt", "last.pt"}


def test_run_refuses_to_overwrite_a_finished_run(compose_cfg, tmp_path):
    (tmp_path / "results.json").write_text('{"mine": 1}')
    with pytest.raises(OutputExistsError, match="already holds a finished run"):
        run(compose_cfg(), tmp_path)
    assert (tmp_path / "results.json").read_text() == '{"mine": 1}'


def test_resume_continues_at_the_same_iteration_with_the_same_rng(compose_cfg, tmp_path):
    straight, first_half, second_half = tmp_path / "straight", tmp_path / "a", tmp_path / "b"
    run(compose_cfg("iterations=4"), straight)
    run(compose_cfg("iterations=2"), first_half)
    run(compose_cfg("iterations=4", f"resume={first_half}"), second_half)
    expected = torch.load(straight / "checkpoints" / "last.pt")
    resumed = torch.load(second_half / "checkpoints" / "last.pt")
    assert resumed["state"]["iteration"] == 4
    for key, value in expected["algorithm"].items():
        assert torch.equal(value, resumed["algorithm"][key]), key
    losses = [r["train/loss"] for r in read_jsonl(straight / "metrics.jsonl") if "train/loss" in r]
    resumed_losses = [r["train/loss"] for r in read_jsonl(second_half / "metrics.jsonl") if "train/loss" in r]
    assert resumed_losses == losses[2:]


def test_resume_from_a_missing_checkpoint_is_one_clear_error(compose_cfg, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        run(compose_cfg(f"resume={tmp_path / 'nowhere'}"), tmp_path / "out")


def test_non_finite_loss_stops_with_a_clear_error(compose_cfg, tmp_path):
    # An absurd inner learning rate makes the adapted weights, and so the query loss, overflow.
    with pytest.raises(NonFiniteLossError, match=r"meta-training loss is (nan|inf) at iteration 1; lower"):
        run(compose_cfg("algorithm.inner_lr=1e38"), tmp_path)


def test_atomic_save_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "ck.pt"
    checkpoint.atomic_save({"a": 1}, target)
    checkpoint.atomic_save({"a": 2}, target)
    assert torch.load(target)["a"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


@pytest.mark.gpu
def test_run_on_gpu_keeps_images_on_the_device(compose_cfg, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from metarun.build import build

    cfg = compose_cfg("device=auto")
    parts = build(cfg, tmp_path / "parts")
    assert parts.train_sampler.images.is_cuda and next(parts.algorithm.parameters()).is_cuda
    run(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["device"].startswith("cuda")


def test_evaluation_with_running_statistics_reads_the_buffers_not_the_batch(compose_cfg, tmp_path):
    """eval.bn_batch_stats=false evaluates with BatchNorm's running statistics (non-transductive)."""
    from metarun.build import build

    parts = build(compose_cfg(), tmp_path / "parts")
    algorithm, tasks = parts.algorithm, parts.val_tasks
    batch = score_tasks(algorithm, tasks, bn_batch_stats=True, ci_z=1.96)
    running = score_tasks(algorithm, tasks, bn_batch_stats=False, ci_z=1.96)
    assert not torch.equal(batch.loss, running.loss)
    with torch.no_grad():  # move the running statistics: only the non-transductive evaluation may notice
        for module in algorithm.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean += 0.5
    assert not torch.equal(score_tasks(algorithm, tasks, bn_batch_stats=False, ci_z=1.96).loss, running.loss)
    assert torch.equal(score_tasks(algorithm, tasks, bn_batch_stats=True, ci_z=1.96).loss, batch.loss)


def test_run_passes_the_batchnorm_option_to_evaluation(compose_cfg, tmp_path):
    run(compose_cfg("eval.bn_batch_stats=true"), tmp_path / "batch")
    run(compose_cfg("eval.bn_batch_stats=false"), tmp_path / "running")
    batch, running = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("batch", "running"))
    assert running["config"]["eval"]["bn_batch_stats"] is False
    assert batch["curves"]["test"]["loss_mean"] != running["curves"]["test"]["loss_mean"]


def test_a_scheduler_resumed_mid_run_continues_bit_exactly(compose_cfg, tmp_path):
    straight, first_half, second_half = tmp_path / "straight", tmp_path / "a", tmp_path / "b"
    run(compose_cfg("scheduler=cosine", "iterations=4"), straight)
    # The first half is its own run of 2 iterations; the schedule must still be the 4-iteration one.
    run(compose_cfg("scheduler=cosine", "scheduler.T_max=4", "iterations=2"), first_half)
    run(compose_cfg("scheduler=cosine", "scheduler.T_max=4", "iterations=4", f"resume={first_half}"), second_half)
    expected = torch.load(straight / "checkpoints" / "last.pt")
    resumed = torch.load(second_half / "checkpoints" / "last.pt")
    assert resumed["scheduler"] == expected["scheduler"] and resumed["scheduler"]["last_epoch"] == 4
    for key, value in expected["algorithm"].items():
        assert torch.equal(value, resumed["algorithm"][key]), key
    rates = [r["train/lr"] for r in read_jsonl(straight / "metrics.jsonl") if "train/lr" in r]
    resumed_rates = [r["train/lr"] for r in read_jsonl(second_half / "metrics.jsonl") if "train/lr" in r]
    assert rates[0] == 1e-3 and rates[2:] == resumed_rates and rates[3] < rates[2] < rates[1] < rates[0]


def test_the_loop_tells_the_algorithm_its_iteration_also_after_a_resume(compose_cfg, tmp_path, monkeypatch):
    from metarun.algorithms.maml import MAML

    seen = []
    monkeypatch.setattr(MAML, "on_iteration", lambda self, i, n: seen.append((i, n)), raising=False)
    run(compose_cfg("iterations=2"), tmp_path / "a")
    run(compose_cfg("iterations=4", f"resume={tmp_path / 'a'}"), tmp_path / "b")
    assert seen == [(0, 2), (1, 2), (2, 4), (3, 4)]


def test_checkpoints_written_before_best_val_had_a_direction_still_resume(compose_cfg, tmp_path):
    """Old last.pt files: best_val_acc (minus the MSE for regression), NumPy's RNG state as an array, no scheduler."""
    import random

    from metarun.loop import RunState
    from metarun.objectives import Classification, Regression

    run(compose_cfg("iterations=2"), tmp_path / "a")
    path = tmp_path / "a" / "checkpoints" / "last.pt"
    saved = torch.load(path)
    saved["state"] = {"iteration": 2, "best_val_acc": 0.25, "best_iteration": 1}
    saved["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    del saved["scheduler"]
    torch.save(saved, path)
    assert RunState.from_saved({"iteration": 2, "best_val_acc": -0.5, "best_iteration": 1}, Regression()).best_val == 0.5
    assert RunState.from_saved({"iteration": 2, "best_val_acc": -math.inf, "best_iteration": -1},
                               Classification()).best_val is None
    run(compose_cfg("iterations=3", f"resume={tmp_path / 'a'}"), tmp_path / "b")
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert resumed["state"]["iteration"] == 3 and "best_val_acc" not in resumed["state"]


def test_ensemble_of_the_top_k_checkpoints_averages_their_predictions(compose_cfg, tmp_path):
    """eval.top_k keeps the k best validation checkpoints and tests their ensemble; with one member
    the ensemble is that model itself."""
    from metarun.build import build
    from metarun.loop import score_checkpoints

    run(compose_cfg("iterations=4", "eval.top_k=3"), tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "top").iterdir())
    assert len(kept) == 3 and len(results["tested_iterations"]) == 3
    assert kept == sorted(checkpoint.top_file(tmp_path, i).name for i in results["tested_iterations"])
    assert results["tested_iterations"][0] == results["best_iteration"]
    parts = build(compose_cfg(), tmp_path / "parts")
    ckpt = tmp_path / "run" / "checkpoints"
    single = score_checkpoints(parts.algorithm, checkpoint.TOP, [checkpoint.best_file(ckpt)], {"test": parts.test_tasks},
                               parts.objective, True, 1.96)["test"]
    plain = score_tasks(parts.algorithm, parts.test_tasks, True, 1.96)
    assert torch.equal(single.accuracy, plain.accuracy)
    members = [checkpoint.top_file(ckpt, i) for i in results["tested_iterations"]]
    ensemble = score_checkpoints(parts.algorithm, checkpoint.TOP, members, {"test": parts.test_tasks}, parts.objective,
                                 True, 1.96)["test"]
    assert ensemble.summary()["acc_mean"] == pytest.approx(results["curves"]["test"]["acc_mean"])
    # By hand: the mean of the members' class probabilities decides each query.
    from metarun.checkpoint import load_model
    from metarun.loop import task_results

    probabilities = []
    for path in members:
        load_model(path, parts.algorithm)
        probabilities.append([r[-1].predictions for r in task_results(parts.algorithm, parts.test_tasks, True)])
    for t, task in enumerate(parts.test_tasks):
        mean = torch.stack([p[t] for p in probabilities]).mean(0)
        assert float(ensemble.accuracy[t, -1]) == pytest.approx(float((mean.argmax(1) == task.query.y).float().mean()))
