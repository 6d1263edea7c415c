"""Process-wide CPU and allocator settings (torch's thread count, glibc's malloc) that a run, training
or evaluation, applies before it builds anything."""

from __future__ import annotations

import ctypes
import sys

import torch

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Free memory glibc may keep at the top of its heap (mallopt takes a C int).
KEEP_BYTES = 2**31 - 1


def configure_cpu(threads: int, keep_freed_memory: bool) -> None:
    """``threads``: torch's CPU thread count (0 keeps torch's choice). ``keep_freed_memory``: see
    :func:`keep_freed_memory_for_reuse`."""
    if threads:
        # Few-shot batches are small: on a busy CPU, torch's spinning worker threads can cost more
        # than they bring (see docs/results.md), so the count is a run setting.
        torch.set_num_threads(threads)
    if keep_freed_memory:
        keep_freed_memory_for_reuse()


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of returning it to the
    operating system; return whether it did (False off glibc).

    By default glibc serves every allocation above its mmap threshold (128 KiB to 32 MiB) with a
    fresh ``mmap`` and unmaps it on free, so every large temporary tensor of every meta-iteration is
    page-faulted in again, page by page. The vectorised meta-batch works on tensors of several MiB
    (``[n, tasks*64, 14, 14]`` floats is 8 MiB at 32 tasks): on the 2-core VM of docs/results.md it
    took up to 26 000 page faults per meta-iteration, and keeping the memory made the vectorised
    step 6 to 8 % faster at meta-batch 32 (docs/results.md; 15 queries per class: 44 %).
    ``M_MMAP_MAX = 0`` sends every allocation to the heap, and a large ``M_TRIM_THRESHOLD`` keeps
    freed heap memory mapped. The cost: the process holds on to its peak memory until it exits.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library the process already uses
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # musl and other C libraries may export a mallopt that does nothing and returns 0.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
