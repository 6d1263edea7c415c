#!/usr/bin/env python3
"""Run the MAML++ authors' PyTorch code (HowToTrainYourMAMLPytorch, pinned and patched by fetch.sh) beside
metarun's MAML++ (experiment=maml_plus_plus_omniglot_5w1s) at the same short budget on Omniglot 5-way 1-shot,
seed by seed, and compare: validation curves, final test accuracy, a verdict (scripts/fidelity/run_pair.py's rule).

    scripts/fidelity/mamlpp/fetch.sh /tmp/fidelity/mamlpp_ref          # once
    METARUN_CACHE=/tmp/mrcache .venv/bin/python scripts/fidelity/mamlpp/run_pair_mamlpp.py \
        --ref /tmp/fidelity/mamlpp_ref --data-root /tmp/omni_data --out /tmp/fidelity/out_mamlpp

Writes OUT/pair_mamlpp.json and OUT/pair_mamlpp.png; runs go to OUT/reference/mamlpp/seedS/ and
OUT/metarun/mamlpp/seedS/ (a finished run is reused, an interrupted metarun run continues: resume=auto; an
interrupted reference run starts again). See scripts/fidelity/mamlpp/README.md for the protocol and its differences.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
# run_pair.py's helpers: the same log handling, budget check, result readers, summary and curve bands.
from run_pair import add_run_arguments, compare, parse_run_arguments, run_seeds  # noqa: E402

METHOD = "mamlpp"


def reference_command(a: argparse.Namespace, seed: int, out_json: Path) -> list[str]:
    cmd = [a.python, str(a.ref / "fidelity_run.py"), "--data-root", str(a.data_root), "--seed", str(seed),
           "--split-seed", str(a.split_seed), "--init-seed", str(seed if a.init_seed == "seed" else 104),
           "--iterations", str(a.iterations), "--meta-batch", str(a.meta_batch),
           "--iters-per-epoch", str(a.iters_per_epoch), "--msl-iterations", str(a.msl_iterations),
           "--first-order-iterations", str(a.first_order_iterations), "--inner-steps", str(a.inner_steps),
           "--eval-inner-steps", str(a.eval_inner_steps), "--inner-lr", str(a.inner_lr), "--meta-lr", str(a.meta_lr),
           "--min-lr", str(a.min_lr), "--val-every", str(a.val_every), "--val-tasks", str(a.val_tasks),
           "--test-tasks", str(a.test_tasks), "--top-k", str(a.top_k), "--threads", str(a.threads),
           "--out", str(out_json), "--workdir", str(out_json.parent / "experiment")]
    if a.cpu:
        cmd.append("--cpu")
    return [*cmd, *a.ref_extra]  # e.g. --ref-extra="--init torch" (the driver's switch to PyTorch's initialisation)


def metarun_command(a: argparse.Namespace, seed: int, run_dir: Path) -> list[str]:
    budget = [f"iterations={a.iterations}", f"meta_batch_size={a.meta_batch}", f"eval_every={a.val_every}",
              f"checkpoint_every={a.val_every}", f"eval.tasks={a.test_tasks}", f"eval.val_tasks={a.val_tasks}"]
    # the preset holds the authors' 50 000-iteration values; these make the schedules and steps those of the
    # reference command above
    match = [f"algorithm.inner_steps={a.inner_steps}", f"algorithm.eval_inner_steps={a.eval_inner_steps}",
             f"algorithm.inner_lr={a.inner_lr}", f"algorithm.msl_anneal_iterations={a.msl_iterations}",
             f"algorithm.first_order_iterations={a.first_order_iterations}", f"optimizer.lr={a.meta_lr}",
             f"scheduler.eta_min={a.min_lr}", f"eval.top_k={a.top_k}"]
    common = [f"dataset.root={a.data_root}", f"seed={seed}", f"threads={a.threads}", "wandb.mode=offline",
              "console=false", "resume=auto", f"hydra.run.dir={run_dir}"]
    if a.cpu:
        common.append("device=cpu")
    return [a.metarun, "experiment=maml_plus_plus_omniglot_5w1s", *budget, *match, *common, *a.metarun_extra]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", type=Path, required=True, help="the folder fetch.sh made")
    p.add_argument("--data-root", type=Path, required=True, help="holds images_background/ and images_evaluation/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-tasks", type=int, default=100)
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--inner-steps", type=int, default=5, help="training steps (the paper's 5)")
    p.add_argument("--eval-inner-steps", type=int, default=5)
    p.add_argument("--inner-lr", type=float, default=0.1, help="inner rate (LSLR's initial value), the authors' 0.1")
    p.add_argument("--meta-lr", type=float, default=0.001)
    p.add_argument("--min-lr", type=float, default=0.00001, help="cosine floor (the authors' min_learning_rate)")
    p.add_argument("--msl-iterations", type=int, default=200,
                   help="MSL anneals over this many iterations, then the last step's loss alone (the authors: 10 "
                        "epochs = 10%% of 100; metarun's short-budget MAML++ rows: 200 of 400)")
    p.add_argument("--first-order-iterations", type=int, default=0,
                   help="DA: first order for this many iterations (the authors' Omniglot configs: never)")
    p.add_argument("--top-k", type=int, default=1, help="1: test the best-on-validation model; 5: the authors' "
                                                        "(and the preset's) ensemble of the 5 best")
    p.add_argument("--iters-per-epoch", type=int, default=1,
                   help="reference only: its schedules move once per epoch of this many iterations (1: every "
                        "iteration, as metarun's; the authors ran 500)")
    p.add_argument("--split-seed", type=int, default=0, help="reference's val_seed (split, val/test tasks); the "
                                                             "authors: 0 for all runs")
    p.add_argument("--init-seed", choices=["seed", "authors"], default="seed",
                   help="reference's initialisation seed: the run's seed, or the authors' fixed 104")
    add_run_arguments(p)
    a = parse_run_arguments(p)
    a.ref, a.data_root, a.out = a.ref.resolve(), a.data_root.resolve(), a.out.resolve()
    if not (a.ref / "fidelity_run.py").exists():
        raise SystemExit(f"{a.ref}/fidelity_run.py is missing: run scripts/fidelity/mamlpp/fetch.sh {a.ref}")
    for part in ("images_background", "images_evaluation"):
        if not (a.data_root / part).is_dir():
            raise SystemExit(f"{a.data_root / part} is not a folder")
    a.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("METARUN_CACHE", str(Path.home() / ".cache/metarun"))
    env.setdefault("WANDB_SILENT", "true")
    env.setdefault("OMP_NUM_THREADS", str(a.threads))

    sides = run_seeds(a, METHOD, lambda seed, out_json: reference_command(a, seed, out_json),
                      lambda seed, run_dir: metarun_command(a, seed, run_dir), env)
    if not a.only:
        name = "authors' code (HowToTrainYourMAMLPytorch" + (f", {' '.join(a.ref_extra)})" if a.ref_extra else ")")
        compare(a, METHOD, sides, name,
                "MAML++ Omniglot 5-way 1-shot: authors' code vs metarun, equal budget",
                {"matched": {k: getattr(a, k) for k in ("inner_steps", "eval_inner_steps", "inner_lr", "meta_lr",
                                                        "min_lr", "msl_iterations", "first_order_iterations", "top_k")},
                 "reference_only": {k: getattr(a, k) for k in ("iters_per_epoch", "split_seed", "init_seed")},
                 "extra": {"reference": a.ref_extra, "metarun": a.metarun_extra}},
                {"repository": "https://github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch"})


if __name__ == "__main__":
    main()
