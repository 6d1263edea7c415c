"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node=2``: one meta-step of each case
split across the ranks against the same step in one process, and sharded evaluation against unsharded.

Every rank builds the same algorithm and draws the same meta-batch (same seed); the one-process
reference runs on a copy, from the same RNG state. The meta-optimizer is SGD with rate 1, so the
parameters' change is minus the (clipped) meta-gradient. Rank 0 writes, for every case, the relative
difference (L2 norms) of the parameter changes and of the buffers (BatchNorm statistics), and the
largest relative difference of the metrics, into the JSON file named by the first argument.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import metarun.config  # noqa: F401  (the run_schema)
from metarun import distributed
from metarun.algorithms.base import MetaUpdate
from metarun.build import build_algorithm, build_data, seed_everything
from metarun.commands import CONFIG_DIR
from metarun.loop import score_tasks
from metarun.tasks.device import sample_tasks
from metarun.tasks.types import TaskBatch, with_seeds

GLYPHS = ["dataset.num_alphabets=4", "dataset.characters_per_alphabet=10", "dataset.split_sizes=[20,10,-1]"]
BASE = [*GLYPHS, "device=cpu", "eval.val_tasks=7", "eval.tasks=7", "wandb.mode=disabled"]

# name: (overrides, meta-batch size, grad_clip)
CASES = {
    "maml_second_order": (["algorithm=maml", "algorithm.first_order=false"], 4, None),
    "maml_uneven": (["algorithm=maml", "algorithm.first_order=false"], 5, None),
    "maml_per_task_clipped": (["algorithm=maml", "algorithm.vectorize=false"], 5, 0.05),
    "maml_plus_plus": (["algorithm=maml_plus_plus"], 5, None),
    "reptile": (["algorithm=reptile", "algorithm.inner_optimizer=sgd"], 5, None),
    "protonet": (["algorithm=protonet"], 4, None),
    "mann": (["algorithm=mann"], 5, None),
}


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``|a - b| / |a|`` over all the tensors together (L2 norms)."""
    if not a:
        return 0.0
    flat_a = torch.cat([a[n].double().reshape(-1) for n in a])
    flat_b = torch.cat([b[n].double().reshape(-1) for n in a])
    return ((flat_a - flat_b).norm() / flat_a.norm().clamp_min(1e-30)).item()


def step(algorithm: torch.nn.Module, tasks: list, ranks: distributed.Ranks, grad_clip: float | None
         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """One meta-step; the parameters' changes, the buffers after, the metrics."""
    before = {n: p.detach().clone() for n, p in algorithm.named_parameters()}
    update = MetaUpdate(torch.optim.SGD(algorithm.parameters(), lr=1.0), grad_clip, ranks)
    algorithm.train()
    with update.shared(algorithm, tasks) as share:
        metrics = algorithm.meta_step(share, update)
    changes = {n: p.detach() - before[n] for n, p in algorithm.named_parameters()}
    buffers = {n: b.detach().clone().double() for n, b in algorithm.named_buffers()}
    return changes, buffers, metrics


def in_double(tasks: TaskBatch) -> TaskBatch:
    return dataclasses.replace(tasks, support_x=tasks.support_x.double(), query_x=tasks.query_x.double())


def main() -> None:
    ranks = distributed.join()
    assert ranks.world_size == 2, ranks
    out: dict[str, dict[str, float]] = {}
    for name, (overrides, batch, grad_clip) in CASES.items():
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*BASE, *overrides, f"meta_batch_size={batch}"])
        seed_everything(0)
        sampler, val_tasks, _, objective = build_data(cfg, torch.device("cpu"))
        algorithm, _, _ = build_algorithm(cfg, torch.device("cpu"), objective)
        algorithm.on_iteration(0, 10)
        tasks = with_seeds(sample_tasks(sampler, batch), 0)
        result: dict[str, float] = {}
        # float64 separates the maths from float32's summation order; float32 is what runs.
        for dtype, suffix in ((torch.float64, ""), (torch.float32, "_float32")):
            model = copy.deepcopy(algorithm).to(dtype)
            batch_tasks = in_double(tasks) if dtype == torch.float64 else tasks
            state = torch.get_rng_state()
            one = step(copy.deepcopy(model), batch_tasks, distributed.SINGLE, grad_clip)
            torch.set_rng_state(state)
            split = step(model, batch_tasks, ranks, grad_clip)
            result.update({
                f"changes{suffix}": relative(one[0], split[0]),
                f"buffers{suffix}": relative(one[1], split[1]),
                f"metrics{suffix}": max(abs(one[2][k] - split[2][k]) / max(abs(one[2][k]), 1e-12) for k in one[2]),
            })
        result["moved"] = max(c.abs().max().item() for c in one[0].values())
        result["buffer_names"] = len(one[1])
        if name in ("maml_uneven", "protonet", "mann"):
            whole = score_tasks(algorithm, val_tasks, cfg.eval.bn_batch_stats, 1.96, objective.loss_metric)
            sharded = score_tasks(algorithm, val_tasks, cfg.eval.bn_batch_stats, 1.96, objective.loss_metric, ranks)
            result["evaluation"] = relative({k: torch.tensor(v) for k, v in whole.summary().items()},
                                            {k: torch.tensor(v) for k, v in sharded.summary().items()})
            result["evaluation_tasks"] = len(sharded.loss)
        out[name] = result
    if ranks.writes:
        Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
    distributed.leave()


if __name__ == "__main__":
    main()
