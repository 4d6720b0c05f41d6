"""Cost models where no table was profiled: other workloads and another model, measured on a device.

Users rarely run exactly the shape and workload a device was profiled for. This check times, end to
end, random per-layer pruned configurations at workloads that have no table of their own, and
compares them with what `cost_model_for` answers there (the roofline calibrated to every cpu_local
table), the uncalibrated roofline (measured peaks) and a FLOPs proxy:

- the bundled MiniLM at batch 8 x 64 tokens and batch 4 x 256 tokens (prefill);
- a random-init LLaMA-GQA decoder (hidden 512, 8 query / 2 KV heads, 8 layers, MLP 1536, vocabulary
  32000) decoding one token per sequence against a 1024-token KV cache, at batch 1 and 16.

Each configuration is physically pruned; dense and pruned models are timed in interleaved rounds
(median). Errors are reported as a speedup over the dense model (what the search ranks and
hwprune-apply reports) and absolute. Output: results/benchmarks/cost_models_unseen.md and .csv.

On another torch device (`--hardware gpu_h200` on the GPU machine) the same cases run in the
profile's default dtype against that profile's tables; `--llama` picks the decoder (its tables must
be among them), `--kv-len` the decode cache.

Usage:
    python benchmarks/cost_models_unseen.py --configs 50 --decode-configs 30 --repeats 15
    python benchmarks/cost_models_unseen.py --hardware gpu_h200 --llama benchmarks/models/llama_gqa_2048.json \
        --model-source random:benchmarks/models/all_minilm_l6_v2.json     # see benchmarks/gpu_h200.sh
"""

from __future__ import annotations

import argparse
import logging
import sys
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _command import command_line
from cost_models_check import STEP, describe, metrics, pruned_models, spread_configs, time_interleaved

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import torch_device
from hwprune.search import block_spec, head_width
from hwprune.search.config import load_hardware

log = logging.getLogger("cost_models_unseen")


LLAMA_CONFIG = Path(__file__).parent / "models" / "llama_gqa_512.json"


def llama_gqa(config: Path = LLAMA_CONFIG) -> torch.nn.Module:
    """The random-init LLaMA-GQA of `config` (seed 0): the model its decode tables were profiled with."""
    return prunable.load_model(f"random:{config}", "LlamaForCausalLM")


def check(
    name: str,
    dense: torch.nn.Module,
    workload: cost_models.Workload,
    profile: cost_models.HardwareProfile,
    tables: list[cost_models.LatencyTable],
    n: int,
    rounds: int,
) -> tuple[list[dict[str, object]], pd.DataFrame]:
    structure = prunable.discover(dense)
    spec = block_spec(structure, head_width=head_width(dense))
    calibrated = cost_models.cost_model_for(profile, spec, workload, tables=tables)
    if calibrated.source != "calibrated":
        raise SystemExit(
            f"{name}: expected no table for {workload.describe()}, got source {calibrated.source}"
        )
    analytical = cost_models.AnalyticalModel(profile=profile, spec=spec, workload=workload)
    units, mlp = spread_configs(spec, n, seed=zlib.crc32(name.encode()))
    log.info("%s: timing dense + %d configurations, %d rounds", name, n, rounds)
    samples = time_interleaved(pruned_models(dense, units, mlp), workload, profile.device, rounds)
    # samples: (1 + n, rounds), the dense model first
    timed = np.median(samples, axis=1)
    dense_ms, measured = float(timed[0]), timed[1:]
    even = np.median(samples[:, 0::2], axis=1)
    odd = np.median(samples[:, 1::2], axis=1)
    full_u, full_m = np.full(spec.num_layers, spec.units), np.full(spec.num_layers, spec.mlp)
    flops = spec.flops(workload, units, mlp) + 2 * workload.tokens * spec.hidden * spec.head_width
    dense_flops = (
        float(spec.flops(workload, full_u, full_m)) + 2 * workload.tokens * spec.hidden * spec.head_width
    )
    predictions = {
        "calibrated": calibrated.predict(units, mlp).latency_ms,
        "analytical": analytical.predict(units, mlp).latency_ms,
        "FLOPs proxy (x measured dense)": dense_ms * flops / dense_flops,
        cost_models.NULL: np.full(len(units), dense_ms),  # every configuration as fast as dense
    }
    dense_pred = {
        "calibrated": calibrated.dense_ms(),
        "analytical": analytical.dense_ms(),
        "FLOPs proxy (x measured dense)": dense_ms,
        cost_models.NULL: dense_ms,
    }
    null_mape = metrics(np.ones(len(units)), dense_ms / measured)["mape"]
    rows = []
    for model_name, pred in predictions.items():
        as_speedup = metrics(dense_pred[model_name] / pred, dense_ms / measured)
        absolute = metrics(pred, measured)
        rows.append(
            {
                "case": name,
                "workload": workload.describe(),
                "model": model_name,
                "dense predicted ms": dense_pred[model_name],
                "speedup within 10 %": as_speedup["within10"],
                "speedup MAPE %": as_speedup["mape"],
                "speedup tau": as_speedup["tau"],
                "speedup skill vs null": 1 - as_speedup["mape"] / null_mape,
                "absolute within 10 %": absolute["within10"],
                "absolute MAPE %": absolute["mape"],
            }
        )
    even_speedup, odd_speedup = even[0] / even[1:], odd[0] / odd[1:]
    noise, noise_abs = metrics(even_speedup, odd_speedup), metrics(even[1:], odd[1:])
    rows.append(
        {
            "case": name,
            "workload": workload.describe(),
            "model": "this machine, even vs odd rounds",
            "dense predicted ms": float(even[0]),
            "speedup within 10 %": noise["within10"],
            "speedup MAPE %": noise["mape"],
            "speedup tau": noise["tau"],
            "speedup skill vs null": 1 - noise["mape"] / null_mape,
            "absolute within 10 %": noise_abs["within10"],
            "absolute MAPE %": noise_abs["mape"],
        }
    )
    raw = pd.DataFrame({"case": name, "measured_ms": measured, "dense_ms": dense_ms})
    for model_name, pred in predictions.items():
        raw[model_name] = pred
        raw[f"{model_name}: dense"] = dense_pred[model_name]  # what a speedup is predicted against
    for i in range(spec.num_layers):
        raw[f"units{i}"], raw[f"mlp{i}"] = units[:, i], mlp[:, i]
    log.info(
        "%s: dense measured %.2f ms, calibrated %.2f, analytical %.2f",
        name,
        dense_ms,
        *list(dense_pred.values())[:2],
    )
    return rows, raw


def default_out(args: argparse.Namespace) -> str:
    """Where the report goes without --out."""
    suffix = "" if args.hardware == "cpu_local" else f"_{args.hardware}"
    return f"results/benchmarks/cost_models_unseen{suffix}.md"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", type=int, default=50, help="pruned MiniLM configurations per workload")
    parser.add_argument(
        "--decode-configs", type=int, default=30, help="pruned LLaMA configurations per batch"
    )
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--hardware", default="cpu_local", help="hardware profile (torch backend) to check")
    parser.add_argument(
        "--out", help="report path (default results/benchmarks/cost_models_unseen[_<hardware>].md)"
    )
    parser.add_argument(
        "--model-source",
        default=prunable.MINILM,
        help="the MiniLM to time (default the bundled checkpoint; random:benchmarks/models/"
        "all_minilm_l6_v2.json where it is not installed)",
    )
    parser.add_argument(
        "--llama", type=Path, default=LLAMA_CONFIG, help="config.json of the LLaMA-GQA decoder"
    )
    parser.add_argument("--kv-len", type=int, default=1024, help="cached tokens of the decode cases")
    args = parser.parse_args()
    args.out = args.out or default_out(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("hwprune.prunable").setLevel(logging.WARNING)
    started = datetime.now(timezone.utc)
    profile = load_hardware(args.hardware)
    if profile.backend != "torch":
        raise SystemExit(
            f"--hardware {args.hardware}: this check times torch models, not {profile.backend!r}"
        )
    profile = cost_models.local_profile(profile) if profile.measure_peaks else profile
    device = torch_device(profile.device)  # fails here, naming the device, before any work
    dtype = profile.resolve_dtype("auto")
    tables = cost_models.load_tables(profile)
    if not tables:
        raise SystemExit(
            f"no {profile.name} table was measured on this device: run hwprune-profile first (README)"
        )
    minilm = prunable.load_model(args.model_source, "BertModel")
    llama = llama_gqa(args.llama)
    kv = args.kv_len
    cases = [
        ("minilm b8 x 64", minilm, cost_models.Workload(batch_size=8, seq_len=64, dtype=dtype), args.configs),
        (
            "minilm b4 x 256",
            minilm,
            cost_models.Workload(batch_size=4, seq_len=256, dtype=dtype),
            args.configs,
        ),
        (
            f"llama-gqa decode b1 kv{kv}",
            llama,
            cost_models.Workload(batch_size=1, phase="decode", kv_len=kv, dtype=dtype),
            args.decode_configs,
        ),
        (
            f"llama-gqa decode b16 kv{kv}",
            llama,
            cost_models.Workload(batch_size=16, phase="decode", kv_len=kv, dtype=dtype),
            args.decode_configs,
        ),
    ]
    rows, raws = [], []
    for name, model, workload, n in cases:
        case_rows, raw = check(name, model, workload, profile, tables, n, args.repeats)
        rows += case_rows
        raws.append(raw)
    report = pd.DataFrame(rows)
    out = Path(args.out)
    pd.concat(raws).to_csv(out.with_suffix(".csv"), index=False)
    fitted = ", ".join(f"{t.spec.num_layers}x{t.spec.hidden} {t.workload.describe()}" for t in tables)
    lines = [
        "# Cost models where no table was profiled (measured)",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {describe(device)}.  ",
        f"Date: {started:%Y-%m-%d %H:%M} UTC; {args.repeats} interleaved rounds per configuration, median.  ",
        f"Calibrated on the {profile.name} tables of this device: {fitted}. "
        f"LLaMA-GQA: `{args.llama.name}` (random init). Timed in {dtype}.  ",
        "Configurations: per-layer widths drawn around a keep ratio uniform in [0, 1] (empty to dense), "
        f"MLP in steps of {STEP}. `speedup` compares predicted and measured dense/pruned ratios; "
        "`absolute` the latencies themselves. The FLOPs proxy is anchored to the measured dense latency, "
        "so its absolute error uses a measurement the other models do not have; the null predictor says pruning "
        "changes nothing, and `skill vs null` is 1 - MAPE / its MAPE (positive: better than saying nothing "
        "changes). The last row per case is "
        "this machine against itself (median of even rounds vs odd rounds): the noise floor.",
        "",
        markdown(report),
    ]
    out.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", out)


def markdown(frame: pd.DataFrame) -> str:
    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
