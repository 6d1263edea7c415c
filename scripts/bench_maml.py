"""Meta-iterations per second: metarun's MAML step against a plain learn2learn loop.

The baseline is written like learn2learn's ``examples/vision/maml_omniglot.py``: a TaskDataset
over the images themselves (``LoadData`` copies every sample), support/query chosen by
position, ``maml.clone()`` and ``adapt`` per task, ``backward`` per task, gradients averaged,
one Adam step. metarun runs ``loop.train_step`` with its own sampler and algorithm. Both use
the same backbone (Conv4, 64 filters, stride-2), the same data (generated glyphs, 28x28), the
same ways/shots/meta-batch and inner steps, in the same process; rounds alternate between the
two so machine noise hits both alike. The ratio is what to compare across machines.

    python scripts/bench_maml.py --ways 5 --shots 1 --meta-batch-size 32 --rounds 5 --iterations 20
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from metarun._learn2learn import l2l
from metarun.algorithms.base import MetaUpdate
from metarun.algorithms.maml import MAML
from metarun.backbones import Conv4
from metarun.data.glyphs import load_glyphs
from metarun.tasks import TaskSampler


def learn2learn_example_step(maml, optimizer, taskset, meta_batch_size, ways, shots, inner_steps, device):
    """One meta-iteration as learn2learn's maml_omniglot example writes it."""
    loss_fn = nn.CrossEntropyLoss(reduction="mean")
    optimizer.zero_grad()
    for _ in range(meta_batch_size):
        learner = maml.clone()
        data, labels = taskset.sample()
        data, labels = data.to(device), labels.to(device)
        adaptation = torch.zeros(data.size(0), dtype=torch.bool)
        adaptation[torch.arange(shots * ways) * 2] = True
        evaluation = ~adaptation
        for _ in range(inner_steps):
            learner.adapt(loss_fn(learner(data[adaptation]), labels[adaptation]))
        loss_fn(learner(data[evaluation]), labels[evaluation]).backward()
    for p in maml.parameters():
        p.grad.data.mul_(1.0 / meta_batch_size)
    optimizer.step()


def time_it(step, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return iterations / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--first-order", action="store_true", help="first-order MAML in both loops")
    parser.add_argument("--iterations", type=int, default=20, help="meta-iterations per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    splits = load_glyphs()
    # The example's query uses as many samples per class as the support set (2 * shots per class).
    sampler = TaskSampler(splits.train, args.ways, args.shots, args.shots, device)
    algorithm = MAML(Conv4(), ways=args.ways, inner_lr=0.4, inner_steps=args.inner_steps,
                     eval_inner_steps=args.inner_steps, first_order=args.first_order,
                     per_step_bn_statistics=False, per_step_bn_weights=False, per_step_inner_lrs=False,
                     multi_step_loss=False, msl_anneal_iterations=0, first_order_iterations=0).to(device)
    ours_opt = torch.optim.Adam(algorithm.parameters(), lr=1e-3)

    images = splits.train.images.float().div(255.0)
    meta = l2l.data.MetaDataset(torch.utils.data.TensorDataset(images, splits.train.labels))
    taskset = l2l.data.TaskDataset(meta, task_transforms=[
        l2l.data.transforms.NWays(meta, args.ways),
        l2l.data.transforms.KShots(meta, 2 * args.shots),
        l2l.data.transforms.LoadData(meta),
        l2l.data.transforms.RemapLabels(meta),
        l2l.data.transforms.ConsecutiveLabels(meta),
    ], num_tasks=-1)
    baseline = l2l.algorithms.MAML(nn.Sequential(Conv4(), nn.Linear(64, args.ways)), lr=0.4,
                                   first_order=args.first_order).to(device)
    base_opt = torch.optim.Adam(baseline.parameters(), lr=1e-3)

    update = MetaUpdate(ours_opt, grad_clip=None)

    def ours():  # what metarun's loop does per iteration: sample the meta-batch, then the algorithm's meta-step
        algorithm.train()
        algorithm.meta_step([sampler.sample() for _ in range(args.meta_batch_size)], update)

    def theirs():
        learn2learn_example_step(baseline, base_opt, taskset, args.meta_batch_size, args.ways, args.shots,
                                 args.inner_steps, device)

    time_it(ours, 2), time_it(theirs, 2)  # warm-up
    ours_rates, theirs_rates = [], []
    for _ in range(args.rounds):
        ours_rates.append(time_it(ours, args.iterations))
        theirs_rates.append(time_it(theirs, args.iterations))
    ratios = [o / t for o, t in zip(ours_rates, theirs_rates, strict=True)]
    print(f"hardware: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print(f"shape: {args.ways}-way {args.shots}-shot, meta-batch {args.meta_batch_size}, "
          f"{args.inner_steps} inner step(s), {'first' if args.first_order else 'second'} order, {args.rounds} rounds x {args.iterations} iterations")
    print(f"metarun       {statistics.median(ours_rates):7.2f} meta-it/s (median; rounds {[round(r, 2) for r in ours_rates]})")
    print(f"learn2learn   {statistics.median(theirs_rates):7.2f} meta-it/s (median; rounds {[round(r, 2) for r in theirs_rates]})")
    print(f"ratio metarun/learn2learn: {statistics.median(ratios):.3f} (median of per-round ratios)")


if __name__ == "__main__":
    main()
