"""Memory of a run, phase by phase: what `report.md` says each phase peaked at.

The peak resident set of each phase is the kernel's high-water mark (VmHWM), reset when a phase
starts (`/proc/self/clear_refs`), so a phase's figure is its own, not the run's so far. At the end of
each phase, and between re-scored candidates, the process hands freed memory back to the system
(`gc.collect`, then glibc's `malloc_trim`): without it the allocator keeps what a phase freed mapped
(measured on a 24-layer BERT-large shape: 2.0 of the 3.8 GiB resident after scoring saliency was
freed memory the allocator held; trimmed, 1.8 GiB stayed), so the resident set grows phase after
phase although nothing of it is alive.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("hwprune.search")

GIB = 1024**3
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def resident_gib() -> float | None:
    """The process's resident set now (None where /proc is not there)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024 / GIB


def peak_gib() -> float | None:
    """The resident set's high-water mark since it was last reset."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024 / GIB


def reset_peak() -> None:
    """Start a new high-water mark (Linux: writing 5 to clear_refs resets VmHWM)."""
    with contextlib.suppress(OSError):  # not Linux: the peak stays the process's
        _CLEAR_REFS.write_text("5")


def release() -> None:
    """Collect garbage and hand the allocator's free memory back to the system."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage Python holds now (each storage once)."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            # type(), not isinstance(): isinstance asks lazy module proxies for __class__, which warns.
            if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, ReferenceError):  # meta tensors, freed weak proxies
            continue
    return sum(seen.values())


@dataclass
class MemoryLog:
    """Per phase of a run: its peak resident set and the resident set at its end (GiB)."""

    phases: list[tuple[str, float | None, float | None]] = field(default_factory=list)

    def start(self) -> None:
        """A phase begins: its peak is counted from here."""
        reset_peak()

    def end(self, phase: str) -> None:
        """A phase ends: record its peak and what stays resident once its garbage is collected and
        its freed memory handed back; the next phase begins."""
        peak = peak_gib()
        release()
        now = resident_gib()
        self.phases.append((phase, peak, now))
        if peak is not None and now is not None:
            log.info("memory: %s peaked at %.2f GiB resident, %.2f GiB after", phase, peak, now)
        reset_peak()

    def rows(self) -> list[dict[str, object]]:
        return [{"phase": p, "peak_gib": peak, "resident_after_gib": now} for p, peak, now in self.phases]
