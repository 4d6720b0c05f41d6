"""NVIDIA device details for measured tables, read through nvidia-ml-py (NVML)."""

from __future__ import annotations

import contextlib
from typing import Any


def nvml_metadata(index: int = 0) -> dict[str, Any]:
    """Device name, driver, clocks, power limit and memory of GPU `index`, or why they are missing.

    Clocks matter for reproducing a latency table: the same GPU under another power limit or with
    locked clocks is a different device for timing purposes.
    """
    try:
        import pynvml
    except ImportError as err:
        return {"error": f"nvidia-ml-py not importable: {err}"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return {"error": f"NVML unavailable: {err}"}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        clocks = pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_MEM
        out: dict[str, Any] = {
            "name": _text(pynvml.nvmlDeviceGetName(handle)),
            "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, clocks[0]),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, clocks[1]),
            "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, clocks[0]),
            "max_mem_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, clocks[1]),
            "power_limit_w": pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0,
            "memory_total_mib": mem.total // 2**20,
        }
        with contextlib.suppress(pynvml.NVMLError):
            out["temperature_c"] = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        return out
    except pynvml.NVMLError as err:
        return {"error": f"NVML query failed: {err}"}
    finally:
        pynvml.nvmlShutdown()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
