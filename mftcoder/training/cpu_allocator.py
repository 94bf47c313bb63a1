"""On a CPU run, freed tensors stay in the C heap for the next step instead of going back to the kernel.

glibc's malloc serves an allocation above its mmap threshold (128 KiB, raised as it sees larger frees, to
32 MiB at most) with fresh pages from the kernel and hands them back when it is freed, and it trims the
heap's free top beyond a second threshold. A training step allocates and frees tensors of megabytes in
every layer (activations, LoRA products, logits, their gradients), the same sizes step after step: each
comes back as new pages, and the kernel zero-fills every 4 KiB page on its first write. On the `tiny-lora`
benchmark that made elementwise operations several times slower than on reused memory, about a tenth of
the step. With both thresholds at 1 GiB, freed memory is reused. The process keeps up to 1 GiB of freed
heap instead of returning it; its peak did not grow on the benchmarks (the same tensors are alive at
the peak), though heap fragmentation could add to it.

A process the user started with their own `MALLOC_*` settings, or with another allocator preloaded
(jemalloc, tcmalloc), is left as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

THRESHOLD = 1 << 30
# Older glibc versions refuse an mmap threshold above 32 MiB on 64-bit (HEAP_MAX_SIZE / 2): the largest they take.
OLD_GLIBC_MMAP_THRESHOLD = 32 << 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def applies(env: Mapping[str, str], libc: str) -> bool:
    """Whether to set the thresholds: glibc, and nothing the user set about the allocator."""
    return libc == "glibc" and not any(env.get(name) for name in USER_SETTINGS)


def keep_freed_memory() -> dict[str, int] | None:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring); the thresholds
    set (0: refused), or None where left as it is."""
    if not applies(os.environ, platform.libc_ver()[0]):
        return None
    libc = ctypes.CDLL(None)  # the C library this process already uses
    mmap = next((t for t in (THRESHOLD, OLD_GLIBC_MMAP_THRESHOLD) if libc.mallopt(M_MMAP_THRESHOLD, t) == 1), 0)
    trim = THRESHOLD if libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1 else 0
    return {"mmap_threshold": mmap, "trim_threshold": trim}
