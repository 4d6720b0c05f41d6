"""Peaks of the local CPU from a short micro-benchmark (GEMM FLOP/s, copy bandwidth), cached."""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from hwprune.cost_models._hardware import HardwareProfile

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("HWPRUNE_CACHE", "~/.cache/hwprune")).expanduser() / "cpu_peaks.json"


def cpu_name() -> str:
    """The CPU model, with family/model/stepping: a VM may show only "AMD EPYC", which is no model."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name") or platform.processor() or platform.machine()
    numbers = [(k, fields[k]) for k in ("cpu family", "model", "stepping") if k in fields]
    if numbers:
        name += " (" + ", ".join(f"{k.removeprefix('cpu ')} {v}" for k, v in numbers) + ")"
    return name


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 `flags`, ARM `Features` in /proc/cpuinfo); empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return set(value.split())
    except OSError:
        pass
    return set()


# Flags under which a CPU computes bf16 natively: AVX-512 BF16 or AMX (x86), the BF16 extension (ARM).
# Without one, torch emulates bf16 GEMMs in fp32 and converts: slower than fp32, never a choice.
NATIVE_BF16 = {"avx512_bf16", "amx_bf16", "bf16"}


def native_dtypes(dtypes: list[str], flags: set[str]) -> list[str]:
    """The `dtypes` this CPU runs natively (fp32 always; bf16 with `NATIVE_BF16`; others as listed
    where the flags say nothing: an unknown CPU keeps what its profile lists)."""
    if not flags:
        return list(dtypes)
    return [d for d in dtypes if d != "bf16" or flags & NATIVE_BF16]


def machine_key() -> str:
    """This CPU and thread count as a directory name: where the tables profiled on it live.

    E.g. "amd-epyc-family-25-model-17-stepping-1-x2". Tables of one profile measured on several
    machines sit side by side, one directory each, and `load_tables` keeps this machine's.
    """
    name = cpu_name().lower()
    for noise in ("(r)", "(tm)", "processor", "cpu @"):
        name = name.replace(noise, " ")
    return re.sub(r"[^a-z0-9.]+", "-", name).strip("-") + f"-x{torch.get_num_threads()}"


def table_dir(profile: str, kind: str) -> str:
    """Where tables of the hardware profile named `profile` live (under results/tables, or the
    shipped tables): one directory per machine when `kind` is "cpu", where the name is no device."""
    return f"{profile}/{machine_key()}" if kind == "cpu" else profile


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peaks(*, size: int = 1024, copy_mib: int = 256, repeats: int = 5) -> dict[str, float]:
    """GEMM TFLOP/s (fp32, and bf16 where it runs) and copy bandwidth in GB/s of this machine."""
    peaks: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        seconds = _best_seconds(functools.partial(torch.mm, a, b), repeats)
        peaks[name] = 2 * size**3 / seconds / 1e12
    src = torch.empty(copy_mib * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), repeats)
    peaks["bandwidth_gbs"] = 2 * src.numel() * 4 / seconds / 1e9  # read + write
    return peaks


def local_profile(
    profile: HardwareProfile, *, cache: Path | None = None, refresh: bool = False
) -> HardwareProfile:
    """`profile` with its peaks replaced by this machine's measured ones (measured once, then cached)
    and its dtypes cut to those this CPU runs natively (bf16 only with AVX-512 BF16, AMX or ARM's BF16).

    The cache is keyed by CPU model and thread count, so a different machine measures anew.
    """
    cache = cache or DEFAULT_CACHE
    key = f"{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    if refresh or key not in stored:
        log.info("measuring CPU peaks of %s", key)
        stored[key] = measure_peaks()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(stored, indent=2))
    peaks = dict(stored[key])
    bandwidth = peaks.pop("bandwidth_gbs")
    tflops = {d: peaks[d] for d in profile.dtypes if d in peaks}
    dtypes = native_dtypes(list(profile.dtypes), cpu_flags())
    if dropped := [d for d in profile.dtypes if d not in dtypes]:
        log.info(
            "%s: %s not native on this CPU (no AVX-512 BF16, AMX or ARM BF16): runs %s",
            profile.name,
            ", ".join(dropped),
            dtypes,
        )
    return replace(
        profile,
        peak_tflops={**profile.peak_tflops, **tflops},
        memory_bandwidth_gbs=bandwidth,
        dtypes=dtypes,
    )
