"""Profilers that measure real per-block latency into `LatencyTable`s: torch, JAX/XLA, ONNX Runtime."""

from cost_models.profilers._base import Profiler, Timing, repeat_timed
from cost_models.profilers._jax import JaxProfiler
from cost_models.profilers._nvml import nvml_metadata
from cost_models.profilers._onnxruntime import OnnxRuntimeProfiler, block_graph
from cost_models.profilers._torch import ReferenceBlock, TorchProfiler

__all__ = [
    "JaxProfiler",
    "OnnxRuntimeProfiler",
    "Profiler",
    "ReferenceBlock",
    "Timing",
    "TorchProfiler",
    "block_graph",
    "nvml_metadata",
    "repeat_timed",
]
