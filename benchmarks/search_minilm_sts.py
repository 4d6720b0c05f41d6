"""Search benchmark: MiniLM on STS-B (train: calibration, dev: metric), cpu_local, batch 32 x 128.

1. The default sampler (Pareto local search) against NSGA-II, TPE and random search at equal
   trials, seeded and cold: hypervolume of each proxy front as a fraction of the exact DP front,
   trials per second with the default (journal) storage.
2. The default and the random-search fronts re-scored on STS-B dev, against uniform pruning with
   the same saliency.
3. `hwprune-apply` on the front's plans: measured CPU speedup against predicted, and the dev metric.
4. Wall time of the embedded default run (`hwprune-search` with no arguments).

Usage:
    python benchmarks/search_minilm_sts.py --stsb ../shared/data/stsb --out results/benchmarks/search_minilm_sts.md
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from _command import command_line
from omegaconf import OmegaConf

from hwprune import cost_models
from hwprune.search import apply_config, compose, run_apply, run_config, write_report
from hwprune.search.config import AppConfig

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

    # Every sampler at equal trials, with the default seeding and cold (dense + uniform seeds only);
    # the default and random search also re-score their fronts on dev.
    runs = {
        "pls (default)": ["search.rescore=10"],
        "pls (default), seed 1": ["search.rescore=0", "search.seed=1"],
        "pls (default), seed 2": ["search.rescore=0", "search.seed=2"],
        "random": ["search=random", "search.rescore=10"],
        "nsga2": ["search=nsga2", "search.rescore=0"],
        "tpe": ["search=tpe", "search.rescore=0"],
    }
    for name, sampler in (
        ("pls (default)", []),
        ("random", ["search=random"]),
        ("nsga2", ["search=nsga2"]),
        ("tpe", ["search=tpe"]),
    ):
        runs[f"{name}, no exact seeds"] = [*sampler, "search.rescore=0", "search.exact_seeds=0"]
    rows, outcomes = [], {}
    for name, overrides in runs.items():
        run_dir = work / name.replace(" (default)", "").replace(", ", "_").replace(" ", "_")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        app = config(args, *overrides)
        start = time.perf_counter()
        outcome = run_config(app, run_dir)
        elapsed = time.perf_counter() - start
        write_report(outcome, command=f"`python {' '.join(sys.argv)}` (this run: `{' '.join(overrides)}`).")
        rows.append(
            {
                "sampler": name,
                "trials": len(outcome.study.trials),
                "hv_ratio": outcome.hv_ratio,
                "trials_per_s": len(outcome.study.trials) / outcome.extras["study_seconds"],
                "seconds": elapsed,
            }
        )
        outcomes[name] = (outcome, run_dir)
        log.info("%s: %s", name, rows[-1])

    # The front re-scored on dev, and hwprune-apply on its plans.
    default_dir = outcomes["pls (default)"][1]
    pareto = pd.read_csv(default_dir / "pareto.csv")
    random_front = pd.read_csv(outcomes["random"][1] / "pareto.csv")
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
            plan=str(default_dir / r.plan_path),
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
    write(args, rows, pareto, random_front, applied, default_wall, outcomes["pls (default)"][0])


def best_within(front: pd.DataFrame, speedup: float) -> str:
    """Best dev metric among the front's points predicted at least `speedup` x faster than dense."""
    fast = front[front.speedup >= speedup]
    return "-" if fast.empty else f"{fast.metric.max():.2f}"


def write(args, rows, pareto, random_front, applied, default_wall, outcome) -> None:  # type: ignore[no-untyped-def]
    lines = [
        "# Search on all-MiniLM-L6-v2 / STS-B, cpu_local, batch 32 x 128",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {cost_models.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}.  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Latencies predicted by the `{outcome.cost_model.source}` "
        "model of cpu_local; measured ones were timed on this CPU.",
        "",
        "## 1. Samplers at equal trials: hypervolume of the proxy front",
        "",
        "Default seeding: the dense model, uniform ratios (25/50/75%) and 10 exact-front points picked "
        "greedily by hypervolume. `no exact seeds`: the dense model and uniform ratios only. "
        "Trials/s: the study alone with the default journal storage in the run directory.",
        "",
        "| sampler | trials | hypervolume / exact DP front | trials/s | run seconds (incl. saliency and re-scoring) |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['sampler']} | {r['trials']} | {r['hv_ratio']:.4f} | {r['trials_per_s']:.0f} | {r['seconds']:.0f} |"
        for r in rows
    ]
    lines += [
        "",
        "## 2. Fronts re-scored on STS-B dev (Spearman x 100): default search, random search, uniform",
        "",
        "Both searches ran 1000 trials with the same saliency, cost model and seeding; `dominated` is "
        "within each search's own re-scored front (uniform rows are baselines).",
        "",
        "| search | kind | label | predicted ms | predicted speedup | dev Spearman | dominated |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for sampler, front in (("pls (default)", pareto), ("random", random_front)):
        for r in front.sort_values("latency_ms").itertuples():
            if sampler == "random" and r.kind != "search":
                continue  # dense and uniform rows are the same in both runs
            lines.append(
                f"| {sampler} | {r.kind} | {r.label} | {r.latency_ms:.1f} | {r.speedup:.2f}x | "
                f"{r.metric:.2f} | {r.dominated} |"
            )
    uniform = pareto[pareto.kind == "uniform"]
    lines += [
        "",
        "Best dev Spearman among points predicted at least this much faster than dense:",
        "",
        "| predicted speedup >= | pls (default) | random | uniform |",
        "| --- | --- | --- | --- |",
    ]
    for x in (1.5, 2.0, 3.0):
        lines.append(
            f"| {x:.1f}x | {best_within(pareto[pareto.kind == 'search'], x)} | "
            f"{best_within(random_front[random_front.kind == 'search'], x)} | {best_within(uniform, x)} |"
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
