"""Depth pruning benchmark: MiniLM on STS-B, searched with and without `search.depth`.

For each target (hardware and workload), `hwprune-search` runs twice with the same saliency, cost model, trials and
recovery (task=sts: calibration on train, metric on dev), once keeping every layer (an empty layer
stays as a block) and once with depth pruning (a layer left without units is dropped and scored by
its measured loss). For cpu_local targets, the non-dominated re-scored plans of both are then pruned
and timed on this CPU in one interleaved run with the dense model, so that predicted and measured
speedups compare; a depth plan is also timed with its dropped layers kept as empty blocks, which is
what dropping saves beyond the units. Other targets are predicted only (no such device here).
A run directory that already holds a finished run is read back instead of searched again.

Usage:
    python benchmarks/depth_minilm_sts.py --stsb ../shared/data/stsb \
        --targets cpu_local:b1_s128 cpu_local:b32_s128 gpu_h100:b1_s128
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _command import command_line
from omegaconf import OmegaConf

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import interleaved
from hwprune.search import compose, model_cost_model, model_timer, run_config, write_report
from hwprune.search.config import AppConfig

log = logging.getLogger("depth_minilm_sts")


def config(args: argparse.Namespace, hardware: str, workload: str, depth: bool) -> AppConfig:
    cfg = compose(
        "config",
        [
            "task=sts",
            f"task.build.train_path={Path(args.stsb).resolve() / 'sts-train.csv'}",
            f"task.build.eval_path={Path(args.stsb).resolve() / 'sts-dev.csv'}",
            f"hardware={hardware}",
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


def cost_model_of(cfg: AppConfig, model: torch.nn.Module) -> cost_models.CostModel:
    """The cost model `hwprune-search` builds for this configuration and model."""
    profile = cfg.hardware.validate()
    if profile.measure_peaks:
        profile = cost_models.local_profile(profile)
    return model_cost_model(profile, model, cfg.workload.build())


def predicted_speedup(cm: cost_models.CostModel, plan: prunable.PrunePlan, *, drops: bool) -> float:
    """Dense over predicted latency of `plan`, its dropped layers dropped or kept as empty blocks."""
    units = np.array([len(lp.heads) for lp in plan.layers])  # MiniLM: one head per attention unit
    mlp = np.array([len(lp.mlp) for lp in plan.layers])
    dropped = np.array([lp.drop and drops for lp in plan.layers])
    return cm.dense_ms() / float(cm.predict(units, mlp, dropped=dropped).latency_ms)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stsb", default="../shared/data/stsb")
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--rescore", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--targets", nargs="+", default=["cpu_local:b1_s128", "cpu_local:b32_s128"])
    parser.add_argument("--out", default="results/benchmarks/depth_minilm_sts.md")
    parser.add_argument("--work", default="results/benchmarks/depth_minilm_sts_runs")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read searches already finished under --work back instead of refusing them (the header says so)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    started = datetime.now(timezone.utc)
    rows, empties, sources = [], [], {}
    dense = prunable.load_model(prunable.MINILM, "BertModel")
    for target in args.targets:
        hardware, workload = target.split(":")
        plans: list[tuple[str, pd.Series, prunable.PrunePlan]] = []
        for depth in (False, True):
            name = f"{hardware}_{workload}_{'depth' if depth else 'widths'}"
            run_dir = Path(args.work) / name
            cfg = config(args, hardware, workload, depth)
            if (run_dir / "pareto.csv").is_file():
                if not args.reuse:
                    raise SystemExit(
                        f"{run_dir} holds a finished search: pass --reuse to read it back, or another --work"
                    )
                log.info("%s: reading the finished run back (--reuse)", run_dir)
                pareto = pd.read_csv(run_dir / "pareto.csv")
            else:
                outcome = run_config(cfg, run_dir)
                this_run = f"{hardware} {workload} search.depth={str(depth).lower()}"
                pareto = write_report(
                    outcome, command=f"`python {' '.join(sys.argv)}` (this run: {this_run})."
                )
            sources[target] = str(pareto.latency_source.iloc[0])
            keep = pareto[
                (pareto.kind == "uniform") | ((pareto.kind == "search") & ~pareto.dominated.astype(bool))
            ]
            for r in keep.itertuples():
                plans.append((name, pd.Series(r._asdict()), prunable.PrunePlan.load(run_dir / r.plan_path)))
            dense_row = pareto[pareto.kind == "dense"].iloc[0]
        timed = hardware == "cpu_local"
        times: list[float] = []
        if timed:  # plans that drop 1 and 2 middle layers and keep the rest dense: latency only
            structure = prunable.discover(dense)
            for drop in ({2}, {2, 3}):
                forced = prunable.PrunePlan.from_units(
                    structure,
                    prunable.model_ref(dense),
                    attention=[[] if i in drop else range(12) for i in range(6)],
                    mlp=[[] if i in drop else range(1536) for i in range(6)],
                    drop=[i in drop for i in range(6)],
                )
                label = f"layers {sorted(drop)} dropped, the rest dense (latency only)"
                plans.append((f"forced {len(drop)}", pd.Series({"plan_path": label}), forced))
        deep = [i for i, (_, _, plan) in enumerate(plans) if plan.dropped()]
        cm = cost_model_of(cfg, dense)
        if timed:
            # The dense model, every plan, and each depth plan with empty blocks in place of its drops.
            built = [prunable.pruned_copy(dense, plan, check_weights=False) for _, _, plan in plans]
            kept_empty = [
                prunable.pruned_copy(dense, without_drops(plans[i][2]), check_weights=False) for i in deep
            ]
            wl = cost_models.load_profile("cpu_local").resolve_workload(cfg.workload.build())
            reference = prunable.load_model(prunable.MINILM, "BertModel")
            timers = [model_timer(m, wl, "cpu") for m in [reference, *built, *kept_empty]]
            times = [statistics.median(t) for t in interleaved(timers, rounds=args.rounds, warmup=2)]
            del built, kept_empty, reference
        for i, (name, r, _) in enumerate(plans):
            if name.startswith("forced"):
                continue
            rows.append(
                {
                    "target": target,
                    "search": "depth" if name.endswith("depth") else "widths only",
                    "kind": r.kind,
                    "plan": f"{name}/{r.plan_path}",
                    "layers": int(r.layers),
                    "predicted speedup": float(dense_row.latency_ms / r.latency_ms),
                    "measured speedup": times[0] / times[1 + i] if timed else float("nan"),
                    "dev Spearman": float(r.metric),
                    "before recovery": float(r.metric_unrecovered),
                }
            )
        for j, i in enumerate(deep if timed else []):
            name, r, plan = plans[i]
            empties.append(
                {
                    "target": target,
                    "plan": r.plan_path if name.startswith("forced") else f"`{name}/{r.plan_path}`",
                    "dropped layers": len(plan.dropped()),
                    "predicted dropped": predicted_speedup(cm, plan, drops=True),
                    "measured dropped": times[0] / times[1 + i],
                    "predicted kept empty": predicted_speedup(cm, plan, drops=False),
                    "measured kept empty": times[0] / times[1 + len(plans) + j],
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
        f"Command: `{command_line()}`  ",
        f"Machine: {cost_models.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}.  ",
        f"Date: {started:%Y-%m-%d %H:%M} UTC. Predicted latencies come from the "
        + ", ".join(f"`{s}` model for {t}" for t, s in sources.items())
        + "; measured speedups (cpu_local targets only) are medians of "
        f"{args.rounds} interleaved rounds (dense model and every plan) on this CPU.",
        "",
        "Both searches: NViT saliency, 1000 trials of the default sampler, re-scoring up to "
        f"{args.rescore} front points with predicted speedup in [1.3, 4.0], `reconstruct` recovery; "
        "`depth` adds `search.depth=true`. Rows are the non-dominated re-scored plans and the uniform baselines.",
        "",
        "## Re-scored plans: speedup and STS-B dev Spearman x 100",
        "",
        "| target | search | kind | layers | predicted speedup | measured speedup | dev Spearman | before recovery | plan |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows.to_dict("records"):
        lines.append(
            f"| {r['target']} | {r['search']} | {r['kind']} | {r['layers']}/6 | {r['predicted speedup']:.2f}x | "
            + (f"{r['measured speedup']:.2f}x" if r["measured speedup"] == r["measured speedup"] else "n/a")
            + f" | {r['dev Spearman']:.2f} | {r['before recovery']:.2f} | `{r['plan']}` |"
        )
    lines += [
        "",
        "## What dropping saves beyond the units: depth plans against the same widths kept as empty blocks",
        "",
        "Each plan that drops layers (the searches' and two forced ones: middle layers dropped, the rest dense) "
        "timed as it is and with its dropped layers kept as empty blocks (norms and residual additions left), "
        "in the same interleaved run; predicted speedups from the same cost model with and without the drops.",
        "",
        "| target | plan | dropped layers | predicted speedup, dropped | measured, dropped | predicted, kept empty | measured, kept empty |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in empties.to_dict("records"):
        lines.append(
            f"| {r['target']} | {r['plan']} | {r['dropped layers']} | {r['predicted dropped']:.3f}x | "
            f"{r['measured dropped']:.3f}x | {r['predicted kept empty']:.3f}x | {r['measured kept empty']:.3f}x |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
