"""Recovery after pruning: the re-scored front with none, reconstruct and distill, and applied plans.

On the bundled MiniLM and STS-B (train for saliency, recovery and distillation, 15 % of it held out
as the validation part plans are chosen on; dev for the reported metric), cpu_local at batch 32 x 128:

1. `run_config` three times with the same seed (so the same Optuna front) and recovery `none`,
   `reconstruct` and `distill`: every re-scored plan's dev Spearman and recovery seconds.
2. `hwprune-apply` (`run_apply`) on the fastest distilled plans within 0.5 and 1.5 points of the
   dense model on validation: measured speedup on this CPU (interleaved rounds), the recipe run
   again, dev Spearman reported.
3. Saliency after recovery: the same per-layer widths with units chosen by nvit, magnitude or
   random, each pruned, reconstructed and distilled.
4. The ViT digits recipe (classification accuracy) with the three recoveries.
5. The embedded default (`hwprune-search`, default recovery) end to end, wall time.

Usage:
    python benchmarks/recovery_minilm_sts.py --stsb ../shared/data/stsb --trials 1000 --rescore 8 --window 1.5 4.5
Output: results/benchmarks/recovery_minilm_sts.md (and the runs under recovery_minilm_sts_runs/).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from _command import command_line

from hwprune import hessian, prunable
from hwprune.search import (
    SaliencyProxy,
    Widths,
    apply_config,
    compose,
    run_apply,
    run_config,
    to_object,
    write_report,
)
from hwprune.search.config import AppConfig, build_task
from hwprune.search.recovery import Distill, Reconstruct

log = logging.getLogger("recovery_benchmark")

RECOVERIES = ("none", "reconstruct", "distill")


def search(overrides: list[str], run_dir: Path) -> pd.DataFrame:
    """One search run with its re-scored front; the pareto.csv frame."""
    app = to_object(compose("config", overrides))
    assert isinstance(app, AppConfig)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    outcome = run_config(app, run_dir)
    write_report(outcome, command=f"`python {' '.join(sys.argv)}` (this run: `{' '.join(overrides)}`).")
    log.info("%s: %.0f s", run_dir.name, time.perf_counter() - started)
    return pd.read_csv(run_dir / "pareto.csv")


def front_table(fronts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per re-scored plan: predicted speedup and the metric after each recovery."""
    base = fronts["none"][["label", "kind", "speedup", "metric"]].rename(columns={"metric": "none"})
    for name in RECOVERIES[1:]:
        frame = fronts[name].set_index("label")
        base[name] = base.label.map(frame.metric)
        base[f"{name} s"] = base.label.map(frame.recovery_seconds)
    return base.sort_values("speedup").reset_index(drop=True)


def best_within(front: pd.DataFrame, points: float) -> pd.Series | None:
    """The fastest searched plan within `points` of the dense model on the validation part of train
    (`metric_validation`): chosen without looking at dev, which only reports it."""
    dense = float(front[front.kind == "dense"].metric_validation.iloc[0])
    ok = front[(front.kind == "search") & (front.metric_validation >= dense - points)]
    return ok.sort_values("speedup").iloc[-1] if len(ok) else None


def saliency_after_recovery(app: AppConfig, plan_paths: list[Path], steps: int) -> list[dict[str, Any]]:
    """Same widths, units chosen by nvit / magnitude / random; each reconstructed then distilled."""

    dense = prunable.load_model(app.model.source, app.model.class_name)
    structure = prunable.discover(dense)
    task = build_task(app.task, app.model.source)
    task.prepare(dense)
    calibration = task.calibration(dense)
    data = task.recovery_data(samples=app.recovery.samples, seed=0)
    methods = {
        "nvit": hessian.NViTSaliency(),
        "magnitude": hessian.MagnitudeSaliency(),
        "random": hessian.RandomSaliency(seed=0),
    }
    ref = prunable.model_ref(dense, source=app.model.source)
    rows = []
    for path in plan_paths:
        reference = prunable.PrunePlan.load(path)
        kept = reference.kept_units(structure)
        units = np.array([len(u) for u, _ in kept])
        mlp = np.array([len(m) for _, m in kept])
        for name, method in methods.items():
            scores = hessian.cached_score(method, dense, calibration, cache_dir=app.saliency.cache_dir)
            plan = SaliencyProxy(scores, structure).plan(Widths(units, mlp), ref)
            pruned = prunable.apply_plan(copy.deepcopy(dense), plan, check_weights=False)
            row = {"widths of": path.stem, "units chosen by": name, "none": task.evaluate(pruned)}
            Reconstruct().recover(pruned, dense, data)
            row["reconstruct"] = task.evaluate(pruned)
            Distill(steps=steps, lr=3e-4).recover(pruned, dense, data)
            row[f"reconstruct + distill ({steps} steps)"] = task.evaluate(pruned)
            rows.append(row)
            log.info("saliency after recovery: %s", row)
    return rows


def markdown(frame: pd.DataFrame) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return "" if np.isnan(v) else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stsb", required=True, help="directory with sts-train.csv and sts-dev.csv")
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--rescore", type=int, default=8)
    parser.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=(1.5, 4.5),
        metavar=("MIN", "MAX"),
        help="predicted speedups the re-scored front points are spread over",
    )
    parser.add_argument("--distill-steps", type=int, default=400)
    parser.add_argument("--apply-repeats", type=int, default=10)
    parser.add_argument(
        "--saliency-steps", type=int, default=200, help="distill steps in the saliency comparison"
    )
    parser.add_argument("--work", default="results/benchmarks/recovery_minilm_sts_runs")
    parser.add_argument("--out", default="results/benchmarks/recovery_minilm_sts.md")
    parser.add_argument(
        "--reuse",
        nargs="*",
        default=[],
        choices=[*RECOVERIES, "apply", "saliency", "vit", "default"],
        help="sections to read back from an earlier run's work directory instead of running them",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("hwprune.prunable").setLevel(logging.WARNING)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    stsb = Path(args.stsb)
    common = [
        "task=sts",
        f"task.build.train_path={stsb / 'sts-train.csv'}",
        f"task.build.eval_path={stsb / 'sts-dev.csv'}",
        "hardware=cpu_local",
        "workload=b32_s128",
        f"search.n_trials={args.trials}",
        f"search.rescore={args.rescore}",
        f"search.rescore_min_speedup={args.window[0]}",
        f"search.rescore_max_speedup={args.window[1]}",
        "search.uniform_baselines=[0.5]",
    ]
    recovery_args = {
        "none": ["recovery=none"],
        "reconstruct": ["recovery=reconstruct"],
        "distill": [
            "recovery=distill",
            f"recovery.method.steps={args.distill_steps}",
            "recovery.method.lr=3e-4",
        ],
    }
    fronts = {
        name: pd.read_csv(work / name / "pareto.csv")
        if name in args.reuse
        else search([*common, *recovery_args[name]], work / name)
        for name in RECOVERIES
    }
    table = front_table(fronts)
    dense = float(table[table.kind == "dense"].none.iloc[0])

    applied = []
    distilled = fronts["distill"]
    for points in (0.5, 1.5) if "apply" not in args.reuse else ():
        pick = best_within(distilled, points)
        if pick is None:
            log.info("no distilled plan within %.1f points", points)
            continue
        plan = work / "distill" / pick.plan_path
        out = work / f"applied_{pick.label.replace(' ', '_')}"
        app = to_object(compose("config", common))
        result = run_apply(
            apply_config(
                plan=plan, out=out, task=app.task, repeats=args.apply_repeats, overwrite=True, onnx=False
            )  # type: ignore[attr-defined]
        )
        applied.append(
            {
                "goal": f"within {points} points",
                "plan": pick.label,
                "predicted speedup": result["predicted_speedup"],
                "measured speedup": result["measured_speedup"],
                "dense ms": result["latency_ms_dense"],
                "pruned ms": result["latency_ms_pruned"],
                "dev Spearman before recovery": result["metric_unrecovered"],
                "dev Spearman after": result["metric_pruned"],
                "dense": result["metric_dense"],
                "recovery s": result["recovery_seconds"],
            }
        )
        (work / "applied.json").write_text(json.dumps(applied, indent=2))
    if "apply" in args.reuse:
        applied = json.loads((work / "applied.json").read_text())

    saliency_rows: list[dict[str, Any]] = []
    if "saliency" in args.reuse:
        saliency_rows = json.loads((work / "saliency.json").read_text())
    else:
        app = to_object(compose("config", common))
        assert isinstance(app, AppConfig)
        picks = [work / "none" / "plans" / "uniform_50pct.yaml"]
        pick = best_within(distilled, 0.5)
        if pick is not None:
            picks.append(work / "distill" / pick.plan_path)
        saliency_rows = saliency_after_recovery(app, picks, args.saliency_steps)
        (work / "saliency.json").write_text(json.dumps(saliency_rows, indent=2))

    from hwprune.search.tasks import train_vit_digits

    model_dir = work / "vit_digits_model"
    if not (model_dir / "config.json").is_file():
        train_vit_digits(model_dir)
    vit_common = [
        "model=vit_digits",
        f"model.source={model_dir}",
        "task=classification",
        "hardware=cpu_local",
        "workload.seq_len=16",
        f"search.n_trials={args.trials}",
        f"search.rescore={args.rescore}",
    ]
    vit_args = {
        "none": ["recovery=none"],
        "reconstruct": ["recovery=reconstruct"],
        "distill": ["recovery=distill", "recovery.method.steps=300", "recovery.method.lr=1e-3"],
    }
    vit_fronts = {
        n: pd.read_csv(work / f"vit_{n}" / "pareto.csv")
        if "vit" in args.reuse
        else search([*vit_common, *vit_args[n]], work / f"vit_{n}")
        for n in RECOVERIES
    }
    vit_table = front_table(vit_fronts)

    run = work / "default_run"
    if "default" in args.reuse:
        default_seconds = json.loads((work / "default.json").read_text())["seconds"]
    else:
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run(["hwprune-search", f"hydra.run.dir={run}"], check=True, capture_output=True)
        default_seconds = time.perf_counter() - t0
        (work / "default.json").write_text(json.dumps({"seconds": default_seconds}))
    default_front = pd.read_csv(run / "pareto.csv")

    lines = [
        "# Recovery after pruning (measured)",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {prunable_cpu()}; date {started:%Y-%m-%d %H:%M} UTC.  ",
        "MiniLM (bundled all-MiniLM-L6-v2) on STS-B: saliency, reconstruction and distillation use the "
        "train file only, the metric is dev Spearman x 100. Latency: cpu_local at batch 32 x 128 "
        f"(source `{fronts['none'].latency_source.iloc[0]}`). Recovery seconds are wall time on this machine.",
        "",
        f"## Re-scored front: dev Spearman by recovery (dense {dense:.2f})",
        "",
        f"`reconstruct`: per-unit scales and bias compensation (128 samples); `distill`: {args.distill_steps} "
        "steps of layer-wise + pooled-embedding distillation, AdamW 3e-4, 6000 unlabelled train pairs.",
        "",
        markdown(table),
        "",
        "## Applied with hwprune-apply (measured on this CPU, plan's workload)",
        "",
        markdown(pd.DataFrame(applied)) if applied else "No distilled plan met either goal.",
    ]
    if saliency_rows:
        lines += [
            "",
            "## Does the saliency still matter after recovery? (dev Spearman)",
            "",
            markdown(pd.DataFrame(saliency_rows)),
        ]
    lines += [
        "",
        "## ViT digits (accuracy x 100 on the held-out split)",
        "",
        "distill: 300 steps, AdamW 1e-3, logit KL + hidden states on the training split.",
        "",
        markdown(vit_table),
    ]
    rec = default_front[default_front.kind != "dense"]
    lines += [
        "",
        "## The embedded default (`hwprune-search`, recovery `reconstruct`)",
        "",
        f"Wall time {default_seconds:.0f} s end to end (install excluded); recovery "
        f"{rec.recovery_seconds.sum():.0f} s over {len(rec)} plans; fidelity after recovery minus before: "
        f"median {float((rec.metric - rec.metric_unrecovered).median()):+.2f}, "
        f"min {float((rec.metric - rec.metric_unrecovered).min()):+.2f}.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


def prunable_cpu() -> str:
    from hwprune import cost_models

    return f"{cost_models.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


if __name__ == "__main__":
    main()
