#!/usr/bin/env python3
"""Run a trusted reference implementation (learn2learn's own examples, pinned and patched by fetch.sh) beside
metarun at the same budget, seed by seed, and compare: validation curves, final test accuracy, a verdict.

    scripts/fidelity/fetch.sh /tmp/fidelity/ref                    # once
    METARUN_CACHE=/tmp/mrcache .venv/bin/python scripts/fidelity/run_pair.py maml \
        --ref /tmp/fidelity/ref --data-root /tmp/omni_data --out /tmp/fidelity/out

Writes OUT/pair_<method>.json and OUT/pair_<method>.png; runs go to OUT/reference/<method>/seedS/ and
OUT/metarun/<method>/seedS/ (a finished run is reused, an interrupted metarun run continues: resume=auto).
See scripts/fidelity/README.md for the protocol and its differences between the two sides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The same budget on both sides, per method. MAML: docs/results.md's "optimisation family" protocol
# (scripts/omniglot_optimisation_runs.sh). ProtoNet: the metric-based runs (scripts/omniglot_metric_runs.sh:
# experiment=protonet_omniglot_5w1s cut to 3000 episodes). Reptile: the `reptile` row of
# scripts/omniglot_optimisation_runs.sh (docs/fidelity.md).
DEFAULTS = {
    "maml": dict(iterations=400, meta_batch=8, val_every=100, val_tasks=100, test_tasks=600),
    "protonet": dict(iterations=3000, meta_batch=1, val_every=250, val_tasks=100, test_tasks=600),
    "reptile": dict(iterations=400, meta_batch=8, val_every=100, val_tasks=100, test_tasks=600),
}


def reference_command(method: str, a: argparse.Namespace, seed: int, data: Path, out_json: Path) -> list[str]:
    common = ["--data-root", str(data), "--seed", str(seed), "--iterations", str(a.iterations),
              "--val-every", str(a.val_every), "--val-tasks", str(a.val_tasks), "--test-tasks", str(a.test_tasks),
              "--threads", str(a.threads), "--out", str(out_json)]
    if a.cpu:
        common.append("--cpu")
    if method == "maml":
        return [a.python, str(a.ref / "examples/vision/maml_omniglot.py"), *common,
                "--model", "cnn", "--ways", "5", "--shots", "1", "--query-shots", "1",
                "--meta-batch-size", str(a.meta_batch), "--meta-lr", "0.001", "--fast-lr", "0.4",
                "--inner-steps", "1", "--test-inner-steps", "3"]
    if method == "protonet":
        return [a.python, str(a.ref / "examples/vision/protonet_miniimagenet.py"), *common,
                "--dataset", "omniglot", "--train-way", "60", "--shot", "1", "--train-query", "5",
                "--test-way", "5", "--test-shot", "1", "--test-query", "5", "--lr", "0.001",
                "--lr-step", "2000", "--lr-gamma", "0.5", *([] if a.cpu else ["--gpu", "1"])]
    if method == "reptile":
        # conf/algorithm/reptile.yaml with train_shots=10 algorithm.eval_inner_steps=50: inner Adam (beta1 0) lr 1e-3,
        # batches of 10, 5 steps on 10 shots per class in training, 50 steps on 1 shot at validation and test;
        # outer step 1.0 annealed linearly to 0; one query per class (train and test).
        return [a.python, str(a.ref / "examples/vision/reptile_miniimagenet.py"), *common,
                "--dataset", "omniglot", "--ways", "5", "--train-shots", "10", "--train-query", "1",
                "--test-shots", "1", "--test-query", "1", "--meta-bsz", str(a.meta_batch),
                "--meta-lr", "1.0", "--meta-lr-final", "0.0", "--fast-lr", "0.001",
                "--train-bsz", "10", "--test-bsz", "10", "--train-steps", "5", "--test-steps", "50"]
    raise SystemExit(f"unknown method {method}")


def metarun_split_seed(a: argparse.Namespace, seed: int) -> int | None:
    """metarun's dataset.split_seed for a seed's run. learn2learn's examples shuffle the 1 623 characters into
    train / validation / test with the run's seed, so each reference seed tests other characters; a fair comparison
    lets metarun's seeds redraw the split too ("seed": split_seed = seed + 1, so seed 0 keeps the default split 1).
    None ("fixed"): every seed on the dataset's default split, as the first comparisons of docs/fidelity.md ran."""
    return seed + 1 if a.metarun_split == "seed" else None


def metarun_command(method: str, a: argparse.Namespace, seed: int, run_dir: Path) -> list[str]:
    budget = [f"iterations={a.iterations}", f"meta_batch_size={a.meta_batch}", f"eval_every={a.val_every}",
              f"checkpoint_every={a.val_every}", f"eval.tasks={a.test_tasks}", f"eval.val_tasks={a.val_tasks}"]
    common = [f"dataset.root={a.data_root}", f"seed={seed}", f"threads={a.threads}", "wandb.mode=offline",
              "console=false", "resume=auto", f"hydra.run.dir={run_dir}"]
    split = metarun_split_seed(a, seed)
    if split is not None:
        common.append(f"dataset.split_seed={split}")
    if a.cpu:
        common.append("device=cpu")
    if method == "maml":
        shape = ["dataset=omniglot", "algorithm=maml", "ways=5", "shots=1", "query_shots=1"]
    elif method == "protonet":
        shape = ["experiment=protonet_omniglot_5w1s"]  # 60-way training, 5 queries, step lr, max-pool, BN running
    elif method == "reptile":  # scripts/omniglot_optimisation_runs.sh, row `reptile`
        shape = ["dataset=omniglot", "algorithm=reptile", "ways=5", "shots=1", "query_shots=1", "train_shots=10",
                 "algorithm.eval_inner_steps=50"]
    else:
        raise SystemExit(f"unknown method {method}")
    return [a.metarun, *shape, *budget, *common, *a.metarun_extra]


def l2l_data_root(data_root: Path, out: Path) -> Path:
    """torchvision's Omniglot (used by learn2learn's FullOmniglot) reads ROOT/omniglot-py/images_*: link them."""
    for part in ("images_background", "images_evaluation"):
        if not (data_root / part).is_dir():
            raise SystemExit(f"{data_root / part} is not a folder: --data-root must hold the extracted "
                             "images_background/ and images_evaluation/")
    root = out / "l2l_data"
    (root / "omniglot-py").mkdir(parents=True, exist_ok=True)
    for part in ("images_background", "images_evaluation"):
        link = root / "omniglot-py" / part
        if link.is_symlink() or link.exists():
            if link.resolve() == (data_root / part).resolve():
                continue
            link.unlink()
        link.symlink_to((data_root / part).resolve(), target_is_directory=True)
    return root


def check_command(record: Path, cmd: list[str]) -> None:
    """A run is reused (or resumed) only with the arguments it was started with (the interpreter aside): a changed
    --ref-extra / --metarun-extra, say, needs a new --out. Runs from before these records are not checked."""
    if record.exists():
        before = json.loads(record.read_text())
        if before != cmd[1:]:
            raise SystemExit(f"{record} holds other arguments ({' '.join(before)}): use a new --out or delete the run")


def record_command(record: Path, cmd: list[str]) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(cmd[1:]))


def run_logged(cmd: list[str], log: Path, env: dict) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"command failed (exit {rc}), log {log}:\n" + "\n".join(tail))
    return time.perf_counter() - start


def check_budget(name: str, where: Path, found: dict, a: argparse.Namespace) -> None:
    """A reused run must have the requested budget (a changed budget needs a new --out)."""
    want = {"iterations": a.iterations, "val_tasks": a.val_tasks, "test_tasks": a.test_tasks}
    bad = {k: (found[k], v) for k, v in want.items() if found.get(k) is not None and found[k] != v}
    if bad:
        raise SystemExit(f"{name} run {where} has another budget ({', '.join(f'{k} {x} != {y}' for k, (x, y) in bad.items())})"
                         ": use a new --out or delete it")


def read_reference(path: Path) -> dict:
    r = json.loads(path.read_text())
    return {"val": [{"iteration": v["iteration"], "acc": v["acc_mean"], "ci95": v["acc_ci95"]} for v in r["val"]],
            "test_mean": r["test"]["acc_mean"], "test_ci95": r["test"]["acc_ci95"], "test_tasks": r["test"]["n_tasks"],
            "best_iteration": r["best_iteration"], "best_val_acc": r["best_val_acc"],
            "train_seconds": r["train_seconds"], "wall_seconds": r["wall_seconds"]}


def read_metarun(run_dir: Path) -> dict:
    r = json.loads((run_dir / "results.json").read_text())
    val = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val/acc" in row:
            val[row["iteration"]] = row["val/acc"]  # a resumed run may repeat an iteration: keep the last
    return {"val": [{"iteration": i, "acc": acc, "ci95": None} for i, acc in sorted(val.items())],
            "test_mean": r["test/acc_mean"], "test_ci95": r["test/acc_ci95"], "test_tasks": r["eval_tasks"],
            "best_iteration": r["best_iteration"], "best_val_acc": r.get("best_val_acc"),
            "train_seconds": r["train_seconds"], "wall_seconds": r["wall_seconds"]}


def summarise(runs: list[dict], z: float) -> dict:
    """Mean test accuracy over seeds; its CI from the per-run CIs (test-task noise only) and across seeds."""
    means = [r["test_mean"] for r in runs]
    n = len(means)
    mean = sum(means) / n
    ci_tasks = math.sqrt(sum(r["test_ci95"] ** 2 for r in runs)) / n
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (n - 1)) if n > 1 else None
    return {"test_mean": mean, "test_ci95": ci_tasks, "seed_sd": sd,
            "seed_ci95": z * sd / math.sqrt(n) if sd is not None else None,
            "train_seconds_mean": sum(r["train_seconds"] for r in runs) / n,
            "wall_seconds_mean": sum(r["wall_seconds"] for r in runs) / n}


def curve(runs: list[dict], z: float) -> tuple[list[int], list[float], list[float] | None, str]:
    """Validation curve: mean over seeds at the iterations all seeds share, and its band."""
    its = sorted(set.intersection(*[{v["iteration"] for v in r["val"]} for r in runs]))
    rows = [{v["iteration"]: v for v in r["val"]} for r in runs]
    mean = [sum(row[i]["acc"] for row in rows) / len(rows) for i in its]
    if len(runs) > 1:
        band = [z * math.sqrt(sum((row[i]["acc"] - m) ** 2 for row in rows) / (len(rows) - 1)) / math.sqrt(len(rows))
                for i, m in zip(its, mean, strict=True)]
        return its, mean, band, f"{z} x across-seed sd / sqrt({len(runs)})"
    if all(row[i]["ci95"] is not None for row in rows for i in its):
        return its, mean, [rows[0][i]["ci95"] for i in its], "95% CI over the validation tasks"
    return its, mean, None, "no band (one seed; metarun logs no per-task validation CI)"


def plot(title: str, labels: dict[str, str], sides: dict, path: Path, z: float, verdict: str) -> dict:
    """Validation accuracy against meta-iteration, both sides (``labels``: side -> legend name), with bands."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bands = {}
    for name, colour in (("reference", "tab:orange"), ("metarun", "tab:blue")):
        runs = sides[name]["runs"]
        its, mean, band, how = curve(runs, z)
        bands[name] = how
        label = f"{labels[name]} (mean of {len(runs)} seed{'s' * (len(runs) > 1)})"
        ax.plot(its, [100 * m for m in mean], "o-", color=colour, label=label)
        if band is not None:
            ax.fill_between(its, [100 * (m - b) for m, b in zip(mean, band, strict=True)],
                            [100 * (m + b) for m, b in zip(mean, band, strict=True)],
                            color=colour, alpha=0.2, label=f"{name}: {how}")
        if len(runs) > 1:
            for r in runs:
                ax.plot([v["iteration"] for v in r["val"]], [100 * v["acc"] for v in r["val"]], "-", color=colour,
                        alpha=0.3, linewidth=0.8)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{title}\n" + textwrap.fill(verdict, 90), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return bands


def run_seeds(a: argparse.Namespace, method: str, reference_cmd, metarun_cmd, env: dict) -> dict:
    """Both sides, seed by seed (``reference_cmd(seed, result_json)``, ``metarun_cmd(seed, run_dir)`` give the
    commands): run what is missing, reuse what is finished (with the same arguments and budget), and read each
    run's validation curve and test result. Returns ``{"reference": {"runs", "commands"}, "metarun": {...}}``."""
    sides: dict = {"reference": {"runs": [], "commands": []}, "metarun": {"runs": [], "commands": []}}
    for seed in a.seeds:
        ref_dir = a.out / "reference" / method / f"seed{seed}"
        ref_json = ref_dir / "result.json"
        if a.only != "metarun":
            cmd = reference_cmd(seed, ref_json)
            sides["reference"]["commands"].append(cmd)
            check_command(ref_dir / "command.json", cmd)
            if ref_json.exists():
                print(f"reference seed {seed}: reusing {ref_json}", file=sys.stderr)
            else:
                record_command(ref_dir / "command.json", cmd)
                run_logged(cmd, ref_dir / "log.txt", env)
        mr_dir = a.out / "metarun" / method / f"seed{seed}"
        if a.only != "reference":
            cmd = metarun_cmd(seed, mr_dir)
            sides["metarun"]["commands"].append(cmd)
            check_command(a.out / "metarun" / method / f"seed{seed}.command.json", cmd)
            if (mr_dir / "results.json").exists():
                print(f"metarun seed {seed}: reusing {mr_dir}", file=sys.stderr)
            else:
                record_command(a.out / "metarun" / method / f"seed{seed}.command.json", cmd)
                run_logged(cmd, a.out / "metarun" / method / f"seed{seed}.log", env)
        if ref_json.exists():
            r = json.loads(ref_json.read_text())
            check_budget("reference", ref_json, {"iterations": r.get("iterations", r.get("args", {}).get("iterations")),
                                                 "val_tasks": len(r["val"]) and r["val"][0]["n_tasks"],
                                                 "test_tasks": r["test"]["n_tasks"]}, a)
            sides["reference"]["runs"].append({"seed": seed, **read_reference(ref_json)})
        if (mr_dir / "results.json").exists():
            r = json.loads((mr_dir / "results.json").read_text())
            cfg = r.get("config", {})
            check_budget("metarun", mr_dir, {"iterations": cfg.get("iterations"),
                                             "val_tasks": cfg.get("eval", {}).get("val_tasks"),
                                             "test_tasks": r.get("eval_tasks")}, a)
            sides["metarun"]["runs"].append({"seed": seed, **read_metarun(mr_dir)})
        for name in sides:
            r = next((r for r in sides[name]["runs"] if r["seed"] == seed), None)
            if r:
                print(f"{method} seed {seed} {name:9s}: test {100 * r['test_mean']:.2f} ± "
                      f"{100 * r['test_ci95']:.2f}% ({r['test_tasks']} tasks), best val {100 * r['best_val_acc']:.1f}% "
                      f"at {r['best_iteration']}, train {r['train_seconds']:.0f} s, wall {r['wall_seconds']:.0f} s",
                      flush=True)
    return sides


def compare(a: argparse.Namespace, method: str, sides: dict, reference_name: str, title: str, record: dict,
            reference_info: dict | None = None) -> None:
    """The verdict (the difference of the seed-mean test accuracies against their combined CI), the PNG and
    ``OUT/pair_<method>.json`` (``record``: more top-level fields for it; ``reference_info``: more about the
    reference, e.g. its repository)."""
    for name in sides:
        sides[name]["summary"] = summarise(sides[name]["runs"], a.z)
    ref, mr = sides["reference"]["summary"], sides["metarun"]["summary"]
    diff = mr["test_mean"] - ref["test_mean"]
    combined = math.sqrt(ref["test_ci95"] ** 2 + mr["test_ci95"] ** 2)
    verdict = "agree" if abs(diff) <= combined else ("metarun better" if diff > 0 else "metarun worse")
    line = (f"{method}: metarun {100 * mr['test_mean']:.2f}% vs {reference_name} {100 * ref['test_mean']:.2f}% "
            f"(mean of {len(a.seeds)} seed{'s' * (len(a.seeds) > 1)}), diff {100 * diff:+.2f} points, "
            f"combined CI ±{100 * combined:.2f}: {verdict}")
    if ref["seed_sd"] is not None:
        seed_combined = math.sqrt(ref["seed_ci95"] ** 2 + mr["seed_ci95"] ** 2)
        line += (f" [across-seed check: combined ±{100 * seed_combined:.2f}, "
                 f"{'agree' if abs(diff) <= seed_combined else 'differ'}]")
    png = a.out / f"pair_{method}.png"
    bands = plot(title, {"reference": reference_name, "metarun": "metarun"}, sides, png, a.z, line.split(": ", 1)[1])
    result = {
        "method": method, "seeds": a.seeds,
        "budget": {k: getattr(a, k) for k in ("iterations", "meta_batch", "val_every", "val_tasks", "test_tasks",
                                              "threads")},
        **record,
        "verdict": verdict, "diff": diff, "combined_ci95": combined,
        "rule": "diff = mean over seeds of metarun's test mean - the reference's; each side's CI = "
                "sqrt(sum of the per-seed test CIs^2) / seeds (test-task noise); combined = sqrt(ci_ref^2 + ci_metarun^2); "
                "agree when |diff| <= combined",
        "curve_bands": bands,
        "reference": {**sides["reference"], **(reference_info or {}),
                      "commit": (a.ref / ".fidelity_commit").read_text().strip()
                      if (a.ref / ".fidelity_commit").exists() else None},
        "metarun": sides["metarun"],
        "png": str(png),
    }
    (a.out / f"pair_{method}.json").write_text(json.dumps(result, indent=1))
    print(line)
    print(f"wrote {a.out / f'pair_{method}.json'} and {png}")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of how both sides run, which every comparison script takes."""
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpu", action="store_true", help="both sides on the CPU even where CUDA is available")
    p.add_argument("--only", choices=["reference", "metarun"], help="run one side (the summary needs both)")
    p.add_argument("--python", default=str(REPO / ".venv/bin/python"), help="runs the reference")
    p.add_argument("--metarun", default=str(REPO / ".venv/bin/metarun"))
    p.add_argument("--metarun-extra", nargs="*", default=[], help="more metarun overrides (after the others)")
    p.add_argument("--z", type=float, default=1.96, help="the normal quantile of the CIs and bands")
    p.add_argument("--ref-extra", action="append", default=[], metavar="'ARG ...'",
                   help="more reference arguments (after the others), one quoted string split like a shell "
                        "command line, e.g. --ref-extra='--init torch'; may be repeated")


def parse_run_arguments(p: argparse.ArgumentParser) -> argparse.Namespace:
    """``p.parse_args()`` with --ref-extra's strings split into arguments."""
    a = p.parse_args()
    a.ref_extra = [arg for chunk in a.ref_extra for arg in shlex.split(chunk)]
    return a


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=sorted(DEFAULTS))
    p.add_argument("--ref", type=Path, required=True, help="the folder fetch.sh made (learn2learn at the pinned commit)")
    p.add_argument("--data-root", type=Path, required=True, help="holds images_background/ and images_evaluation/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, help="meta-iterations (ProtoNet: episodes); default per method")
    p.add_argument("--meta-batch", type=int, help="tasks per meta-iteration (MAML, Reptile)")
    p.add_argument("--val-every", type=int)
    p.add_argument("--val-tasks", type=int)
    p.add_argument("--test-tasks", type=int)
    p.add_argument("--metarun-split", choices=["seed", "fixed"], default="seed",
                   help="seed: metarun's seed S runs on dataset.split_seed=S+1, as each reference seed draws its own "
                        "split; fixed: every seed on the default split (the first MAML, ProtoNet and Reptile pairs)")
    add_run_arguments(p)
    a = parse_run_arguments(p)
    for key, value in DEFAULTS[a.method].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.method == "protonet" and a.meta_batch != 1:
        raise SystemExit("protonet: one episode per update on both sides (--meta-batch 1)")
    a.ref, a.data_root, a.out = a.ref.resolve(), a.data_root.resolve(), a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    data = l2l_data_root(a.data_root, a.out)
    env = dict(os.environ)
    env.setdefault("METARUN_CACHE", str(Path.home() / ".cache/metarun"))
    env.setdefault("WANDB_SILENT", "true")

    sides = run_seeds(a, a.method, lambda seed, out_json: [*reference_command(a.method, a, seed, data, out_json),
                                                           *a.ref_extra],
                      lambda seed, run_dir: metarun_command(a.method, a, seed, run_dir), env)
    if not a.only:
        example = f"learn2learn example ({' '.join(a.ref_extra)})" if a.ref_extra else "learn2learn example"
        compare(a, a.method, sides, "reference", f"{a.method}: {example} vs metarun, equal budget",
                {"extra": {"reference": a.ref_extra, "metarun": a.metarun_extra},
                 "metarun_split": {"mode": a.metarun_split,
                                   "split_seed": {s: metarun_split_seed(a, s) for s in a.seeds}}})


if __name__ == "__main__":
    main()
