"""Search benchmark: MiniLM on STS-B (train: calibration, dev: metric), cpu_local, batch 32 x 128.

1. NSGA-II against random search and TPE at equal trials: hypervolume of each proxy front as a
   fraction of the exact DP front, trials per second with the default (journal) storage.
2. The search front re-scored on STS-B dev against uniform pruning with the same saliency.
3. `hwprune-apply` on the front's plans: measured CPU speedup against predicted, and the dev metric.
4. Wall time of the embedded default run (`hwprune-search` with no arguments).

Usage:
    python benchmarks/search_minilm_sts.py --stsb ../shared/data/stsb --out results/benchmarks/search_minilm_sts.md
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

import cost_models
from search import compose
from search._report import write_report
from search._run import run_search
from search.apply_app import apply_config
from search.apply_app import run as run_apply
from search.config import AppConfig

log = logging.getLogger("search_minilm_sts")


def config(args: argparse.Namespace, *overrides: str) -> AppConfig:
    cfg = compose(
        "config",
        [
            "task=sts",
            f"task.build.train_path={Path(args.stsb).resolve() / 'sts-train.csv'}",
            f"task.build.eval_path={Path(args.stsb).resolve() / 'sts-dev.csv'}",
            "hardware=cpu_local",
            "workload=b32_s128",
            f"search.n_trials={args.trials}",
            *overrides,
        ],
    )
    app = OmegaConf.to_object(cfg)
    assert isinstance(app, AppConfig)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stsb", default="../shared/data/stsb")
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--out", default="results/benchmarks/search_minilm_sts.md")
    parser.add_argument("--work", default="results/benchmarks/search_minilm_sts_runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work)

    samplers = {
        "nsga2": ["search.rescore=10"],
        "random": ["search=random", "search.rescore=0"],
        "tpe": ["search=tpe", "search.rescore=0"],
    }
    rows, outcomes = [], {}
    for name, overrides in samplers.items():
        run_dir = work / name
        if run_dir.exists():
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        app = config(args, *overrides)
        start = time.perf_counter()
        outcome = run_search(app, run_dir)
        elapsed = time.perf_counter() - start
        write_report(outcome)
        trials = len(outcome.study.trials)
        rows.append({"sampler": name, "trials": trials, "hv_ratio": outcome.hv_ratio, "seconds": elapsed})
        outcomes[name] = outcome
        log.info("%s: %s", name, rows[-1])

    # Trials per second of the study alone, default journal storage, in a fresh run directory.
    app = config(args, "search.rescore=0", "search.exact_seeds=0", "search.uniform_baselines=[]")
    speed_dir = work / "speed"
    subprocess.run(["rm", "-rf", str(speed_dir)], check=True)
    speed = run_search(app, speed_dir)
    trials_per_s = args.trials / speed.extras["study_seconds"]
    rows.append(
        {
            "sampler": "nsga2, no exact seeds",
            "trials": len(speed.study.trials),
            "hv_ratio": speed.hv_ratio,
            "seconds": float("nan"),
        }
    )

    # The front re-scored on dev, and hwprune-apply on its plans.
    pareto = pd.read_csv(work / "nsga2" / "pareto.csv")
    applied = []
    # The non-dominated front plans, and the uniform baselines for comparison.
    to_apply = pareto[
        (pareto.kind == "uniform") | ((pareto.kind == "search") & ~pareto.dominated.astype(bool))
    ]
    for r in to_apply[to_apply.speedup > 1.0001].itertuples():
        task = compose(
            "config",
            [
                "task=sts",
                f"task.build.train_path={Path(args.stsb).resolve() / 'sts-train.csv'}",
                f"task.build.eval_path={Path(args.stsb).resolve() / 'sts-dev.csv'}",
            ],
        ).task
        cfg = apply_config(
            plan=str(work / "nsga2" / r.plan_path),
            out=str(work / "apply" / Path(r.plan_path).stem),
            task=task,
            workload={"batch_size": 32, "seq_len": 128},
            repeats=10,
            onnx=False,
        )
        result = run_apply(cfg)
        applied.append(
            {
                "plan": r.plan_path,
                "kind": r.kind,
                **{
                    k: result[k]
                    for k in (
                        "predicted_speedup",
                        "measured_speedup",
                        "latency_ms_dense",
                        "latency_ms_pruned",
                        "metric_dense",
                        "metric_pruned",
                    )
                },
            }
        )
        log.info("applied %s: %s", r.plan_path, applied[-1])

    # Wall time of the embedded default.
    t0 = time.perf_counter()
    subprocess.run(["hwprune-search", f"hydra.run.dir={work / 'default'}"], check=True, capture_output=True)
    default_wall = time.perf_counter() - t0
    write(args, rows, trials_per_s, pareto, applied, default_wall, outcomes["nsga2"])


def write(args, rows, trials_per_s, pareto, applied, default_wall, outcome) -> None:  # type: ignore[no-untyped-def]
    lines = [
        "# Search on all-MiniLM-L6-v2 / STS-B, cpu_local, batch 32 x 128",
        "",
        f"Command: `python benchmarks/search_minilm_sts.py --stsb {args.stsb} --trials {args.trials}`  ",
        f"Machine: {cost_models.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}.  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Latencies predicted by the `{outcome.cost_model.source}` "
        "model of cpu_local; measured ones were timed on this CPU.",
        "",
        "## 1. Samplers at equal trials: hypervolume of the proxy front",
        "",
        "Each sampler runs with the default seeding (dense model, uniform ratios, 10 exact-front points); "
        "`nsga2, no exact seeds` is the throughput run, seeded with the dense model only.",
        "",
        "| sampler | trials | hypervolume / exact DP front | run seconds (incl. saliency and re-scoring) |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['sampler']} | {r['trials']} | {r['hv_ratio']:.4f} | "
        + ("-" if r["seconds"] != r["seconds"] else f"{r['seconds']:.0f}")
        + " |"
        for r in rows
    ]
    lines += [
        "",
        f"Study throughput with the default journal storage: **{trials_per_s:.0f} trials/s**.",
        "",
        "## 2. NSGA-II front re-scored on STS-B dev (Spearman x 100), and uniform pruning",
        "",
        "| kind | label | predicted ms | predicted speedup | dev Spearman | dominated |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in pareto.sort_values("latency_ms").itertuples():
        lines.append(
            f"| {r.kind} | {r.label} | {r.latency_ms:.1f} | {r.speedup:.2f}x | {r.metric:.2f} | {r.dominated} |"
        )
    lines += [
        "",
        "## 3. hwprune-apply: measured on this CPU (median of 10, batch 32 x 128)",
        "",
        "| plan | predicted speedup | measured speedup | dense ms | pruned ms | dev Spearman dense -> pruned |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for a in applied:
        lines.append(
            f"| `{a['plan']}` | {a['predicted_speedup']:.2f}x | {a['measured_speedup']:.2f}x | "
            f"{a['latency_ms_dense']:.0f} | {a['latency_ms_pruned']:.0f} | {a['metric_dense']:.2f} -> {a['metric_pruned']:.2f} |"
        )
    good = [
        a for a in applied if a["measured_speedup"] >= 1.5 and a["metric_dense"] - a["metric_pruned"] <= 1.0
    ]
    lines += [
        "",
        "Goal (>= 1.5x measured speedup within 1 Spearman point of dense, no fine-tuning): "
        + (
            "**met** by " + ", ".join(f"`{a['plan']}`" for a in good)
            if good
            else "**not met** by any front plan"
        ),
        "",
        f"## 4. Embedded default (`hwprune-search`, no arguments): {default_wall:.0f} s wall time",
        "",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    (Path(args.work) / "applied.json").write_text(json.dumps(applied, indent=2))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
