"""Depth pruning benchmark: MiniLM on STS-B, searched with and without `search.depth`.

For each workload, `hwprune-search` runs twice with the same saliency, cost model, trials and
recovery (task=sts: calibration on train, metric on dev), once keeping every layer (an empty layer
stays as a block) and once with depth pruning (a layer left without units is dropped and scored by
its measured loss). The non-dominated re-scored plans of both are then pruned and timed on this CPU
in one interleaved run with the dense model, so that predicted and measured speedups compare; a
depth plan is also timed with its dropped layers kept as empty blocks, which is what dropping saves
beyond the units.

Usage:
    python benchmarks/depth_minilm_sts.py --stsb ../shared/data/stsb --out results/benchmarks/depth_minilm_sts.md
"""

from __future__ import annotations

import argparse
import logging
import statistics
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import interleaved
from hwprune.search import compose
from hwprune.search._blocks import model_timer
from hwprune.search._report import write_report
from hwprune.search._run import run_search
from hwprune.search.config import AppConfig

log = logging.getLogger("depth_minilm_sts")


def config(args: argparse.Namespace, workload: str, depth: bool) -> AppConfig:
    cfg = compose(
        "config",
        [
            "task=sts",
            f"task.build.train_path={Path(args.stsb).resolve() / 'sts-train.csv'}",
            f"task.build.eval_path={Path(args.stsb).resolve() / 'sts-dev.csv'}",
            "hardware=cpu_local",
            f"workload={workload}",
            f"search.n_trials={args.trials}",
            f"search.rescore={args.rescore}",
            "search.rescore_min_speedup=1.3",
            "search.rescore_max_speedup=4.0",
            f"search.depth={str(depth).lower()}",
        ],
    )
    app = OmegaConf.to_object(cfg)
    assert isinstance(app, AppConfig)
    return app


def without_drops(plan: prunable.PrunePlan) -> prunable.PrunePlan:
    """The same plan with its dropped layers kept as empty blocks."""
    return replace(plan, layers=tuple(replace(lp, drop=False) for lp in plan.layers))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stsb", default="../shared/data/stsb")
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--rescore", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--workloads", nargs="+", default=["b1_s128", "b32_s128"])
    parser.add_argument("--out", default="results/benchmarks/depth_minilm_sts.md")
    parser.add_argument("--work", default="results/benchmarks/depth_minilm_sts_runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    started = datetime.now(timezone.utc)
    rows, empties, sources = [], [], {}
    dense = prunable.load_model(prunable.MINILM, "BertModel")
    for workload in args.workloads:
        plans: list[tuple[str, pd.Series, prunable.PrunePlan]] = []
        for depth in (False, True):
            name = f"{workload}_{'depth' if depth else 'widths'}"
            run_dir = Path(args.work) / name
            if run_dir.exists():
                raise SystemExit(f"{run_dir} exists: move it away (runs are never overwritten)")
            outcome = run_search(config(args, workload, depth), run_dir)
            pareto = write_report(outcome)
            sources[workload] = outcome.cost_model.source
            keep = pareto[
                (pareto.kind == "dense")
                | ((pareto.kind != "dense") & ~pareto.dominated.fillna(False).astype(bool))
            ]
            for r in keep[keep.kind != "dense"].itertuples():
                plans.append((name, pd.Series(r._asdict()), prunable.PrunePlan.load(run_dir / r.plan_path)))
            dense_row = pareto[pareto.kind == "dense"].iloc[0]
        # Time the dense model, every plan, and each depth plan with empty blocks in place of drops.
        built = [prunable.pruned_copy(dense, plan, check_weights=False) for _, _, plan in plans]
        deep = [i for i, (_, _, plan) in enumerate(plans) if plan.dropped()]
        kept_empty = [
            prunable.pruned_copy(dense, without_drops(plans[i][2]), check_weights=False) for i in deep
        ]
        wl = cost_models.load_profile("cpu_local").resolve_workload(
            config(args, workload, False).workload.build()
        )
        reference = prunable.load_model(prunable.MINILM, "BertModel")
        timers = [model_timer(m, wl, "cpu") for m in [reference, *built, *kept_empty]]
        times = [statistics.median(t) for t in interleaved(timers, rounds=args.rounds, warmup=2)]
        dense_ms = times[0]
        for (name, r, _), ms in zip(plans, times[1 : 1 + len(built)], strict=True):
            rows.append(
                {
                    "workload": workload,
                    "search": "depth" if name.endswith("depth") else "widths only",
                    "kind": r.kind,
                    "plan": f"{name}/{r.plan_path}",
                    "layers": int(r.layers),
                    "predicted speedup": float(dense_row.latency_ms / r.latency_ms),
                    "measured speedup": dense_ms / ms,
                    "dev Spearman": float(r.metric),
                    "before recovery": float(r.metric_unrecovered),
                }
            )
        for i, ms in zip(deep, times[1 + len(built) :], strict=True):
            name, r, plan = plans[i]
            empties.append(
                {
                    "workload": workload,
                    "plan": f"{name}/{r.plan_path}",
                    "dropped layers": len(plan.dropped()),
                    "dropped ms": times[1 + i],
                    "kept empty ms": ms,
                    "dense ms": dense_ms,
                }
            )
    write_markdown(args, started, pd.DataFrame(rows), pd.DataFrame(empties), sources)


def write_markdown(
    args: argparse.Namespace,
    started: datetime,
    rows: pd.DataFrame,
    empties: pd.DataFrame,
    sources: dict[str, str],
) -> None:
    lines = [
        "# Depth pruning on all-MiniLM-L6-v2 / STS-B, cpu_local",
        "",
        f"Command: `python benchmarks/depth_minilm_sts.py --stsb ../shared/data/stsb --trials {args.trials} "
        f"--rescore {args.rescore} --rounds {args.rounds} --workloads {' '.join(args.workloads)}`  ",
        f"Machine: {cost_models.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}.  ",
        f"Date: {started:%Y-%m-%d %H:%M} UTC. Predicted latencies come from the "
        + ", ".join(f"`{s}` model at {w}" for w, s in sources.items())
        + " of cpu_local; measured speedups are medians of "
        f"{args.rounds} interleaved rounds (dense model and every plan) on this CPU.",
        "",
        "Both searches: NViT saliency, 1000 trials of the default sampler, re-scoring up to "
        f"{args.rescore} front points with predicted speedup in [1.3, 4.0], `reconstruct` recovery; "
        "`depth` adds `search.depth=true`. Rows are the non-dominated re-scored plans and the uniform baselines.",
        "",
        "## Re-scored plans: speedup and STS-B dev Spearman x 100",
        "",
        "| workload | search | kind | layers | predicted speedup | measured speedup | dev Spearman | before recovery | plan |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows.to_dict("records"):
        lines.append(
            f"| {r['workload']} | {r['search']} | {r['kind']} | {r['layers']}/6 | {r['predicted speedup']:.2f}x | "
            f"{r['measured speedup']:.2f}x | {r['dev Spearman']:.2f} | {r['before recovery']:.2f} | `{r['plan']}` |"
        )
    lines += [
        "",
        "## What dropping saves beyond the units: depth plans timed with their dropped layers kept empty",
        "",
        "| workload | plan | dropped layers | dense ms | dropped ms | kept-empty ms | saving of dropping |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in empties.to_dict("records"):
        lines.append(
            f"| {r['workload']} | `{r['plan']}` | {r['dropped layers']} | {r['dense ms']:.2f} | {r['dropped ms']:.2f} | "
            f"{r['kept empty ms']:.2f} | {1 - r['dropped ms'] / r['kept empty ms']:.1%} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
