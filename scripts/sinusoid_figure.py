"""Fitted sinusoids after 0, 1 and 10 steps, and test MSE for several K, from a finished run.

Loads the best checkpoint of a sinusoid run directory (``metarun experiment=maml_sinusoid ...``)
with the run's own config (``results.json``), so the test tasks are the run's test tasks, and

1. plots, for the first few test tasks, the true function, the K support points and the
   learner after each of ``--steps`` adaptation steps (Finn et al. 2017, Figure 2), and
2. prints the test MSE after 1, 5 and 10 steps for each K in ``--shots`` (the paper trains with
   K = 10 and tests with K = 5, 10, 20; ``--shots`` re-draws the run's test tasks with K points).

    python scripts/sinusoid_figure.py /tmp/runs/maml_sinusoid --shots 5 10 20 --out docs/sinusoid_fits.png

``--set key=value`` changes the run config before building (e.g. ``--set algorithm.inner_lr=0.02``
to fine-tune the pretrained baseline with another step size); the checkpoint is the same.
``--split val`` reports on the validation tasks instead, to choose such a setting without
looking at the test tasks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from metarun import checkpoint
from metarun.algorithms.base import Algorithm
from metarun.build import build_algorithm, build_data
from metarun.loop import score_tasks
from metarun.tasks.sampling import FixedTasks

REPORTED_STEPS = (1, 5, 10)  # the paper's appendix table


def load(run_dir: Path, cfg: DictConfig, shots: int, split: str = "test") -> tuple[Algorithm, FixedTasks]:
    """The run's best model and its ``split`` (val or test) tasks, with ``shots`` support points."""
    cfg = OmegaConf.merge(cfg, {"shots": shots})
    device = torch.device("cpu")
    _, val_tasks, test_tasks, objective = build_data(cfg, device)
    algorithm, _, _ = build_algorithm(cfg, device, objective)
    checkpoint.load_model(run_dir / "checkpoints" / "best.pt", algorithm)
    return algorithm, {"val": val_tasks, "test": test_tasks}[split]


def mse_table(run_dir: Path, cfg: DictConfig, shots: list[int], split: str = "test") -> list[str]:
    """Markdown rows ``| K | MSE after 1 | 5 | 10 steps |`` (mean ± 95% CI over the ``split`` tasks)."""
    rows = ["| K | " + " | ".join(f"after {s} step{'s' * (s > 1)}" for s in REPORTED_STEPS) + " |",
            "|---|" + "---|" * len(REPORTED_STEPS)]
    for k in shots:
        algorithm, tasks = load(run_dir, cfg, k, split)
        algorithm.eval_inner_steps = max(REPORTED_STEPS)
        curve = score_tasks(algorithm, tasks, cfg.eval.bn_batch_stats, cfg.eval.ci_z, "mse").summary()
        cells = [f"{curve['mse_mean'][s]:.3f} ± {curve['mse_ci95'][s]:.3f}" for s in REPORTED_STEPS]
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    return rows


def plot_fits(run_dir: Path, cfg: DictConfig, tasks_shown: int, steps: list[int], out: Path) -> None:
    """True curve, support points and the learner after each of ``steps`` steps, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algorithm, tasks = load(run_dir, cfg, cfg.shots)
    low, high = tasks.sampler.source.x_range
    grid = torch.linspace(low, high, 200).unsqueeze(1)  # [200, 1]
    fig, axes = plt.subplots(1, tasks_shown, figsize=(3.4 * tasks_shown, 2.8), dpi=100, squeeze=False)
    for ax, task, (_, amplitude, phase) in zip(axes[0], tasks, tasks.drawn, strict=False):
        ax.plot(grid, amplitude * torch.sin(grid - phase), color="black", lw=2, label="true")
        with torch.no_grad():
            for step, learner in enumerate(algorithm.trajectory(task.support, max(steps))):
                if step in steps:
                    ax.plot(grid, learner(grid), lw=1.3, ls="--" if step == 0 else "-", label=f"{step} steps")
        ax.scatter(task.support.x, task.support.y, color="red", marker="^", zorder=3, label=f"K={cfg.shots}")
        ax.set_ylim(-6, 6)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    name = cfg.algorithm._target_.rsplit(".", 1)[-1]
    fig.suptitle(f"{name}: fits to test tasks after {', '.join(map(str, steps))} steps on K={cfg.shots} points",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--shots", type=int, nargs="*", default=[], help="K values to report the test MSE for")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 1, 10], help="steps to plot")
    parser.add_argument("--tasks", type=int, default=3, help="test tasks to plot")
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN_DIR/sinusoid_fits.png)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change the run config")
    parser.add_argument("--split", choices=["val", "test"], default="test", help="tasks of the MSE table")
    args = parser.parse_args()
    results_path = args.run_dir / "results.json"
    if not results_path.is_file():
        sys.exit(f"sinusoid_figure: error: no finished run in {args.run_dir} (results.json missing)")
    cfg = OmegaConf.merge(OmegaConf.create(json.loads(results_path.read_text())["config"]),
                          OmegaConf.from_dotlist(args.set))
    if not cfg.dataset._target_.endswith("Sinusoids"):
        sys.exit(f"sinusoid_figure: error: {args.run_dir} is not a sinusoid run (dataset {cfg.dataset._target_})")
    torch.set_num_threads(max(cfg.threads, 1))
    out = args.out or args.run_dir / "sinusoid_fits.png"
    plot_fits(args.run_dir, cfg, args.tasks, args.steps, out)
    print(f"figure: {out}")
    if args.shots:
        print(f"{args.split} MSE (mean ± 95% CI over {cfg.eval.val_tasks if args.split == 'val' else cfg.eval.tasks} "
              f"tasks):")
        print("\n".join(mse_table(args.run_dir, cfg, args.shots, args.split)))


if __name__ == "__main__":
    main()
