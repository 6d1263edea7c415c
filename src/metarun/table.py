"""The ``metarun-table`` command: a paper table from experiment presets, over seeds.

One thing: the command, from the presets and their sweep to table.md, table.csv and table.png.

::

    metarun-table 'maml_omniglot_*' protonet_omniglot_5w1s --seeds 0 1 2 dataset.root=/data/omniglot
    metarun-table 'maml_*' --seeds 0 1 2 --iterations 2000 dataset.root=...    # a shortened variant
    metarun-table --collect multirun/2026-01-01/12-00-00                          # finished runs only

Presets are names or shell-style globs of ``conf/experiment/*.yaml``; any argument with ``=`` is a
Hydra override passed to every job. The grid runs as one real Hydra multirun in a subprocess,
``python -m metarun -m experiment=a,b seed=0,1,2 hydra.sweep.dir=OUT/sweep ...``, one job at a time
unless an override picks another launcher (``hydra/launcher=joblib_gpus``). ``--collect`` runs
nothing: it reads the ``results.json`` of every finished job under a sweep directory.

The table (``table.md``, ``table.csv``) has one row per preset (and per set of other overrides):

* published: ``paper.mean ± paper.ci95`` from the preset's ``paper`` block (its source too); no
  published number lives in this code.
* reproduced: the mean over seeds of each seed's test mean, ± ``ci_z · std / √seeds`` (sample
  standard deviation of the per-seed means, ``ci_z`` = the runs' ``eval.ci_z``); and per seed,
  its test mean ± its CI over test tasks.
* verdict: ``within`` when the reproduced mean lies in published mean ± published CI, ``above`` or
  ``below`` otherwise. Where the paper gives no CI the interval is published mean ± the reproduced
  CI over seeds (the published mean lies inside the reproduced interval); with neither (one seed,
  no published CI) only equality is ``within``. For MSE, ``below`` is better. A row where a seed's
  run diverged (results.json ``diverged: true``) adds ``diverged (seed S: step K, xF)`` (column
  ``diverged`` in the CSV).
* iterations actually run, with ``shortened from N`` when fewer than the preset's ``N``; wall time
  (mean per seed, of the process that finished the run); hardware (from ``results.json``).

``table.png`` plots the test query accuracy (or MSE) after each adaptation step, the mean over
seeds, one line per row.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import functools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metarun.commands import CONFIG_DIR, OneLineParser, say
from metarun.config import UNNAMED_KEYS

# Overrides that say where things are or how a job runs, not what it computes: they do not split rows.
# Besides the keys that name no job directory (metarun.config.UNNAMED_KEYS): the preset and the length of the
# run are columns of the row, and Hydra's own settings.
RUNTIME_KEYS = (*UNNAMED_KEYS, "experiment", "iterations", "hydra.", "hydra/")

VERDICT_DEFINITION = (
    "within: the reproduced mean lies in published mean ± published CI; above/below: outside it. Where the "
    "paper gives no CI, the interval is published mean ± the reproduced CI over seeds; with neither, only "
    "equality is within. For MSE, below is better."
)


DIVERGED_DEFINITION = (
    "diverged (seed S: step K, xF): seed S's run diverged (results.json diverged: true): on its validation tasks "
    "(or, where those did not show it, its test tasks) the mean query loss after the last adaptation step K was "
    "F times its value at step 0, more than eval.divergence_factor (its worst validation)."
)

NO_PRESET = "(no preset)"  # a job run without experiment=...


def is_accuracy(metric: str) -> bool:
    """``acc`` and its variants (``acc_instance_2``: MANN's accuracy at an instance) are fractions in
    results.json, percentages in papers and tables; anything else (``mse``) is shown as it is."""
    return metric.startswith("acc")


class TableError(RuntimeError):
    """A one-line problem with the command's arguments or inputs."""


def config_dir() -> Path:
    return Path(CONFIG_DIR)


def preset_names() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


def expand_presets(patterns: Sequence[str]) -> list[str]:
    """Preset names from names or globs (``maml_*``), in the order given, each once."""
    known, chosen = preset_names(), []
    for pattern in patterns:
        matches = fnmatch.filter(known, pattern)
        if not matches:
            raise TableError(f"no experiment preset matches {pattern!r}; presets: {', '.join(known)}")
        chosen += [m for m in matches if m not in chosen]
    return chosen


@functools.cache
def preset_iterations(name: str) -> int | None:
    """The iterations a preset asks for (None when it no longer composes)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    # The run schema is registered: importing metarun.config (for UNNAMED_KEYS, above) did it.
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return int(compose(config_name="config", overrides=[f"experiment={name}"]).iterations)
    except Exception:  # noqa: BLE001 - a preset renamed or removed since the run: unknown
        return None


@dataclass
class Run:
    """One finished job: its ``results.json`` and what Hydra recorded about it."""

    path: Path
    preset: str
    overrides: tuple[str, ...]  # other than the runtime keys: they split rows
    seed: int
    metric: str  # "acc" (shown in percent) or "mse"
    mean: float
    ci: float
    ci_z: float
    iterations: int
    curve: list[float]
    wall_seconds: float
    hardware: str
    paper: dict[str, Any]
    # results.json's divergence record when it says diverged: true (step, factor, ...; {} when it has none); else None
    divergence: dict[str, Any] | None = None


def _job_overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(path.read_text()) or []) if path.is_file() else []


def _job_preset(job: Path, overrides: list[str]) -> str | None:
    path = job / ".hydra" / "hydra.yaml"
    if path.is_file():
        hydra_cfg = yaml.safe_load(path.read_text()) or {}
        choice = hydra_cfg.get("hydra", {}).get("runtime", {}).get("choices", {}).get("experiment")
        if choice:
            return str(choice)
    for override in overrides:
        if override.startswith("experiment="):
            return override.split("=", 1)[1]
    return None


@functools.cache
def default_ci_z() -> float:
    """conf/config.yaml's ``eval.ci_z``, where its value is declared once: the z of a run whose saved config
    has none, and the one an empty table names."""
    return float(yaml.safe_load((config_dir() / "config.yaml").read_text())["eval"]["ci_z"])


def read_run(results_path: Path) -> Run:
    try:
        results = json.loads(results_path.read_text())
        if not isinstance(results, dict):
            raise ValueError("not a JSON object")
        return _run(results_path, results)
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise TableError(f"{results_path} is not a readable results.json of a finished run ({error}); rerun that "
                         f"job, or move the file away") from None


def _run(results_path: Path, results: dict) -> Run:
    job = results_path.parent
    overrides = _job_overrides(job)
    config = results.get("config", {})
    paper = config.get("paper") or {}
    metric = paper.get("metric") or ("acc" if "test/acc_mean" in results else "mse")
    scale = 100.0 if is_accuracy(metric) else 1.0  # accuracy in percent, as papers print it
    curve = results.get("curves", {}).get("test", {}).get(f"{metric}_mean", [])
    return Run(
        path=job,
        preset=_job_preset(job, overrides) or NO_PRESET,
        overrides=tuple(sorted(o for o in overrides if not o.lstrip("+~").startswith(RUNTIME_KEYS))),
        seed=int(config.get("seed", 0)),
        metric=metric,
        mean=scale * float(results[f"test/{metric}_mean"]),
        ci=scale * float(results.get(f"test/{metric}_ci95", float("nan"))),
        ci_z=float((config.get("eval") or {}).get("ci_z") or default_ci_z()),
        iterations=int(config.get("iterations", 0)),
        curve=[scale * float(v) for v in curve],
        wall_seconds=float(results.get("wall_seconds", results.get("train_seconds", float("nan")))),
        hardware=str(results.get("hardware") or results.get("device", "?")),
        paper=paper,
        divergence=(results.get("divergence") or {}) if results.get("diverged") is True else None,
    )


def collect(sweep_dir: Path, presets: Sequence[str] = ()) -> list[Run]:
    """Every finished job (a ``results.json``) under ``sweep_dir``; only ``presets`` when given. The
    evaluations metarun-eval wrote into a job (``JOB/eval/NAME/results.json``) are not jobs."""
    paths = [path for path in sorted(Path(sweep_dir).rglob("results.json")) if not is_evaluation(path)]
    runs = [read_run(path) for path in paths]
    return [run for run in runs if not presets or run.preset in presets]


def is_evaluation(results_path: Path) -> bool:
    """Whether ``results_path`` is ``RUN/eval/NAME/results.json``, written by metarun-eval into a run."""
    run = results_path.parent.parent.parent
    return results_path.parent.parent.name == "eval" and ((run / "results.json").is_file() or (run / ".hydra").is_dir())


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file, or that already holds a table (nothing is overwritten)."""
    if out.exists() and not out.is_dir():
        raise TableError(f"--out {out} is a file; name a directory for table.md, table.csv and table.png")
    existing = [name for name in ("table.md", "table.csv", "table.png") if (out / name).exists()]
    if existing:
        raise TableError(f"{out} already holds a table ({', '.join(existing)}); choose another --out, or delete it")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


@dataclass
class Row:
    """One preset (with one set of other overrides) over its seeds."""

    preset: str
    overrides: tuple[str, ...]
    iterations: int
    runs: list[Run] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.runs[0].metric

    @property
    def paper(self) -> dict[str, Any]:
        return self.runs[0].paper

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]

    @property
    def mean(self) -> float:
        """The mean over seeds of each seed's test mean."""
        return sum(run.mean for run in self.runs) / len(self.runs)

    @property
    def ci(self) -> float | None:
        """``ci_z · std / √seeds`` over the per-seed means (sample std); None for one seed."""
        n = len(self.runs)
        if n < 2:
            return None
        std = math.sqrt(sum((run.mean - self.mean) ** 2 for run in self.runs) / (n - 1))
        return self.runs[0].ci_z * std / math.sqrt(n)

    @property
    def verdict(self) -> str:
        published = self.paper.get("mean")
        if published is None:
            return "n/a"
        half = self.paper.get("ci95")
        if half is None:
            half = self.ci or 0.0
        if self.mean > published + half:
            return "above"
        if self.mean < published - half:
            return "below"
        return "within"

    @property
    def diverged(self) -> str:
        """``diverged (seed 1: step 3, x1.8e+05)`` naming every seed whose run diverged (results.json
        ``diverged: true``, its worst validation's step and factor); empty when none did."""
        seeds = []
        for run in self.runs:
            if run.divergence is None:
                continue
            step, factor = run.divergence.get("step"), run.divergence.get("factor")
            details = ", ".join(([f"step {step}"] if step is not None else []) +
                                ([f"x{float(factor):.3g}"] if factor is not None else []))
            seeds.append(f"seed {run.seed}" + (f": {details}" if details else ""))
        return f"diverged ({'; '.join(seeds)})" if seeds else ""

    @property
    def preset_iterations(self) -> int | None:
        return preset_iterations(self.preset)

    @property
    def shortened(self) -> bool:
        full = self.preset_iterations
        return full is not None and self.iterations < full

    @property
    def curve(self) -> list[float]:
        """Mean over seeds after each adaptation step (seeds with another number of steps left out)."""
        length = len(self.runs[0].curve)
        curves = [run.curve for run in self.runs if len(run.curve) == length]
        return [sum(values) / len(values) for values in zip(*curves, strict=True)] if length else []

    @property
    def wall_seconds(self) -> float:
        return sum(run.wall_seconds for run in self.runs) / len(self.runs)

    @property
    def hardware(self) -> str:
        return " | ".join(dict.fromkeys(run.hardware for run in self.runs))

    @property
    def label(self) -> str:
        return self.preset + (f" ({' '.join(self.overrides)})" if self.overrides else "")


def group(runs: Sequence[Run]) -> list[Row]:
    rows: dict[tuple, Row] = {}
    for run in sorted(runs, key=lambda r: (r.preset, r.overrides, r.iterations, r.seed)):
        key = (run.preset, run.overrides, run.iterations)
        rows.setdefault(key, Row(run.preset, run.overrides, run.iterations)).runs.append(run)
    return list(rows.values())


def _number(value: float | None, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2f}" if is_accuracy(metric) else f"{value:.3f}"


def _pm(mean: float | None, ci: float | None, metric: str) -> str:
    if mean is None:
        return "n/a"
    return _number(mean, metric) + (f" ± {_number(ci, metric)}" if ci is not None else "")


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _iterations(row: Row) -> str:
    if row.shortened:
        return f"{row.iterations} (shortened from {row.preset_iterations})"
    return str(row.iterations)


COLUMNS = ["preset", "metric", "published", "source", "reproduced (over seeds)", "per seed (test tasks)",
           "verdict", "iterations", "wall time per seed", "hardware"]


def markdown_rows(rows: Sequence[Row]) -> list[list[str]]:
    out = []
    for row in rows:
        unit = f"{row.metric} %" if is_accuracy(row.metric) else row.metric.upper()
        out.append([
            row.label,
            unit,
            _pm(row.paper.get("mean"), row.paper.get("ci95"), row.metric),
            str(row.paper.get("source", "")),
            f"{_pm(row.mean, row.ci, row.metric)} ({len(row.runs)} seed{'s' if len(row.runs) > 1 else ''})",
            "; ".join(f"seed {run.seed}: {_pm(run.mean, run.ci, run.metric)}" for run in row.runs),
            "; ".join(filter(None, [row.verdict, row.diverged])),
            _iterations(row),
            _duration(row.wall_seconds),
            row.hardware,
        ])
    return out


def write_markdown(rows: Sequence[Row], path: Path, source: str) -> None:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    z = rows[0].runs[0].ci_z if rows else default_ci_z()
    text = [
        "# metarun-table",
        "",
        line(COLUMNS),
        line(["---"] * len(COLUMNS)),
        *(line(cells) for cells in markdown_rows(rows)),
        "",
        "- Published: the preset's `paper` block (mean ± its 95% CI; n/a where none is published). "
        "Accuracy in percent, MSE as is.",
        f"- Reproduced: the mean over seeds of each seed's test mean, ± ci_z·std/√seeds over those per-seed "
        f"means (sample std, ci_z = {z:g}, the runs' eval.ci_z); per seed: its test mean ± its CI over test tasks.",
        f"- Verdict: {VERDICT_DEFINITION} {DIVERGED_DEFINITION}",
        "- Iterations: meta-training iterations run; \"shortened from N\" marks a run cut below the preset's N "
        "(`--iterations`): such a row is a shortened variant, not the paper's protocol.",
        "- Wall time: mean per seed, of the process that finished each run (after a resume, that process only).",
        f"- Source: {source}",
        "",
    ]
    path.write_text("\n".join(text))


def write_csv(rows: Sequence[Row], path: Path) -> None:
    fields = ["preset", "overrides", "metric", "published_mean", "published_ci95", "source", "reproduced_mean",
              "reproduced_ci", "ci_z", "seeds", "per_seed", "verdict", "diverged", "iterations", "preset_iterations", "shortened",
              "wall_seconds_per_seed", "hardware"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({
                "preset": row.preset,
                "overrides": " ".join(row.overrides),
                "metric": row.metric,
                "published_mean": row.paper.get("mean"),
                "published_ci95": row.paper.get("ci95"),
                "source": row.paper.get("source", ""),
                "reproduced_mean": row.mean,
                "reproduced_ci": row.ci,
                "ci_z": row.runs[0].ci_z,
                "seeds": " ".join(str(s) for s in row.seeds),
                "per_seed": "; ".join(f"{run.seed}: {run.mean} ± {run.ci}" for run in row.runs),
                "verdict": row.verdict,
                "diverged": row.diverged,
                "iterations": row.iterations,
                "preset_iterations": row.preset_iterations,
                "shortened": row.shortened,
                "wall_seconds_per_seed": row.wall_seconds,
                "hardware": row.hardware,
            })


def write_figure(rows: Sequence[Row], path: Path) -> None:
    """Test query accuracy (or MSE) after each adaptation step, mean over seeds, one line per row;
    one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = list(dict.fromkeys(row.metric for row in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for row in rows:
            if row.metric == metric and row.curve:
                ax.plot(range(len(row.curve)), row.curve, marker="o", markersize=3,
                        label=f"{row.label}{' (shortened)' if row.shortened else ''}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("adaptation step")
        ax.set_ylabel(f"test query {'accuracy' if metric == 'acc' else metric} (%)" if is_accuracy(metric)
                      else f"test query {metric.upper()}")
        ax.grid(alpha=0.3)
        ax.set_title("mean over seeds")
        if ax.lines:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
        else:  # a metric on another axis than the adaptation step (MANN's acc_instance_2)
            ax.text(0.5, 0.5, f"{metric}: no curve over adaptation steps", ha="center", transform=ax.transAxes)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_table(runs: Sequence[Run], out: Path, source: str) -> list[Row]:
    """``table.md``, ``table.csv`` and ``table.png`` in ``out``; returns the rows."""
    rows = group(runs)
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(rows, out / "table.md", source)
    write_csv(rows, out / "table.csv")
    write_figure(rows, out / "table.png")
    return rows


def sweep_command(presets: Sequence[str], seeds: Sequence[int], sweep_dir: Path, iterations: int | None,
                  overrides: Sequence[str]) -> list[str]:
    """``python -m metarun -m experiment=a,b seed=0,1 ...``: the grid as one Hydra multirun."""
    command = [sys.executable, "-m", "metarun", "-m", f"experiment={','.join(presets)}",
               f"seed={','.join(str(s) for s in seeds)}"]
    if not any(o.startswith("hydra.sweep.dir=") for o in overrides):
        command.append(f"hydra.sweep.dir={sweep_dir}")
    if iterations is not None:
        command.append(f"iterations={iterations}")
    return command + list(overrides)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = OneLineParser(
        prog="metarun-table", label="metarun-table",
        description="Run experiment presets over seeds (one Hydra multirun) or collect finished runs, and write "
                    "a Markdown and CSV table against the published numbers, with a figure.",
        epilog=VERDICT_DEFINITION,
    )
    parser.add_argument("items", nargs="*", metavar="PRESET_OR_OVERRIDE",
                        help="experiment presets (names or globs such as 'maml_*'); arguments with '=' are Hydra "
                             "overrides for every job")
    parser.add_argument("--seeds", nargs="+", default=["0"], help="seeds (default: 0)")
    parser.add_argument("--iterations", type=positive_int, help="run N iterations instead of the preset's (the table marks "
                                                       "the row as shortened)")
    parser.add_argument("--collect", type=Path, metavar="SWEEP_DIR",
                        help="run nothing: tabulate the finished runs (results.json) under SWEEP_DIR")
    parser.add_argument("--out", type=Path, help="where the table goes (default: tables/DATE_TIME when running, "
                                                 "SWEEP_DIR with --collect)")
    args = parser.parse_intermixed_args(argv)
    # --seeds takes one or more values; a preset written after them belongs to the positional list.
    seeds, rest = [], []
    for token in args.seeds:
        for part in token.split(","):
            part = part.strip()
            if part.lstrip("+-").isdigit() and not part.isdigit():
                parser.error(f"--seeds: {part} is not a non-negative integer")
            (seeds if part.isdigit() else rest).append(part)
    if not seeds:
        parser.error("--seeds needs at least one non-negative integer")
    args.seeds = [int(s) for s in seeds]
    args.items = [*args.items, *rest]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = [item for item in args.items if "=" in item]
    patterns = [item for item in args.items if "=" not in item]
    try:
        if any(o.startswith("experiment=") for o in overrides):
            raise TableError("name the presets as arguments (maml_omniglot_5w1s 'protonet_*'), not experiment=...")
        presets = expand_presets(patterns) if patterns else []
        returncode = 0
        if args.collect is not None:
            sweep_dir, out = args.collect, args.out or args.collect
            if not sweep_dir.is_dir():
                raise TableError(f"--collect {sweep_dir}: not a directory")
            source = f"finished runs collected from {sweep_dir}"
        else:
            if not presets:
                raise TableError("name at least one experiment preset (or --collect SWEEP_DIR)")
            out = args.out or Path("tables") / time.strftime("%Y-%m-%d_%H-%M-%S")
            sweep_dir = next((Path(o.split("=", 1)[1]) for o in overrides if o.startswith("hydra.sweep.dir=")),
                             out / "sweep")
            command = sweep_command(presets, args.seeds, sweep_dir, args.iterations, overrides)
            shown = " ".join(command[1:])
            print(f"metarun-table: running {shown}", flush=True)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            returncode = subprocess.run(command, env=env).returncode
            if returncode != 0:
                say(f"metarun-table: the sweep stopped with exit status {returncode}; tabulating the runs that "
                    f"finished")
            source = f"`python {shown}`"
        check_out(out)
        runs = collect(sweep_dir, presets)
        if not runs:
            raise TableError(f"no finished run (results.json) under {sweep_dir}")
        rows = write_table(runs, out, source)
    except TableError as error:
        say(f"metarun-table: error: {error}")
        return 2
    print((out / "table.md").read_text())
    print(f"metarun-table: {len(rows)} rows in {out / 'table.md'}, {out / 'table.csv'} and {out / 'table.png'}")
    return returncode


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
