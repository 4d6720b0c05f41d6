"""Precision per block as a search axis: MiniLM on STS-B, cpu_local at batch 32 x 128 on this CPU.

Two searches of the same model, task and device: widths only (`search.precisions=[fp32]`) and
widths with each block's precision (the default on cpu_local: fp32 and bf16). Plans are chosen on a
validation part of STS-B train (1000 pairs held out of the training file, never used to score units,
calibrate or recover; `task.build.validation_path`, so pareto.csv's `metric_validation`), and
reported on STS-B dev by `hwprune-apply`, which measures each chosen plan
against the dense fp32 model in interleaved rounds on this CPU. Goals on the validation metric: the
fastest plan (predicted) within 1.0 and within 0.5 Spearman point of dense; the uniform-bf16 dense
model (`dense bf16`) is applied beside them.

Usage:
    python benchmarks/precision_axis_minilm_sts.py --stsb ../shared/data/stsb --out results/benchmarks/precision_axis_minilm_sts.md
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from _command import command_line
from omegaconf import OmegaConf

from hwprune import cost_models
from hwprune.cost_models.profilers import allocator_state
from hwprune.search import apply_config, compose, run_apply, run_config, write_report
from hwprune.search.config import AppConfig

log = logging.getLogger("precision_axis_minilm_sts")

VALIDATION = 1000  # training pairs held out to choose plans on
GOALS = (1.0, 0.5)  # Spearman points below dense on validation


def split_train(stsb: Path, work: Path, seed: int = 0) -> tuple[Path, Path]:
    """sts-train.csv as a training part and a validation part (lines shuffled with `seed`)."""
    lines = (stsb / "sts-train.csv").read_text().splitlines(keepends=True)
    random.Random(seed).shuffle(lines)
    train, val = work / "train_part.csv", work / "validation.csv"
    train.write_text("".join(lines[VALIDATION:]))
    val.write_text("".join(lines[:VALIDATION]))
    return train, val


def task_overrides(train: Path, validation: Path, evaluation: Path) -> list[str]:
    """The STS task: trained on `train`, plans chosen on `validation`, reported on `evaluation`."""
    return [
        "task=sts",
        f"task.build.train_path={train}",
        f"task.build.validation_path={validation}",
        f"task.build.eval_path={evaluation}",
    ]


def search_config(task: list[str], args: argparse.Namespace, *overrides: str) -> AppConfig:
    cfg = compose(
        "config",
        [
            *task,
            "hardware=cpu_local",
            "workload=b32_s128",
            f"search.n_trials={args.trials}",
            f"recovery={args.recovery}",
            f"saliency.cache_dir={args.work / 'cache'}",
            *overrides,
        ],
    )
    app = OmegaConf.to_object(cfg)
    assert isinstance(app, AppConfig)
    return app


def chosen(pareto: pd.DataFrame, points: float) -> pd.Series | None:
    """The fastest (predicted) non-degenerate plan whose validation metric is within `points` of dense."""
    dense = pareto[pareto.kind == "dense"].iloc[0]
    ok = pareto[
        (pareto.kind != "dense")
        & (pareto.degenerate.fillna("") == "")
        & (pareto.metric_validation >= dense.metric_validation - points)
    ]
    return None if ok.empty else ok.sort_values("speedup").iloc[-1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stsb", default="../shared/data/stsb")
    parser.add_argument("--out", default="results/benchmarks/precision_axis_minilm_sts.md")
    parser.add_argument("--work", default="/tmp/hwprune_precision_axis")
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--recovery", default="reconstruct")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.work = Path(args.work).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    stsb = Path(args.stsb).resolve()
    train, val = split_train(stsb, args.work)
    dev = stsb / "sts-dev.csv"
    task_args = task_overrides(train, val, dev)

    runs = {"widths only": ["search.precisions=[fp32]"], "widths and precision": []}
    rows, seconds = [], {}
    for name, overrides in runs.items():
        run_dir = args.work / name.replace(" ", "_")
        started = time.perf_counter()
        outcome = run_config(search_config(task_args, args, *overrides), run_dir)
        pareto = write_report(outcome)
        seconds[name] = time.perf_counter() - started
        picks = [(f"within {g} of dense (validation)", chosen(pareto, g)) for g in GOALS]
        if name == "widths and precision":
            picks.append(("uniform bf16", pareto[pareto.label == "dense bf16"].iloc[0]))
        dense_val = float(pareto[pareto.kind == "dense"].metric_validation.iloc[0])
        task = compose("config", task_args).task  # the search's task: the same data for recovery
        for goal, row in picks:
            if row is None:
                rows.append({"search": name, "goal": goal, "plan": "none meets it"})
                continue
            out = args.work / "apply" / f"{name.replace(' ', '_')}_{Path(row.plan_path).stem}"
            result = run_apply(
                apply_config(
                    plan=str(run_dir / row.plan_path),
                    out=str(out),
                    task=task,
                    workload={"batch_size": 32, "seq_len": 128, "dtype": "fp32"},
                    repeats=args.repeats,
                    onnx=False,
                    overwrite=True,
                )
            )
            rows.append(
                {
                    "search": name,
                    "goal": goal,
                    "plan": row.label,
                    "precisions": row.precisions if isinstance(row.precisions, str) else "",
                    "predicted": row.speedup,
                    "val": row.metric_validation,
                    "val_dense": dense_val,
                    "dev": result["metric_pruned"],
                    "dev_dense": result["metric_dense"],
                    "measured": result["measured_speedup"],
                    "same_precision": result.get("measured_speedup_same_precision"),
                    "units": row.units,
                    "mlp": row.mlp,
                    "allocator": result["workload"].get("allocator"),
                }
            )
            (args.work / "applied.json").write_text(json.dumps(rows, indent=2, default=str))

    command = command_line()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = (
        f"{cost_models.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"allocator for timing {allocator_state()}"
    )
    lines = [
        "# Precision per block as a search axis: MiniLM on STS-B, cpu_local batch 32 x 128",
        "",
        f"Command: `{command}`  ",
        f"Date: {date}. Machine: {machine}. Searches: {args.trials} trials each, recovery `{args.recovery}`, "
        f"plans chosen on {VALIDATION} STS-B train pairs held out (validation), reported on STS-B dev by "
        f"`hwprune-apply` (measured speedup over the dense fp32 model in {args.repeats} interleaved rounds "
        "on this CPU; `same precision`: over the dense model with every layer at the plan's precisions). "
        "Search wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()) + ". "
        f"`{Path(args.out).with_suffix('.json').name}` holds the rows with each plan's widths (heads, MLP neurons per layer).",
        "",
        "| search | goal | plan | precisions | predicted | validation (dense) | dev (dense) | measured | same precision |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "dev" not in r:
            lines.append(f"| {r['search']} | {r['goal']} | {r['plan']} | | | | | | |")
            continue
        same = "" if r["same_precision"] is None else f"{r['same_precision']:.2f}x"
        lines.append(
            f"| {r['search']} | {r['goal']} | {r['plan']} | {r['precisions']} | {r['predicted']:.2f}x | "
            f"{r['val']:.2f} ({r['val_dense']:.2f}) | {r['dev']:.2f} ({r['dev_dense']:.2f}) | "
            f"{r['measured']:.2f}x | {same} |"
        )
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    Path(args.out).write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
