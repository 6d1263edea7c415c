"""metarun.cpu: the process-wide CPU and allocator settings."""

import subprocess
import sys

import pytest

# Page faults of allocating, filling and freeing a 40 MiB tensor (above glibc's largest dynamic mmap
# threshold, 32 MiB, so by default every such allocation is a fresh mmap), before and after
# keep_freed_memory_for_reuse, in a fresh process: the setting is process-wide.
FAULTS = r"""
import resource, sys, torch
from metarun.cpu import keep_freed_memory_for_reuse

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(10 * 2**20).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
default = faults()
applied = keep_freed_memory_for_reuse()
faults()
print(default, applied, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True).stdout
    default, applied, kept = out.split()
    assert applied == "True"
    # 5 x 40 MiB is 51 200 pages of 4 KiB: by default each is faulted in again.
    assert int(default) > 40_000
    assert int(kept) < 1_000
