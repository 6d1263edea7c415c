"""Statistics over fixed tasks: what a tested model scored, and the curves format results.json holds.

:class:`TaskScores` holds every task's query metrics after every adaptation step and summarises
them as a split's curves: per metric, the mean over tasks and the half-width of its confidence
interval (``ci_z * std / sqrt(tasks)``) after each step, ``{"acc_mean": [...], "acc_ci95": [...],
"loss_mean": [...], ...}``, plus the curves on other axes under the axis' name (``"instance":
{"position": [...], "acc_mean": [...], ...}``). The readers of that format (which metric a curve
shows, its flat keys ``test/acc_mean``) are here too, beside its writer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from metarun.objectives import Curve, TaskResult


@dataclass
class AxisValues:
    """Every task's metrics on one axis other than the adaptation step (e.g. the instance number of a class
    within a sequential episode).

    Attributes:
        positions: the axis values that occur in any task, increasing.
        metrics: metric name -> ``[tasks, len(positions)]`` float64, NaN where a task has no value.
    """

    positions: list[int]
    metrics: dict[str, torch.Tensor]

    @classmethod
    def of(cls, curves: list[Curve | None]) -> AxisValues:
        """From one curve per task (None: the task has none), aligned on the union of their positions."""
        present = [c for c in curves if c is not None]
        positions = sorted({int(p) for c in present for p in c.positions.tolist()})
        column = {p: i for i, p in enumerate(positions)}
        names = list(dict.fromkeys(name for c in present for name in c.metrics))
        metrics = {name: torch.full((len(curves), len(positions)), math.nan, dtype=torch.float64) for name in names}
        for t, curve in enumerate(curves):
            if curve is None:
                continue
            columns = torch.tensor([column[int(p)] for p in curve.positions.tolist()], dtype=torch.long)
            for name, values in curve.metrics.items():
                metrics[name][t, columns] = values.detach().to(device="cpu", dtype=torch.float64)
        return cls(positions=positions, metrics=metrics)

    @classmethod
    def concatenate(cls, parts: list[AxisValues], tasks: list[int]) -> AxisValues:
        """The tasks of ``parts`` one after the other (``tasks``: how many each part holds), aligned on
        the union of their positions, as :meth:`of` aligns them."""
        positions = sorted({p for part in parts for p in part.positions})
        column = {p: i for i, p in enumerate(positions)}
        names = list(dict.fromkeys(name for part in parts for name in part.metrics))
        metrics = {name: torch.full((sum(tasks), len(positions)), math.nan, dtype=torch.float64) for name in names}
        start = 0
        for part, count in zip(parts, tasks, strict=True):
            columns = torch.tensor([column[p] for p in part.positions], dtype=torch.long)
            for name, values in part.metrics.items():
                metrics[name][start:start + count][:, columns] = values
            start += count
        return cls(positions=positions, metrics=metrics)


@dataclass
class TaskScores:
    """Query metrics of fixed tasks after each adaptation step.

    Attributes:
        loss: ``[tasks, steps + 1]`` query loss after 0..steps adaptation steps.
        accuracy: same shape, query accuracy in [0, 1]; None for regression.
        ci_z: z-value of the confidence interval (1.96 for 95%).
        loss_metric: the objective's name for the loss when it is the task's metric (``"mse"``
            for regression), reported under that name too; None for classification.
        axes: the fully adapted learners' curves on other axes (``TaskResult.curves``), by axis
            name (``"instance"``); empty for the methods that give none.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor | None
    ci_z: float
    loss_metric: str | None = None
    axes: dict[str, AxisValues] = field(default_factory=dict)

    @classmethod
    def of(cls, results: list[list[TaskResult]], ci_z: float, loss_metric: str | None) -> TaskScores:
        """From ``results[task][step]``; the curves on other axes are those of the last step."""
        loss = torch.stack([torch.stack([r.loss for r in task]) for task in results]).cpu()
        accuracy = None
        if results[0][0].accuracy is not None:
            accuracy = torch.stack([torch.stack([r.accuracy for r in task]) for task in results]).cpu()
        final = [task[-1].curves or {} for task in results]
        names = list(dict.fromkeys(axis for curves in final for axis in curves))
        axes = {axis: AxisValues.of([curves.get(axis) for curves in final]) for axis in names}
        return cls(loss=loss, accuracy=accuracy, ci_z=ci_z, loss_metric=loss_metric, axes=axes)

    def to_json(self) -> dict[str, Any]:
        """Every value, exactly (floats as JSON numbers round-trip; NaN as NaN): what a rank sends
        to be gathered (:meth:`concatenate`)."""
        return {"loss": self.loss.tolist(), "dtype": str(self.loss.dtype).removeprefix("torch."),
                "accuracy": None if self.accuracy is None else self.accuracy.tolist(),
                "axes": {axis: {"positions": values.positions, "metrics": {n: m.tolist() for n, m in values.metrics.items()}}
                         for axis, values in self.axes.items()}}

    @classmethod
    def concatenate(cls, parts: list[dict[str, Any]], ci_z: float, loss_metric: str | None) -> TaskScores:
        """The scores of the tasks of ``parts`` (:meth:`to_json`) one after the other: the per-rank
        shards of an evaluation gathered in task order."""
        dtype = getattr(torch, parts[0]["dtype"])
        loss = torch.cat([torch.tensor(p["loss"], dtype=dtype) for p in parts])
        accuracy = None
        if parts[0]["accuracy"] is not None:
            accuracy = torch.cat([torch.tensor(p["accuracy"], dtype=dtype) for p in parts])
        tasks = [len(p["loss"]) for p in parts]
        names = list(dict.fromkeys(axis for p in parts for axis in p["axes"]))
        axes = {}
        for axis in names:
            pieces = [p["axes"].get(axis, {"positions": [], "metrics": {}}) for p in parts]
            axes[axis] = AxisValues.concatenate(
                [AxisValues(positions=piece["positions"],
                            metrics={n: torch.tensor(v, dtype=torch.float64).reshape(count, len(piece["positions"]))
                                     for n, v in piece["metrics"].items()})
                 for piece, count in zip(pieces, tasks, strict=True)], tasks)
        return cls(loss=loss, accuracy=accuracy, ci_z=ci_z, loss_metric=loss_metric, axes=axes)

    def _ci(self, values: torch.Tensor) -> torch.Tensor:
        n = values.shape[0]
        std = values.std(dim=0, unbiased=True) if n > 1 else torch.zeros(values.shape[1])
        return self.ci_z * std / math.sqrt(n)

    def summary(self) -> dict[str, list[float]]:
        """Mean and CI half-width per adaptation step: ``{"loss_mean": [...], "acc_ci95": [...], ...}``
        (``mse_mean``/``mse_ci95``, copies of the loss, instead of ``acc_*`` for regression)."""
        out = {"loss_mean": self.loss.mean(0).tolist(), "loss_ci95": self._ci(self.loss).tolist()}
        if self.accuracy is not None:
            out["acc_mean"] = self.accuracy.mean(0).tolist()
            out["acc_ci95"] = self._ci(self.accuracy).tolist()
        if self.loss_metric is not None:
            out[f"{self.loss_metric}_mean"] = out["loss_mean"]
            out[f"{self.loss_metric}_ci95"] = out["loss_ci95"]
        return out

    def axis_summaries(self) -> dict[str, dict[str, list]]:
        """Mean and CI half-width over the tasks that have a value, per position of every other
        axis: ``{"instance": {"position": [1, 2, ...], "acc_mean": [...], "acc_ci95": [...]}}``.
        A position no task has is None (JSON null); one task alone has a CI of 0."""
        out: dict[str, dict[str, list]] = {}
        for axis, values in self.axes.items():
            summary: dict[str, list] = {"position": list(values.positions)}
            for name, table in values.metrics.items():
                valid = ~torch.isnan(table)
                n = valid.sum(0).to(torch.float64)  # [P] tasks with a value
                mean = torch.where(valid, table, 0.0).sum(0) / n
                squares = torch.where(valid, table - mean, 0.0).pow(2).sum(0)
                std = torch.where(n > 1, squares / (n - 1).clamp(min=1), 0.0).sqrt()
                ci = self.ci_z * std / n.sqrt()
                summary[f"{name}_mean"] = [None if k == 0 else float(m) for m, k in zip(mean, n, strict=True)]
                summary[f"{name}_ci95"] = [None if k == 0 else float(c) for c, k in zip(ci, n, strict=True)]
            out[axis] = summary
        return out

    def curves(self) -> dict[str, Any]:
        """What results.json holds for a split: :meth:`summary`, and :meth:`axis_summaries` under
        their axis names."""
        return {**self.summary(), **self.axis_summaries()}

    def final_metrics(self, split: str) -> dict[str, float]:
        """Means after the last adaptation step: ``{"val/loss": ..., "val/acc": ...}`` (``val/mse`` for regression)."""
        return {f"{split}/{key.removesuffix('_mean')}": values[-1]
                for key, values in self.summary().items() if key.endswith("_mean")}

    def score(self, metric: str) -> float:
        """The mean of ``metric`` (``"acc"``, ``"mse"``, ``"loss"``) after the last adaptation step."""
        return self.summary()[f"{metric}_mean"][-1]

    def divergence(self, threshold: float) -> tuple[int, float] | None:
        """:func:`divergence` of the mean query loss per adaptation step (``loss_mean``)."""
        return divergence(self.loss.mean(0).tolist(), threshold)


def divergence(loss_mean: list[float], threshold: float) -> tuple[int, float] | None:
    """Whether adaptation made the query loss explode: ``(step, factor)`` when the mean query loss after
    the last adaptation step (``step``) is more than ``threshold`` times its value at step 0, ``factor``
    being that ratio (``inf`` over a loss of 0); None otherwise. A method without an inner loop (one
    value) never diverges; a NaN loss is not a divergence (the loop stops on non-finite training losses)."""
    if len(loss_mean) < 2:
        return None
    first, last = loss_mean[0], loss_mean[-1]
    if not last > threshold * first:
        return None
    return len(loss_mean) - 1, (last / first if first > 0 else math.inf)


def final_values(split: str, curves: dict[str, Any]) -> dict[str, float | None]:
    """The flat keys of a split's curves (:meth:`TaskScores.curves`): every per-step metric after
    the last adaptation step (``test/acc_mean``, ``test/acc_ci95``, ...), and every position of
    every other axis (``test/acc_instance_2_mean``, ``test/acc_instance_2_ci95``, ...)."""
    out: dict[str, float | None] = {}
    for key, values in curves.items():
        if isinstance(values, dict):  # another axis: {"position": [...], "acc_mean": [...], ...}
            for name, column in values.items():
                if name != "position":
                    metric, _, statistic = name.rpartition("_")
                    for position, value in zip(values["position"], column, strict=True):
                        out[f"{split}/{metric}_{key}_{position}_{statistic}"] = value
        else:
            out[f"{split}/{key}"] = values[-1]
    return out


def metric_names(summary: dict[str, list[float]]) -> list[str]:
    """The metrics of a summary, e.g. ``["loss", "acc"]`` for ``loss_mean``, ``loss_ci95``, ``acc_mean``, ..."""
    return [key.removesuffix("_mean") for key in summary if key.endswith("_mean")]


def curve_metric(curves: dict[str, dict[str, list[float]]]) -> str:
    """The metric every split has that tables and plots show: ``"acc"`` for classification, the
    objective's own name for its loss (``"mse"``) for regression, else ``"loss"``."""
    common = set.intersection(*(set(metric_names(summary)) for summary in curves.values())) - {"loss"}
    return "acc" if "acc" in common else min(common, default="loss")


def axis_metric(splits: dict[str, dict[str, list]]) -> str:
    """The metric that tables and plots of an axis show: ``"acc"`` when there is one."""
    names = [m for summary in splits.values() for m in metric_names(summary)]
    return "acc" if "acc" in names else names[0]
