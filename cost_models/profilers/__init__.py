"""Profilers that measure real per-block latency into `LatencyTable`s: torch, JAX/XLA, ONNX Runtime."""

from hwprune.cost_models.profilers._base import Profiler, Timing, interleaved, repeat_timed
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
    "TORCH_DTYPES",
    "JaxProfiler",
    "OnnxRuntimeProfiler",
    "Profiler",
    "ReferenceBlock",
    "Timing",
    "TorchProfiler",
    "block_graph",
    "interleaved",
    "nvml_metadata",
    "repeat_timed",
    "torch_device",
    "torch_threads",
    "torch_timer",
]
