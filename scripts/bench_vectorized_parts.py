"""Where the vectorised MAML meta-step's time goes, and what two of its parts are worth (docs/results.md,
"Speed"). MAML 5-way 1-shot, one query per class, meta-batch 32, Conv4 on glyphs, as in bench_maml.py.

    bench_vectorized_parts.py faults [--first-order]     ms and minor page faults per meta-iteration
    bench_vectorized_parts.py profile [--first-order]    torch.profiler's top ops, loop and vectorised
    bench_vectorized_parts.py conv [--inner-steps 5]     GroupedConv2d against the stock grouped conv2d
    bench_vectorized_parts.py batchnorm                  fused F.batch_norm against BatchNorm written out

``conv`` and ``batchnorm`` alternate the two versions in one process, rounds of a few meta-iterations
each, and print the median ratio. They swap the part by replacing a name in
``metarun.algorithms.vectorized`` for the round: a benchmark-only swap, not an option of the engine.
The process applies the run's CPU settings (``threads=1``, ``keep_freed_memory`` as conf/config.yaml);
``--no-keep-freed-memory`` measures glibc's default.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
import types

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import bench_maml  # scripts/ is on the path of a script run from it; one definition of each meta-step
from metarun.algorithms import vectorized
from metarun.commands import CONFIG_DIR
from metarun.cpu import configure_cpu


class StockGroupedConv2d:
    """The grouped convolution as ``F.conv2d`` (PyTorch's double backward: one convolution per group)."""

    @staticmethod
    def apply(x, weight, stride, padding, dilation, groups):
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)


def written_out_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """``F.batch_norm`` from mean, variance and rsqrt; with buffers and ``momentum=1`` (how the engine
    records a pass's statistics) it leaves the batch mean and unbiased variance in them, as the fused op does."""
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    var = centred.square().mean(dim=dims, keepdim=True)
    if running_mean is not None:
        n = x.numel() // x.shape[1]
        with torch.no_grad():
            running_mean.copy_(mean.flatten())
            running_var.copy_(var.flatten() * n / (n - 1))
    y = centred * torch.rsqrt(var + eps)
    shape = (1, -1, *([1] * (x.dim() - 2)))
    if weight is not None:
        y = y * weight.view(shape)
    return y if bias is None else y + bias.view(shape)


def faults(steps: dict, iterations: int) -> None:
    for name in ("learn2learn", "vectorised"):
        step = steps[name]
        for _ in range(3):
            step()
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(iterations):
            step()
        after = resource.getrusage(resource.RUSAGE_SELF)
        print(f"{name:<12} {(time.perf_counter() - start) / iterations * 1e3:6.0f} ms/it, "
              f"{(after.ru_minflt - before.ru_minflt) / iterations:7.0f} minor faults/it, "
              f"system time {(after.ru_stime - before.ru_stime) / iterations * 1e3:4.0f} ms/it")


def profile(steps: dict) -> None:
    for name in ("learn2learn", "vectorised"):
        step = steps[name]
        for _ in range(3):
            step()
        with torch.profiler.profile() as prof:
            for _ in range(3):
                step()
        print(f"{name}, 3 meta-iterations under torch.profiler (its overhead slows every op):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def alternate(step, name: str, versions: dict[str, object], rounds: int, iterations: int) -> None:
    """Rates of ``step`` with ``vectorized.<name>`` set to each version in turn, round after round."""
    original = getattr(vectorized, name)
    rates: dict[str, list[float]] = {label: [] for label in versions}
    try:
        for version in versions.values():  # warm-up
            setattr(vectorized, name, version)
            step()
            step()
        for _ in range(rounds):
            for label, version in versions.items():
                setattr(vectorized, name, version)
                start = time.perf_counter()
                for _ in range(iterations):
                    step()
                rates[label].append(iterations / (time.perf_counter() - start))
    finally:
        setattr(vectorized, name, original)
    (a, b) = versions
    ratio = statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))
    print(" ".join(f"{label} {statistics.median(r):.2f} it/s," for label, r in rates.items()) + f" {a}/{b} {ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("faults", "profile", "conv", "batchnorm"))
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction,
                        default=OmegaConf.load(os.path.join(CONFIG_DIR, "config.yaml")).keep_freed_memory)
    args = parser.parse_args()
    configure_cpu(1, args.keep_freed_memory)
    shape = bench_maml.Shape(5, 1, 1, 32, args.inner_steps, args.first_order)
    steps = bench_maml.steps(shape, bench_maml.load_data(), torch.device("cpu"))
    print(f"{shape}; keep_freed_memory={args.keep_freed_memory}; {bench_maml.hardware(torch.device('cpu'))}")
    iterations = 6 if args.inner_steps == 1 else 2
    if args.what == "faults":
        faults(steps, 10)
    elif args.what == "profile":
        profile(steps)
    elif args.what == "conv":
        alternate(steps["vectorised"], "GroupedConv2d",
                  {"GroupedConv2d": vectorized.GroupedConv2d, "stock": StockGroupedConv2d}, args.rounds, iterations)
    else:
        written_out = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
        written_out.batch_norm = written_out_batch_norm
        alternate(steps["vectorised"], "F", {"written-out": written_out, "fused": F}, args.rounds, iterations)


if __name__ == "__main__":
    main()
