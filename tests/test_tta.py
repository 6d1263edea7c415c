"""Test-time augmentation (``eval.tta_views``): the tested prediction is the mean over each test task
and augmented copies of it, as an ensemble of views (issue 22: a lever for the Omniglot challenge)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CONF
from metarun import checkpoint
from metarun.augment import RandomAffine
from metarun.build import augmentation, build
from metarun.loop import run, score_checkpoints, task_results
from metarun.tasks.sampling import AugmentedTasks
from test_evaluate import call, results_of

AFFINE = RandomAffine(degrees=10.0, translate=0.05, scale=(0.8, 1.2), shear=0.3)


def images(tasks) -> list[torch.Tensor]:
    return [torch.cat([task.support.x, task.query.x]) for task in tasks]


def test_a_view_is_the_same_images_every_time_on_any_share_and_leaves_the_rng_alone(compose_cfg, tmp_path):
    tasks = build(compose_cfg(), tmp_path).test_tasks
    state = torch.get_rng_state()
    first, again = images(AugmentedTasks(tasks, AFFINE, 1)), images(AugmentedTasks(tasks, AFFINE, 1))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    plain, other = images(tasks), images(AugmentedTasks(tasks, AFFINE, 2))
    assert all(a.shape == p.shape and not torch.equal(a, p) for a, p in zip(first, plain, strict=True))  # every task changed
    assert all(not torch.equal(a, o) for a, o in zip(first, other, strict=True))  # each view draws its own distortions
    # A rank's share (tasks 2 and 3 of 4) sees the images the whole list has there: seeds follow the place.
    share = images(AugmentedTasks(tasks.part(slice(2, 4)), AFFINE, 1))
    assert all(torch.equal(a, b) for a, b in zip(share, first[2:], strict=True))
    labels = [(t.support.y, t.query.y) for t in AugmentedTasks(tasks, AFFINE, 1)]
    assert all(torch.equal(a[0], t.support.y) and torch.equal(a[1], t.query.y) for a, t in zip(labels, tasks, strict=True))


@pytest.mark.parametrize("algorithm", ["maml", "protonet"])
def test_the_tested_prediction_is_the_mean_over_the_task_and_its_views(compose_cfg, tmp_path, algorithm):
    cfg = compose_cfg(f"algorithm={algorithm}", "augment=koch_affine", "eval.tta_views=2", "eval.tasks=6")
    run(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    parts = build(cfg, tmp_path / "parts")
    checkpoint.load_model(checkpoint.best_file(tmp_path / "run" / "checkpoints"), parts.algorithm)
    tasks = parts.test_tasks
    transform = augmentation(cfg)
    views = [task_results(parts.algorithm, v, True) for v in (tasks, *(AugmentedTasks(tasks, transform, i)
                                                                         for i in (1, 2)))]
    by_hand = []
    for t, task in enumerate(tasks):
        mean = torch.stack([view[t][-1].predictions for view in views]).mean(0)  # [n_query, ways]
        by_hand.append(float((mean.argmax(1) == task.query.y).float().mean()))
    assert results["test/acc_mean"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-6)
    plain = score_checkpoints(parts.algorithm, checkpoint.BEST, [checkpoint.best_file(tmp_path / "run" / "checkpoints")],
                              {"test": tasks}, parts.objective, True, 1.96)["test"]
    assert plain.curves()["loss_mean"] != pytest.approx(results["curves"]["test"]["loss_mean"])  # the views count


def test_metarun_eval_tests_a_run_trained_without_augmentation_with_tta(compose_cfg, tmp_path, capsys):
    out = tmp_path / "run"
    run(compose_cfg(), out)
    code, _, err = call(capsys, out, "eval.tta_views=2")
    assert code == 2 and err.count("metarun: error:") == 1 and "needs an augmentation" in err, err
    code, stdout, err = call(capsys, out, "--name", "tta", "augment=koch_affine", "eval.tta_views=2")
    assert code == 0, err
    tta, plain = results_of(out, "tta"), results_of(out)
    assert tta["config"]["eval"]["tta_views"] == 2 and tta["eval_tasks"] == plain["eval_tasks"]
    assert tta["curves"]["test"]["loss_mean"] != plain["curves"]["test"]["loss_mean"]
    assert stdout.strip().splitlines()[-1].startswith("test accuracy: ")



@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(p.stem for p in (CONF / "algorithm").glob("*.yaml")))
def test_every_algorithm_can_be_tested_with_test_time_augmentation(compose_cfg, tmp_path, algorithm):
    """Every method's test results carry predictions, so each can be tested as an ensemble of views."""
    run(compose_cfg(f"algorithm={algorithm}", "augment=koch_affine", "eval.tta_views=1"), tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0.0 <= results["test/acc_mean"] <= 1.0 and results["config"]["eval"]["tta_views"] == 1
