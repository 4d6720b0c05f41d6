"""NViT scoring time of the default run (bundled MiniLM, STS-B, 512 pairs) in whole batches and in parts.

What `saliency.max_samples` costs where memory is no problem: the two settings alternate `--repeats`
times in one process (this machine's speed drifts, so they are compared pair by pair), and the scores
are compared with the first run's.

Usage:
    python benchmarks/saliency_passes_minilm.py --stsb ../shared/data/stsb --max-samples 8
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from _command import command_line
from transformers import AutoTokenizer

from hwprune import cost_models, hessian, prunable
from hwprune.prunable import resolve_source
from hwprune.search.tasks import STSTask

log = logging.getLogger("saliency_passes_minilm")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stsb", type=Path, required=True, help="folder with sts-train.csv and sts-dev.csv")
    parser.add_argument("--max-samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/saliency_passes_minilm.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started_at = datetime.now(timezone.utc)
    model = prunable.load_model(prunable.MINILM, "BertModel")
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_source(prunable.MINILM)))
    task = STSTask(
        train_path=args.stsb / "sts-train.csv", eval_path=args.stsb / "sts-dev.csv", tokenizer=tokenizer
    )
    task.prepare(model)
    calibration = task.calibration(model)
    reference = None
    rows: list[tuple[int, str, float, float]] = []
    for repeat in range(args.repeats):
        for max_samples in (None, args.max_samples):
            started = time.perf_counter()
            options = hessian.ScoringOptions(max_samples=max_samples)
            scores = hessian.NViTSaliency().score(model, calibration, options=options)
            seconds = time.perf_counter() - started
            flat = torch.cat([*scores.attention, *scores.mlp])
            reference = flat if reference is None else reference
            diff = float((flat - reference).abs().max() / reference.abs().max())
            setting = "whole batches" if max_samples is None else f"parts of {max_samples}"
            rows.append((repeat, setting, seconds, diff))
            log.info(
                "repeat %d: %s: %.1f s, max rel diff to the first run %.1e", repeat, setting, seconds, diff
            )
    ratios = [parts[2] / whole[2] for whole, parts in zip(rows[::2], rows[1::2], strict=True)]
    lines = [
        "# Saliency in passes: what `saliency.max_samples` costs on the default run (measured)",
        "",
        f"Command: `{command_line()}`  ",
        f"Date: {started_at:%Y-%m-%d %H:%M} UTC. Machine: {cost_models.cpu_name()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}. NViT on the bundled all-MiniLM-L6-v2, STS-B train calibration "
        f"({calibration.n_samples} pairs in the task's batches), whole batches and passes of {args.max_samples} "
        "samples alternating in one process.",
        "",
        "| repeat | setting | seconds | largest score difference to the first run (of the largest score) |",
        "| --- | --- | --- | --- |",
        *(f"| {r} | {s} | {sec:.1f} | {d:.1e} |" for r, s, sec, d in rows),
        "",
        f"Parts over whole batches, pair by pair: {', '.join(f'{x:.3f}' for x in ratios)} "
        f"(median {statistics.median(ratios):.3f}).",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
