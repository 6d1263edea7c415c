"""``metarun-table`` and the paper presets: aggregates and verdicts from hand-written finished runs,
the command on a real tiny sweep, every preset's ``paper`` block, and every preset running one
iteration (slow)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONF, TINY, TINY_GLYPHS, run_cli
from metarun import table

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def preset(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={name}", *overrides])


def paper_of(name: str) -> dict:
    return OmegaConf.to_container(preset(name).paper, resolve=True)


# ----------------------------------------------------------------------------------------------
# Aggregates and verdicts, from finished runs written by hand
# ----------------------------------------------------------------------------------------------


def write_run(sweep: Path, num: int, name: str, seed: int, mean: float, ci: float, *, iterations: int = 100,
              overrides: tuple[str, ...] = (), curve: list[float] | None = None, wall: float = 10.0) -> Path:
    """A job directory as a Hydra sweep leaves it, with a results.json of known numbers. ``mean`` and ``ci``
    are in the paper's unit (percent for accuracy)."""
    paper = paper_of(name)
    metric = paper["metric"]
    scale = 100.0 if metric == "acc" else 1.0
    job = sweep / f"{num}_experiment={name}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"experiment": name}}}}))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        [f"experiment={name}", f"seed={seed}", f"iterations={iterations}", "dataset.root=/data", *overrides]))
    curve = curve if curve is not None else [mean / 2, mean]
    results = {
        f"test/{metric}_mean": mean / scale,
        f"test/{metric}_ci95": ci / scale,
        "curves": {"test": {f"{metric}_mean": [v / scale for v in curve]}},
        "wall_seconds": wall,
        "train_seconds": wall - 1,
        "device": "cpu",
        "hardware": "Test CPU (2 cores); Linux",
        "config": {"seed": seed, "iterations": iterations, "eval": {"ci_z": 1.96}, "paper": paper},
    }
    (job / "results.json").write_text(json.dumps(results))
    return job


@pytest.fixture
def fake_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    m = paper_of("maml_omniglot_5w1s")["mean"]  # published 98.7 ± 0.4
    write_run(sweep, 0, "maml_omniglot_5w1s", 0, m + 0.1, 0.5, curve=[20.0, m + 0.1])
    write_run(sweep, 1, "maml_omniglot_5w1s", 1, m - 0.1, 0.6, curve=[22.0, m - 0.1])
    write_run(sweep, 2, "maml_omniglot_5w1s", 2, m, 0.4, curve=[24.0, m])
    # the same preset with another setting: a row of its own
    write_run(sweep, 3, "maml_omniglot_5w1s", 0, 50.0, 1.0, overrides=("algorithm.inner_lr=0.1",))
    p20 = paper_of("maml_omniglot_20w1s")  # published with a CI; reproduced above it
    write_run(sweep, 4, "maml_omniglot_20w1s", 0, p20["mean"] + p20["ci95"] + 0.5, 0.3)
    write_run(sweep, 5, "maml_omniglot_20w1s", 1, p20["mean"] + p20["ci95"] + 0.7, 0.3)
    proto = paper_of("protonet_omniglot_5w1s")["mean"]  # no published CI: published mean ± reproduced CI
    write_run(sweep, 6, "protonet_omniglot_5w1s", 0, proto - 8, 1.0)
    write_run(sweep, 7, "protonet_omniglot_5w1s", 1, proto - 6, 1.0)
    match = paper_of("matching_omniglot_5w1s")["mean"]  # no published CI, published mean inside the reproduced CI
    full = preset("matching_omniglot_5w1s").iterations
    write_run(sweep, 8, "matching_omniglot_5w1s", 0, match - 1.0, 1.0, iterations=full)
    write_run(sweep, 9, "matching_omniglot_5w1s", 1, match + 0.6, 1.0, iterations=full)
    mse = paper_of("maml_sinusoid_5shot")["mean"]  # regression, one seed, no CI anywhere
    write_run(sweep, 10, "maml_sinusoid_5shot", 0, mse + 0.15, 0.02, curve=[3.0, 1.0, mse + 0.15])
    (sweep / "11_experiment=maml_omniglot_5w1s").mkdir()  # an unfinished job: no results.json
    return sweep


def rows_by_label(sweep: Path) -> dict[str, table.Row]:
    return {row.label: row for row in table.group(table.collect(sweep))}


def test_aggregates_over_seeds(fake_sweep):
    rows = rows_by_label(fake_sweep)
    assert len(rows) == 6
    m = paper_of("maml_omniglot_5w1s")["mean"]
    row = rows["maml_omniglot_5w1s"]
    assert row.seeds == [0, 1, 2]
    assert row.mean == pytest.approx(m)
    assert row.ci == pytest.approx(1.96 * 0.1 / math.sqrt(3))  # sample std of (m+0.1, m-0.1, m) is 0.1
    assert row.curve == pytest.approx([22.0, m])  # mean over seeds after each step
    assert [run.ci for run in row.runs] == pytest.approx([0.5, 0.6, 0.4])
    assert row.wall_seconds == 10.0 and row.hardware == "Test CPU (2 cores); Linux"
    assert rows["maml_omniglot_5w1s (algorithm.inner_lr=0.1)"].seeds == [0]
    assert rows["maml_omniglot_5w1s (algorithm.inner_lr=0.1)"].ci is None


def test_verdicts(fake_sweep):
    rows = rows_by_label(fake_sweep)
    assert rows["maml_omniglot_5w1s"].verdict == "within"
    assert rows["maml_omniglot_5w1s (algorithm.inner_lr=0.1)"].verdict == "below"
    assert rows["maml_omniglot_20w1s"].verdict == "above"
    # no published CI: the interval is published mean ± the reproduced CI (1.96 * std / sqrt(2))
    proto = rows["protonet_omniglot_5w1s"]
    assert proto.ci == pytest.approx(1.96) and proto.verdict == "below"  # 7 points below, CI 1.96
    match = rows["matching_omniglot_5w1s"]
    assert match.ci == pytest.approx(1.96 * math.sqrt(1.28) / math.sqrt(2)) and match.verdict == "within"
    assert rows["maml_sinusoid_5shot"].verdict == "above"  # MSE: above is worse
    assert rows["maml_sinusoid_5shot"].metric == "mse"


def test_iterations_say_when_a_run_was_shortened(fake_sweep):
    rows = rows_by_label(fake_sweep)
    assert rows["maml_omniglot_5w1s"].shortened
    assert table._iterations(rows["maml_omniglot_5w1s"]) == f"100 (shortened from {preset('maml_omniglot_5w1s').iterations})"
    assert not rows["matching_omniglot_5w1s"].shortened
    assert table._iterations(rows["matching_omniglot_5w1s"]) == str(preset("matching_omniglot_5w1s").iterations)


def test_collect_writes_markdown_csv_and_figure(fake_sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert table.main(["--collect", str(fake_sweep), "--out", str(out)]) == 0
    text = (out / "table.md").read_text()
    m, c = paper_of("maml_omniglot_5w1s")["mean"], paper_of("maml_omniglot_5w1s")["ci95"]
    line = next(line for line in text.splitlines() if line.startswith("| maml_omniglot_5w1s |"))
    assert f"| {m:.2f} ± {c:.2f} |" in line and "| within |" in line and "(3 seeds)" in line
    assert "seed 0: " in line and "seed 2: " in line and "shortened from 60000" in line
    assert "ci_z·std/√seeds" in text and "within: the reproduced mean lies in published mean ± published CI" in text
    with open(out / "table.csv", newline="") as fh:
        csv_rows = {(r["preset"], r["overrides"]): r for r in csv.DictReader(fh)}
    row = csv_rows[("maml_omniglot_5w1s", "")]
    assert float(row["reproduced_mean"]) == pytest.approx(m) and row["verdict"] == "within"
    assert float(row["reproduced_ci"]) == pytest.approx(1.96 * 0.1 / math.sqrt(3))
    assert row["seeds"] == "0 1 2" and row["shortened"] == "True" and row["published_ci95"] == str(c)
    assert csv_rows[("protonet_omniglot_5w1s", "")]["published_ci95"] == ""  # none published
    with Image.open(out / "table.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200
    # Only the presets asked for
    only = tmp_path / "only"
    assert table.main(["--collect", str(fake_sweep), "--out", str(only), "maml_omniglot_2*"]) == 0
    assert [r["preset"] for r in csv.DictReader(open(only / "table.csv"))] == ["maml_omniglot_20w1s"]


def test_a_metric_without_a_curve_over_steps_gets_a_note_in_the_figure_not_a_warning(tmp_path, recwarn):
    """MANN's row reads acc_instance_2, which has no curve over adaptation steps: its panel says so, and
    matplotlib does not warn about an empty legend on the user's terminal."""
    sweep = tmp_path / "sweep"
    write_run(sweep, 0, "mann_omniglot_5w", 0, 0.789, 0.014, curve=[])
    assert table.main(["--collect", str(sweep), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "table.png").stat().st_size > 0
    assert not [w for w in recwarn if "legend" in str(w.message)]


def test_bad_arguments_are_one_line(tmp_path):
    for argv, message in [
        (["no_such_preset"], "no experiment preset matches 'no_such_preset'"),
        (["--collect", str(tmp_path)], "no finished run"),
        (["experiment=maml_omniglot_5w1s"], "name the presets as arguments"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "metarun.table", *argv], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"metarun-table: error: {proc.stderr.split('error: ', 1)[1].strip()}"]
        assert message in proc.stderr


def table_command(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metarun.table", *argv], cwd=cwd, capture_output=True, text=True)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["corrupt", "empty", "list", "out is a file", "out holds a table", "seeds -1",
                                  "iterations 0", "iterations x"])
def test_bad_table_input_is_one_line_and_writes_nothing(fake_sweep, tmp_path, case):
    out = tmp_path / "out"
    argv = ["--collect", str(fake_sweep), "--out", str(out)]
    message = {
        "corrupt": "is not a readable results.json of a finished run", "empty": "is not a readable results.json",
        "list": "not a JSON object", "out is a file": "is a file; name a directory",
        "out holds a table": "already holds a table (table.md", "seeds -1": "--seeds: -1 is not a non-negative",
        "iterations 0": "0 is not a positive integer", "iterations x": "'x' is not an integer",
    }[case]
    bad = fake_sweep / "0_experiment=maml_omniglot_5w1s" / "results.json"
    if case == "corrupt":
        bad.write_text(bad.read_text()[:40])
    elif case == "empty":
        bad.write_text("")
    elif case == "list":
        bad.write_text("[1, 2]")
    elif case == "out is a file":
        out.write_text("mine")
    elif case == "out holds a table":
        out.mkdir()
        (out / "table.md").write_text("mine")
    elif case == "seeds -1":
        argv = ["maml_omniglot_5w1s", "--seeds", "0", "-1"]
    else:
        argv = ["maml_omniglot_5w1s", "--iterations", case.split()[1]]
    before = files_of(tmp_path)
    proc = table_command(argv, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metarun-table: error: "), proc.stderr
    assert message in lines[0], lines[0]
    assert files_of(tmp_path) == before


def test_collect_counts_a_job_once_whatever_metarun_eval_wrote_into_it(fake_sweep, tmp_path):
    """metarun-eval writes JOB/eval/NAME/results.json; the job is collected, its evaluations are not jobs."""
    job = fake_sweep / "0_experiment=maml_omniglot_5w1s"
    (job / "eval" / "best-test-ways=3").mkdir(parents=True)
    (job / "eval" / "best-test-ways=3" / "results.json").write_text(json.dumps({"test/acc_mean": 0.5}))
    runs = table.collect(fake_sweep)
    assert sum(run.path == job for run in runs) == 1 and not any("eval" in run.path.parts for run in runs)
    assert table.main(["--collect", str(fake_sweep), "--out", str(tmp_path / "out")]) == 0


def test_seeds_and_presets_can_be_given_in_any_order():
    args = table.parse_args(["--seeds", "0", "1", "2", "maml_*", "dataset.root=/x"])
    assert args.seeds == [0, 1, 2] and args.items == ["maml_*", "dataset.root=/x"]
    assert table.parse_args(["maml_*", "--seeds", "3,4"]).seeds == [3, 4]


def test_table_command_runs_a_shortened_preset_grid_as_a_hydra_multirun(tmp_path):
    """The real command: two seeds of a preset, cut to 2 iterations, on the tiny generated glyphs."""
    out = tmp_path / "table"
    tiny = [o for o in TINY if not o.startswith("iterations=")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "metarun.table", "maml_omniglot_5w1s", "--seeds", "0", "1", "--iterations", "2",
         "--out", str(out), "dataset=glyphs", *TINY_GLYPHS, *tiny],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "-m experiment=maml_omniglot_5w1s seed=0,1" in proc.stdout
    jobs = sorted((out / "sweep").glob("*/results.json"))
    assert len(jobs) == 2
    [row] = list(csv.DictReader(open(out / "table.csv")))
    assert row["preset"] == "maml_omniglot_5w1s" and row["seeds"] == "0 1"
    assert row["iterations"] == "2" and row["preset_iterations"] == "60000" and row["shortened"] == "True"
    assert "dataset=glyphs" in row["overrides"].split()  # what differs from the preset is on the row
    assert "cores" in row["hardware"] and float(row["wall_seconds_per_seed"]) > 0
    means = [100 * json.loads(p.read_text())["test/acc_mean"] for p in jobs]
    assert float(row["reproduced_mean"]) == pytest.approx(sum(means) / 2)
    assert (out / "table.png").is_file() and "2 (shortened from 60000)" in (out / "table.md").read_text()


# ----------------------------------------------------------------------------------------------
# The presets
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_records_the_result_it_aims_for(name):
    cfg = preset(name)
    paper = OmegaConf.to_container(cfg.paper, resolve=True)
    assert isinstance(paper, dict), f"{name}: no paper block"
    assert isinstance(paper["source"], str) and paper["source"]
    assert paper["metric"] == "mse" or paper["metric"].startswith("acc")  # acc_instance_2: MANN
    assert paper["mean"] is None or isinstance(paper["mean"], int | float)
    assert paper.get("ci95") is None or paper["ci95"] > 0
    assert cfg.eval.ci_z == 1.96 and cfg.eval.tasks >= 400
    if paper["metric"].startswith("acc") and paper["mean"] is not None:
        assert 20 <= paper["mean"] <= 100  # percent, as papers print it
    assert ("sinusoid" in name) == (paper["metric"] == "mse")


def test_paper_and_code_presets_differ_where_the_sources_do():
    paper, code = preset("maml_omniglot_5w1s"), preset("maml_omniglot_5w1s_code")
    assert (paper.algorithm.eval_inner_steps, code.algorithm.eval_inner_steps) == (3, 10)
    assert paper.paper.protocol == "paper" and code.paper.protocol == "code"
    assert paper.paper.mean == code.paper.mean
    assert (preset("maml_miniimagenet_5w5s").meta_batch_size, preset("maml_miniimagenet_5w5s_code").meta_batch_size) == (2, 4)
    mini = preset("maml_miniimagenet_5w1s")
    assert (mini.train_query_shots, mini.query_shots, mini.backbone.hidden, mini.backbone.pool) == (15, 1, 32, "max")
    assert (mini.algorithm.inner_lr, mini.algorithm.inner_steps, mini.algorithm.eval_inner_steps) == (0.01, 5, 10)
    assert preset("maml_omniglot_20w5s").dataset.split == "maml"


def test_the_paper_block_does_not_change_training(compose_cfg):
    import torch

    from metarun.build import build_algorithm

    cfg = compose_cfg("paper={source:test,mean:99}")
    assert cfg.paper.mean == 99
    assert OmegaConf.to_container(compose_cfg()) == {**OmegaConf.to_container(cfg), "paper": None}
    build_algorithm(cfg, torch.device("cpu"))


def _write_tiny_miniimagenet(root: Path) -> list[str]:
    """An 84x84 RGB folder-format mini-ImageNet (Ravi's CSV layout), big enough for every mini preset:
    30 training classes (ProtoNet trains 30-way), 20 images per class (5 shots + 15 queries)."""
    import csv as csv_module

    import numpy as np

    rng = np.random.default_rng(0)
    counts = {"train": 30, "val": 5, "test": 5}
    (root / "images").mkdir(parents=True)
    label = 0
    for split, n in counts.items():
        with open(root / f"{split}.csv", "w", newline="") as fh:
            writer = csv_module.writer(fh)
            writer.writerow(["filename", "label"])
            for _ in range(n):
                wnid = f"n{label:08d}"
                for i in range(20):
                    name = f"{wnid}{i + 1:08d}.jpg"
                    pixels = rng.integers(0, 255, (84, 84, 3), dtype=np.uint8)
                    pixels[:, :, label % 3] = 40 * (label % 6)  # a class colour, so there is something to learn
                    Image.fromarray(pixels).save(root / "images" / name)
                    writer.writerow([name, wnid])
                label += 1
    return ["dataset=miniimagenet", f"dataset.root={root}", f"dataset.split_dir={root}", "dataset.format=folder",
            # 84x84 convolutions are slow on a CPU: the smallest tasks of the preset's shape
            "train_ways=5", "train_query_shots=1", "query_shots=1"]


# Glyphs big enough for every Omniglot preset: 60-way ProtoNet training, 20-way within-alphabet tasks
# (Koch), 19 queries + 1 shot (Relation Network) out of 20 drawings per character.
PRESET_GLYPHS = ["dataset=glyphs", "dataset.num_alphabets=2", "dataset.characters_per_alphabet=100",
                 "dataset.split_sizes=[80,60,-1]"]
ONE_ITERATION = ["iterations=1", "meta_batch_size=2", "eval.tasks=2", "eval.val_tasks=2", "eval_every=1",
                 "checkpoint_every=1", "wandb.mode=disabled", "console=false", "device=cpu",
                 "hydra.sweep.subdir=${hydra.job.num}"]  # job directories named by their overrides get too long


def preset_overrides(name: str, mini: list[str]) -> tuple[str, ...]:
    """The small data a preset runs on here. Omniglot presets: generated glyphs, minus the Omniglot-only
    keys the preset sets (split=alphabets, val_alphabets); mini-ImageNet presets (84x84 RGB): a tiny
    generated mini-ImageNet, with 5-way training tasks and one query per class (84x84 convolutions are slow
    here); sinusoid presets: their own generated tasks."""
    target = preset(name).dataset._target_
    if target.endswith("load_omniglot"):
        glyph_keys = set(preset(name, *PRESET_GLYPHS).dataset) - set(compose_glyphs().dataset)
        return (*PRESET_GLYPHS, *sorted(f"~dataset.{key}" for key in glyph_keys))
    if target.endswith("load_miniimagenet"):
        return tuple(mini)
    assert target.endswith("Sinusoids"), f"{name}: no small data for {target}"
    return ()


def compose_glyphs():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=PRESET_GLYPHS)


@pytest.mark.slow
def test_every_preset_runs_one_iteration(tmp_path):
    """Each preset through the real CLI, as `metarun -m experiment=a,b,...` multiruns (one per kind of
    data), one iteration on small generated data; every job writes its results.json."""
    mini = _write_tiny_miniimagenet(tmp_path / "mini")
    groups: dict[tuple[str, ...], list[str]] = {}
    for name in PRESETS:
        overrides = preset_overrides(name, mini)
        # A multirun checks its overrides on the config without the swept experiment: a preset whose keys
        # are deleted (~dataset.split) runs alone, its experiment then a plain override.
        groups.setdefault((*overrides, name) if any(o.startswith("~") for o in overrides) else overrides, []).append(name)
    for n, (overrides, names) in enumerate(groups.items()):
        overrides = tuple(o for o in overrides if o not in names)
        sweep = tmp_path / f"sweep{n}"
        proc = run_cli("-m", f"experiment={','.join(names)}", *overrides, *ONE_ITERATION, f"hydra.sweep.dir={sweep}",
                       cwd=tmp_path, timeout=1800)
        assert proc.returncode == 0, f"{names}: {proc.stderr[-3000:]}"
        finished = {table.read_run(path).preset for path in sweep.rglob("results.json")}
        assert finished == set(names)
