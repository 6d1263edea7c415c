"""Where a distributed meta-step spends its time: MAML 5-way 1-shot, meta-batch 32, second order, vectorised, on
the glyphs; 30 steps after 10 of warm-up; milliseconds per step of sampling, of the three collectives (the
metrics' all-reduce, the gradients' all-reduce, the BatchNorm statistics' all-gather) and of the whole step.
Rank 0 prints one line (docs/results.md, "One run on two ranks").

    python scripts/profile_distributed_step.py                                           # one process
    python -m torch.distributed.run --standalone --nproc_per_node=2 scripts/profile_distributed_step.py
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import torch
from hydra import compose, initialize_config_dir

import metarun.config  # noqa: F401  (the run_schema)
from metarun import distributed
from metarun.algorithms.base import MetaUpdate
from metarun.build import build_algorithm, build_data, seed_everything
from metarun.commands import CONFIG_DIR
from metarun.tasks.device import sample_tasks
from metarun.tasks.types import with_seeds

SPENT: dict[str, float] = collections.defaultdict(float)


def timed(name: str, function: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        out = function(*args, **kwargs)
        SPENT[name] += time.perf_counter() - started
        return out
    return wrapper


def main() -> None:
    torch.set_num_threads(1)
    ranks = distributed.join()
    overrides = ["experiment=maml_omniglot_5w1s", "dataset=glyphs", "meta_batch_size=32", "algorithm.first_order=false",
                 "algorithm.vectorize=true", "device=cpu", "eval.val_tasks=8", "eval.tasks=8"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    seed_everything(0)
    sampler, _, _, objective = build_data(cfg, torch.device("cpu"))
    algorithm, optimizer, _ = build_algorithm(cfg, torch.device("cpu"), objective)
    update = MetaUpdate(optimizer, None, ranks)
    ranks.reduce_gradients = timed("gradients all-reduce", ranks.reduce_gradients)
    ranks.weighted_sum_ = timed("metrics all-reduce", ranks.weighted_sum_)
    ranks.merge_buffers = timed("BatchNorm all-gather", ranks.merge_buffers)
    steps, warm_up = 40, 10
    for iteration in range(steps):
        if iteration == warm_up:
            SPENT.clear()
            started = time.perf_counter()
        tasks = timed("sampling", lambda i=iteration: with_seeds(sample_tasks(sampler, 32), i))()
        algorithm.train()
        step_started = time.perf_counter()
        with update.shared(algorithm, tasks) as share:
            algorithm.meta_step(share, update)
        SPENT["whole step"] += time.perf_counter() - step_started
    per_step = (time.perf_counter() - started) / (steps - warm_up)
    if ranks.writes:
        print(f"{ranks.world_size} rank(s): " + ", ".join(f"{name} {1000 * value / (steps - warm_up):.2f} ms"
                                                      for name, value in SPENT.items())
              + f"; {1000 * per_step:.1f} ms per iteration")
    distributed.leave()


if __name__ == "__main__":
    main()
