"""Saliency benchmark on the bundled all-MiniLM-L6-v2 with STS-B (train: calibration, dev: evaluation).

1. Truth test: remove each of the 72 heads alone, and each block of MLP neurons alone, and measure
   the true change of the calibration loss (supervised STS loss and label-free embedding distance)
   and of dev Spearman; rank-correlate every method's score with it.
2. Pruning outcome without fine-tuning: keep 50% of heads and 50% of MLP neurons (per-layer uniform,
   and by global ranking), physically prune, report dev Spearman x 100.
3. Cost: seconds and peak memory to score MiniLM on the calibration pairs, each method in a fresh
   process.

Usage:
    python benchmarks/saliency_minilm.py --stsb ../shared/data/stsb --out results/benchmarks/saliency_minilm.md
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from _command import command_line
from scipy.stats import spearmanr

from hwprune import cost_models, hessian, prunable
from hwprune.search.tasks import STSTask, embed_batch

log = logging.getLogger("saliency_minilm")

METHODS = {
    "nvit": lambda: hessian.NViTSaliency(seed=0),
    "nvit-first-order": lambda: hessian.NViTSaliency(seed=0, first_order=True),
    "fisher": lambda: hessian.FisherSaliency(seed=0),
    "hutchinson": lambda: hessian.HutchinsonSaliency(seed=0),
    "taylor": lambda: hessian.TaylorSaliency(),
    "magnitude": lambda: hessian.MagnitudeSaliency(),
    "random": lambda: hessian.RandomSaliency(seed=0),
}
OBJECTIVES = ("supervised", "label-free")


def setup(
    args: argparse.Namespace,
) -> tuple[torch.nn.Module, STSTask, hessian.Calibration, hessian.Calibration]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(prunable.resolve_source(prunable.MINILM)))
    model = prunable.load_model(prunable.MINILM, "BertModel")
    task = STSTask(
        train_path=Path(args.stsb) / "sts-train.csv",
        eval_path=Path(args.stsb) / "sts-dev.csv",
        tokenizer=tokenizer,
        calibration_samples=args.samples,
        seed=0,
    )
    supervised = task.calibration(model)
    distance = hessian.OutputDistance(output=embed_batch, name="embedding-distance")
    distance.set_reference(model, supervised.batches)
    label_free = hessian.Calibration(supervised.batches, distance, supervised.description + ", label-free")
    return model, task, supervised, label_free


def score_one(args: argparse.Namespace) -> None:
    """Child process: score with one method and objective, report time and peak RSS as JSON."""
    model, _, supervised, label_free = setup(args)
    calibration = supervised if args.objective == "supervised" else label_free
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    scores = METHODS[args.method]().score(model, calibration)
    seconds = time.perf_counter() - start
    scores.save(args.scores_path)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak / 1024, "rss_before_mib": rss_before / 1024}))


def run_child(args: argparse.Namespace, method: str, objective: str, path: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--score-one",
        method,
        "--objective",
        objective,
        "--scores-path",
        str(path),
    ]
    cmd += ["--stsb", args.stsb, "--samples", str(args.samples)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def truths(
    model: torch.nn.Module,
    task: STSTask,
    supervised: hessian.Calibration,
    label_free: hessian.Calibration,
    blocks: int,
) -> dict[str, list[dict]]:
    """True loss and Spearman changes when each head, and each block of neurons, is removed alone."""
    structure = prunable.discover(model)

    def measure() -> tuple[float, float, float]:
        with torch.no_grad():
            sup = sum(supervised.objective.losses(model, b).sum().item() for b in supervised.batches)
            free = sum(label_free.objective.losses(model, b).sum().item() for b in label_free.batches)
        n = supervised.n_samples
        return sup / n, free / n, task.evaluate(model)

    out: dict[str, list[dict]] = {"heads": [], "mlp": []}
    with prunable.gated(model, structure) as gates:
        base = measure()
        log.info("dense: loss %.5f, distance %.5f, spearman %.3f", *base)
        for i, layer in enumerate(structure.layers):
            width = layer.mlp_width // blocks
            units = [("heads", [h]) for h in range(layer.attention_units)]
            units += [("mlp", list(range(k * width, (k + 1) * width))) for k in range(blocks)]
            for kind, members in units:
                gate = gates.of(kind)[i]
                gate[members] = 0.0
                sup, free, rho = measure()
                gate[members] = 1.0
                row = {"layer": i, "members": members, "d_loss": sup - base[0], "d_distance": free - base[1]}
                row["d_spearman"] = rho - base[2]
                out[kind].append(row)
                log.info(
                    "layer %d %s %s..: dL %.5f dD %.5f dS %.3f", i, kind, members[0], *list(row.values())[2:]
                )
    return out


def prune_half(model: torch.nn.Module, scores: hessian.UnitScores, policy: str) -> torch.nn.Module:
    """Keep the top half of heads and of neurons, per layer or by global ranking."""
    structure = prunable.discover(model)
    kept: dict[str, list[list[int]]] = {}
    for kind in prunable.UNIT_KINDS:
        per_layer = scores.of(kind)
        if policy == "uniform":
            kept[kind] = [s.argsort(descending=True)[: len(s) // 2].sort().values.tolist() for s in per_layer]
        else:
            flat = torch.cat(per_layer)
            owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(per_layer)])
            offset = torch.cat([torch.arange(len(s)) for s in per_layer])
            top = flat.argsort(descending=True)[: len(flat) // 2]
            kept[kind] = [sorted(offset[top][owner[top] == i].tolist()) for i in range(len(per_layer))]
    pruned = copy.deepcopy(model)
    plan = prunable.PrunePlan.from_units(
        structure, prunable.model_ref(pruned, with_weights=False), attention=kept["heads"], mlp=kept["mlp"]
    )
    return prunable.apply_plan(pruned, plan)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stsb", default="../shared/data/stsb")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--mlp-blocks", type=int, default=8, help="neuron blocks per layer in the truth test")
    parser.add_argument("--out", default="results/benchmarks/saliency_minilm.md")
    parser.add_argument("--work", default="results/benchmarks/saliency_minilm_work")
    parser.add_argument("--score-one", dest="method", choices=sorted(METHODS))
    parser.add_argument("--objective", choices=OBJECTIVES, default="supervised")
    parser.add_argument("--scores-path")
    args = parser.parse_args()
    if args.method:
        score_one(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    costs, scores = {}, {}
    for objective in OBJECTIVES:
        for method in METHODS:
            if objective == "label-free" and method in ("magnitude", "random"):
                continue  # data-free: identical to the supervised run
            if objective == "label-free" and method == "nvit-first-order":
                continue  # the first-order term of a distance to the dense outputs is zero: plain nvit
            path = work / f"{method}-{objective}.npz"
            costs[method, objective] = run_child(args, method, objective, path)
            scores[method, objective] = hessian.UnitScores.load(path)
            log.info("%s/%s: %s", method, objective, costs[method, objective])

    model, task, supervised, label_free = setup(args)
    truth_path = work / "truth.json"
    if truth_path.is_file():
        truth = json.loads(truth_path.read_text())
    else:
        truth = truths(model, task, supervised, label_free, args.mlp_blocks)
        truth_path.write_text(json.dumps(truth))

    dense_rho = task.evaluate(model)
    rows = []
    for (method, objective), s in scores.items():
        row = {"method": method, "objective": objective if method not in ("magnitude", "random") else "-"}
        for kind in prunable.UNIT_KINDS:
            layer_scores = s.of(kind)
            predicted = [float(layer_scores[t["layer"]][t["members"]].sum()) for t in truth[kind]]
            for target in ("d_loss", "d_distance", "d_spearman"):
                sign = -1.0 if target == "d_spearman" else 1.0  # a drop in Spearman is the damage
                rho = spearmanr(predicted, [sign * t[target] for t in truth[kind]]).statistic
                row[f"{kind}:{target}"] = rho
        for policy in ("uniform", "global"):
            row[f"prune50:{policy}"] = task.evaluate(prune_half(model, s, policy))
        row.update(costs[method, objective])
        rows.append(row)
        log.info("%s", row)
    write_report(args, rows, dense_rho, len(truth["mlp"]) // 6)


def write_report(args: argparse.Namespace, rows: list[dict], dense_rho: float, blocks: int) -> None:
    cpu = cost_models.cpu_name()
    lines = [
        "# Saliency on all-MiniLM-L6-v2 / STS-B",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {platform.python_version()}  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. All numbers measured on this CPU.",
        "",
        f"Calibration: {args.samples} pairs drawn (seed 0) from sts-train; supervised objective = per-pair "
        "(cos - score/5)^2 with its Gauss-Newton curvature (probe sqrt(2) cos), label-free = "
        "1/2 ||embedding - dense embedding||^2 (probe: random projections). Dense dev Spearman x 100: "
        f"**{dense_rho:.2f}**.",
        "",
        "## 1. Truth test: Spearman rank correlation of score with the true damage of removing the unit alone",
        "",
        f"72 heads, and {blocks} blocks of {1536 // blocks} contiguous neurons per layer ({6 * blocks} blocks; "
        "a block's score is the sum of its neurons' scores, as the search adds them). Damage = increase of "
        "the calibration loss (dL), of the label-free distance (dD), and drop of dev Spearman (dS). "
        "`nvit-first-order` is `NViTSaliency(first_order=True)`: the Gauss-Newton term plus the signed "
        "first-order term -E[dL/dgate], which NViT drops.",
        "",
        "| method | objective | heads dL | heads dD | heads dS | MLP dL | MLP dD | MLP dS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [r[f"{k}:{t}"] for k in ("heads", "mlp") for t in ("d_loss", "d_distance", "d_spearman")]
        # Constant scores (first-order Taylor on a label-free distance is zero) have no rank correlation.
        text = ["n/a" if c != c else f"{c:.3f}" for c in cells]
        lines.append(f"| {r['method']} | {r['objective']} | " + " | ".join(text) + " |")
    lines += [
        "",
        "## 2. Keep 50% of heads and 50% of MLP neurons, no fine-tuning: dev Spearman x 100",
        "",
        f"Dense: {dense_rho:.2f}. Physically pruned with `prunable.apply_plan`.",
        "",
        "| method | objective | per-layer uniform | global ranking |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['objective']} | {r['prune50:uniform']:.2f} | {r['prune50:global']:.2f} |"
        )
    lines += [
        "",
        f"## 3. Cost of scoring {args.samples} calibration pairs (fresh process per method)",
        "",
        "| method | objective | seconds | peak RSS (MiB) | RSS before scoring (MiB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['objective']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['rss_before_mib']:.0f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
