"""Cost models against measurement on a device of this machine, with the bundled all-MiniLM-L6-v2.

For each workload: random per-layer pruned configurations are physically pruned and timed end to
end (median of interleaved rounds), and compared with the table model (from the `hwprune-profile`
table), the roofline calibrated to that table, the uncalibrated roofline (the profile's peaks:
measured on cpu_local, datasheet elsewhere) and a FLOPs proxy scaled to the dense model's measured
latency. Also measures whole-model predictions per second. The measured latencies go to a CSV
beside the report, so other models can be scored without re-timing.

The device is the hardware profile's (`--hardware`, a torch backend: `cpu_local` here, `gpu_h100`
on the GPU machine, timed with CUDA events in the profile's first dtype). Results go to
results/benchmarks/cost_models_<hardware>.md and .csv.

Usage (profiles each workload's table with the commands below, then checks it right away, so the
machine has as little time as possible to change speed between the two):
    python benchmarks/cost_models_check.py --profile --configs 50 --repeats 90 \
        --previous <an earlier run's cost_models_cpu_local.csv>
    python benchmarks/cost_models_check.py --hardware gpu_h100 --profile --configs 50 --repeats 90
Without --profile it checks the tables under results/tables/<hardware>/, made on cpu_local by:
    hwprune-profile hardware=cpu_local workload=b1_s128 profiler.rounds=10 profiler.warmup=2
    hwprune-profile hardware=cpu_local workload=b32_s128 profiler.rounds=3 profiler.repeats=6 profiler.warmup=1
(on a GPU, where a grid takes seconds: profiler.rounds=10).
"""

from __future__ import annotations

import argparse
import copy
import logging
import subprocess
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from _command import command_line

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import (
    allocator_state,
    interleaved,
    nvml_metadata,
    steady_allocator,
    torch_device,
)
from hwprune.search import block_spec, model_timer
from hwprune.search.config import load_hardware

log = logging.getLogger("cost_models_check")

WORKLOADS = {"b1_s128": (1, 128), "b32_s128": (32, 128)}
# These took 3.5 and 10 min per table on the 2-core CPU (2026-11-23); a GPU sweeps a grid in seconds.
PROFILE_ARGS = {
    "b1_s128": "profiler.rounds=10 profiler.warmup=2",
    "b32_s128": "profiler.rounds=3 profiler.repeats=6 profiler.warmup=1",
}
GPU_PROFILE_ARGS = "profiler.rounds=10"
STEP = 128  # the MLP step of the table grid and of the configurations
DEFAULT = "table (additive fit, default)"


def random_configs(spec: cost_models.BlockSpec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every layer's widths drawn uniformly and independently on the grid's steps.

    Whole-model sizes then cluster around half the dense model (the average of 2 x 6 draws).
    """
    rng = np.random.default_rng(seed)
    units = rng.integers(0, spec.units + 1, size=(n, spec.num_layers))
    mlp = rng.integers(0, spec.mlp // STEP + 1, size=(n, spec.num_layers)) * STEP
    return units, mlp


def spread_configs(spec: cost_models.BlockSpec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer widths around a per-configuration keep ratio drawn uniformly in [0, 1].

    Whole-model sizes then cover the range a search explores, from nearly empty to dense, which the
    uniform draw leaves mostly unvisited.
    """
    rng = np.random.default_rng(seed)
    keep = rng.uniform(0.0, 1.0, size=(n, 1))
    units = rng.binomial(spec.units, keep, size=(n, spec.num_layers))
    mlp = rng.binomial(spec.mlp // STEP, keep, size=(n, spec.num_layers)) * STEP
    return units, mlp


def time_interleaved(
    models: Iterable[torch.nn.Module], workload: cost_models.Workload, device: str, rounds: int
) -> np.ndarray:
    """(models, rounds) latencies in ms, each model timed once per round in a shuffled order.

    Round-robin timing spreads a shared machine's slow drifts (other tenants, clocks) over every
    model alike instead of biasing whichever model happened to be timed during a slow minute.
    Each model moves to the device as it comes (`models` may be a generator), so a GPU run holds
    one host copy at a time, and pruned copies of a model already moved are made on the device.
    The allocator is made steady first, as the profiler made it for the tables.
    """
    steady_allocator()
    timers = [model_timer(model, workload, device) for model in models]
    return np.array(interleaved(timers, rounds=rounds, warmup=2))


def pruned_models(
    dense: torch.nn.Module,
    units: np.ndarray,
    mlp: np.ndarray,
    precisions: tuple[list[list[str]], list[list[str]]] | None = None,
) -> Iterator[torch.nn.Module]:
    """`dense`, then one physically pruned copy per row of (configurations, layers) `units` and `mlp`,
    with its blocks at their (attention, rest) `precisions` where given, as a plan deploys them.

    A generator: with `time_interleaved` the dense model is on the device before it is copied.
    """
    structure = prunable.discover(dense)
    ref = prunable.model_ref(dense, with_weights=False)
    yield dense
    for k in range(len(units)):
        plan = prunable.PrunePlan.from_units(
            structure, ref, attention=[range(u) for u in units[k]], mlp=[range(m) for m in mlp[k]]
        )
        if precisions is not None:
            plan = plan.with_precisions(precisions[0][k], precisions[1][k])
        pruned = prunable.apply_plan(copy.deepcopy(dense), plan, check_weights=False)
        yield pruned if precisions is None else prunable.set_precisions(pruned, plan)


def speed_windows(
    model: torch.nn.Module, dtype: str, device: str, seconds: float, window: float = 10.0
) -> np.ndarray:
    """Medians (ms) of the dense model at batch 1 run back to back, one per `window` seconds.

    How far this machine's speed wanders on its own over minutes: a bound on how well any absolute
    latency, measured at one time, can predict one measured at another.
    """
    run = model_timer(model, cost_models.Workload(batch_size=1, seq_len=128, dtype=dtype), device)
    run()
    medians = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        times, start = [], time.perf_counter()
        while time.perf_counter() - start < window:
            times.append(run())
        medians.append(float(np.median(times)))
    return np.array(medians)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        nvml = nvml_metadata(device.index or 0)
        details = ", ".join(f"{k} {v}" for k, v in nvml.items() if k != "name")
        return f"{torch.cuda.get_device_name(device)} ({details}), torch {torch.__version__}"
    return (
        f"{cost_models.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"allocator {allocator_state()}"
    )


def metrics(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """MAPE, shares within ±10 / ±5 % and Kendall tau of predicted against measured (latencies or
    speedups): `cost_models.speedup_accuracy`, the one home of these figures."""
    acc = cost_models.speedup_accuracy(predicted, measured)
    return {"mape": acc.mape, "within10": acc.within10, "within5": acc.within5, "tau": acc.tau}


def config_sets(spec: cost_models.BlockSpec, n: int, batch: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The two configuration sets of one workload, seeded by its batch so every run times the same."""
    return {"uniform": random_configs(spec, n, seed=batch), "spread": spread_configs(spec, n, seed=batch)}


def stacked(sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Every set's (units, mlp) one after the other: (configurations, layers) each."""
    return np.concatenate([u for u, _ in sets.values()]), np.concatenate([m for _, m in sets.values()])


def load_previous(path: str | None, spec: cost_models.BlockSpec, n: int) -> pd.DataFrame | None:
    """An earlier run's measurements, checked before any timing to hold this run's configurations."""
    if path is None:
        return None
    frame = pd.read_csv(path)
    layers = range(spec.num_layers)
    for name, (batch, _) in WORKLOADS.items():
        rows = frame[frame["workload"] == name]
        units, mlp = stacked(config_sets(spec, n, batch))
        if not (
            np.array_equal(rows[[f"units{i}" for i in layers]], units)
            and np.array_equal(rows[[f"mlp{i}" for i in layers]], mlp)
        ):
            raise SystemExit(
                f"--previous {path}: its {name} configurations are not this run's (same --configs?)"
            )
    return frame


def throughput(model: cost_models.CostModel, n: int = 100_000) -> float:
    units, mlp = random_configs(model.spec, n, seed=0)
    model.predict(units[:10], mlp[:10])
    start = time.perf_counter()
    model.predict(units, mlp)
    return n / (time.perf_counter() - start)


def default_out(args: argparse.Namespace) -> str:
    """Where the report goes without --out."""
    return f"results/benchmarks/cost_models_{args.hardware}.md"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", type=int, default=50, help="configurations per set (two sets)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--profile", action="store_true", help="profile each table right before its check")
    parser.add_argument("--stability-seconds", type=float, default=120.0)
    parser.add_argument("--hardware", default="cpu_local", help="hardware profile (torch backend) to check")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="precision to time and predict (default the profile's first); another one reads and "
        "profiles the tables named for it (minilm_b1_s128_bf16.csv)",
    )
    parser.add_argument("--out", help="report path (default results/benchmarks/cost_models_<hardware>.md)")
    parser.add_argument(
        "--model-source",
        default=prunable.MINILM,
        help="the MiniLM to time (default the bundled checkpoint); random:benchmarks/models/"
        "all_minilm_l6_v2.json is its architecture with random weights, the same latency, for "
        "machines without the checkpoint",
    )
    parser.add_argument(
        "--previous",
        help="measurements CSV of an earlier run (same --configs): adds how well that run predicts this one",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out = args.out or default_out(args)
    profile = load_hardware(args.hardware)
    if profile.backend != "torch":
        raise SystemExit(
            f"--hardware {args.hardware}: the check times torch models, its backend is {profile.backend!r}"
        )
    profile = cost_models.local_profile(profile) if profile.measure_peaks else profile
    dtype = profile.resolve_dtype(args.dtype)
    tag = "" if args.dtype == "auto" else f"_{dtype}"  # the table names `hwprune-profile` gives
    device = torch_device(profile.device)  # fails here, naming the device, before any work

    dense = prunable.load_model(args.model_source, "BertModel")
    spec = block_spec(prunable.discover(dense))
    previous = load_previous(args.previous, spec, args.configs)
    started = datetime.now(timezone.utc)
    stability = speed_windows(dense, dtype, profile.device, args.stability_seconds)
    sections, measurements = [], []
    for name, (batch, seq) in WORKLOADS.items():
        if args.profile:
            settings = GPU_PROFILE_ARGS if device.type == "cuda" else PROFILE_ARGS[name]
            source = "" if args.model_source == prunable.MINILM else f" model.source={args.model_source}"
            dtype_arg = "" if args.dtype == "auto" else f" workload.dtype={dtype}"
            command = (
                f"hwprune-profile hardware={args.hardware} workload={name}{dtype_arg}{source} overwrite=true "
                f"{settings}"
            )
            log.info("running %s", command)
            subprocess.run(command.split(), check=True)
        workload = cost_models.Workload(batch_size=batch, seq_len=seq, dtype=dtype)
        where = cost_models.table_dir(profile.name, profile.kind)
        path = next(
            iter(cost_models.find_tables(f"results/tables/{where}/minilm_b{batch}_s{seq}{tag}.csv")), None
        )
        if path is None:
            raise SystemExit(
                f"no table for {name}: run with --profile, or `hwprune-profile` as in the docstring"
            )
        table = cost_models.LatencyTable.load(path)
        models: dict[str, cost_models.CostModel] = {
            DEFAULT: cost_models.TableModel(table=table, workload=workload),
            "table (raw grid)": cost_models.TableModel(table=table, workload=workload, fit="grid"),
            "calibrated": cost_models.calibrate(profile, [table], spec=spec, workload=workload),
            "analytical": cost_models.AnalyticalModel(profile=profile, spec=spec, workload=workload),
        }
        sets = config_sets(spec, args.configs, batch)
        units, mlp = stacked(sets)
        rounds = args.repeats if batch == 1 else max(3, args.repeats // 3)
        samples = time_interleaved(pruned_models(dense, units, mlp), workload, profile.device, rounds)
        timed = np.median(samples, axis=1)
        dense_ms, measured = float(timed[0]), timed[1:]
        # Halves of the rounds: how well this machine predicts itself, a ceiling for any model.
        even, odd = np.median(samples[1:, 0::2], axis=1), np.median(samples[1:, 1::2], axis=1)
        n = spec.num_layers
        dense_flops = spec.flops(workload, np.full(n, spec.units), np.full(n, spec.mlp))
        predicted = {m: model.predict(units, mlp).latency_ms for m, model in models.items()}
        # A table is absolute, and this machine's speed wanders between profiling and checking. As a
        # speedup over the dense model (what a search ranks and hwprune-apply reports), times the dense
        # model measured now, it gets the same anchor as the FLOPs proxy.
        speedup_scale = dense_ms / models[DEFAULT].dense_ms()
        predicted["table, as speedup x dense now"] = predicted[DEFAULT] * speedup_scale
        predicted["FLOPs proxy"] = spec.flops(workload, units, mlp) / dense_flops * dense_ms
        # "Pruning changes nothing": every configuration as fast as the dense model measured now.
        predicted[cost_models.NULL] = np.full(len(units), dense_ms)
        predicted["measurement: odd rounds vs even rounds"] = odd
        if previous is not None:
            # The same configurations (fixed seeds) timed in another run: how far this machine's
            # latencies move between runs, absolute and as a speedup over that run's dense model.
            before = previous[previous["workload"] == name]
            predicted["measurement: previous run"] = before["measured_ms"].to_numpy()
            predicted["measurement: previous run, as speedup x dense now"] = (
                before["measured_ms"].to_numpy() / before["dense_ms"].to_numpy() * dense_ms
            )
        # Odd rounds are scored against even ones; everything else against all rounds.
        truth = {m: (even if m.startswith("measurement: odd") else measured) for m in predicted}
        results, ranges = {}, {}
        for k, set_name in enumerate(sets):
            rows = slice(k * args.configs, (k + 1) * args.configs)
            results[set_name] = {m: metrics(p[rows], truth[m][rows]) for m, p in predicted.items()}
            ranges[set_name] = (measured[rows].min(), measured[rows].max())
        sections.append((name, workload, table, models[DEFAULT], results, dense_ms, ranges, rounds))
        for k in range(len(units)):
            set_name = list(sets)[k // args.configs]
            row = {"workload": name, "set": set_name, "measured_ms": measured[k], "dense_ms": dense_ms}
            row |= {"run_utc": f"{started:%Y-%m-%d %H:%M}"}
            row |= {f"units{i}": units[k, i] for i in range(n)} | {f"mlp{i}": mlp[k, i] for i in range(n)}
            measurements.append(row)
    pd.DataFrame(measurements).to_csv(Path(args.out).with_suffix(".csv"), index=False, float_format="%.4f")
    # Throughput on the last workload's models (prediction cost does not depend on the workload).
    rates = {m: throughput(model) for m, model in models.items() if m != "table (raw grid)"}
    write(args, profile, device, sections, rates, stability, previous)


def previous_when(previous: pd.DataFrame) -> str:
    if "run_utc" not in previous:
        return ""
    return ", run " + ", ".join(sorted(set(previous["run_utc"].astype(str)))) + " UTC"


def write(
    args: argparse.Namespace,
    profile: Any,
    device: torch.device,
    sections: list[Any],
    rates: dict[str, float],
    stability: np.ndarray,
    previous: pd.DataFrame | None,
) -> None:
    lines = [
        f"# Cost models against measured latency on {profile.name} (all-MiniLM-L6-v2)",
        "",
        f"Command: `{command_line()}`"
        + (" (profiles each table, then checks it)" if args.profile else "")
        + f"; every measured latency is in `{Path(args.out).with_suffix('.csv').name}`.  ",
        f"Machine: {describe(device)}. "
        + ("Measured peaks" if profile.measure_peaks else "Datasheet peaks")
        + f" ({sections[0][1].dtype}): {profile.peak_tflops[sections[0][1].dtype] * 1e3:.0f} GFLOP/s, "
        f"memory {profile.memory_bandwidth_gbs:.1f} GB/s.  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Every latency here was measured on this "
        f"{'GPU (CUDA events)' if device.type == 'cuda' else 'CPU (wall clock)'}."
        + (
            f" Weights: `{args.model_source}`, the all-MiniLM-L6-v2 architecture with random weights "
            "(latency does not depend on the values)."
            if args.model_source != prunable.MINILM
            else ""
        ),
        "",
        f"Two sets of {args.configs} random per-layer configurations (attention heads 0-12 and MLP width "
        "0-1536 in steps of 128, per layer): `uniform` draws every layer's widths independently, so "
        "whole-model sizes cluster around half the dense model; `spread` first draws a keep ratio per "
        "configuration, uniform in [0, 1], then each layer's widths binomially around it, so sizes cover "
        "the range a search explores. Each configuration is physically pruned with `prunable.apply_plan` "
        "and timed end to end (median of interleaved rounds: the dense model and every configuration "
        f"timed once per round, in a shuffled order; {sections[0][1].dtype}, sequence 128).",
        "",
        "Models: `table (additive fit, default)` reads the profiled per-block table (real pruned MiniLM "
        "layers) as attention + MLP sub-layer latencies fitted to the whole grid, plus the measured time "
        "outside the blocks; `table (raw grid)` interpolates the raw grid instead; `calibrated` is the "
        "roofline fitted to that table; `analytical` is the roofline from the profile's peaks alone; `table, "
        "as speedup x dense now` is the default table's predicted speedup over the dense model (what the "
        "search ranks and `hwprune-apply` reports) times the dense model measured now, the same anchor "
        "the FLOPs proxy gets (the dense model's latency measured now, scaled by the configuration's "
        "FLOPs); the null predictor says pruning changes nothing (the dense model measured now, for every configuration), and `skill vs null` is 1 - MAPE / its MAPE: a model is worth its figures only where that is positive. The `odd rounds vs even rounds` row compares the median of the odd rounds with that of the even rounds: the "
        "agreement of this machine with itself within one interleaved check, a ceiling for any model "
        "(a loose one: each half has half the rounds)."
        + (
            f" The `previous run` rows (`--previous {args.previous}`{previous_when(previous)}) "
            "predict each configuration by its latency measured in that run (absolute, and as a speedup "
            "over that run's dense model times the dense model now): how well this machine reproduces "
            "itself between runs, the ceiling for a table profiled in one run and checked in another."
            if previous is not None
            else ""
        ),
        "",
        "## How steady this machine is",
        "",
        f"The dense model at batch 1 run back to back for {args.stability_seconds:.0f} s, median of "
        f"every 10 s: {stability.min():.2f} to {stability.max():.2f} ms (median {np.median(stability):.2f}; "
        f"max / min = {stability.max() / stability.min():.2f}). Absolute latencies measured minutes apart "
        "on this machine differ by that much whatever predicts them: the rows without a measurement "
        "taken now (table, calibrated, analytical) carry it; the anchored rows do not.",
        "",
    ]
    for name, workload, table, model, results, dense_ms, ranges, rounds in sections:
        lines += [
            f"## {name}: {workload.describe()}",
            "",
            f"Table: `{table.meta.get('command', '')}` ({len(table.frame)} grid points, "
            f"{table.meta.get('stack', 1)} blocks per timed call, {table.meta.get('date', '')}); additive "
            f"fit within {model.fit_error * 100:.1f} % RMS of the raw grid. Dense model measured now: "
            f"{dense_ms:.2f} ms; while profiling: {table.meta.get('dense_model_ms', float('nan')):.2f} ms. "
            f"Configurations timed in {rounds} interleaved rounds.",
            "",
        ]
        for set_name, rows in results.items():
            lines += [
                f"`{set_name}` set: measured {ranges[set_name][0]:.2f} to {ranges[set_name][1]:.2f} ms.",
                "",
                "| model | MAPE % | within ±10 % | within ±5 % | Kendall tau | skill vs null |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            null_mape = rows[cost_models.NULL]["mape"]
            for model_name, m in rows.items():
                lines.append(
                    f"| {model_name} | {m['mape']:.1f} | {m['within10']:.0f} | {m['within5']:.0f} | "
                    f"{m['tau']:.3f} | {1 - m['mape'] / null_mape:+.2f} |"
                )
            lines.append("")
    lines += [
        "## Vectorised query speed",
        "",
        "Whole-model predictions per second, one call on 100,000 configurations (6 layers each):",
        "",
        "| model | predictions / s |",
        "| --- | --- |",
    ]
    lines += [f"| {m} | {r:,.0f} |" for m, r in rates.items()]
    Path(args.out).write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
