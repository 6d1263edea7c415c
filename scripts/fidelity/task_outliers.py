"""Per-task scores of a finished run's tested model: the tasks whose loss after the last step is an outlier,
and the mean and median per step with and without them (docs/fidelity.md, the sinusoid's one diverging task).

    python scripts/fidelity/task_outliers.py RUN_DIR [--split test] [--above 10]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from metarun import checkpoint
from metarun.build import build
from metarun.loop import score_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--above", type=float, default=10.0, help="an outlier's loss after the last step")
    args = parser.parse_args()
    cfg = OmegaConf.load(args.run_dir / ".hydra" / "config.yaml")
    cfg.wandb.mode = "disabled"
    cfg.console = False
    with tempfile.TemporaryDirectory() as scratch:
        parts = build(cfg, Path(scratch))
    checkpoint.load_model(checkpoint.best_file(checkpoint.folder(args.run_dir)), parts.algorithm)
    tasks = parts.test_tasks if args.split == "test" else parts.val_tasks
    scores = score_tasks(parts.algorithm, tasks, cfg.eval.bn_batch_stats, cfg.eval.ci_z, parts.objective.loss_metric)
    last = scores.loss[:, -1]
    outliers = (last > args.above).nonzero().flatten().tolist()
    print(f"{len(outliers)} of {len(last)} {args.split} tasks with a loss above {args.above} after the last step")
    described = list(tasks)
    for index in outliers:
        task = described[index]
        print(f"  task {index}: loss per step {[float(f'{v:.3g}') for v in scores.loss[index].tolist()]}; "
              f"support x {[round(v, 2) for v in task.support.x.flatten().tolist()]}, "
              f"y {[round(v, 2) for v in task.support.y.flatten().tolist()]}")
    keep = last <= args.above
    print("mean, all tasks:     ", [float(f"{v:.3g}") for v in scores.loss.mean(0).tolist()])
    print("mean, without them:  ", [float(f"{v:.3g}") for v in scores.loss[keep].mean(0).tolist()])
    print("median, all tasks:   ", [float(f"{v:.3g}") for v in scores.loss.median(0).values.tolist()])


if __name__ == "__main__":
    main()
