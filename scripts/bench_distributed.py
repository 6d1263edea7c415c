"""Meta-training speed of one run on several ranks against one process, as ratios of alternating runs.

The same config, MAML 5-way 1-shot, meta-batch 32, second order, vectorised (``experiment=maml_omniglot_5w1s``
on the generated glyphs by default: Omniglot's 28x28 shapes without its files; ``--omniglot ROOT`` for the real
images), runs as whole ``metarun`` commands in rounds, each round running every variant once, so machine noise
hits them alike:

- ``1p x 1t``: one process, ``threads=1``;
- ``1p x Nt``: one process, ``threads=N`` (N = the ranks of the largest variant, on a CPU);
- ``Wr x 1t``: ``torchrun --nproc_per_node=W``, ``threads=1`` per rank (on a GPU machine: one GPU per rank).

The time is ``train_seconds`` of ``results.json`` (the meta-training loop, its one validation included) per
meta-iteration; ratios are medians of per-round ratios against ``1p x 1t``. Printed as a markdown table, with
the command lines and the machine.

    python scripts/bench_distributed.py --ranks 2 --iterations 12 --rounds 3             # CPU
    python scripts/bench_distributed.py --device cuda --ranks 1 2 4 8 --iterations 200   # a multi-GPU node
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from metarun.loop import hardware

REPO = Path(__file__).resolve().parents[1]


def command(ranks: int, threads: int, args: argparse.Namespace, run_dir: Path) -> list[str]:
    config = ["experiment=maml_omniglot_5w1s", "meta_batch_size=32", "algorithm.first_order=false",
              "algorithm.vectorize=true", f"iterations={args.iterations}", f"eval_every={args.iterations}",
              f"checkpoint_every={args.iterations}", "eval.val_tasks=8", "eval.tasks=8", f"device={args.device}",
              f"threads={threads}", "wandb.mode=disabled", "console=false", f"hydra.run.dir={run_dir}"]
    config += [f"dataset.root={args.omniglot}"] if args.omniglot else ["dataset=glyphs"]
    if ranks == 1:
        return [sys.executable, "-m", "metarun", *config]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "metarun", *config]


def seconds_per_iteration(cmd: list[str], run_dir: Path, iterations: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return json.loads((run_dir / "results.json").read_text())["train_seconds"] / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2], help="world sizes to time (besides 1)")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--omniglot", default=None, help="Omniglot's root (default: the generated glyphs)")
    args = parser.parse_args()
    widest = max(args.ranks)
    variants = {"1p x 1t": (1, 1)}
    if args.device == "cpu" and widest > 1:
        variants[f"1p x {widest}t"] = (1, widest)
    variants.update({f"{w}r x 1t": (w, 1) for w in args.ranks if w > 1})
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for name, (ranks, threads) in variants.items():
                run_dir = Path(scratch) / f"{round_index}-{name.replace(' ', '')}"
                times[name].append(seconds_per_iteration(command(ranks, threads, args, run_dir), run_dir,
                                                         args.iterations))
                print(f"round {round_index + 1}: {name}: {times[name][-1]:.3f} s/iteration", file=sys.stderr)
    base = times["1p x 1t"]
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if args.device == "cuda" else []
    print(f"MAML 5-way 1-shot, meta-batch 32, second order, vectorised, {args.iterations} iterations x "
          f"{args.rounds} rounds, {'Omniglot' if args.omniglot else 'glyphs'}, device {args.device}; "
          f"{hardware(torch.device('cpu'))}{'; ' + ', '.join(gpus) if gpus else ''}")
    print(f"command: python scripts/bench_distributed.py {' '.join(sys.argv[1:])}")
    print()
    print("| variant | s / iteration (median) | speed-up over 1p x 1t (median of per-round ratios) |")
    print("|---|---|---|")
    for name, values in times.items():
        ratio = statistics.median(b / v for b, v in zip(base, values, strict=True))
        print(f"| {name} | {statistics.median(values):.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
