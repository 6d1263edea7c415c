"""Kill-and-resume campaign: does a run that is killed at any moment, and resumed, end bit-exactly
where an uninterrupted run ends, and is every checkpoint it leaves behind loadable?

It first runs a tiny glyphs job through the real CLI without interruption. Then, ``--trials`` times,
it starts the same job in a fresh directory and kills it with SIGKILL, at a random moment or at a
chosen one (while a checkpoint is being written, or during the final test evaluation), resumes
it from its own ``checkpoints/last.pt`` (or starts it again when it died before the first one),
and may kill it again, until it finishes. Each finished trial is compared with the uninterrupted
run (the test and validation curves in results.json, and every tensor of best.pt and last.pt),
and every checkpoint file left in its directory is loaded.

    .venv/bin/python scripts/kill_resume.py --trials 20 --out /tmp/kill_resume

Prints one line per trial and the totals: bit-exact runs out of N, corrupt checkpoints out of all.
Exit status 1 when a trial differs or a checkpoint is corrupt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from metarun.checkpoint import safe_load
from metarun.errors import CheckpointError

JOB = [
    "dataset.num_alphabets=4", "dataset.characters_per_alphabet=10", "dataset.split_sizes=[20,10,-1]",
    "iterations=40", "meta_batch_size=4", "eval_every=5", "checkpoint_every=3", "eval.tasks=60", "eval.val_tasks=10",
    "eval.top_k=2", "scheduler=cosine", "wandb.mode=disabled", "console=false", "device=cpu", "threads=1",
]
# results.json keys that legitimately differ between runs (timing and where the run lives).
VOLATILE = {"train_seconds", "wall_seconds", "output_dir", "config"}


def start(out: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "metarun", *JOB, f"hydra.run.dir={out}"]
    if resume:
        args.append(f"resume={out}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, condition, timeout: float) -> bool:
    """Poll ``condition()`` every millisecond until it holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.001)
    return False


def writing_checkpoint(out: Path) -> bool:
    """A checkpoint's temporary file exists while an earlier last.pt does: ``atomic_save`` is
    replacing a checkpoint that a resume would read."""
    folder = out / "checkpoints"
    return (folder / "last.pt").is_file() and any(p.name.startswith(".") for p in folder.rglob("*"))


def in_final_evaluation(out: Path, iterations: int) -> bool:
    """Training has logged its last iteration: the run is testing."""
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return False
    for line in metrics.read_text().splitlines()[-3:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line the run is writing right now
            continue
        if record.get("iteration") == iterations and "val/loss" in record:
            return True
    return False


def kill_once(out: Path, mode: str, rng: random.Random, baseline_seconds: float) -> str:
    """Start (or resume) the job and SIGKILL it at the moment ``mode`` picks; returns what happened."""
    proc = start(out, resume=(out / "checkpoints" / "last.pt").is_file())
    if mode == "checkpoint-write":
        hit = wait_for(proc, lambda: writing_checkpoint(out), baseline_seconds * 2)
    elif mode == "final-eval":
        hit = wait_for(proc, lambda: in_final_evaluation(out, 40), baseline_seconds * 2)
    else:
        hit = wait_for(proc, lambda: False, rng.uniform(0.5, baseline_seconds)) or proc.poll() is None
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return f"killed ({mode}{'' if hit else ', late'})"
    return f"finished before the kill (rc {proc.returncode})"


def finish(out: Path) -> None:
    proc = start(out, resume=(out / "checkpoints" / "last.pt").is_file())
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"resumed job failed: {stderr.strip()}")


def comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in VOLATILE}


def same_tensors(a: Path, b: Path) -> bool:
    x, y = safe_load(a), safe_load(b)
    return x["algorithm"].keys() == y["algorithm"].keys() and all(
        torch.equal(x["algorithm"][k], y["algorithm"][k]) for k in x["algorithm"])


def checkpoints_left(out: Path) -> tuple[int, list[str]]:
    """Load every checkpoint file in the run; returns (how many, the corrupt ones)."""
    files = [p for p in (out / "checkpoints").rglob("*.pt") if not p.name.startswith(".")]
    corrupt = []
    for path in files:
        try:
            safe_load(path)
        except CheckpointError as error:
            corrupt.append(f"{path}: {error}")
    return len(files), corrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    straight = args.out / "straight"
    began = time.monotonic()
    if not (straight / "results.json").is_file():
        finish(straight)
    baseline_seconds = time.monotonic() - began
    expected = comparable(json.loads((straight / "results.json").read_text()))
    print(f"uninterrupted run: {baseline_seconds:.1f} s, test acc {expected['test/acc_mean']:.4f}")

    exact = total_files = 0
    all_corrupt: list[str] = []
    modes = ["checkpoint-write", "final-eval", "random"]
    for trial in range(args.trials):
        out = args.out / f"trial_{trial:02d}"
        events = []
        mode = modes[trial % len(modes)]
        events.append(kill_once(out, mode, rng, baseline_seconds))
        while rng.random() < 0.5 and not (out / "results.json").is_file():  # sometimes kill it again
            events.append(kill_once(out, "random", rng, baseline_seconds))
        if not (out / "results.json").is_file():
            finish(out)
        results = comparable(json.loads((out / "results.json").read_text()))
        same = results == expected and all(
            same_tensors(out / "checkpoints" / name, straight / "checkpoints" / name) for name in ("best.pt", "last.pt"))
        files, corrupt = checkpoints_left(out)
        exact += same
        total_files += files
        all_corrupt += corrupt
        print(f"trial {trial:2d}: {'; '.join(events)} -> {'bit-exact' if same else 'DIFFERS'}, "
              f"{files} checkpoints, {len(corrupt)} corrupt", flush=True)
    print(f"bit-exact: {exact}/{args.trials}; corrupt checkpoints: {len(all_corrupt)}/{total_files}")
    for line in all_corrupt:
        print("  corrupt:", line)
    return 0 if exact == args.trials and not all_corrupt else 1


if __name__ == "__main__":
    sys.exit(main())
