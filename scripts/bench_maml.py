"""Meta-iterations per second: a plain learn2learn loop, metarun per task, metarun vectorised.

Four ways to run the same MAML meta-iteration (Conv4, 64 filters, stride 2, generated 28x28
glyphs), in one process, rounds alternating between them so machine noise hits all alike:

- ``learn2learn``: written like learn2learn's ``examples/vision/maml_omniglot.py``: a TaskDataset
  over the images themselves, support/query chosen by position, ``maml.clone()`` and ``adapt``
  per task, ``backward`` per task, one Adam step;
- ``per-task``: metarun before vectorisation: its learn2learn ``TaskSampler`` and the per-task
  ``meta_step`` (``sampler=learn2learn algorithm.vectorize=false``);
- ``per-task+dev``: the per-task ``meta_step`` on the device sampler (what ``vectorize=auto``
  falls back to with the default ``sampler=device``);
- ``vectorised``: the device sampler and the vectorised ``meta_step`` (``vectorize=true``).

Every value but the shape is the config's: ``experiment=maml_omniglot_5w1s dataset=glyphs`` composed from
conf/ (MAML's inner rate and switches, the Conv4, Adam and its rate, the glyphs), and metarun's variants
are built by ``metarun.build.build_algorithm``; the shape's defaults are that preset's too.

``auto`` is whichever of the last two ``vectorize=auto`` picks for the shape. Ratios are medians of
per-round ratios against the learn2learn loop (``/l2l``) and against metarun's per-task path
(``auto/per-task``). The grid covers 5-way 1-shot with 1 and 15 queries per class, meta-batch 4,
16 and 32, 1 and 5 inner steps, first and second order (``--grid``), or one shape. ``--sampling``
times the samplers alone (tasks/s at one meta-batch).

    python scripts/bench_maml.py --grid --threads 1
    python scripts/bench_maml.py --meta-batch-size 32 --inner-steps 1 --query-shots 1 --threads 1
    python scripts/bench_maml.py --sampling --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

import metarun.config  # noqa: F401  (registers the run_schema that conf/config.yaml starts from)
from metarun._learn2learn import l2l
from metarun.algorithms import vectorized
from metarun.algorithms.base import Algorithm, MetaUpdate
from metarun.build import build_algorithm
from metarun.commands import CONFIG_DIR
from metarun.cpu import configure_cpu
from metarun.loop import hardware
from metarun.tasks.device import DeviceTaskSampler, sample_tasks
from metarun.tasks.sampling import TaskSampler

VARIANTS = ("learn2learn", "per-task", "per-task+dev", "vectorised")
# MAML's Omniglot 5-way 1-shot protocol on the generated glyphs: every value but the shape comes from here.
PRESET = ("experiment=maml_omniglot_5w1s", "dataset=glyphs")


def config(*overrides: str) -> DictConfig:
    """conf/config.yaml with :data:`PRESET`, then ``overrides``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*PRESET, *overrides])


def load_data(cfg: DictConfig | None = None):
    """The glyphs' class splits, as the config's dataset makes them (cached after the first run)."""
    return instantiate((cfg or config()).dataset, _convert_="all")


@dataclass(frozen=True)
class Shape:
    ways: int
    shots: int
    query_shots: int
    meta_batch_size: int
    inner_steps: int
    first_order: bool

    def __str__(self) -> str:
        return (f"{self.ways}w{self.shots}s q{self.query_shots} mb{self.meta_batch_size} k{self.inner_steps} "
                f"{'FO' if self.first_order else 'SO'}")


def learn2learn_example_step(maml, optimizer, taskset, shape: Shape, device) -> None:
    """One meta-iteration as learn2learn's maml_omniglot example writes it."""
    loss_fn = nn.CrossEntropyLoss(reduction="mean")
    per_class = shape.shots + shape.query_shots
    optimizer.zero_grad()
    for _ in range(shape.meta_batch_size):
        learner = maml.clone()
        data, labels = taskset.sample()
        data, labels = data.to(device), labels.to(device)
        adaptation = torch.zeros(data.size(0), dtype=torch.bool)
        # The TaskDataset's samples come class by class; the first `shots` of each adapt.
        adaptation[(torch.arange(shape.ways)[:, None] * per_class + torch.arange(shape.shots)).flatten()] = True
        evaluation = ~adaptation
        for _ in range(shape.inner_steps):
            learner.adapt(loss_fn(learner(data[adaptation]), labels[adaptation]))
        loss_fn(learner(data[evaluation]), labels[evaluation]).backward()
    for p in maml.parameters():
        p.grad.data.mul_(1.0 / shape.meta_batch_size)
    optimizer.step()


def shape_config(shape: Shape, vectorize: str = "auto") -> DictConfig:
    """The config of one benchmarked shape: :data:`PRESET` with the shape's ways and inner loop."""
    return config(f"ways={shape.ways}", f"shots={shape.shots}", f"query_shots={shape.query_shots}",
                  f"train_query_shots={shape.query_shots}", f"meta_batch_size={shape.meta_batch_size}",
                  f"algorithm.inner_steps={shape.inner_steps}", f"algorithm.eval_inner_steps={shape.inner_steps}",
                  f"algorithm.first_order={str(shape.first_order).lower()}", f"algorithm.vectorize={vectorize}")


def make_algorithm(shape: Shape, vectorize: str, device: torch.device
                   ) -> tuple[Algorithm, torch.optim.Optimizer]:
    """metarun's MAML and its meta-optimizer, as a run builds them (same initial weights every time)."""
    torch.manual_seed(0)
    algorithm, optimizer, _ = build_algorithm(shape_config(shape, vectorize), device)
    return algorithm, optimizer


def make_baseline(shape: Shape, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """learn2learn's MAML on the same network (same initial weights as :func:`make_algorithm`: the backbone,
    then the linear head), inner rate and meta-optimizer, from the same config nodes the build reads.
    It is no metarun algorithm, so the build cannot make it."""
    cfg = shape_config(shape)
    torch.manual_seed(0)
    features = instantiate(cfg.backbone)
    baseline = l2l.algorithms.MAML(nn.Sequential(features, nn.Linear(features.out_features, shape.ways)),
                                   lr=cfg.algorithm.inner_lr, first_order=cfg.algorithm.first_order).to(device)
    return baseline, instantiate(cfg.optimizer)(params=baseline.parameters())


def steps(shape: Shape, splits, device: torch.device) -> dict[str, Callable[[], None]]:
    """One meta-iteration of each variant, as a function."""
    sampler = TaskSampler(splits.train, shape.ways, shape.shots, shape.query_shots, device)
    device_sampler = DeviceTaskSampler(sampler)
    out: dict[str, Callable[[], None]] = {}

    images = splits.train.images.float().div(255.0)
    meta = l2l.data.MetaDataset(torch.utils.data.TensorDataset(images, splits.train.labels))
    taskset = l2l.data.TaskDataset(meta, task_transforms=[
        l2l.data.transforms.NWays(meta, shape.ways),
        l2l.data.transforms.KShots(meta, shape.shots + shape.query_shots),
        l2l.data.transforms.LoadData(meta),
        l2l.data.transforms.RemapLabels(meta),
        l2l.data.transforms.ConsecutiveLabels(meta),
    ], num_tasks=-1)
    baseline, base_opt = make_baseline(shape, device)
    out["learn2learn"] = lambda: learn2learn_example_step(baseline, base_opt, taskset, shape, device)

    for name, vectorize, source in (("per-task", "false", sampler), ("per-task+dev", "false", device_sampler),
                                    ("vectorised", "true", device_sampler)):
        algorithm, optimizer = make_algorithm(shape, vectorize, device)
        update = MetaUpdate(optimizer, grad_clip=None)

        def step(algorithm=algorithm, update=update, source=source) -> None:
            algorithm.train()  # what metarun's loop does per iteration: sample the meta-batch, then meta_step
            algorithm.meta_step(sample_tasks(source, shape.meta_batch_size), update)

        out[name] = step
    return out


def auto_choice(shape: Shape, splits, device: torch.device) -> bool:
    """Whether vectorize=auto vectorises this shape."""
    algorithm, _ = make_algorithm(shape, "auto", device)
    sampler = DeviceTaskSampler(TaskSampler(splits.train, shape.ways, shape.shots, shape.query_shots, device))
    return vectorized.choose(algorithm, sampler.sample_batch(shape.meta_batch_size), "meta-training")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(step: Callable[[], None], iterations: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    sync(device)
    return iterations / (time.perf_counter() - start)


def bench_shape(shape: Shape, splits, device: torch.device, rounds: int, seconds: float,
                variants: tuple[str, ...] = VARIANTS) -> dict[str, list[float]]:
    """Per-round meta-it/s of every variant; each round runs every variant for about ``seconds``."""
    fns = {name: fn for name, fn in steps(shape, splits, device).items() if name in variants}
    iterations = {}
    for name, fn in fns.items():  # warm-up, and the iterations that make about `seconds`
        fn()
        iterations[name] = max(1, round(seconds * rate(fn, 1, device)))
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            rates[name].append(rate(fn, iterations[name], device))
    return rates


def ratio(rates: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))


def bench_sampling(splits, device: torch.device, shape: Shape, rounds: int, seconds: float) -> None:
    """Tasks per second of today's sampler (``sample()`` per task) and of the device sampler."""
    sampler = TaskSampler(splits.train, shape.ways, shape.shots, shape.query_shots, device)
    device_sampler = DeviceTaskSampler(sampler)
    mb = shape.meta_batch_size
    fns = {"learn2learn": lambda: [sampler.sample() for _ in range(mb)],
           "device": lambda: device_sampler.sample_batch(mb)}
    iterations = {name: max(1, round(seconds * rate(fn, 1, device))) for name, fn in fns.items()}
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            rates[name].append(rate(fn, iterations[name], device) * mb)
    print(f"sampling {shape.ways}-way {shape.shots}-shot, {shape.query_shots} queries, meta-batch {mb}: "
          f"learn2learn {statistics.median(rates['learn2learn']):9.0f} tasks/s, "
          f"device {statistics.median(rates['device']):9.0f} tasks/s, "
          f"ratio {ratio(rates, 'device', 'learn2learn'):.1f}x (median of {rounds} rounds)")


def main() -> None:
    preset = config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", type=int, default=preset.ways)
    parser.add_argument("--shots", type=int, default=preset.shots)
    parser.add_argument("--query-shots", type=int, default=preset.query_shots)
    parser.add_argument("--meta-batch-size", type=int, default=preset.meta_batch_size)
    parser.add_argument("--inner-steps", type=int, default=preset.algorithm.inner_steps)
    parser.add_argument("--first-order", action="store_true", default=preset.algorithm.first_order)
    parser.add_argument("--grid", action="store_true", help="the whole grid (queries 1/15, meta-batch 4/16/32, "
                                                            "steps 1/5, both orders)")
    parser.add_argument("--sampling", action="store_true", help="time the samplers alone")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per variant per round (about)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave the default)")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction,
                        default=preset.keep_freed_memory,
                        help="glibc keeps freed memory (default: as a run does, keep_freed_memory in "
                             "conf/config.yaml); it applies to every variant, the process is one")
    args = parser.parse_args()
    configure_cpu(args.threads, args.keep_freed_memory)
    device = torch.device(args.device)
    splits = load_data(preset)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"hardware: {hardware(device)}; {torch.get_num_threads()} torch thread(s); "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else "")
    print(f"python {platform.python_version()}; rounds {args.rounds} x ~{args.seconds:g} s per variant; "
          f"keep_freed_memory={args.keep_freed_memory}")
    if args.sampling:
        for mb in (4, 16, 32):
            shape = Shape(args.ways, args.shots, args.query_shots, mb, args.inner_steps, args.first_order)
            bench_sampling(splits, device, shape, args.rounds, args.seconds)
        return
    if args.grid:
        shapes = [Shape(args.ways, args.shots, q, mb, k, fo)
                  for q, mb, k, fo in itertools.product((1, 15), (4, 16, 32), (1, 5), (False, True))]
    else:
        shapes = [Shape(args.ways, args.shots, args.query_shots, args.meta_batch_size, args.inner_steps,
                        args.first_order)]
    variants = tuple(v for v in VARIANTS if v in args.variants.split(","))
    print(f"{'shape':<24} " + " ".join(f"{v:>12}" for v in variants) + "   (meta-it/s, medians)")
    for shape in shapes:
        rates = bench_shape(shape, splits, device, args.rounds, args.seconds, variants)
        line = f"{str(shape):<24} " + " ".join(f"{statistics.median(rates[v]):12.2f}" for v in variants)
        if {"learn2learn", "per-task", "vectorised"} <= set(variants):
            auto = auto_choice(shape, splits, device)
            chosen = "vectorised" if auto else "per-task+dev"
            line += (f" | /l2l: per-task {ratio(rates, 'per-task', 'learn2learn'):.2f} "
                     f"vectorised {ratio(rates, 'vectorised', 'learn2learn'):.2f} | vectorised/per-task "
                     f"{ratio(rates, 'vectorised', 'per-task'):.2f}")
            if chosen in rates:
                line += f" | auto={'vec' if auto else 'loop'} auto/per-task {ratio(rates, chosen, 'per-task'):.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
