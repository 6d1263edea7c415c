"""Learning checks: short runs must beat chance by a wide margin (margins, not exact numbers)."""

from __future__ import annotations

import json

import pytest

CHANCE_5WAY = 0.2


def short_run(compose_cfg, tmp_path, *overrides: str) -> dict:
    from metarun.loop import run

    cfg = compose_cfg(
        "dataset=glyphs", "iterations=150", "meta_batch_size=8", "eval_every=50", "eval.val_tasks=50",
        "eval.tasks=200", *overrides,
    )
    run(cfg, tmp_path)
    return json.loads((tmp_path / "results.json").read_text())


def test_maml_learns_glyphs_far_above_chance_and_below_perfect(compose_cfg, tmp_path):
    results = short_run(compose_cfg, tmp_path)
    curve = results["curves"]["test"]["acc_mean"]
    # Before adaptation the head is untrained for the task's labels: chance level.
    assert curve[0] < CHANCE_5WAY + 0.1
    assert results["test/acc_mean"] > CHANCE_5WAY + 0.3
    # glyphs is a real few-shot problem: a short run does not solve it.
    assert results["test/acc_mean"] < 0.97


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fomaml", "metasgd", "anil"])
def test_other_gradient_methods_learn_glyphs(compose_cfg, tmp_path, algorithm):
    results = short_run(compose_cfg, tmp_path, f"algorithm={algorithm}")
    assert results["test/acc_mean"] > CHANCE_5WAY + 0.25
