"""The allocator timings run with: freed activations reused instead of faulted in anew.

`steady_allocator` changes the process for good, so each check runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from hwprune.cost_models.profilers import TorchProfiler, allocator_state

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "LD_PRELOAD" in os.environ,
    reason="mallopt thresholds are glibc's",
)

# Three 12 MiB tensors made, written and freed, ten times over; page faults counted. Under glibc's
# default thresholds whether they are faulted in again each round depends on the heap's history (here
# 0 or all 92160 pages, from one run to the next), so the check first pins the mmap threshold at its
# initial 128 KiB, where every round faults (proving the count sees it), then makes it steady.
_FAULTS = """
import ctypes, json, resource, sys, torch
from hwprune.cost_models.profilers import allocator_state, steady_allocator

ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD, pinned at glibc's initial value

def faults():
    def once():
        tensors = [torch.ones(3 << 20) for _ in range(3)]  # 3 x (3M fp32 = 12 MiB), written
        del tensors
    for _ in range(3):
        once()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        once()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

out = {"mmapped": faults(), "default_state": allocator_state()}
out["returned"] = steady_allocator()
out["again"] = steady_allocator()
out["steady"] = faults()
out["steady_state"] = allocator_state()
print(json.dumps(out))
"""


def _run(code: str, env: dict[str, str] | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_only
def test_steady_allocator_stops_refaulting_freed_activations() -> None:
    out = _run(_FAULTS)
    pages = 10 * 3 * (12 << 20) // 4096  # every page of every round
    assert out["mmapped"] > pages // 2, out  # refaults are counted: the check can fail
    assert out["steady"] < pages // 100, out
    assert out["default_state"].endswith("default thresholds")
    assert out["returned"] == out["again"] == out["steady_state"]
    assert "mmap threshold 32 MiB, trim threshold 1 GiB" in out["steady_state"]


def test_a_preloaded_allocator_is_left_alone_and_named() -> None:
    code = (
        "import json; from hwprune.cost_models.profilers import steady_allocator;"
        " print(json.dumps({'state': steady_allocator()}))"
    )
    # The variable is only read (nothing is loaded from it in the child after start-up).
    out = _run(
        code.replace("import json;", "import json, os; os.environ['LD_PRELOAD'] = '/x/libjemalloc.so.2';")
    )
    assert out["state"] == "libjemalloc.so.2 (LD_PRELOAD)"


def test_tables_record_the_allocator_they_were_timed_with() -> None:
    meta = TorchProfiler(warmup=0, repeats=1).metadata()
    assert meta["allocator"] == allocator_state()
