"""What glibc's default allocator thresholds do to CPU timings, against `steady_allocator`.

Each part runs in a fresh process (the allocator setting lasts for a process, and under glibc's
defaults what a process allocated before changes what it faults in later), alternating default and
steady, `--processes` of each: all-MiniLM-L6-v2 blocks timed as `hwprune-profile` times them (real
pruned layers, a stack of 6, warm-up 1, 4 repeats) at a few widths, fp32 and bf16 each in a process of
their own, as a table of either dtype is profiled; and the dense model in fp32 and with its blocks in
bf16 (as a plan deploys them), timed in interleaved rounds; with the page faults (minor) each process
took while timing. The table gives, per setting, the median over processes and the range from its
fastest to its slowest process: how far one process's timing can sit from another's.

Usage:
    python benchmarks/allocator_cpu.py --out results/benchmarks/allocator_cpu.md
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from _command import command_line

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import TorchProfiler, allocator_state, interleaved, steady_allocator
from hwprune.search import block_spec, model_timer, real_block_factory

log = logging.getLogger("allocator_cpu")

SETTINGS = ("default", "steady")
WIDTHS = ((12, 1536), (12, 1408), (8, 1024), (4, 1536), (4, 1408), (4, 1280))  # (heads, MLP neurons)
PARTS = ("fp32", "bf16", "models")  # blocks at each dtype (a process each), then whole models


def child(setting: str, part: str, batch: int, seq: int) -> dict[str, object]:
    """One fresh process's timings (ms) of `part` and its page faults under `setting`."""
    torch.set_num_threads(2)
    if setting == "steady":
        steady_allocator()
    model = prunable.load_model(prunable.MINILM, "BertModel").eval()
    structure = prunable.discover(model)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    if part != "models":
        profiler = TorchProfiler(
            block_factory=real_block_factory(model), warmup=1, repeats=4, threads=2, stack=6
        )
        workload = cost_models.Workload(batch_size=batch, seq_len=seq, dtype=part)
        ms = {
            f"{part} block {heads}/{mlp}": profiler.measure_block(
                block_spec(structure), workload, units=heads, mlp=mlp
            ).median_ms
            for heads, mlp in WIDTHS
        }
    else:
        ref = prunable.model_ref(model, with_weights=False)
        n = structure.num_layers
        plan = prunable.PrunePlan.dense(structure, ref).with_precisions(["bf16"] * n, ["bf16"] * n)
        in_bf16 = prunable.set_precisions(prunable.pruned_copy(model, plan, check_weights=False), plan)
        workload = cost_models.Workload(batch_size=batch, seq_len=seq)
        timers = [model_timer(model, workload, "cpu"), model_timer(in_bf16, workload, "cpu")]
        with torch.inference_mode():
            dense, bf16 = interleaved(timers, rounds=4)
        ms = {
            "fp32 dense model": statistics.median(dense),
            "bf16 dense model (blocks bf16)": statistics.median(bf16),
        }
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"allocator": allocator_state(), "faults": faults, "ms": ms}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per setting and part")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", default="results/benchmarks/allocator_cpu.md")
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.part, args.batch, args.seq)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs: dict[tuple[str, str], list[dict]] = {(s, p): [] for s in SETTINGS for p in PARTS}
    for i in range(args.processes):
        for part in PARTS:
            for setting in SETTINGS if i % 2 == 0 else SETTINGS[::-1]:  # alternate which goes first
                argv = [sys.executable, __file__, "--child", setting, "--part", part]
                argv += ["--batch", str(args.batch), "--seq", str(args.seq)]
                done = subprocess.run(argv, capture_output=True, text=True, check=True)
                runs[setting, part].append(json.loads(done.stdout.strip().splitlines()[-1]))
                log.info("process %d %s %s: %s", i + 1, setting, part, runs[setting, part][-1]["ms"])

    allocators = {s: runs[s, "models"][0]["allocator"] for s in SETTINGS}
    lines = [
        f"# CPU timings under glibc's default allocator and `steady_allocator`: MiniLM, batch {args.batch} x {args.seq}",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {cost_models.cpu_name()}, 2 threads, torch {torch.__version__}; allocators: "
        f"default `{allocators['default']}`, steady `{allocators['steady']}`.  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Every latency measured on this CPU (wall clock): "
        f"{args.processes} fresh processes per setting and part, alternating; blocks as `hwprune-profile` times "
        "them (a stack of 6 pruned real layers, per block, one dtype per process), models in 4 interleaved rounds.",
        "",
        "| timed | default: median ms (fastest-slowest process) | steady: median ms (fastest-slowest) | default / steady |",
        "| --- | --- | --- | --- |",
    ]
    for part in PARTS:
        for name in runs["default", part][0]["ms"]:
            cells = []
            for setting in SETTINGS:
                values = [r["ms"][name] for r in runs[setting, part]]
                cells.append((statistics.median(values), min(values), max(values)))
            (d, dlo, dhi), (s, slo, shi) = cells
            lines.append(
                f"| {name} | {d:.2f} ({dlo:.2f}-{dhi:.2f}) | {s:.2f} ({slo:.2f}-{shi:.2f}) | {d / s:.2f} |"
            )
        faults = [statistics.median([r["faults"] for r in runs[s, part]]) for s in SETTINGS]
        lines.append(
            f"| page faults while timing the {part} part (median per process) | {faults[0]:.0f} | {faults[1]:.0f} | |"
        )
    lines.append("")
    out = Path(args.out)
    out.write_text("\n".join(lines))
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
