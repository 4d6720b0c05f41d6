"""Cost models against measurement on this machine's CPU, with the bundled all-MiniLM-L6-v2.

For each workload: random per-layer pruned configurations are physically pruned and timed end to end
(median of interleaved rounds), and compared with the table model (from the committed `hwprune-profile` table),
the roofline calibrated to that table, the uncalibrated roofline (measured CPU peaks) and a FLOPs
proxy scaled to the dense model's measured latency. Also measures whole-model predictions per second.

Usage (tables first, then the check):
    hwprune-profile hardware=cpu_local workload=b1_s128 profiler.rounds=10 profiler.warmup=2
    hwprune-profile hardware=cpu_local workload=b32_s128 profiler.rounds=3 profiler.repeats=6 profiler.warmup=1
    python benchmarks/cost_models_cpu.py --configs 50 --repeats 30
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

import cost_models
import prunable
from search._blocks import block_spec
from search.config import load_hardware

log = logging.getLogger("cost_models_cpu")

WORKLOADS = {"b1_s128": (1, 128), "b32_s128": (32, 128)}


def random_configs(spec: cost_models.BlockSpec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer widths on the table grid's steps, from near-empty to dense."""
    rng = np.random.default_rng(seed)
    step = 128
    units = rng.integers(0, spec.units + 1, size=(n, spec.num_layers))
    mlp = rng.integers(0, spec.mlp // step + 1, size=(n, spec.num_layers)) * step
    return units, mlp


def time_interleaved(models: list[torch.nn.Module], batch: int, seq: int, rounds: int) -> np.ndarray:
    """(models, rounds) latencies in ms, each model timed once per round in a shuffled order.

    Round-robin timing spreads this shared machine's slow drifts (other tenants, clocks) over every
    model alike instead of biasing whichever model happened to be timed during a slow minute.
    """
    ids = torch.randint(1000, 2000, (batch, seq))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rng = np.random.default_rng(0)
    samples: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:  # warm-up: allocations, weight pages, oneDNN kernel choice
            model(**inputs)
            model(**inputs)
        for _ in range(rounds):
            for k in rng.permutation(len(models)):
                t0 = time.perf_counter()
                models[k](**inputs)
                samples[k].append((time.perf_counter() - t0) * 1e3)
    return np.array(samples)


def metrics(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    err = (predicted - measured) / measured
    return {
        "mape": float(np.mean(np.abs(err)) * 100),
        "within10": float(np.mean(np.abs(err) <= 0.10) * 100),
        "within5": float(np.mean(np.abs(err) <= 0.05) * 100),
        "tau": float(kendalltau(predicted, measured).statistic),
    }


def throughput(model: cost_models.CostModel, n: int = 100_000) -> float:
    rng = np.random.default_rng(0)
    spec = model.spec
    units = rng.integers(0, spec.units + 1, size=(n, spec.num_layers))
    mlp = rng.integers(0, spec.mlp // 128 + 1, size=(n, spec.num_layers)) * 128
    model.predict(units[:10], mlp[:10])
    start = time.perf_counter()
    model.predict(units, mlp)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="results/benchmarks/cost_models_cpu.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    dense = prunable.load_model(prunable.MINILM, "BertModel")
    structure = prunable.discover(dense)
    spec = block_spec(structure)
    ref = prunable.model_ref(dense, with_weights=False)
    profile = cost_models.local_profile(load_hardware("cpu_local"))
    sections = []
    for name, (batch, seq) in WORKLOADS.items():
        workload = cost_models.Workload(batch_size=batch, seq_len=seq, dtype="fp32")
        path = cost_models.find_table(f"results/tables/cpu_local/minilm_b{batch}_s{seq}.csv")
        if path is None:
            raise SystemExit(
                f"no table for {name}: run `hwprune-profile hardware=cpu_local workload={name}` first"
            )
        table = cost_models.LatencyTable.load(path)
        models = {
            "table": cost_models.TableModel(table=table, workload=workload),
            "calibrated": cost_models.calibrate(profile, table),
            "analytical": cost_models.AnalyticalModel(profile=profile, spec=spec, workload=workload),
        }
        units, mlp = random_configs(spec, args.configs, seed=batch)
        rounds = args.repeats if batch == 1 else max(3, args.repeats // 3)
        pruned = []
        for k in range(args.configs):
            plan = prunable.PrunePlan.from_units(
                structure, ref, heads=[range(u) for u in units[k]], mlp=[range(m) for m in mlp[k]]
            )
            pruned.append(prunable.apply_plan(copy.deepcopy(dense), plan, check_weights=False))
        samples = time_interleaved([dense, *pruned], batch, seq, rounds)
        timed = np.median(samples, axis=1)
        dense_ms, measured_arr = float(timed[0]), timed[1:]
        del pruned
        for k in range(args.configs):
            log.info("%s config %d: units %s mlp %s -> %.2f ms", name, k, units[k], mlp[k], measured_arr[k])
        n = spec.num_layers
        dense_flops = spec.flops(workload, np.full(n, spec.units), np.full(n, spec.mlp))
        rows = {m: metrics(model.predict(units, mlp).latency_ms, measured_arr) for m, model in models.items()}
        # A table is absolute: on a shared machine whose speed drifts between profiling and use, one
        # dense measurement now re-anchors it (the same information the FLOPs proxy gets).
        anchor = dense_ms / table.meta["dense_model_ms"]
        rows["table, re-anchored"] = metrics(
            models["table"].predict(units, mlp).latency_ms * anchor, measured_arr
        )
        rows["FLOPs proxy"] = metrics(spec.flops(workload, units, mlp) / dense_flops * dense_ms, measured_arr)
        # The noise floor: how well one half of the rounds predicts the other on this machine.
        even, odd = np.median(samples[1:, 0::2], axis=1), np.median(samples[1:, 1::2], axis=1)
        rows["measurement: odd rounds vs even rounds"] = metrics(odd, even)
        sections.append((name, workload, table, rows, dense_ms, measured_arr))

    rates = {m: throughput(model) for m, model in models.items()}
    write(args, profile, sections, rates)


def write(args: argparse.Namespace, profile, sections, rates) -> None:  # type: ignore[no-untyped-def]
    lines = [
        "# Cost models against measured CPU latency (all-MiniLM-L6-v2)",
        "",
        f"Command: `python benchmarks/cost_models_cpu.py --configs {args.configs} --repeats {args.repeats}` "
        "after the two `hwprune-profile` runs in its docstring.  ",
        f"Machine: {cost_models.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Measured CPU peaks: fp32 {profile.peak_tflops['fp32'] * 1e3:.0f} GFLOP/s, "
        f"copy {profile.memory_bandwidth_gbs:.1f} GB/s.  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Every latency here was measured on this CPU.",
        "",
        f"{args.configs} random per-layer configurations (attention heads 0-12 and MLP width 0-1536 in steps of "
        "128, per layer), physically pruned with `prunable.apply_plan` and timed end to end (median of "
        "interleaved rounds: the dense model and every configuration timed once per round, in a shuffled "
        "order; fp32, sequence 128). `table` looks up the profiled per-block table (real pruned MiniLM "
        "layers) plus its measured non-block time; `calibrated` is the roofline fitted to that table; "
        "`analytical` is the roofline from measured peaks alone; `table, re-anchored` multiplies the table's "
        "predictions by (dense model measured now / dense model measured while profiling); the FLOPs proxy scales the dense model's "
        "measured latency by the configuration's FLOPs. The last row compares the median of the odd rounds "
        "with that of the even rounds: the agreement of this machine with itself, a ceiling for any model "
        "(a loose one: each half has half the rounds).",
        "",
    ]
    for name, workload, table, rows, dense_ms, measured in sections:
        lines += [
            f"## {name}: {workload.describe()}",
            "",
            f"Dense model measured: {dense_ms:.2f} ms (when profiling the table: "
            f"{table.meta.get('dense_model_ms', float('nan')):.2f} ms); configurations measured from "
            f"{measured.min():.2f} to {measured.max():.2f} ms. Table: `{table.meta.get('command', '')}` "
            f"({len(table.frame)} grid points, {table.meta.get('stack', 1)} blocks per timed call, "
            f"{table.meta.get('date', '')}).",
            "",
            "| model | MAPE % | within ±10 % | within ±5 % | Kendall tau |",
            "| --- | --- | --- | --- | --- |",
        ]
        for model, m in rows.items():
            lines.append(
                f"| {model} | {m['mape']:.1f} | {m['within10']:.0f} | {m['within5']:.0f} | {m['tau']:.3f} |"
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
