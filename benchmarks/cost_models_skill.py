"""Cost-model skill: every committed accuracy figure beside the null predictor's and the FLOPs proxy's.

Re-scores the committed measurements of `cost_models_check.py` and `cost_models_unseen.py` (their
CSVs; nothing is timed here, so any machine reproduces this file) as speedups over the dense model,
for each cost model and for two predictors that know nothing about the device: the null predictor
("pruning changes nothing", speedup 1) and the FLOPs proxy (dense FLOPs / configuration FLOPs).
Skill = 1 - MAPE / the null predictor's MAPE: a model is worth its claims only where it is positive.

Check CSVs: the table, calibrated and analytical models are rebuilt from the committed tables the
run used (their dates are checked against the run's report) and the peaks the run's report states.
Unseen CSVs made before 2026-12-07 store each configuration's predicted latency but not the
predicted dense latency a speedup needs, so their model rows are the run's own speedup figures (its
.md) and only the null and FLOPs rows are computed here; later runs store the dense prediction
(`<model>: dense`) and every row is computed.

Usage:
    python benchmarks/cost_models_skill.py --out results/benchmarks/cost_models_skill.md
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _command import command_line

from hwprune import cost_models

log = logging.getLogger("cost_models_skill")

AMD_25 = "results/tables/cpu_local/amd-epyc-family-25-model-17-stepping-1-x2"
# (measurements, hardware profile, tables of the machine that measured them, their name's dtype tag)
CHECKS = [
    ("results/benchmarks/cost_models_cpu_local.csv", "cpu_local", AMD_25, ""),
    ("results/benchmarks/cost_models_cpu_local_bf16.csv", "cpu_local", AMD_25, "_bf16"),
    ("results/benchmarks/cost_models_gpu_h200.csv", "gpu_h200", "results/tables/gpu_h200", ""),
]
UNSEEN = ["results/benchmarks/cost_models_unseen.csv", "results/benchmarks/cost_models_unseen_gpu_h200.csv"]
WORKLOADS = {"b1_s128": (1, 128), "b32_s128": (32, 128)}
HEADER = "| predictor | speedup MAPE % | within ±10 % | within ±5 % | Kendall tau | skill vs null |"


def report_line(md: Path, prefix: str) -> str:
    """The line of a run's report that starts with `prefix` (its machine, its date)."""
    for line in md.read_text().splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip().rstrip(" .")
    raise SystemExit(f"{md}: no line starting {prefix!r}")


def row(name: str, acc: cost_models.Accuracy) -> str:
    def fmt(v: float, spec: str) -> str:
        return "—" if np.isnan(v) else ("inf" if np.isinf(v) else format(v, spec))

    return (
        f"| {name} | {fmt(acc.mape, '.1f')} | {fmt(acc.within10, '.0f')} | {fmt(acc.within5, '.0f')} | "
        f"{fmt(acc.tau, '.3f')} | {fmt(acc.skill, '+.2f')} |"
    )


def verdict(scores: dict[str, cost_models.Accuracy]) -> str:
    models = {k: v for k, v in scores.items() if k != cost_models.NULL}
    beat = [f"{k} ({v.skill:+.2f})" for k, v in models.items() if v.beats_null]
    lose = [f"{k} ({v.skill:+.2f})" for k, v in models.items() if not v.beats_null]
    return f"Beat the null predictor: {', '.join(beat) or 'none'}. Do not: {', '.join(lose) or 'none'}."


def peaks_of_run(md: Path, profile: cost_models.HardwareProfile) -> cost_models.HardwareProfile:
    """The profile with the peaks the run's report states it measured (cpu_local measures its own)."""
    if not profile.measure_peaks:
        return profile
    found = re.search(r"Measured peaks \((\w+)\): ([\d.]+) GFLOP/s, memory ([\d.]+) GB/s", md.read_text())
    if found is None:
        raise SystemExit(f"{md}: states no measured peaks")
    dtype, gflops, gbs = found.group(1), float(found.group(2)), float(found.group(3))
    return replace(
        profile, peak_tflops={**profile.peak_tflops, dtype: gflops / 1e3}, memory_bandwidth_gbs=gbs
    )


def check_section(csv: Path, hardware: str, tables: Path, tag: str) -> list[str]:
    md = csv.with_suffix(".md")
    frame = pd.read_csv(csv)
    profile = peaks_of_run(md, cost_models.load_profile(hardware))
    lines = [
        f"## `{csv.name}`: tables profiled, then checked ({hardware}{tag.replace('_', ', ')})",
        "",
        f"Measured by `{report_line(md, 'Command:').split('`')[1]}` on {report_line(md, 'Machine:')}; "
        f"run {', '.join(sorted(set(frame.run_utc.astype(str))))} UTC. Models rebuilt from `{tables}` "
        + (
            "with the peaks that run measured."
            if profile.measure_peaks
            else "with the profile's datasheet peaks."
        ),
        "",
    ]
    text = md.read_text()
    for name, (batch, seq) in WORKLOADS.items():
        table = cost_models.LatencyTable.load(tables / f"minilm_b{batch}_s{seq}{tag}.csv")
        if str(table.meta.get("date")) not in text:  # the run reports its tables' dates
            raise SystemExit(
                f"{tables}: the {name} table ({table.meta.get('date')}) is not the one {md} used"
            )
        spec, workload = table.spec, table.workload
        models: dict[str, cost_models.CostModel] = {
            "table (additive fit, default)": cost_models.TableModel(table=table, workload=workload),
            "calibrated": cost_models.calibrate(profile, [table], spec=spec, workload=workload),
            "analytical": cost_models.AnalyticalModel(profile=profile, spec=spec, workload=workload),
        }
        for set_name, rows in frame[frame.workload == name].groupby("set", sort=False):
            units = rows[[f"units{i}" for i in range(spec.num_layers)]].to_numpy()
            mlp = rows[[f"mlp{i}" for i in range(spec.num_layers)]].to_numpy()
            measured = rows.dense_ms.to_numpy() / rows.measured_ms.to_numpy()
            predicted = {
                m: model.dense_ms() / model.predict(units, mlp).latency_ms for m, model in models.items()
            }
            predicted |= cost_models.reference_speedups(spec, workload, units, mlp)
            scores = score(predicted, measured)
            lines += section(f"{name}, `{set_name}` set", measured, scores)
    return lines


def section(title: str, measured: np.ndarray, scores: dict[str, cost_models.Accuracy]) -> list[str]:
    """One set's table: each predictor's figures, then which beat the null predictor."""
    return [
        f"### {title} ({len(measured)} configurations; measured speedups {measured.min():.2f}-{measured.max():.2f}x)",
        "",
        HEADER,
        "| --- | --- | --- | --- | --- | --- |",
        *(row(m, a) for m, a in scores.items()),
        "",
        verdict(scores),
        "",
    ]


def score(predicted: dict[str, np.ndarray], measured: np.ndarray) -> dict[str, cost_models.Accuracy]:
    null = cost_models.speedup_accuracy(predicted[cost_models.NULL], measured)
    return {m: cost_models.speedup_accuracy(p, measured).against(null) for m, p in predicted.items()}


def run_rows(md: Path) -> pd.DataFrame:
    """The model rows of an unseen run's report (its markdown table)."""
    lines = [line for line in md.read_text().splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return pd.DataFrame(cells[1:], columns=cells[0])


def unseen_section(csv: Path) -> list[str]:
    md = csv.with_suffix(".md")
    frame, reported = pd.read_csv(csv), run_rows(md)
    flops_column = next(c for c in frame.columns if c.startswith("FLOPs proxy"))
    lines = [
        f"## `{csv.name}`: no table for these workloads",
        "",
        f"Measured by `{report_line(md, 'Command:').split('`')[1]}` on {report_line(md, 'Machine:')} "
        f"({report_line(md, 'Date:').split(';')[0]}). Model rows as that run reported them (`{md.name}`); "
        "null and FLOPs rows computed here from its CSV; within ±5 % was not reported there.",
        "",
    ]
    for case, rows in frame.groupby("case", sort=False):
        measured = rows.dense_ms.to_numpy() / rows.measured_ms.to_numpy()
        null = cost_models.speedup_accuracy(np.ones(len(rows)), measured)
        flops = cost_models.speedup_accuracy(
            rows.dense_ms.to_numpy() / rows[flops_column].to_numpy(), measured
        )
        scores: dict[str, cost_models.Accuracy] = {}
        stored = [
            c[: -len(": dense")] for c in rows.columns if c.endswith(": dense") and not c.startswith("FLOPs")
        ]
        for model in stored:  # runs since 2026-12-07 store the predicted dense latency: computed here
            if model != cost_models.NULL:
                speedups = rows[f"{model}: dense"].to_numpy() / rows[model].to_numpy()
                scores[model] = cost_models.speedup_accuracy(speedups, measured).against(null)
        for _, r in reported[reported.case == case].iterrows():
            model = str(r["model"])
            if model.startswith(("FLOPs", "this machine", "null")) or model in scores:
                continue
            acc = cost_models.Accuracy(
                mape=float(r["speedup MAPE %"]),
                within10=float(r["speedup within 10 %"]),
                within5=float("nan"),
                tau=float(r["speedup tau"]),
            )
            scores[model] = acc.against(null)
        scores[cost_models.FLOPS] = flops.against(null)
        scores[cost_models.NULL] = null.against(null)
        lines += section(str(case), measured, scores)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="results/benchmarks/cost_models_skill.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    lines = [
        "# Cost-model skill: each model beside the null predictor and the FLOPs proxy",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {cost_models.cpu_name()}, torch {torch.__version__}; it only re-scores committed "
        "measurements, each section names the machine that timed them.  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        "Every figure compares predicted with measured speedups over the dense model (what a search ranks "
        "and `hwprune-apply` reports). `null` predicts that pruning changes nothing (speedup 1); the FLOPs "
        "proxy predicts dense FLOPs / configuration FLOPs (blocks only; `inf` MAPE where a configuration "
        "keeps no block FLOPs at all). Skill = 1 - MAPE / null MAPE: positive means the model beats "
        "saying nothing changes, and only there does a share within ±10 % say something about the model "
        "rather than about how little pruning moved latency. Kendall tau is undefined (—) for the null "
        "predictor, which ranks nothing.",
        "",
    ]
    for csv, hardware, tables, tag in CHECKS:
        lines += check_section(Path(csv), hardware, Path(tables), tag)
    for csv in UNSEEN:
        lines += unseen_section(Path(csv))
    Path(args.out).write_text("\n".join(lines))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
