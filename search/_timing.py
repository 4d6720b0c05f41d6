"""Timing a pruned model against its dense one: interleaved rounds, kept up until the speedup is stable.

On a shared machine one measurement can say 2.96x and the next, minutes later, 1.47x. The speedup
of each round (dense / pruned, timed back to back in a shuffled order) is what the reported median
speedup rests on, so its spread says how far to trust it: while the per-round speedups' interquartile
range exceeds `SPREAD_LIMIT` of their median, more rounds are timed (up to `MAX_BATCHES` times the
asked number); a measurement still that spread is reported as unstable, with a warning.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hwprune import cost_models
from hwprune.cost_models.profilers import interleaved, steady_allocator
from hwprune.search._blocks import model_timer
from hwprune.search._int8 import OnnxRuntimeModel
from hwprune.search._interrupt import raise_if_pressed

log = logging.getLogger("hwprune.apply")

SPREAD_LIMIT = 0.25  # interquartile range of the per-round speedups, as a fraction of their median
MAX_BATCHES = 4  # rounds timed at most: this many times the asked number
MIN_ROUNDS = 4  # fewer rounds have no quartiles to judge the spread by


@dataclass(frozen=True)
class Timing:
    """Latencies (ms) of the dense and the pruned model, one per interleaved round each, and of any
    other model timed in the same rounds (the dense model at the pruned model's precision)."""

    dense: list[float]
    pruned: list[float]
    others: tuple[list[float], ...] = ()

    @property
    def speedup(self) -> float:
        """Median dense latency over median pruned latency."""
        return statistics.median(self.dense) / statistics.median(self.pruned)

    @property
    def round_speedups(self) -> list[float]:
        return [d / p for d, p in zip(self.dense, self.pruned, strict=True)]

    @property
    def spread(self) -> float | None:
        """Interquartile range of the per-round speedups over their median (None: too few rounds)."""
        if len(self.dense) < MIN_ROUNDS:
            return None
        q1, q2, q3 = statistics.quantiles(self.round_speedups, n=4)
        return (q3 - q1) / q2

    @property
    def stable(self) -> bool | None:
        """Whether the spread is within `SPREAD_LIMIT` (None: too few rounds to say)."""
        spread = self.spread
        return None if spread is None else spread <= SPREAD_LIMIT


def _stoppable(timer: Callable[[], float]) -> Callable[[], float]:
    """`timer`, first raising KeyboardInterrupt if a Ctrl-C was pressed and lost (`stop_at_once`)."""

    def run() -> float:
        raise_if_pressed()
        return timer()

    return run


def measure(
    timed: list[tuple[torch.nn.Module, cost_models.Workload]],
    *,
    device: torch.device,
    repeats: int,
) -> Timing:
    """Time the (model, workload) pairs in interleaved rounds, the dense then the pruned model first;
    more rounds while the pruned model's speedup is unstable.

    Models move to the device and their workload's dtype in place, so call this after anything
    that needs them as they were (the task metric, the ONNX export). The process's allocator is made
    steady first (`cost_models.profilers.steady_allocator`, as the profiler times the tables), which
    lasts: page faults of fresh activations would otherwise be timed with the models.
    """
    if len(timed) < 2:
        raise ValueError(f"measure needs the dense and the pruned model, got {len(timed)} model(s)")
    steady_allocator()
    # An ONNX Runtime model (int8) times itself; torch models move to the device and dtype.
    timers = [
        _stoppable(
            model.timer(workload)
            if isinstance(model, OnnxRuntimeModel)
            else model_timer(model, workload, str(device))
        )
        for model, workload in timed
    ]

    def timing_of(latencies: list[list[float]]) -> Timing:
        return Timing(latencies[0], latencies[1], tuple(latencies[2:]))

    latencies = interleaved(timers, rounds=repeats, warmup=3)
    timing = timing_of(latencies)
    batches = 1
    while timing.stable is False and batches < MAX_BATCHES:
        log.info(
            "per-round speedups spread %.0f%% of their median (limit %.0f%%): timing %d more rounds",
            100 * (timing.spread or 0.0),
            100 * SPREAD_LIMIT,
            repeats,
        )
        more = interleaved(timers, rounds=repeats, warmup=0, seed=batches)
        latencies = [done + extra for done, extra in zip(latencies, more, strict=True)]
        timing = timing_of(latencies)
        batches += 1
    if timing.stable is False:
        q1, q2, q3 = statistics.quantiles(timing.round_speedups, n=4)
        log.warning(
            "the measured speedup is unstable: per-round speedups %.2fx / %.2fx / %.2fx (quartiles) after %d "
            "rounds; the machine is busy. Trust %.2fx only that far, or rerun on a quiet machine",
            q1,
            q2,
            q3,
            len(timing.dense),
            timing.speedup,
        )
    return timing
