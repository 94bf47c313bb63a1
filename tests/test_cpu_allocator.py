"""The C allocator on CPU runs: freed tensors are reused rather than handed back to the kernel and
faulted in again, page by page (mftcoder/training/cpu_allocator.py)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from mftcoder.training.cpu_allocator import applies

pytestmark = pytest.mark.unit

# Allocates, writes and frees a 64 MiB tensor 10 times and counts the page faults, before and after the
# thresholds are raised (once the heap has grown); in a fresh process, since the setting lasts as long as
# the process.
FAULTS = """
import json, resource, torch
from mftcoder.training.cpu_allocator import keep_freed_memory

def faults():
    torch.empty(1 << 24).fill_(1.0)  # warm-up: the first time, the pages are new in any case
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(1 << 24).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = faults()
applied = keep_freed_memory()
faults()  # meanwhile the heap grows to what the loop needs
print(json.dumps({"before": before, "applied": applied, "after": faults()}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_freed_tensors_are_reused_without_page_faults():
    env = {"PATH": "", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, env=env, check=True)
    measured = json.loads(out.stdout)
    if measured["applied"]["mmap_threshold"] < 1 << 30:
        pytest.skip(f"this glibc takes an mmap threshold of {measured['applied']} only, below the 64 MiB tested")
    # 10 x 64 MiB is 163,840 pages of 4 KiB: glibc maps each tensor anew and faults in every page.
    assert measured["before"] > 100_000, measured
    assert measured["after"] < 1_000, measured


@pytest.mark.parametrize(
    ("env", "libc", "expected"),
    [
        ({}, "glibc", True),
        ({"OMP_NUM_THREADS": "2"}, "glibc", True),
        ({}, "", False),  # musl, macOS: other allocators, other knobs
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "glibc", False),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "glibc", False),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "glibc", False),
    ],
    ids=["glibc", "other-env", "not-glibc", "user-threshold", "user-tunables", "preloaded-allocator"],
)
def test_only_glibc_without_the_users_own_allocator_settings(env, libc, expected):
    assert applies(env, libc) is expected
