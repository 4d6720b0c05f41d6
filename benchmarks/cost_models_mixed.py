"""The mixed-precision cost model against measurement, with plans deployed as `hwprune-apply` does.

What the precision axis prices: per-layer widths and, per layer, the precision of its attention and
of the rest of its block (`cost_models.mixed_precision_model`, one cost model per precision from this
machine's tables). Three seeded sets of configurations, widths spread from nearly empty to dense:
`fp32` (every block fp32), `bf16` (every block bf16) and `mixed` (each layer's attention and rest
drawn independently). Each is physically pruned, its blocks set to their precisions with
`prunable.set_precisions` (a block runs at its precision between casts, the rest of the model in
fp32: what a plan deploys), and timed with the dense fp32 model in interleaved rounds. Predicted and
measured speedups over the dense fp32 model are compared beside the null predictor and the FLOPs
proxy (which knows nothing of precision), with skill = 1 - MAPE / the null's (cost_models._skill).

Usage:
    python benchmarks/cost_models_mixed.py --workload b32_s128 --configs 30 --repeats 6 \
        --out results/benchmarks/cost_models_mixed_cpu_local.md
"""

from __future__ import annotations

import argparse
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _command import command_line
from cost_models_check import describe, pruned_models, spread_configs, time_interleaved

from hwprune import cost_models, prunable
from hwprune.search import block_spec
from hwprune.search.config import load_hardware

log = logging.getLogger("cost_models_mixed")

WORKLOADS = {"b1_s128": (1, 128), "b8_s128": (8, 128), "b32_s128": (32, 128)}
PRECISIONS = ("fp32", "bf16")
HEADER = "| set | predictor | speedup MAPE % | within ±10 % | within ±5 % | Kendall tau | skill vs null |"


def precision_sets(n: int, layers: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per set, (configurations, layers) attention and MLP precision indices into PRECISIONS."""
    rng = np.random.default_rng(seed)
    zeros, ones = np.zeros((n, layers), dtype=np.int64), np.ones((n, layers), dtype=np.int64)
    return {
        "fp32": (zeros, zeros),
        "bf16": (ones, ones),
        "mixed": (rng.integers(0, 2, (n, layers)), rng.integers(0, 2, (n, layers))),
    }


def row(set_name: str, name: str, acc: cost_models.Accuracy) -> str:
    tau = "—" if np.isnan(acc.tau) else f"{acc.tau:.3f}"
    mape = "inf" if np.isinf(acc.mape) else f"{acc.mape:.1f}"
    return (
        f"| {set_name} | {name} | {mape} | {acc.within10:.0f} | {acc.within5:.0f} | {tau} | "
        f"{acc.skill:+.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", default="b32_s128", choices=sorted(WORKLOADS))
    parser.add_argument("--configs", type=int, default=30, help="configurations per set (three sets)")
    parser.add_argument("--repeats", type=int, default=6, help="interleaved timing rounds")
    parser.add_argument("--out", default="results/benchmarks/cost_models_mixed_cpu_local.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("hwprune.prunable").setLevel(logging.WARNING)
    profile = cost_models.local_profile(load_hardware("cpu_local"))
    if "bf16" not in profile.dtypes:
        raise SystemExit(
            f"this CPU runs {profile.dtypes}: no native bf16 to mix (AVX-512 BF16, AMX or ARM BF16)"
        )
    batch, seq = WORKLOADS[args.workload]
    workload = cost_models.Workload(batch_size=batch, seq_len=seq, dtype="fp32")
    dense = prunable.load_model(prunable.MINILM, "BertModel")
    spec = block_spec(prunable.discover(dense))
    tables = cost_models.load_tables(profile)
    mixed = cost_models.mixed_precision_model(profile, spec, workload, list(PRECISIONS), tables=tables)
    log.info("predicting with %s", mixed.sources)
    n = args.configs
    precisions = precision_sets(n, spec.num_layers, seed=batch)
    widths = {name: spread_configs(spec, n, seed=batch + k) for k, name in enumerate(precisions)}
    units = np.concatenate([widths[s][0] for s in precisions])
    mlp = np.concatenate([widths[s][1] for s in precisions])
    attention = np.concatenate([precisions[s][0] for s in precisions])
    rest = np.concatenate([precisions[s][1] for s in precisions])
    names = ([[PRECISIONS[i] for i in r] for r in attention], [[PRECISIONS[i] for i in r] for r in rest])
    samples = time_interleaved(pruned_models(dense, units, mlp, names), workload, "cpu", args.repeats)
    timed = np.median(samples, axis=1)  # (1 + configurations,) ms, the dense model first
    measured = timed[0] / timed[1:]
    predicted = (
        mixed.dense_ms()
        / mixed.predict_mixed(units, mlp, attention_precision=attention, mlp_precision=rest).latency_ms
    )
    refs = cost_models.reference_speedups(spec, workload, units, mlp)
    frame = pd.DataFrame({"set": np.repeat(list(precisions), n), "measured_speedup": measured})
    frame["predicted_speedup"] = predicted
    frame["dense_ms"] = timed[0]
    frame["measured_ms"] = timed[1:]
    for i in range(spec.num_layers):
        frame[f"units{i}"], frame[f"mlp{i}"] = units[:, i], mlp[:, i]
        frame[f"attention{i}"] = [PRECISIONS[p] for p in attention[:, i]]
        frame[f"rest{i}"] = [PRECISIONS[p] for p in rest[:, i]]
    out = Path(args.out)
    frame.to_csv(out.with_suffix(".csv"), index=False, float_format="%.4f")

    lines = [
        f"# Mixed-precision cost model against measurement: MiniLM, cpu_local, {workload.describe()}",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {describe(torch.device('cpu'))}.  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Every latency measured on this CPU (wall clock, "
        f"median of {args.repeats} interleaved rounds); measurements in `{out.with_suffix('.csv').name}`.",
        "",
        "Predicted by `cost_models.mixed_precision_model` from this machine's tables: "
        + ", ".join(f"{p} {src}" for p, src in mixed.sources.items())
        + f". Dense fp32 measured {timed[0]:.2f} ms, predicted {mixed.dense_ms():.2f} ms. "
        f"{n} configurations per set (widths spread from nearly empty to dense), deployed with "
        "`prunable.set_precisions` as plans are. Speedups are over the dense fp32 model; the FLOPs proxy's MAPE is inf where a configuration keeps no block FLOPs.",
        "",
        HEADER,
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k, set_name in enumerate(precisions):
        rows = slice(k * n, (k + 1) * n)
        null = cost_models.speedup_accuracy(refs[cost_models.NULL][rows], measured[rows])
        scores = {
            "mixed-precision model": predicted[rows],
            cost_models.FLOPS: refs[cost_models.FLOPS][rows],
            cost_models.NULL: refs[cost_models.NULL][rows],
        }
        for name, p in scores.items():
            lines.append(row(set_name, name, cost_models.speedup_accuracy(p, measured[rows]).against(null)))
        lines.append(
            f"| {set_name} | (measured speedups {measured[rows].min():.2f}-{measured[rows].max():.2f}x; "
            f"predicted / measured median {np.median(predicted[rows] / measured[rows]):.2f}) | | | | | |"
        )
    out.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
