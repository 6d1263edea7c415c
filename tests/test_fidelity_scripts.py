"""scripts/fidelity/run_pair.py, the comparator of issue 22: reads finished runs of both sides, refuses to reuse
a run made with another budget or other arguments, and gives the verdict by its rule (the difference of the
seed-mean test accuracies against their combined CI). Runs here are result files written by hand, so nothing
is trained and no reference code is needed."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fidelity" / "run_pair.py"


@pytest.fixture(scope="module")
def run_pair():
    spec = importlib.util.spec_from_file_location("run_pair", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_pair"] = module
    spec.loader.exec_module(module)
    return module


def write_reference(out: Path, seed: int, test: float, ci: float, val: list[float], iterations: int = 200) -> None:
    run = out / "reference" / "maml" / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({
        "iterations": iterations,
        "val": [{"iteration": 100 * (i + 1), "acc_mean": acc, "acc_ci95": 0.02, "n_tasks": 50}
                for i, acc in enumerate(val)],
        "test": {"acc_mean": test, "acc_ci95": ci, "n_tasks": 300},
        "best_iteration": 100 * (val.index(max(val)) + 1), "best_val_acc": max(val),
        "train_seconds": 10.0, "wall_seconds": 12.0}))


def write_metarun(out: Path, seed: int, test: float, ci: float, val: list[float], iterations: int = 200) -> None:
    run = out / "metarun" / "maml" / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "config": {"iterations": iterations, "eval": {"val_tasks": 50}}, "eval_tasks": 300,
        "test/acc_mean": test, "test/acc_ci95": ci, "best_iteration": 100 * (val.index(max(val)) + 1),
        "best_val_acc": max(val), "train_seconds": 5.0, "wall_seconds": 6.0}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"iteration": 100 * (i + 1), "val/acc": acc}) + "\n"
                                               for i, acc in enumerate(val)))


def args(out: Path, seeds=(0, 1)) -> argparse.Namespace:
    return argparse.Namespace(out=out, seeds=list(seeds), only=None, iterations=200, meta_batch=8, val_every=100,
                              val_tasks=50, test_tasks=300, threads=1, z=1.96, ref=out / "no_reference")


def never_run(seed, path):  # a finished run is read, never run again
    raise AssertionError(f"seed {seed} would run again")


def compare(run_pair, out: Path) -> dict:
    a = args(out)
    sides = run_pair.run_seeds(a, "maml", lambda seed, p: ["python", "ref.py", str(seed)],
                               lambda seed, p: ["metarun", f"seed={seed}"], {})
    run_pair.compare(a, "maml", sides, "reference", "test", {})
    return json.loads((out / "pair_maml.json").read_text())


def test_the_verdict_is_the_difference_of_seed_means_against_the_combined_ci(run_pair, tmp_path):
    for seed, (ref, mr) in enumerate([(0.70, 0.72), (0.74, 0.73)]):
        write_reference(tmp_path, seed, ref, 0.03, [0.6, ref])
        write_metarun(tmp_path, seed, mr, 0.04, [0.65, mr])
    pair = compare(run_pair, tmp_path)
    ci_ref, ci_mr = math.sqrt(2 * 0.03 ** 2) / 2, math.sqrt(2 * 0.04 ** 2) / 2
    assert pair["diff"] == pytest.approx(0.725 - 0.72)
    assert pair["combined_ci95"] == pytest.approx(math.hypot(ci_ref, ci_mr))
    assert pair["verdict"] == "agree"
    assert pair["reference"]["summary"]["seed_sd"] == pytest.approx(math.sqrt(2 * 0.02 ** 2))
    assert (tmp_path / "pair_maml.png").stat().st_size > 0


@pytest.mark.parametrize(("metarun_tests", "verdict"), [(0.90, "metarun better"), (0.60, "metarun worse")])
def test_a_difference_beyond_the_combined_ci_is_a_verdict_either_way(run_pair, tmp_path, metarun_tests, verdict):
    for seed in (0, 1):
        write_reference(tmp_path, seed, 0.75, 0.02, [0.7, 0.75])
        write_metarun(tmp_path, seed, metarun_tests, 0.02, [0.7, metarun_tests])
    assert compare(run_pair, tmp_path)["verdict"] == verdict


def test_a_run_with_another_budget_or_other_arguments_is_not_reused(run_pair, tmp_path):
    write_reference(tmp_path, 0, 0.7, 0.02, [0.6, 0.7], iterations=400)
    a = args(tmp_path, seeds=(0,))
    a.only = "reference"
    with pytest.raises(SystemExit, match="another budget .*iterations 400 != 200"):
        run_pair.run_seeds(a, "maml", lambda seed, p: ["python", "ref.py"], never_run, {})
    record = tmp_path / "reference" / "maml" / "seed0" / "command.json"
    record.write_text(json.dumps(["ref.py", "--init", "torch"]))
    with pytest.raises(SystemExit, match="holds other arguments"):
        run_pair.run_seeds(a, "maml", lambda seed, p: ["python", "ref.py"], never_run, {})


def parse(run_pair, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    run_pair.add_run_arguments(p)
    old, sys.argv = sys.argv, ["run_pair.py", *argv]
    try:
        return run_pair.parse_run_arguments(p)
    finally:
        sys.argv = old


def test_each_metarun_seed_redraws_its_split_as_the_reference_does(run_pair, tmp_path):
    a = args(tmp_path, seeds=(0, 1, 2))
    a.data_root, a.cpu, a.metarun, a.metarun_extra, a.metarun_split = tmp_path, False, "metarun", [], "seed"
    splits = [[x for x in run_pair.metarun_command("protonet", a, seed, tmp_path) if x.startswith("dataset.split_seed=")]
              for seed in a.seeds]
    assert splits == [["dataset.split_seed=1"], ["dataset.split_seed=2"], ["dataset.split_seed=3"]]
    a.metarun_split = "fixed"  # the first pairs' protocol: the dataset's default split for every seed
    assert not any(x.startswith("dataset.split_seed=") for x in run_pair.metarun_command("maml", a, 2, tmp_path))


def test_ref_extra_is_split_like_a_shell_line_and_reaches_both_drivers(run_pair, tmp_path):
    a = parse(run_pair, ["--ref-extra=--init torch", "--ref-extra", "--inner-batches 'epochs'"])
    assert a.ref_extra == ["--init", "torch", "--inner-batches", "epochs"]
    spec = importlib.util.spec_from_file_location("run_pair_mamlpp", SCRIPT.parent / "mamlpp" / "run_pair_mamlpp.py")
    mamlpp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mamlpp)
    for key in ("data_root", "split_seed", "iterations", "meta_batch", "iters_per_epoch", "msl_iterations",
                "first_order_iterations", "inner_steps", "eval_inner_steps", "inner_lr", "meta_lr", "min_lr",
                "val_every", "val_tasks", "test_tasks", "top_k"):
        setattr(a, key, 1)
    a.ref, a.init_seed = tmp_path, "seed"
    cmd = mamlpp.reference_command(a, 0, tmp_path / "result.json")
    assert cmd[-4:] == ["--init", "torch", "--inner-batches", "epochs"]
