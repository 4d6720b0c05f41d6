"""What deploying blocks at a precision of their own costs beyond the blocks themselves.

A plan's layer at bf16 runs between casts (its inputs to bf16, its output back to the fp32 stream;
`prunable.set_precisions`), while a bf16 latency table times whole bf16 blocks back to back. This
times, in interleaved rounds on this CPU, the dense MiniLM three ways: fp32; the whole model cast to
the precision (what the tables' blocks are); and every block set to the precision by
`prunable.set_precisions`, the embeddings and the stream in fp32 (what a plan deploys). The last
two differ by the casts and hooks at the blocks' edges plus the embeddings' precision: the fixed cost
per layer that the mixed-precision cost model does not price yet.

Usage:
    python benchmarks/per_block_overhead.py --precision bf16 --out results/benchmarks/per_block_overhead.md
"""

from __future__ import annotations

import argparse
import copy
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from _command import command_line

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import interleaved
from hwprune.search import model_timer

log = logging.getLogger("per_block_overhead")

BATCHES = {1: 20, 8: 10, 32: 5}  # batch: interleaved rounds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--out", default="results/benchmarks/per_block_overhead.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    dense = prunable.load_model(prunable.MINILM, "BertModel")
    structure = prunable.discover(dense)
    ref = prunable.model_ref(dense, with_weights=False)
    n = structure.num_layers
    plan = prunable.PrunePlan.dense(structure, ref).with_precisions(
        [args.precision] * n, [args.precision] * n
    )
    rows = []
    for batch, rounds in BATCHES.items():
        fp32 = cost_models.Workload(batch_size=batch, seq_len=128, dtype="fp32")
        whole = cost_models.Workload(batch_size=batch, seq_len=128, dtype=args.precision)
        per_block = prunable.set_precisions(
            prunable.apply_plan(copy.deepcopy(dense), plan, check_weights=False), plan
        )
        timers = [
            model_timer(copy.deepcopy(dense), fp32, "cpu"),
            model_timer(copy.deepcopy(dense), whole, "cpu"),
            model_timer(per_block, fp32, "cpu"),  # blocks keep their precision, the stream is fp32
        ]
        ms = np.median(np.array(interleaved(timers, rounds=rounds, warmup=2)), axis=1)
        rows.append((batch, rounds, *ms))
        log.info("batch %d: %s", batch, ms)
    lines = [
        f"# Blocks deployed at {args.precision} between fp32 layers, against the whole model at {args.precision}",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {cost_models.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}.  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Dense all-MiniLM-L6-v2, sequence 128, wall clock, "
        "median of interleaved rounds on this CPU.",
        "",
        f"| batch | rounds | fp32 ms | whole model {args.precision} ms | blocks {args.precision} (as plans deploy) ms | "
        f"per-block / whole | extra per layer ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for batch, rounds, f, w, b in rows:
        lines.append(
            f"| {batch} | {rounds} | {f:.2f} | {w:.2f} | {b:.2f} | {b / w:.3f} | {(b - w) / n:.3f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
