"""The divergence guard: when adaptation makes the validation query loss explode (after the last inner
step more than ``eval.divergence_factor`` times its value at step 0), training goes on, one warning line
says so, and results.json (``diverged``, ``divergence``), W&B's summary and metarun-table record it."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import torch

from conftest import TINY, run_cli
from metarun import table
from metarun.loop import RunState, check_divergence, check_test_divergence
from metarun.statistics import TaskScores, divergence
from metarun.tracking import Tracker, summary_values

# MAML on sinusoids with an inner rate 20x the regression one (Finn et al.: 0.01): the validation MSE after the
# 3 test steps is ~1e5-1e8 times its step-0 value, and stays finite (0.3 reaches 1e17, 0.6 overflows to inf).
DIVERGING = ["dataset=sinusoid", "algorithm=maml", "algorithm.inner_lr=0.2"]
STABLE = ["dataset=sinusoid", "algorithm=maml", "algorithm.inner_lr=0.01"]
WARNING = "adaptation diverged at iteration"


class Recorder(Tracker):
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log(self, metrics: dict[str, float], iteration: int) -> None:
        self.logged.append((metrics, iteration))


def scores(loss: list[list[float]]) -> TaskScores:
    """``loss[task][step]``, as validation scores it."""
    return TaskScores(loss=torch.tensor(loss, dtype=torch.float64), accuracy=None, ci_z=1.96, loss_metric="mse")


def test_divergence_is_the_last_step_over_step_0_beyond_the_factor():
    assert divergence([2.0, 30.0, 250.0], 100.0) == (2, 125.0)
    assert divergence([2.0, 300.0, 200.0], 100.0) is None  # exactly 100x after the last step: not more
    assert divergence([2.0, 1e6, 1.0], 100.0) is None  # only the last step counts
    assert divergence([5.0], 100.0) is None  # no inner loop: one value, never diverges
    assert divergence([2.0, math.nan], 100.0) is None  # non-finite losses are the loop's stop, not this
    assert divergence([0.0, 1.0], 100.0) == (1, math.inf)
    assert divergence([2.0, 4.0], 1.5) == (1, 2.0)


def test_task_scores_use_the_mean_loss_per_step():
    val = scores([[1.0, 50.0, 100.0, 400.0], [3.0, 10.0, 300.0, 1200.0]])  # means 2, 30, 200, 800
    assert val.summary()["loss_mean"] == [2.0, 30.0, 200.0, 800.0]
    assert val.divergence(100.0) == (3, 400.0)
    assert val.divergence(400.0) is None
    assert scores([[1.0], [3.0]]).divergence(100.0) is None  # a method without an inner loop


def test_check_divergence_warns_once_and_keeps_the_worst(caplog):
    state, tracker = RunState(), Recorder()
    with caplog.at_level(logging.WARNING, logger="metarun.loop"):
        state.iteration = 1
        check_divergence(scores([[1.0, 5.0]]), 100.0, state, tracker)  # 5x: fine
        assert state.divergence is None and tracker.logged == []
        state.iteration = 2
        check_divergence(scores([[1.0, 10.0, 500.0]]), 100.0, state, tracker)
        state.iteration = 3
        check_divergence(scores([[1.0, 10.0, 300.0]]), 100.0, state, tracker)  # milder: the worst stays
        state.iteration = 4
        check_divergence(scores([[2.0, 10.0, 2000.0]]), 100.0, state, tracker)  # worse
        state.iteration = 5
        check_divergence(scores([[2.0, 1e9]]), None, state, tracker)  # null: no check
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"{WARNING} 2:")
    assert "after step 2 is 500 times" in warnings[0] and "eval.divergence_factor=100" in warnings[0]
    assert state.divergence == {"iteration": 4, "step": 2, "factor": 1000.0, "threshold": 100.0, "first_iteration": 2}
    assert tracker.logged == [({"val/divergence_factor": 500.0}, 2), ({"val/divergence_factor": 300.0}, 3),
                              ({"val/divergence_factor": 1000.0}, 4)]


def test_one_test_task_that_blows_up_is_a_divergence_the_validation_missed(caplog):
    """The sinusoid at 70 000 iterations (docs/fidelity.md): 599 test tasks adapt, one explodes to 1e32 after 10
    steps; the mean over tasks says diverged, and results.json records it as the test's."""
    tasks = [[3.0, 0.6, 0.35]] * 599 + [[8.3, 0.36, 1.1e32]]
    state = RunState()
    with caplog.at_level(logging.WARNING, logger="metarun.loop"):
        check_test_divergence(scores(tasks), 100.0, state)
    assert state.divergence["split"] == "test" and state.divergence["step"] == 2
    assert state.divergence["factor"] > 1e28
    assert [r.getMessage() for r in caplog.records][0].startswith("adaptation diverged on the test tasks")
    quiet = RunState()
    check_test_divergence(scores([[3.0, 0.6, 0.35]] * 600), 100.0, quiet)
    check_test_divergence(scores(tasks), None, quiet)  # null: no check
    assert quiet.divergence is None
    earlier = RunState(divergence={"iteration": 4, "step": 2, "factor": 1000.0})
    check_test_divergence(scores(tasks), 100.0, earlier)
    assert earlier.divergence["iteration"] == 4  # the validation's record stays


def test_wandb_summary_holds_the_divergence():
    results = {"test/mse_mean": 1.0, "diverged": True, "curves": {},
               "divergence": {"iteration": 2, "step": 3, "factor": 1e5, "threshold": 100.0, "first_iteration": 1}}
    summary = summary_values(results)
    assert summary["diverged"] is True and summary["divergence/step"] == 3 and summary["divergence/factor"] == 1e5
    assert "curves" not in summary and "divergence" not in summary
    assert summary_values({"diverged": False, "divergence": None}) == {"diverged": False}


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_diverging_run_keeps_training_warns_once_and_records_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*DIVERGING, *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    warned = [line for line in output.splitlines() if WARNING in line]
    assert len(warned) == 1, output[-3000:]
    assert "[WARNING]" in warned[0] and "eval.divergence_factor=100" in warned[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["diverged"] is True
    record = results["divergence"]
    assert record["step"] == results["eval_inner_steps"] == 3
    assert record["threshold"] == 100.0 and 100.0 < record["factor"] < math.inf
    # Training went on to the end, every loss finite: the guard, not the non-finite stop.
    lines = metrics_lines(run_dir)
    assert [line["iteration"] for line in lines if "val/loss" in line] == [1, 2]
    assert all(math.isfinite(v) for line in lines for k, v in line.items() if k.startswith(("train/", "val/")))
    # The factor is that of a validation as it ran (its own per-step curve), logged at its iteration.
    logged = {line["iteration"]: line["val/divergence_factor"] for line in lines if "val/divergence_factor" in line}
    assert record["factor"] == max(logged.values()) and logged[record["iteration"]] == record["factor"]
    assert record["first_iteration"] == min(logged) and f"{WARNING} {min(logged)}:" in warned[0]


def test_a_run_that_does_not_diverge_says_so(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*STABLE, *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert WARNING not in output
    results = json.loads((run_dir / "results.json").read_text())
    assert results["diverged"] is False and results["divergence"] is None
    assert not any("val/divergence_factor" in line for line in metrics_lines(run_dir))


def test_the_table_marks_a_row_whose_seed_diverged(tmp_path):
    from test_table import write_run

    sweep = tmp_path / "sweep"
    write_run(sweep, 0, "maml_sinusoid_5shot", 0, 0.5, 0.02)
    diverged = write_run(sweep, 1, "maml_sinusoid_5shot", 1, 0.6, 0.02)
    results = json.loads((diverged / "results.json").read_text())
    results.update(diverged=True, divergence={"iteration": 2, "step": 3, "factor": 178000.0, "threshold": 100.0,
                                              "first_iteration": 1})
    (diverged / "results.json").write_text(json.dumps(results))
    write_run(sweep, 2, "maml_omniglot_5w1s", 0, 98.0, 0.5)
    out = tmp_path / "out"
    assert table.main(["--collect", str(sweep), "--out", str(out)]) == 0
    text = (out / "table.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("| maml_sinusoid_5shot |"))
    assert "| above; diverged (seed 1: step 3, x1.78e+05) |" in line  # verdict; the mark
    other = next(line for line in text.splitlines() if line.startswith("| maml_omniglot_5w1s |"))
    assert "diverged" not in other
    assert "diverged (seed S: step K, xF)" in text  # the footnote says what it means
    with open(out / "table.csv", newline="") as fh:
        rows = {r["preset"]: r for r in csv.DictReader(fh)}
    assert rows["maml_sinusoid_5shot"]["diverged"] == "diverged (seed 1: step 3, x1.78e+05)"
    assert rows["maml_sinusoid_5shot"]["verdict"] == "above"  # the verdict column stays a verdict
    assert rows["maml_omniglot_5w1s"]["diverged"] == ""


def test_the_table_reads_diverged_without_details(tmp_path):
    from test_table import write_run

    job = write_run(tmp_path / "sweep", 0, "maml_sinusoid_5shot", 0, 0.5, 0.02)
    results = json.loads((job / "results.json").read_text())
    (job / "results.json").write_text(json.dumps({**results, "diverged": True}))
    [row] = table.group(table.collect(tmp_path / "sweep"))
    assert row.diverged == "diverged (seed 0)"
