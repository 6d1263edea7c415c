"""``metarun-eval``: a run's checkpoint scored again, from its run directory.

One tiny MAML run on glyphs is trained through the ``metarun`` command for the module; every test
evaluates a private copy of it, in-process through ``metarun.evaluate.command.main`` (the console
script's function) or, where the process itself matters, through the installed script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import TINY, TINY_GLYPHS, fingerprint, glyph_generation_options, run_cli
from metarun import checkpoint
from metarun.build import build_algorithm, build_data
from metarun.checkpoint import save_model
from metarun.data.glyphs import generate_glyphs
from metarun.errors import CheckpointError
from metarun.evaluate import command, saved_config

EVAL_SCRIPT = Path(sys.executable).parent / "metarun-eval"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A tiny MAML run (5-way 1-shot, 2 iterations, 4 test tasks, console=false) through the metarun command."""
    root = tmp_path_factory.mktemp("trained")
    out = root / "run"
    proc = run_cli(*TINY_GLYPHS, *TINY, f"hydra.run.dir={out}", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    """A private copy of the trained run."""
    return Path(shutil.copytree(trained[0], tmp_path / "run"))




def save_untrained_run(cfg, run_dir: Path) -> None:
    """A run directory as metarun-eval reads it: ``cfg`` in ``.hydra/config.yaml`` and the model it
    builds, untrained, as ``checkpoints/best.pt`` (a metric method needs no training to be scored)."""
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    algorithm, _, _ = build_algorithm(cfg, torch.device("cpu"))
    save_model(run_dir / "checkpoints" / "best.pt", algorithm, 0)


def edit_saved_config(run_dir: Path, edit) -> None:
    """``edit(cfg)`` applied to the run's saved configs: ``.hydra/config.yaml`` and the one saved with the
    weights in ``checkpoints/last.pt`` (which metarun-eval reads first)."""
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    edit(saved)
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    last = checkpoint.last_file(checkpoint.folder(run_dir))
    state = checkpoint.safe_load(last)
    saved = OmegaConf.create(state["config"])
    edit(saved)
    state["config"] = OmegaConf.to_container(saved)
    torch.save(state, last)


def call(capsys, *args: object) -> tuple[int, str, str]:
    """``metarun-eval ARGS`` in this process: exit status, stdout, stderr."""
    try:
        command.main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def results_of(run_dir: Path, name: str = "") -> dict:
    return json.loads((run_dir / "eval" / name / "results.json" if name else run_dir / "results.json").read_text())


def tasks_of(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval" / name / "tasks.jsonl").read_text().splitlines()]


def save_png(array: np.ndarray, path: Path) -> str:
    """uint8 ``[1, S, S]`` as a greyscale PNG; returns the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[0]).save(path)
    return path.name


# ----------------------------------------------------------------------------------------------
# The run's own tasks
# ----------------------------------------------------------------------------------------------


def test_a_quiet_run_still_ends_with_its_test_result_and_where_it_is(trained):
    out, proc = trained
    lines = [line for line in proc.stdout.splitlines() if line.startswith("test accuracy:")]
    results = results_of(out)
    assert len(lines) == 1, proc.stdout
    assert f"{100 * results['test/acc_mean']:.2f} ± {100 * results['test/acc_ci95']:.2f}%" in lines[0]
    assert lines[0].endswith(f"results: {out / 'results.json'}")


def test_the_command_reproduces_the_runs_own_test_numbers_exactly(run_dir):
    before = fingerprint(run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(EVAL_SCRIPT), str(run_dir)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run, again = results_of(run_dir), results_of(run_dir, "best-test")
    assert again["curves"]["test"] == run["curves"]["test"]  # every step's mean and CI, bit for bit
    assert again["test/acc_mean"] == run["test/acc_mean"] and again["test/acc_ci95"] == run["test/acc_ci95"]
    assert again["checkpoint_iterations"] == [run["best_iteration"]] and again["eval_tasks"] == 4
    assert again["config_source"].endswith("checkpoints/last.pt")  # the config saved with the weights
    final = proc.stdout.strip().splitlines()[-1]
    assert final.startswith(f"test accuracy: {100 * run['test/acc_mean']:.2f} ± ") and "best.pt" in final
    for name in ("metrics.jsonl", "adaptation.png", "tasks.jsonl"):
        assert (run_dir / "eval" / "best-test" / name).is_file()
    assert len(tasks_of(run_dir, "best-test")) == 4
    after = fingerprint(run_dir)
    assert {k: v for k, v in after.items() if k.split("/")[0] != "eval"} == before  # the run's files untouched


def test_the_config_saved_with_the_checkpoint_wins_over_a_rewritten_hydra_config(run_dir, compose_cfg, capsys):
    """.hydra/config.yaml replaced by another algorithm's config (a job directory reused, a file copied over):
    the run is still scored with the config its checkpoint was trained with, and gives its own numbers."""
    other = compose_cfg("algorithm=protonet")
    OmegaConf.save(other, run_dir / ".hydra" / "config.yaml")
    code, _, err = call(capsys, run_dir)
    assert code == 0, err
    again = results_of(run_dir, "best-test")
    assert again["config_source"].endswith("checkpoints/last.pt")
    assert again["config"]["algorithm"]["_target_"] == "metarun.algorithms.maml.MAML"
    assert again["curves"]["test"] == results_of(run_dir)["curves"]["test"]
    # Without last.pt (a run stopped before its first checkpoint, say) the next saved config is read.
    (run_dir / "checkpoints" / "last.pt").unlink()
    code, _, err = call(capsys, run_dir, "--name", "without-last")
    assert code == 2 and "best.pt does not fit the model the config builds" in err, err


def test_the_val_split_reproduces_the_runs_validation_curve(run_dir, capsys):
    code, out, err = call(capsys, run_dir, "--split", "val")
    assert code == 0, err
    assert results_of(run_dir, "best-val")["curves"]["val"] == results_of(run_dir)["curves"]["val"]
    assert out.strip().splitlines()[-1].startswith("val accuracy: ")


def test_the_top_k_ensemble_is_reproduced_from_a_run_without_hydra_files(compose_cfg, tmp_path, capsys):
    """A run made in-process (no .hydra/): the config comes from last.pt, and the default checkpoint is
    what the run tested, the ensemble of its top 2."""
    from metarun.loop import run

    out = tmp_path / "run"
    run(compose_cfg("iterations=3", "eval.top_k=2"), out)
    code, _, err = call(capsys, out)
    assert code == 0, err
    again, original = results_of(out, "top-test"), results_of(out)
    assert again["checkpoint"] == "top" and again["config_source"].endswith("checkpoints/last.pt")
    assert again["checkpoint_iterations"] == original["tested_iterations"]
    assert again["curves"]["test"] == original["curves"]["test"]


def test_settings_newer_than_the_run_take_todays_defaults(run_dir, capsys, caplog):
    """A run saved by an older metarun lacks the keys added since, at the top level and in its
    groups' options: they take conf/'s defaults (logged), and the saved values stay."""
    def older(saved):
        del saved.eval["top_k"]
        del saved.algorithm["eval_inner_steps"]  # both as conf/ has them: the run's numbers come out again

    edit_saved_config(run_dir, older)
    with caplog.at_level("INFO", logger="metarun.evaluate"):
        code, _, err = call(capsys, run_dir)
    assert code == 0, err
    assert results_of(run_dir, "best-test")["curves"]["test"] == results_of(run_dir)["curves"]["test"]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "eval.top_k" in said and "algorithm.eval_inner_steps" in said


def test_top_k_members_are_taken_in_the_order_the_run_tested_them(tmp_path):
    """The ensemble sums its members' predictions in order: results.json's tested_iterations (best
    first), else the run state in last.pt (an interrupted run)."""
    top = tmp_path / "checkpoints" / "top"
    top.mkdir(parents=True)
    for iteration in (1, 2, 3):
        (top / f"iteration_{iteration:07d}.pt").touch()
    torch.save({"algorithm": {}, "state": {"top": [[0.9, 2], [0.8, 3], [0.7, 1]]}}, tmp_path / "checkpoints" / "last.pt")
    assert [p.name[-6:-3] for p in checkpoint.top_members(tmp_path)] == ["002", "003", "001"]
    (tmp_path / "results.json").write_text(json.dumps({"tested_iterations": [3, 1, 2]}))
    assert [p.name[-6:-3] for p in checkpoint.top_members(tmp_path)] == ["003", "001", "002"]
    (top / "iteration_0000001.pt").unlink()
    with pytest.raises(CheckpointError, match="iteration_0000001.pt, a member of the run's top-k "
                                                         "ensemble, is missing"):
        checkpoint.top_members(tmp_path)


# ----------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------


def test_a_gradient_method_trained_5_way_tests_3_way_tasks(run_dir, capsys):
    code, _, err = call(capsys, run_dir, "ways=3")
    assert code == 0, err
    results = results_of(run_dir, "best-test-ways=3")
    assert results["config"]["ways"] == 3 and results["config"]["train_ways"] == 5  # the head stays 5-way
    # 1 query per class: a 3-way task's accuracy is a multiple of 1/3 (a 5-way one's of 1/5).
    accuracies = [a for task in tasks_of(run_dir, "best-test-ways=3") for a in task["acc"]]
    assert all(abs(3 * a - round(3 * a)) < 1e-6 for a in accuracies)
    assert any(abs(5 * a - round(5 * a)) > 1e-6 for a in accuracies)


def test_more_eval_inner_steps_give_more_curve_points(run_dir, capsys):
    code, _, err = call(capsys, run_dir, "algorithm.eval_inner_steps=10", "--name", "steps")
    assert code == 0, err
    results = results_of(run_dir, "steps")
    assert results["eval_inner_steps"] == 10 and len(results["curves"]["test"]["acc_mean"]) == 11
    assert len(results_of(run_dir)["curves"]["test"]["acc_mean"]) == 4  # the run's 3 steps
    rows = [json.loads(line) for line in (run_dir / "eval" / "steps" / "metrics.jsonl").read_text().splitlines()]
    assert [row["adapt/step"] for row in rows] == list(range(11))


def test_the_eval_is_a_wandb_job_of_type_eval_in_the_runs_group(run_dir, capsys, monkeypatch):
    import wandb

    seen = []

    def init(**kwargs):
        seen.append(kwargs)
        raise RuntimeError("no W&B in tests")  # the tracker logs it and carries on

    monkeypatch.setattr(wandb, "init", init)
    edit_saved_config(run_dir, lambda saved: OmegaConf.update(saved, "wandb.group", "my-study"))
    code, _, err = call(capsys, run_dir, "wandb.mode=offline")
    assert code == 0, err
    assert seen[0]["job_type"] == "eval" and seen[0]["group"] == "my-study" and seen[0]["mode"] == "offline"
    assert "eval" in seen[0]["tags"] and "checkpoint=best" in seen[0]["tags"]
    # A sweep's job with no group of its own: the sweep's group, as the metarun command names it.
    edit_saved_config(run_dir, lambda saved: OmegaConf.update(saved, "wandb.group", None))
    hydra_yaml = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml")
    hydra_yaml.hydra.mode = "MULTIRUN"
    OmegaConf.save(hydra_yaml, run_dir / ".hydra" / "hydra.yaml")
    assert call(capsys, run_dir, "wandb.mode=offline", "--name", "sweep")[0] == 0
    assert seen[1]["group"] == f"sweep-{run_dir.parent.parent.name}-{run_dir.parent.name}"


# ----------------------------------------------------------------------------------------------
# Episodes files
# ----------------------------------------------------------------------------------------------


def test_the_runs_test_tasks_written_as_an_episodes_file_score_exactly_the_same(run_dir, tmp_path, capsys):
    """Each fixed test task's images as PNG files and an episodes file listing them: decoded by
    glyphs' load_image, they are the same tasks, and every episode scores what its task scored."""
    cfg, _ = saved_config.read_saved_config(run_dir)
    cfg.device = "cpu"
    _, _, test_tasks, _ = build_data(cfg, torch.device("cpu"))
    folder = tmp_path / "episodes"
    lines = []
    for t, task in enumerate(test_tasks):
        episode = {}
        for side, split in (("support", task.support), ("query", task.query)):
            images = (split.x * 255).round().to(torch.uint8).numpy()
            episode[side] = [[f"images/{save_png(image, folder / 'images' / f't{t}_{side}{i}.png')}", int(label)]
                             for i, (image, label) in enumerate(zip(images, split.y.tolist(), strict=True))]
        lines.append(json.dumps({**episode, "name": f"task {t}"}))
    (folder / "tasks.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")

    assert call(capsys, run_dir, "--episodes", folder / "tasks.jsonl", "--name", "file")[0] == 0
    assert call(capsys, run_dir, "--name", "split")[0] == 0
    results = results_of(run_dir, "file")
    assert results["curves"]["episodes"] == results_of(run_dir)["curves"]["test"]
    assert results["episodes/acc_mean"] == results_of(run_dir)["test/acc_mean"] and results["eval_tasks"] == 4
    episodes, tasks = tasks_of(run_dir, "file"), tasks_of(run_dir, "split")
    assert [(e["acc"], e["loss"]) for e in episodes] == [(t["acc"], t["loss"]) for t in tasks]
    assert [e["line"] for e in episodes] == [1, 2, 4, 5]  # the blank line is skipped, and counted
    assert episodes[3]["name"] == "task 3" and {(e["ways"], e["support"], e["query"]) for e in episodes} == {(5, 5, 5)}


def test_protonet_scores_each_episode_of_a_hand_written_file(compose_cfg, tmp_path, capsys):
    """ProtoNet, any weights: a query identical to a support image (1 shot) is nearest to its own
    class's prototype. Episode 1 labels the queries right, episode 2 wrong, episode 3 is 4-way."""
    cfg = compose_cfg("algorithm=protonet")
    run_dir = tmp_path / "run"
    save_untrained_run(cfg, run_dir)

    glyphs = generate_glyphs(**glyph_generation_options(num_alphabets=2, characters_per_alphabet=3,
                                                        samples_per_class=1))
    files = [f"img/{save_png(glyphs.images[c].numpy(), tmp_path / 'img' / f'char{c}.png')}" for c in range(6)]
    episodes = [
        {"support": [[files[c], c] for c in range(3)], "query": [[files[2], 2], [files[0], 0], [files[1], 1]]},
        {"support": [[files[c], c] for c in range(3)], "query": [[files[c], (c + 1) % 3] for c in range(3)]},
        {"support": [[files[5 - c], c] for c in range(4)], "query": [[files[5 - c], c] for c in (3, 1, 0, 2)]},
    ]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    code, out, err = call(capsys, run_dir, "--episodes", tmp_path / "mine.jsonl")
    assert code == 0, err
    records = tasks_of(run_dir, "best-episodes_mine")
    assert [r["acc"] for r in records] == [[1.0], [0.0], [1.0]]
    assert [r["ways"] for r in records] == [3, 3, 4] and [r["line"] for r in records] == [1, 2, 3]
    results = results_of(run_dir, "best-episodes_mine")
    assert results["episodes/acc_mean"] == pytest.approx(2 / 3) and results["eval_inner_steps"] == 0
    assert out.strip().splitlines()[-1].startswith("episodes accuracy: 66.67 ± ")


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, the run's files unchanged
# ----------------------------------------------------------------------------------------------


def write_episodes(folder: Path, classes: int, missing: bool = False, text: str | None = None) -> Path:
    """An episodes file of ``classes`` classes (1 shot, 1 query) with random images; ``missing``
    leaves the last image out; ``text`` replaces the file's content."""
    rng = np.random.default_rng(0)
    entries = []
    for c in range(classes):
        name = f"img/c{c}.png"
        if not (missing and c == classes - 1):
            save_png(rng.integers(0, 256, (1, 28, 28), dtype=np.uint8), folder / name)
        entries.append([name, c])
    path = folder / "episodes.jsonl"
    path.write_text(text if text is not None else json.dumps({"support": entries, "query": entries}) + "\n")
    return path


def no_checkpoint(run_dir: Path, tmp_path: Path) -> list:
    shutil.rmtree(run_dir / "checkpoints")
    return []


def existing_eval(run_dir: Path, tmp_path: Path) -> list:
    (run_dir / "eval" / "mine").mkdir(parents=True)
    (run_dir / "eval" / "mine" / "results.json").write_text('{"earlier": true}')
    return ["--name", "mine"]


@pytest.mark.parametrize(("prepare", "message"), [
    (no_checkpoint, "holds no checkpoint (no checkpoints/best.pt, last.pt or top/*.pt)"),
    (lambda run, tmp: ["backbone.hidden=32"],
     "best.pt does not fit the model the config builds (algorithm=maml, backbone=conv4): size mismatch for"),
    (lambda run, tmp: ["ways=8"], "ways=8 but the model was trained with train_ways=5: metarun.algorithms.maml.MAML's "
                                  "head has 5 outputs"),
    (lambda run, tmp: ["--episodes", write_episodes(tmp, classes=6)],
     "have up to 6 classes (labels 0..5) but the model was trained with train_ways=5"),
    (lambda run, tmp: ["--episodes", write_episodes(tmp, classes=3, missing=True)], "line 1: image img/c2.png not found"),
    (lambda run, tmp: ["--episodes", write_episodes(tmp, classes=3, text='{"support": [["img/c0.png", 0]]\n')],
     "episodes.jsonl line 1 is not a JSON object"),
    (lambda run, tmp: ["--episodes", write_episodes(
        tmp, classes=3, text='{"support": [["img/c0.png", 0], ["img/c2.png", 2]], "query": [["img/c0.png", 0]]}\n')],
     "line 1: support labels must be 0..N-1 with every class present; label 1 has no support image"),
    (lambda run, tmp: ["nosuchkey=1"], "nosuchkey=1: the run's config has no key nosuchkey"),
    (existing_eval, "eval/mine already exists"),
    # issue 21's open cases
    (lambda run, tmp: ["--episodes", write_episodes(
        tmp, classes=3, text='{"support": [["img/c0.png", 0], ["img/c0.png", 1e30]], "query": [["img/c0.png", 0]]}\n')],
     "line 1: every support entry must be [path, label] with a path string and a label int >= 0, got "),
    (lambda run, tmp: ["--episodes", write_episodes(
        tmp, classes=3, text='{"support": [["img/c0.png", 0], ["img/c0.png", 1' + "0" * 30 + ']], '
                             '"query": [["img/c0.png", 0]]}\n')],
     "line 1: support labels must be 0..N-1 with every class present; label 1 has no support image (labels up to "
     + "1" + "0" * 30 + ")"),
    (lambda run, tmp: ["--name", "n" * 300], "--name is 300 bytes long; a folder name has at most 255"),
    (lambda run, tmp: ["algorithm.inner_lr=nan"], "algorithm.inner_lr must be a finite number, got nan"),
    (lambda run, tmp: (run / "checkpoints" / "last.pt").unlink() or  # no last.pt: .hydra/'s config is read
     (run / ".hydra" / "config.yaml").write_text("- 1\n- 2\n") and [],
     "/.hydra/config.yaml is a list, not a mapping of settings"),
])
def test_bad_input_is_one_line_and_changes_nothing(run_dir, tmp_path, capsys, prepare, message):
    args = prepare(run_dir, tmp_path / "input")
    before = fingerprint(run_dir)
    code, _, err = call(capsys, run_dir, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metarun: error: ") and message in lines[0], err
    assert fingerprint(run_dir) == before


def test_episodes_on_a_regression_run_is_one_line(compose_cfg, tmp_path, capsys):
    """A sinusoid run has no image files to read: --episodes is refused before the file is read."""
    cfg = compose_cfg("dataset=sinusoid")
    run_dir = tmp_path / "run"
    save_untrained_run(cfg, run_dir)
    before = fingerprint(run_dir)
    code, _, err = call(capsys, run_dir, "--episodes", write_episodes(tmp_path / "input", classes=3))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metarun: error: --episodes scores classification episodes of "
                                                   "image files and needs an image dataset"), err
    assert fingerprint(run_dir) == before


def test_an_episode_wider_than_the_training_tasks_is_scored_by_a_metric_method_with_one_warning(
        compose_cfg, tmp_path, capsys, caplog):
    """ProtoNet has no output head: a 12-way episode (trained 5-way) runs, and one warning line says so."""
    cfg = compose_cfg("algorithm=protonet")
    run_dir = tmp_path / "run"
    save_untrained_run(cfg, run_dir)
    code, _, err = call(capsys, run_dir, "--episodes", write_episodes(tmp_path / "input", classes=12))
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "have up to 12 classes (labels 0..11): more than the train_ways=5" in warnings[0]
    assert "\n" not in warnings[0]
    assert len(tasks_of(run_dir, "best-episodes_episodes")) == 1


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-runs an imported module
def test_python_m_metarun_evaluate_is_the_command(tmp_path, capsys, monkeypatch):
    """``python -m metarun.evaluate DIR`` (run here through runpy, as ``-m`` runs it): a directory
    without a run is one line and exit status 2."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["metarun.evaluate", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("metarun.evaluate", run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"metarun: error: {tmp_path} holds no checkpoint (no checkpoints/best.pt, last.pt or top/*.pt): not a "
        f"metarun run directory, or its run stopped before the first checkpoint"]
    assert list(tmp_path.iterdir()) == []
