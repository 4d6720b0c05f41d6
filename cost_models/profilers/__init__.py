"""Profilers that measure real per-block latency into `LatencyTable`s: torch, JAX/XLA, ONNX Runtime."""

from hwprune.cost_models.profilers._allocator import allocator_state, steady_allocator
from hwprune.cost_models.profilers._base import (
    PROFILERS,
    Profiler,
    ProfilerSettings,
    Timing,
    interleaved,
    profiler_for,
    repeat_timed,
)
from hwprune.cost_models.profilers._jax import JaxProfiler
from hwprune.cost_models.profilers._nvml import nvml_metadata
from hwprune.cost_models.profilers._onnxruntime import OnnxRuntimeProfiler, block_graph
from hwprune.cost_models.profilers._torch import (
    TORCH_DTYPES,
    ReferenceBlock,
    TorchProfiler,
    torch_device,
    torch_threads,
    torch_timer,
)

__all__ = [
    "PROFILERS",
    "TORCH_DTYPES",
    "JaxProfiler",
    "OnnxRuntimeProfiler",
    "Profiler",
    "ProfilerSettings",
    "ReferenceBlock",
    "Timing",
    "TorchProfiler",
    "allocator_state",
    "block_graph",
    "interleaved",
    "nvml_metadata",
    "profiler_for",
    "repeat_timed",
    "steady_allocator",
    "torch_device",
    "torch_threads",
    "torch_timer",
]
