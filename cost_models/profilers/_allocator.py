"""The C allocator while timing on a CPU: a forward's activations reused, not faulted in anew.

glibc's malloc serves large blocks (above a threshold that starts at 128 KiB and adapts) with fresh
`mmap`s and returns the top of its heap to the OS when more than 128 KiB of it is free. A torch
forward frees its activations as it goes, so each call faults its big tensors in again, page by
zeroed page, and how many do depends on what the process allocated before (the threshold adapts to
it). Measured on an Intel Xeon with 2 threads (`results/benchmarks/allocator_cpu.md`: all-MiniLM-L6-v2
layers, batch 32 x 128, as a table is profiled): bf16 blocks timed 1.14-1.42x slower in fresh
processes under the defaults (12 heads / 1408 neurons: 18.46 ms against 13.82 ms), the dense fp32
model 1.17x. So timings under the default carry a cost that belongs to neither the model nor the
device, and it differs between shapes and between processes: tables profiled so would price a width
by its page faults.

`steady_allocator` raises both thresholds (the mmap one to glibc's maximum, 32 MiB on 64-bit), so
blocks up to 32 MiB are reused from the heap as a serving process with jemalloc or tcmalloc (what
PyTorch's CPU performance guides recommend) reuses them. It is process-wide and lasting: the apps
that time (`hwprune-profile`, `hwprune-apply`) call it first, tables and `apply.json` record
`allocator_state()`. A process running under a preloaded jemalloc or tcmalloc is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit.
MMAP_THRESHOLD = 32 << 20
# Freed heap kept mapped up to this much (explicit `malloc_trim` calls still return it).
TRIM_THRESHOLD = 1 << 30

_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")
_steady: str | None = None


def _preloaded() -> str | None:
    """The allocator library LD_PRELOAD puts in front of glibc's, if any."""
    for lib in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        if any(name in os.path.basename(lib) for name in _PRELOADED):
            return os.path.basename(lib)
    return None


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def steady_allocator() -> str:
    """Keep freed blocks of up to 32 MiB for reuse in this process (see the module docstring); once
    is enough, later calls change nothing.

    Returns:
        What the process's allocator now is (`allocator_state()`).
    """
    global _steady
    if _steady is not None or _preloaded():
        return allocator_state()
    libc = _glibc()
    if libc is None:
        log.info("allocator left as it is: not glibc (%s)", platform.libc_ver()[0] or platform.system())
        return allocator_state()
    if not (
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    ):
        log.warning("glibc refused mallopt: timings pay for page faults of fresh allocations")
        return allocator_state()
    _steady = f"glibc {platform.libc_ver()[1]}, mmap threshold 32 MiB, trim threshold 1 GiB"
    log.info("allocator for timing: %s (freed activations reused, not faulted in anew)", _steady)
    return allocator_state()


def allocator_state() -> str:
    """The C allocator this process times with, as tables and `apply.json` record it."""
    if lib := _preloaded():
        return f"{lib} (LD_PRELOAD)"
    if _steady is not None:
        return _steady
    name, version = platform.libc_ver()
    return f"{name} {version}, default thresholds" if name else f"{platform.system()} default"
