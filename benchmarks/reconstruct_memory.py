"""Peak memory of `recovery=reconstruct` on random-init BERT shapes (#33).

Per shape: a dense model, a copy keeping every other head and neuron, and `Reconstruct(samples=128)`
on 128 sequences of 128 random tokens (the default fit); the process's resident set before, and its
peak during the recovery (the kernel's high-water mark, reset just before), with the recovery's own
result so a change in memory can be told from a change in what it computes.

Usage:
    python benchmarks/reconstruct_memory.py --shapes base large --out results/benchmarks/reconstruct_memory.md
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from _command import command_line

from hwprune import cost_models, hessian, prunable
from hwprune.search.recovery import Reconstruct, RecoveryData

SHAPES = {
    "base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
}


def resident_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(shape: str) -> dict[str, float]:
    torch.manual_seed(0)
    dense = transformers.BertModel(transformers.BertConfig(vocab_size=30522, **SHAPES[shape])).eval()
    structure = prunable.discover(dense)
    layer = structure.layers[0]
    plan = prunable.PrunePlan.from_units(
        structure,
        prunable.model_ref(dense),
        attention=[range(0, layer.attention_units, 2)] * structure.num_layers,
        mlp=[range(0, layer.mlp_width, 2)] * structure.num_layers,
    )
    student = prunable.pruned_copy(dense, plan, check_weights=False)
    gen = torch.Generator().manual_seed(1)
    batches = [
        hessian.Batch(
            inputs={
                "input_ids": torch.randint(0, 30522, (16, 128), generator=gen),
                "attention_mask": torch.ones(16, 128, dtype=torch.long),
            }
        )
        for _ in range(12)
    ]
    data = RecoveryData(batches, None, "random tokens")
    weights = sum(p.numel() * p.element_size() for p in dense.parameters()) / 2**30
    before = resident_gib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    started = time.perf_counter()
    report = Reconstruct(samples=128).recover(student, dense, data, layers=plan.kept_layers())
    return {
        "weights_gib": weights,
        "before_gib": before,
        "peak_gib": resident_gib("VmHWM"),
        "seconds": time.perf_counter() - started,
        "held_out_before": float(report.held_out_before or 0.0),
        "held_out_after": float(report.held_out_after or 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", default="results/benchmarks/reconstruct_memory.md")
    args = parser.parse_args()
    rows = {shape: measure(shape) for shape in args.shapes}
    command = command_line()
    lines = [
        "# Peak memory of recovery=reconstruct (random-init BERT shapes, half of every layer's units kept)",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {cost_models.cpu_name()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. Fit: 128 sequences x 128 tokens "
        "(16384 tokens), the default `Reconstruct(samples=128)`; held out: 4 more batches of 16.",
        "",
        "| shape | fp32 weights (GiB) | resident before (GiB) | peak during (GiB) | peak - before | seconds | held-out output loss before -> after |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for shape, r in rows.items():
        lines.append(
            f"| {shape} | {r['weights_gib']:.2f} | {r['before_gib']:.2f} | {r['peak_gib']:.2f} | "
            f"{r['peak_gib'] - r['before_gib']:.2f} | {r['seconds']:.0f} | "
            f"{r['held_out_before']:.4f} -> {r['held_out_after']:.4f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
