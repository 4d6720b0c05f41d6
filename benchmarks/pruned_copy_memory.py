"""Peak memory of making a pruned copy: `apply_plan(copy.deepcopy(model))` against `pruned_copy`.

Re-scoring and `hwprune-apply` keep the dense model (the teacher, the reference) and make one pruned
copy of it. Each variant runs in a fresh process on a random-init model (`saliency_scale.py`'s
shapes), with a plan keeping half of every layer's attention units and MLP neurons; the peak RSS
growth while the copy is made is reported, against the model's fp32 size.

Usage:
    python benchmarks/pruned_copy_memory.py --shape llama_1b
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _command import command_line
from saliency_scale import SHAPES, build

from hwprune import cost_models, prunable


def child(shape: str, variant: str) -> None:
    model = build(shape, "cpu", None)
    structure = prunable.discover(model)
    plan = prunable.PrunePlan.from_units(
        structure,
        prunable.model_ref(model, with_weights=False),
        attention=[range(la.attention_units // 2) for la in structure.layers],
        mlp=[range(la.mlp_width // 2) for la in structure.layers],
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if variant == "deepcopy":
        pruned = prunable.apply_plan(copy.deepcopy(model), plan, check_weights=False)
    else:
        pruned = prunable.pruned_copy(model, plan, check_weights=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    pruned_bytes = sum(p.numel() * 4 for p in pruned.parameters())
    print(
        "RESULT "
        + json.dumps(
            {"variant": variant, "growth": peak - before, "dense": dense_bytes, "pruned": pruned_bytes}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="llama_1b", choices=sorted(SHAPES))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="results/benchmarks/pruned_copy_memory.md")
    args = parser.parse_args()
    if args.variant:
        child(args.shape, args.variant)
        return
    rows = []
    for variant in ("deepcopy", "pruned_copy"):
        done = subprocess.run(
            [sys.executable, __file__, "--shape", args.shape, "--variant", variant],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[7:]))
    gib = 2**30
    lines = [
        "# Peak memory of making a pruned copy (measured)",
        "",
        f"Command: `{command_line()}`  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cost_models.cpu_name()}. Random-init "
        f"`{args.shape}` in fp32, a plan keeping half of every layer's attention units and MLP neurons; "
        "peak RSS growth of the process while the pruned copy is made (the dense model already loaded).",
        "",
        "| how | dense model GiB | pruned copy GiB | peak growth GiB |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        how = (
            "`apply_plan(copy.deepcopy(model), plan)` (before)"
            if r["variant"] == "deepcopy"
            else "`pruned_copy(model, plan)`"
        )
        lines.append(
            f"| {how} | {r['dense'] / gib:.2f} | {r['pruned'] / gib:.2f} | {r['growth'] / gib:.2f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
