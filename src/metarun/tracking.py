"""Where metrics go: local files (always), Weights & Biases, and the console.

Every tracker implements :class:`Tracker`; the loop talks to one :class:`Trackers` that fans
out. Metric keys are the project's vocabulary: ``train/loss``, ``train/acc``, ``val/acc``,
``test/acc_mean``, ``test/acc_ci95``, and per adaptation step ``adapt/step`` with
``adapt/val_acc`` and ``adapt/test_acc`` (``*_loss`` for every split, too). Regression has no
accuracy: its metric is the MSE, under the same keys with ``mse`` for ``acc`` (``val/mse``,
``test/mse_mean``, ``adapt/test_mse``), and there is no ``train/acc``. Curves on another axis
than the adaptation step (e.g. the accuracy by instance number) have that axis as their own step:
``instance`` with ``instance/test_acc``, ``instance/test_acc_ci95``, ...
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from metarun import checkpoint
from metarun.errors import ConfigError, one_line
from metarun.plots import metric_label, plot_adaptation, plot_axis
from metarun.statistics import axis_metric, curve_metric, metric_names

log = logging.getLogger(__name__)


class Tracker:
    """Receives a run's metrics. Every method is optional; the base class ignores everything.

    Attributes:
        run_id: the id of the tracker's remote run, stored in ``last.pt`` so that a resumed job
            continues that run; None when there is none.
    """

    run_id: str | None = None

    def start_training(self, iterations: int, start_iteration: int) -> None: ...

    def log(self, metrics: dict[str, float], iteration: int) -> None: ...

    def end_training(self) -> None: ...

    def log_adaptation(self, curves: dict[str, dict[str, list[float]]]) -> None:
        """Per-step curves of the tested model: ``{"val": summary, "test": summary}`` where a
        summary maps ``acc_mean``/``acc_ci95``/``loss_mean``/``loss_ci95`` (``mse_*`` instead of
        ``acc_*`` for regression) to one value per step, and may hold curves on other axes under
        the axis' name: ``"instance": {"position": [1, 2, ...], "acc_mean": [...], "acc_ci95": [...]}``
        (None where no task has the position); :func:`other_axes` picks them out."""

    def finish(self, results: dict[str, Any]) -> None: ...


class Trackers(Tracker):
    """Sends every call to each tracker in turn."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    @property
    def run_id(self) -> str | None:  # type: ignore[override]
        return next((t.run_id for t in self.trackers if t.run_id is not None), None)

    def start_training(self, iterations: int, start_iteration: int) -> None:
        for t in self.trackers:
            t.start_training(iterations, start_iteration)

    def log(self, metrics: dict[str, float], iteration: int) -> None:
        for t in self.trackers:
            t.log(metrics, iteration)

    def end_training(self) -> None:
        for t in self.trackers:
            t.end_training()

    def log_adaptation(self, curves: dict[str, dict[str, list[float]]]) -> None:
        for t in self.trackers:
            t.log_adaptation(curves)

    def finish(self, results: dict[str, Any]) -> None:
        for t in self.trackers:
            t.finish(results)


def adaptation_rows(curves: dict[str, dict[str, list[float]]]) -> list[dict[str, float]]:
    """One record per adaptation step: ``{"adapt/step": k, "adapt/val_acc": ..., "adapt/val_acc_ci95": ...}``,
    one pair per metric of the summaries (``adapt/val_mse`` for regression)."""
    steps = max(len(summary["loss_mean"]) for summary in curves.values())
    rows = []
    for k in range(steps):
        row: dict[str, float] = {"adapt/step": k}
        for split, summary in curves.items():
            for metric in metric_names(summary):
                if k < len(summary[f"{metric}_mean"]):
                    row[f"adapt/{split}_{metric}"] = summary[f"{metric}_mean"][k]
                    row[f"adapt/{split}_{metric}_ci95"] = summary[f"{metric}_ci95"][k]
        rows.append(row)
    return rows


def other_axes(curves: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, list]]]:
    """The curves on axes other than the adaptation step, by axis and then split:
    ``{"instance": {"val": {"position": [...], "acc_mean": [...], ...}, "test": {...}}}``."""
    axes: dict[str, dict[str, dict[str, list]]] = {}
    for split, summary in curves.items():
        for key, value in summary.items():
            if isinstance(value, dict):
                axes.setdefault(key, {})[split] = value
    return axes


def axis_rows(axis: str, splits: dict[str, dict[str, list]]) -> list[dict[str, float]]:
    """One record per position of ``axis``: ``{"instance": 2, "instance/test_acc": ...,
    "instance/test_acc_ci95": ...}`` for every split and metric that has a value there."""
    positions = sorted({p for summary in splits.values() for p in summary["position"]})
    rows = []
    for position in positions:
        row: dict[str, float] = {axis: position}
        for split, summary in splits.items():
            if position not in summary["position"]:
                continue
            i = summary["position"].index(position)
            for metric in metric_names(summary):
                if summary[f"{metric}_mean"][i] is not None:
                    row[f"{axis}/{split}_{metric}"] = summary[f"{metric}_mean"][i]
                    row[f"{axis}/{split}_{metric}_ci95"] = summary[f"{metric}_ci95"][i]
        rows.append(row)
    return rows


class FileTracker(Tracker):
    """Writes ``metrics.jsonl`` (one line per log call), ``results.json`` and ``adaptation.png``
    (and ``<axis>.png`` for a curve on another axis, e.g. ``instance.png``).

    Args:
        output_dir: the run's directory.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / "metrics.jsonl"

    def _append(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def log(self, metrics: dict[str, float], iteration: int) -> None:
        self._append({"iteration": iteration, **metrics})

    def log_adaptation(self, curves: dict[str, dict[str, list[float]]]) -> None:
        for row in adaptation_rows(curves):
            self._append(row)
        plot_adaptation(curves, self.output_dir / "adaptation.png")
        for axis, splits in other_axes(curves).items():
            for row in axis_rows(axis, splits):
                self._append(row)
            plot_axis(axis, splits, self.output_dir / f"{axis}.png")

    def finish(self, results: dict[str, Any]) -> None:
        tmp = self.output_dir / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
        os.replace(tmp, self.output_dir / "results.json")


def wandb_has_api_key() -> bool:
    """True when W&B credentials are configured (``WANDB_API_KEY`` or a ``wandb login`` netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def summary_values(results: dict[str, Any]) -> dict[str, Any]:
    """What a W&B run's summary gets from ``results``: its numbers (``diverged`` among them), and the divergence
    guard's record flat (``divergence/iteration``, ``divergence/step``, ``divergence/factor``, ...)."""
    values = {k: v for k, v in results.items() if isinstance(v, int | float)}
    values.update({f"divergence/{k}": v for k, v in (results.get("divergence") or {}).items()})
    return values


class WandbTracker(Tracker):
    """One W&B run per job, with the resolved config. A W&B failure is logged and never stops training.

    Args:
        mode: ``auto`` (online with an API key, offline without), ``online``, ``offline`` or ``disabled``.
        project, entity, group, job_type, name, tags: as in ``wandb.init``; unset group/job_type/name
            take the defaults the CLI derives from the sweep, and the CLI's tags (the chosen groups and
            the task shape) are added to ``tags``.
        log_model: log ``checkpoints/best.pt`` as a W&B model artifact at the end, with the test mean,
            CI, iteration and a hash of the config as metadata.
        run_config: the resolved run config.
        dir: where W&B writes its files (the run's output directory).
        defaults: ``{"group", "job_type", "name", "tags", "id"}`` from the CLI and the run; ``id``
            (from a resumed checkpoint) continues that W&B run instead of starting another.
    """

    MODES = ("auto", "online", "offline", "disabled")

    def __init__(self, mode: str, project: str, entity: str | None, group: str | None, job_type: str | None,
                 name: str | None, tags: list[str] | None, log_model: bool, run_config: dict[str, Any] | None = None,
                 dir: str | None = None, defaults: dict[str, Any] | None = None) -> None:
        if mode not in self.MODES:
            raise ConfigError(f"wandb.mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        if mode == "auto":
            mode = "online" if wandb_has_api_key() else "offline"
        self.mode = mode
        self.log_model = log_model
        self.dir = Path(dir) if dir is not None else None
        self.run = None
        if mode == "disabled":
            return
        defaults = defaults or {}
        try:
            import wandb

            resume_id = defaults.get("id")
            self.run = wandb.init(
                mode=mode, project=project, entity=entity, config=run_config, dir=dir,
                tags=[*(tags or []), *defaults.get("tags", [])],
                group=group or defaults.get("group"), job_type=job_type or defaults.get("job_type"),
                name=name or defaults.get("name"), reinit="finish_previous",
                **({"id": resume_id, "resume": "allow"} if resume_id else {}),
            )
            self.run_id = self.run.id
            self.run.define_metric("iteration")
            for prefix in ("train", "val", "test"):
                self.run.define_metric(f"{prefix}/*", step_metric="iteration")
            # The summary keeps the best validation value, not the last one.
            self.run.define_metric("val/acc", step_metric="iteration", summary="max")
            for key in ("val/loss", "val/mse"):
                self.run.define_metric(key, step_metric="iteration", summary="min")
            self.run.define_metric("adapt/step")
            self.run.define_metric("adapt/*", step_metric="adapt/step")
            # Offline runs have no name until they are synced; the id is what `wandb sync` shows.
            log.info("W&B run %s (%s mode%s)", self.run.name or self.run.id, mode, ", resumed" if resume_id else "")
        except Exception as error:  # noqa: BLE001 - W&B must never stop training
            self._fail(error)

    def _fail(self, error: Exception) -> None:
        log.warning("W&B disabled after an error: %s", one_line(error))
        self.run = None

    def log(self, metrics: dict[str, float], iteration: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log({**metrics, "iteration": iteration})
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    def log_adaptation(self, curves: dict[str, dict[str, list[float]]]) -> None:
        if self.run is None:
            return
        try:
            import wandb

            rows = adaptation_rows(curves)
            for row in rows:
                self.run.log(row)
            columns = sorted({key for row in rows for key in row}, key=lambda k: (k != "adapt/step", k))
            table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
            media: dict[str, Any] = {"adapt/table": table}
            if self.dir is not None and (self.dir / "adaptation.png").is_file():
                media["adapt/plot"] = wandb.Image(str(self.dir / "adaptation.png"))
            self.run.log(media)
            for axis, splits in other_axes(curves).items():
                # Each axis is its own step: instance/test_acc is plotted against instance, not adapt/step.
                self.run.define_metric(axis)
                self.run.define_metric(f"{axis}/*", step_metric=axis)
                rows = axis_rows(axis, splits)
                for row in rows:
                    self.run.log(row)
                columns = sorted({key for row in rows for key in row}, key=lambda k: (k != axis, k))
                media = {f"{axis}/table": wandb.Table(columns=columns,
                                                      data=[[row.get(c) for c in columns] for row in rows])}
                if self.dir is not None and (self.dir / f"{axis}.png").is_file():
                    media[f"{axis}/plot"] = wandb.Image(str(self.dir / f"{axis}.png"))
                self.run.log(media)
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    def finish(self, results: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(summary_values(results))
            if self.log_model:
                self._log_best_model(results)
            self.run.finish()
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    def _log_best_model(self, results: dict[str, Any]) -> None:
        import hashlib

        import wandb

        metric = curve_metric(results["curves"])
        config_hash = hashlib.sha256(json.dumps(results["config"], sort_keys=True, default=str).encode()).hexdigest()
        artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata={
            f"test/{metric}_mean": results[f"test/{metric}_mean"], f"test/{metric}_ci95": results[f"test/{metric}_ci95"],
            "eval_tasks": results["eval_tasks"], "iteration": results["best_iteration"], "config_sha256": config_hash,
        })
        artifact.add_file(str(checkpoint.best_file(checkpoint.folder(Path(results["output_dir"])))))
        self.run.log_artifact(artifact, aliases=["best"])


class ConsoleTracker(Tracker):
    """A rich progress bar while training, and a table of query accuracy per adaptation step."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=False)
        self.progress = None
        self.started: float | None = None  # set while meta-training
        self.latest: dict[str, float] = {}

    def start_training(self, iterations: int, start_iteration: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.started = time.perf_counter()
        self.start_iteration = start_iteration
        self.iterations = iterations
        if not self.console.is_terminal:
            # A live bar in a log file or CI output is only its last frame: print a line per validation.
            return
        self.progress = Progress(
            TextColumn("meta-train"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"), TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"), console=self.console, transient=False,
        )
        self.task = self.progress.add_task("train", total=iterations, completed=start_iteration,
                                           speed="", stats="")
        self.progress.start()

    def log(self, metrics: dict[str, float], iteration: int) -> None:
        self.latest.update(metrics)
        if self.started is None:
            return
        rate = (iteration - self.start_iteration) / max(time.perf_counter() - self.started, 1e-9)
        # The training metrics and the validation metric (val/acc, or val/mse for regression).
        shown = [k for k in self.latest if k.startswith("train/")] + [k for k in self.latest if k.startswith("val/")
                                                                       and k != "val/loss"][:1]
        stats = "  ".join(f"{k} {self.latest[k]:.3f}" for k in shown)
        if self.progress is not None:
            self.progress.update(self.task, completed=iteration, speed=f"{rate:.2f} it/s", stats=stats)
        elif "val/loss" in metrics:  # every validation logs val/loss
            self.console.print(f"meta-train {iteration}/{self.iterations}  {rate:.2f} it/s  {stats}", highlight=False)

    def end_training(self) -> None:
        self.started = None
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def log_adaptation(self, curves: dict[str, dict[str, list[float]]]) -> None:
        metric = curve_metric(curves)
        rows = [{**row, "adapt/step": int(row["adapt/step"])} for row in adaptation_rows(curves)]
        self._print_table(f"query {metric_label(metric)} per adaptation step", "adapt/step", "adapt", "step",
                          list(curves), metric, rows)
        for axis, splits in other_axes(curves).items():
            metric = axis_metric(splits)
            self._print_table(f"{metric_label(metric)} per {axis}", axis, axis, axis, list(splits), metric,
                              axis_rows(axis, splits))

    def _print_table(self, title: str, position: str, prefix: str, column: str, splits: list[str], metric: str,
                     rows: list[dict[str, float]]) -> None:
        """One row per position (``row[position]``), one ``mean ± CI`` column per split, read from
        ``row[f"{prefix}/{split}_{metric}"]`` and its ``_ci95`` (percent for accuracy)."""
        from rich.table import Table

        table = Table(title=f"{title} (mean ± 95% CI)")
        table.add_column(column, justify="right")
        for split in splits:
            table.add_column(split, justify="right")
        scale = 100.0 if metric == "acc" else 1.0
        for row in rows:
            cells = [str(row[position])]
            for split in splits:
                mean = row.get(f"{prefix}/{split}_{metric}", math.nan) * scale
                ci = row.get(f"{prefix}/{split}_{metric}_ci95", math.nan) * scale
                cells.append(f"{mean:.2f} ± {ci:.2f}")
            table.add_row(*cells)
        self.console.print(table)

    def finish(self, results: dict[str, Any]) -> None:
        self.console.print(result_line(results), highlight=False)
        self.console.print(f"results: {results['output_dir']}/results.json", highlight=False)


def result_line(results: dict[str, Any]) -> str:
    """How a run (or an evaluation) ended, in one line: ``test accuracy: 97.10 ± 0.52% (error 2.90%) (600
    tasks, 3 steps, best val at iteration 4000)``.

    ``results`` is what :meth:`Tracker.finish` receives; an evaluation's results name their
    ``split`` (``test`` when absent) and the ``model`` they scored (the best validation iteration
    when absent).
    """
    split = results.get("split", "test")
    metric = curve_metric(results["curves"])
    mean, ci = results[f"{split}/{metric}_mean"], results[f"{split}/{metric}_ci95"]
    shown = f"{100 * mean:.2f} ± {100 * ci:.2f}% (error {100 * (1 - mean):.2f}%)" if metric == "acc" \
        else f"{mean:.4g} ± {ci:.2g}"
    model = results.get("model") or f"best val at iteration {results['best_iteration']}"
    return (f"{split} {metric_label(metric)}: {shown} ({results['eval_tasks']} tasks, {results['eval_inner_steps']} "
            f"steps, {model})")


def final_line(results: dict[str, Any]) -> str:
    """:func:`result_line` and where the results are, in one line: what a run prints last with
    ``console=false`` (the console tracker prints both on lines of their own)."""
    return f"{result_line(results)}; results: {Path(results['output_dir']) / 'results.json'}"
