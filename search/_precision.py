"""The precision a pruned model is deployed at: prune, recover, then quantise (the last step of
`hwprune-apply`).

`bf16` is the whole model in bfloat16 (`model.to(torch.bfloat16)`): on CPUs with AVX-512 BF16 it
runs MiniLM 2.7x faster than fp32 at no measurable cost in accuracy (results/benchmarks/
precision_cpu.md), and on GPUs it is the tensor cores' format. The metric, the saved weights and the
timing of the pruned model are all at that precision; the dense model it is compared with is the
one the user started from (fp32), and the dense model at the same precision is timed beside both.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from hwprune import cost_models, prunable
from hwprune.search._timing import Timing
from hwprune.search.tasks import Task

log = logging.getLogger("hwprune.apply")

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_precision(precision: str) -> None:
    """Raise ValueError for a precision hwprune-apply cannot deploy, naming the valid ones."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; valid choices: {list(PRECISIONS)}")


def to_precision(model: nn.Module, precision: str) -> nn.Module:
    """`model` converted in place to `precision` (`prunable.cast`: as it reloads when saved)."""
    check_precision(precision)
    return prunable.cast(model, PRECISIONS[precision])


def copy_at_precision(model: nn.Module, precision: str) -> nn.Module:
    """A copy of `model` at `precision`, made parameter by parameter (never a second fp32 copy)."""
    check_precision(precision)
    dtype = PRECISIONS[precision]
    copy = prunable.converted_copy(
        model, params=lambda t: t.detach().to(dtype), buffers=lambda t: t.detach().clone()
    )
    return prunable.cast(copy, dtype)  # the persistent buffers, as `to_precision` converts them


def measured_precision(dtype: str) -> str:
    """The precision a model priced at `dtype` is evaluated at here: `dtype` where torch runs it on
    any device (fp32, bf16), else fp32 (int8, fp8 and fp16 need their runtime's quantisation; the
    report says so)."""
    return dtype if dtype in PRECISIONS else "fp32"


@dataclass(frozen=True)
class Quantized:
    """The pruned model at its deployed precision, and what that changed.

    Attributes:
        precision: The deployed precision.
        workload: The timed workload at that precision.
        metric: The pruned model's metric at that precision (None: fp32, measured already).
        dense: The dense model at that precision, timed beside the others (None: the dense
            reference is timed at this precision already).
        metric_dense: The dense model's metric at that precision (None where `dense` is).
    """

    precision: str
    workload: cost_models.Workload
    metric: float | None = None
    dense: torch.nn.Module | None = None
    metric_dense: float | None = None

    def fields(self, timing: Timing, metric_unquantized: float) -> dict[str, Any]:
        """apply.json's precision part."""
        fields: dict[str, Any] = {"precision": self.precision, "metric_unquantized": metric_unquantized}
        if self.dense is not None:
            (same,) = timing.others
            dense_ms, pruned_ms = statistics.median(same), statistics.median(timing.pruned)
            fields |= {
                "metric_dense_same_precision": self.metric_dense,
                "latency_ms_dense_same_precision": dense_ms,
                "measured_speedup_same_precision": dense_ms / pruned_ms,
            }
        return fields


def quantize(
    dense: torch.nn.Module,
    pruned: torch.nn.Module,
    task: Task,
    precision: str,
    timed: cost_models.Workload,
    metric_dense: float,
) -> Quantized:
    """Convert the recovered pruned model to `precision` in place and evaluate it there; where the
    dense reference is timed at another dtype, a dense copy at `precision` is timed beside it."""
    metric = None
    if precision != "fp32":
        metric = task.evaluate(to_precision(pruned, precision))
        log.info("at %s: %s %.3f", precision, task.metric_name, metric)
    deployed = replace(timed, dtype=precision)
    if timed.dtype == precision:  # the dense reference is timed at this precision already
        return Quantized(precision, deployed, metric)
    dense_copy = copy_at_precision(dense, precision)
    if precision != "fp32":
        metric_dense = task.evaluate(dense_copy)
        log.info("the dense model at %s: %s %.3f", precision, task.metric_name, metric_dense)
    return Quantized(precision, deployed, metric, dense_copy, metric_dense)
