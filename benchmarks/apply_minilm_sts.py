"""One MiniLM plan through Prune -> Distill -> Quantize with `hwprune-apply`, measured on this CPU.

The plan (default: `trial_447` of the committed recovery benchmark's distill run) is applied to STS-B
with its recorded recovery run again, deployed at a precision, evaluated on dev and timed against the
dense model as loaded (fp32) and the dense model at the same precision, in interleaved rounds. Each
`hwprune-apply` run's `apply.json` is copied beside the table (`<out stem>/<variant>_apply.json`) and
the table is written from those files alone:

- `--variants bf16`: the torch model in bf16.
- `--variants int8`: the int8 QDQ `model.onnx` (ONNX Runtime's quantisation tooling, run by ONNX Runtime).
- `--variants int8 qat`: int8 after plain distillation and after distillation with int8 in the loop
  (`recovery.method.quantize=int8`): whether quantised distillation pays.

Usage:
    python benchmarks/apply_minilm_sts.py --variants bf16 int8 qat --out results/benchmarks/apply_minilm_sts.md
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from _command import ROOT, command_line

from hwprune import cost_models
from hwprune.search import apply_config, compose, run_apply

log = logging.getLogger("apply_minilm_sts")

PLAN = "results/benchmarks/recovery_minilm_sts_runs/distill/plans/trial_447.yaml"
# Per variant: the deployed precision and any recovery settings beside the plan's recorded recipe.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "bf16": ("bf16", []),
    "int8": ("int8", []),
    "qat": ("int8", ["recovery=distill", "recovery.method.quantize=int8"]),
}
LABELS = {
    "bf16": "distill, bf16",
    "int8": "distill, int8 QDQ",
    "qat": "distill with int8 in the loop, int8 QDQ",
}


def apply_variant(args: argparse.Namespace, variant: str, work: Path) -> dict[str, Any]:
    precision, recovery = VARIANTS[variant]
    stsb = Path(args.stsb).resolve()
    task = [f"task.build.train_path={stsb / 'sts-train.csv'}", f"task.build.eval_path={stsb / 'sts-dev.csv'}"]
    overrides = ["task=sts", *task, *recovery]
    composed = compose("apply", [f"plan={args.plan}", f"out={work / variant}", *overrides])
    cfg = apply_config(
        plan=args.plan,
        out=str(work / variant),
        task=composed.task,
        recovery=composed.recovery,
        precision=precision,
        repeats=args.repeats,
        overwrite=True,
    )
    return run_apply(cfg)


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    first = next(iter(results.values()))
    lines = [
        "| recovery, deployed | dev fp32 after recovery | dev deployed | deployed costs | recovery s | "
        "dense at that precision: dev, speedup | measured speedup over dense fp32 (quartiles) | pruning on top of the precision | predicted (fp32 widths) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| none (pruned only), fp32 | {first['metric_unrecovered']:.2f} | | | | | | | |",
    ]
    for variant, r in results.items():
        q1, _, q3 = r["measured_speedup_quartiles"]
        unquantized = r.get("metric_unquantized", r["metric_pruned"])
        dense_same = r["latency_ms_dense"] / r["latency_ms_dense_same_precision"]
        lines.append(
            f"| {LABELS[variant]} | {unquantized:.2f} | **{r['metric_pruned']:.2f}** | "
            f"{r['metric_pruned'] - unquantized:+.2f} | {r['recovery_seconds']:.0f} | "
            f"{r['metric_dense_same_precision']:.2f}, {dense_same:.2f}x | **{r['measured_speedup']:.2f}x** "
            f"({q1:.2f}-{q3:.2f}x) | {r['measured_speedup_same_precision']:.2f}x | {r['predicted_speedup']:.2f}x |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--plan", default=PLAN)
    parser.add_argument("--stsb", default="../shared/data/stsb")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--work", default="/tmp/hwprune_apply_minilm_sts")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    kept = out.parent / out.stem  # the apply.json files the table is written from
    kept.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    results = {}
    for variant in args.variants:
        results[variant] = apply_variant(args, variant, Path(args.work))
        shutil.copy(Path(args.work) / variant / "apply.json", kept / f"{variant}_apply.json")
    first = next(iter(results.values()))
    plan = Path(args.plan).resolve()
    shown = plan.relative_to(ROOT) if plan.is_relative_to(ROOT) else plan
    lines = [
        "# Prune -> Distill -> Quantize: one MiniLM plan applied with `hwprune-apply`, measured on this CPU",
        "",
        f"Command: `{command_line()}`  ",
        f"Date: {started:%Y-%m-%d %H:%M}-{datetime.now(timezone.utc):%H:%M} UTC. Machine: {cost_models.cpu_name()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, allocator for timing "
        f"{first['workload'].get('allocator', 'not recorded')}. Plan: `{shown}`.  ",
        f"Each row is one `hwprune-apply` run (its `apply.json` in `{kept.name}/`): the plan's recorded "
        f"recovery ({first['recovery'].get('method')}, {first['recovery'].get('steps', '-')} steps) run again on "
        "STS-B train, the model deployed at the row's precision and evaluated on STS-B dev (Spearman x 100; "
        f"dense fp32 {first['metric_dense']:.2f}), timed at batch 32 x 128 in {first['workload']['repeats']} "
        "interleaved rounds against the dense model as loaded (torch fp32) and the dense model at the same "
        "precision (int8: ONNX Runtime's CPU kernels running the QDQ model an NPU consumes). Which plan: "
        "the recovery benchmark's fastest distilled plan within 0.5 point of dense as chosen there on dev, "
        "so its dev figure carries that selection; rows compare the same plan.",
        "",
        *table(results),
        "",
    ]
    out.write_text("\n".join(lines))
    log.info("wrote %s", out)
    print(json.dumps({v: r["measured_speedup"] for v, r in results.items()}))


if __name__ == "__main__":
    main()
