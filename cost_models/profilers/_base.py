"""The profiler interface: time one block of given widths; sweep a grid into a LatencyTable."""

from __future__ import annotations

import logging
import platform
import random
import statistics
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar

import pandas as pd

from hwprune._progress import Progress
from hwprune.cost_models._spec import BlockSpec, Workload
from hwprune.cost_models._table import LatencyTable
from hwprune.cost_models.profilers._allocator import allocator_state
from hwprune.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    """Repeated measurements of one configuration, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    samples_ms: tuple[float, ...] = ()

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Timing:
        ordered = sorted(samples_ms)
        n = len(ordered)
        return cls(
            median_ms=statistics.median(ordered),
            p10_ms=ordered[int(0.1 * (n - 1))],
            p90_ms=ordered[round(0.9 * (n - 1))],
            repeats=n,
            samples_ms=tuple(samples_ms),
        )

    def scaled(self, factor: float) -> Timing:
        """The same timing with every sample multiplied by `factor` (e.g. per block of a stack)."""
        return Timing.of([t * factor for t in self.samples_ms])


def repeat_timed(run: Callable[[], float], *, warmup: int, repeats: int) -> Timing:
    """Call `run` (which returns elapsed ms) `warmup` times untimed, then `repeats` times."""
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    for _ in range(warmup):
        run()
    return Timing.of([run() for _ in range(repeats)])


def interleaved(
    timers: Sequence[Callable[[], float]], *, rounds: int, warmup: int = 1, seed: int = 0
) -> list[list[float]]:
    """Latencies (ms) of several timed runs, `rounds` each, one call of every timer per round.

    Each round calls the timers in a fresh shuffled order, so a shared machine's slow drifts (other
    tenants, clocks) spread over every timer alike instead of biasing whichever ran during a slow
    minute: what a speedup of one model over another needs to mean anything.

    Args:
        timers: Callables that run once and return the elapsed ms.
        rounds: Timed calls of each timer.
        warmup: Untimed calls of each timer first (allocations, weight pages, kernel choice).
        seed: Seed of the round orders.

    Returns:
        One list of `rounds` latencies per timer, in the order given.
    """
    if rounds < 1 or warmup < 0:
        raise ConfigError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    for timer in timers:
        for _ in range(warmup):
            timer()
    rng = random.Random(seed)
    samples: list[list[float]] = [[] for _ in timers]
    for _ in range(rounds):
        for k in rng.sample(range(len(timers)), len(timers)):
            samples[k].append(timers[k]())
    return samples


@dataclass(frozen=True)
class ProfilerSettings:
    """What `hwprune-profile` knows when it makes a profiler: the target's device and the profiler options.

    Each backend takes what it uses (`Profiler.configured`) and ignores the rest.

    Attributes:
        device: The hardware profile's device ("cpu", "cuda", a JAX platform).
        execution_provider: ONNX Runtime's execution provider (None: the CPU's).
        warmup: Untimed runs first.
        repeats: Timed runs.
        threads: Threads to time with (None: the backend's default).
        stack: Blocks run back to back per timed call (torch).
        block_factory: Builds the block timed at each width (torch; None: the reference block).
    """

    device: str = "cpu"
    execution_provider: str | None = None
    warmup: int = 5
    repeats: int = 20
    threads: int | None = None
    stack: int = 1
    block_factory: Callable[..., Any] | None = None


# Profilers by backend name ("torch", "jax", "onnxruntime"): a subclass that names its `backend` is
# added when it is defined, and `hwprune-profile` makes the one a hardware profile's backend names.
PROFILERS: dict[str, type[Profiler]] = {}


def profiler_for(backend: str, settings: ProfilerSettings) -> Profiler:
    """The profiler of `backend`, configured from `settings`.

    Raises:
        ConfigError: An unknown backend, naming the known ones.
    """
    if backend not in PROFILERS:
        raise ConfigError(f"backend {backend!r} has no profiler; valid: {sorted(PROFILERS)}")
    return PROFILERS[backend].configured(settings)


class Profiler(ABC):
    """Measures real per-block latency on one backend.

    Args:
        warmup: Untimed runs before measuring (JIT compilation, caches, clocks).
        repeats: Timed runs; the table keeps their median and 10th/90th percentiles.
        seed: Seed of the random weights and inputs.
    """

    backend: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "backend" in cls.__dict__:
            PROFILERS[cls.backend] = cls

    @classmethod
    @abstractmethod
    def configured(cls, settings: ProfilerSettings) -> Profiler:
        """This backend's profiler from the settings it uses."""

    def __init__(self, *, warmup: int = 5, repeats: int = 20, seed: int = 0) -> None:
        if warmup < 0 or repeats < 1:
            raise ConfigError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
        self.warmup, self.repeats, self.seed = warmup, repeats, seed

    @abstractmethod
    def measure_block(self, spec: BlockSpec, workload: Workload, *, units: int, mlp: int) -> Timing:
        """Latency of one block of `spec` keeping `units` attention units and `mlp` neurons."""

    def metadata(self) -> dict[str, Any]:
        """Backend and device details recorded with every table."""
        return {
            "backend": self.backend,
            "python": platform.python_version(),
            "host_cpu": _cpu(),
            "allocator": allocator_state(),
        }

    def profile(
        self,
        spec: BlockSpec,
        workload: Workload,
        *,
        units_grid: Sequence[int],
        mlp_grid: Sequence[int],
        hardware: str,
        base_ms: float = 0.0,
        command: str = "",
        rounds: int = 1,
        references: Mapping[str, Callable[[], float]] | None = None,
    ) -> LatencyTable:
        """Measure every (units, mlp) pair of the grid into a table.

        Args:
            rounds: Split the repeats over this many passes through the grid, each in a fresh
                shuffled order, so slow drifts of a shared machine (other tenants, clocks) spread
                over all points instead of biasing the ones timed during a slow minute.
            references: Named callables returning the latency (ms) of one run of some reference
                (the whole dense model, the model with every block emptied), each warmed up and
                timed like a grid point in every round; the median of reference `name` goes to the
                table's metadata as `{name}_ms`, measured under the same conditions as the grid.
        """
        for name, grid, top in (("units_grid", units_grid, spec.units), ("mlp_grid", mlp_grid, spec.mlp)):
            bad = [g for g in grid if not 0 <= g <= top]
            if bad or len(set(grid)) < 2:
                raise ConfigError(f"{name} needs >= 2 distinct values in [0, {top}], got {list(grid)}")
        if rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {rounds}")
        points = [(u, m) for u in sorted(set(units_grid)) for m in sorted(set(mlp_grid))]
        samples: dict[tuple[int, int], list[float]] = {p: [] for p in points}
        references = dict(references or {})
        reference_ms: dict[str, list[float]] = {name: [] for name in references}
        repeats, rng = self.repeats, random.Random(self.seed)
        self.repeats = max(1, -(-repeats // rounds))  # per round, rounded up
        for reference in references.values():
            for _ in range(self.warmup):
                reference()
        try:
            tracker = Progress(
                f"profiling {hardware} ({self.backend}), grid points", len(points) * rounds, logger=log
            )
            for _ in range(rounds):
                order = points if rounds == 1 else rng.sample(points, len(points))
                for units, mlp in order:
                    t = self.measure_block(spec, workload, units=units, mlp=mlp)
                    samples[units, mlp].extend(t.samples_ms or [t.median_ms])
                    tracker.advance()
                for name, reference in references.items():
                    reference_ms[name].extend(reference() for _ in range(self.repeats))
        finally:
            self.repeats = repeats
        rows = []
        for units, mlp in points:
            t = Timing.of(samples[units, mlp])
            rows.append((units, units * spec.heads_per_unit, mlp, t.median_ms, t.p10_ms, t.p90_ms, t.repeats))
        frame = pd.DataFrame(
            rows, columns=["units", "heads", "mlp", "latency_ms", "p10_ms", "p90_ms", "repeats"]
        )
        meta = self.metadata() | {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "warmup": self.warmup,
            "rounds": rounds,
            "command": command,
        }
        for name, times in reference_ms.items():
            meta[f"{name}_ms"] = statistics.median(times)
        return LatencyTable(
            frame=frame, spec=spec, workload=workload, hardware=hardware, base_ms=base_ms, meta=meta
        )


def _cpu() -> str:
    from hwprune.cost_models._cpu_peaks import cpu_name

    return cpu_name()
