"""Search quality by depth: the share of the exact proxy front's hypervolume the study reaches.

For random-init models of growing depth (MiniLM-width BERTs of 6 to 32 layers and a 32-layer
LLaMA-GQA), NViT saliency on random tokens (label-free distance to the dense outputs) and the
gpu_h100 roofline at batch 1 x 128 define the same two objectives `hwprune-search` optimises. The
exact Pareto front of that additive proxy comes from the dynamic programme; the study (the default
Pareto local search, `--trials` trials, the dense model and a uniform 50 % plan enqueued) is run with
`--exact-seeds` points of the exact front enqueued, for each value given, over `--seeds` sampler
seeds. Reported: hypervolume of the study's front / hypervolume of the exact front.

Usage:
    python benchmarks/search_depth.py --trials 1000 --exact-seeds 10 50 100 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import transformers
from _command import command_line

from hwprune import cost_models, hessian, prunable
from hwprune.search import (
    Constraints,
    ParetoLocalSearchSampler,
    SaliencyProxy,
    SearchObjective,
    SearchSpace,
    block_spec,
    exact_front,
    head_width,
    hypervolume,
    hypervolume_subset,
    open_storage,
    option_tables,
    pick,
    run_study,
    within_budgets,
)
from hwprune.search.config import load_hardware

log = logging.getLogger("search_depth")

BERT = {"model_type": "bert", "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536}
LLAMA = {
    "model_type": "llama",
    "hidden_size": 1024,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "intermediate_size": 2816,
    "vocab_size": 32000,
}
SHAPES = {f"bert_{n}x384": BERT | {"num_hidden_layers": n} for n in (6, 12, 24, 32)}
SHAPES["llama_gqa_32x1024"] = LLAMA | {"num_hidden_layers": 32}


def scores_for(model: torch.nn.Module) -> hessian.UnitScores:
    gen = torch.Generator().manual_seed(0)
    batches = [
        hessian.Batch(inputs={"input_ids": torch.randint(0, 1000, (8, 64), generator=gen)}) for _ in range(2)
    ]

    def pooled(m: torch.nn.Module, batch: hessian.Batch) -> torch.Tensor:
        out = m(**batch.inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
        return hidden.mean(1)  # (rows, D)

    distance = hessian.OutputDistance(output=pooled)
    distance.set_reference(model, batches)
    calibration = hessian.Calibration(batches, distance, "random tokens")
    return hessian.NViTSaliency().score(model, calibration, options=hessian.ScoringOptions(max_samples=4))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--exact-seeds", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument(
        "--latency-fraction",
        type=float,
        help="a latency budget (fraction of dense), as search.latency_budget_fraction",
    )
    parser.add_argument(
        "--params-fraction",
        type=float,
        help="a budget on the blocks' weights (fraction of dense), as search.params_budget_fraction",
    )
    parser.add_argument("--out", default="results/benchmarks/search_depth.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("hwprune").setLevel(logging.WARNING)
    started = datetime.now(timezone.utc)
    profile = load_hardware("gpu_h100")
    rows = []
    for shape in args.shapes:
        config = transformers.AutoConfig.for_model(**SHAPES[shape])
        torch.manual_seed(0)
        model = transformers.AutoModel.from_config(config).eval()
        structure = prunable.discover(model)
        spec = block_spec(structure, head_width=head_width(model))
        cost_model = cost_models.AnalyticalModel(
            profile=profile, spec=spec, workload=profile.resolve_workload(cost_models.Workload(batch_size=1))
        )
        t0 = time.perf_counter()
        scores = scores_for(model)
        log.info("%s: saliency in %.0f s", shape, time.perf_counter() - t0)
        space = SearchSpace.build(structure, mlp_step=cost_models.width_step(profile, spec.mlp), unit_step=1)
        proxy = SaliencyProxy(scores, structure)
        constraints = Constraints(
            latency_fraction=args.latency_fraction, params_fraction=args.params_fraction
        )
        objective = SearchObjective(space, cost_model, proxy, constraints)
        lats, losses, options, _ = option_tables(space, cost_model, proxy)
        exact = exact_front(lats, losses, base=cost_model.base_ms)
        zeros = np.zeros(space.num_layers, int)
        reference = (objective.dense_ms, float(proxy.loss(zeros, zeros)[0]))
        optimum = within_budgets(exact, options, objective)  # as hwprune-search does
        fronts: list[tuple[np.ndarray, np.ndarray]] = [(optimum.latency, optimum.loss)]
        shape_rows = []
        for k in args.exact_seeds:
            picks = hypervolume_subset(optimum.latency, optimum.loss, reference, k)
            seeded = [pick(options, optimum.choices[p]) for p in picks]
            seeds_front = (optimum.latency[picks], optimum.loss[picks])
            studies, seconds = [], []
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as tmp:
                    storage = open_storage(None, Path(tmp))
                    t0 = time.perf_counter()
                    study = run_study(
                        objective,
                        sampler=ParetoLocalSearchSampler(seed=seed),
                        storage=storage,
                        n_trials=args.trials,
                        seeds=[space.dense(), space.uniform(0.5), *seeded],
                    )
                    seconds.append(time.perf_counter() - t0)
                    front = study.best_trials  # feasible trials only
                    studies.append(
                        (np.array([t.values[0] for t in front]), np.array([t.values[1] for t in front]))
                    )
            fronts += studies
            shape_rows.append((k, seeds_front, studies, float(np.mean(seconds))))
        # The reference: the exact front within the budgets; under a parameter budget, where that is only
        # part of the constrained optimum, the best front known (it and every study's, pooled).
        pooled = [
            np.concatenate(a) for a in zip(*(fronts if args.params_fraction else fronts[:1]), strict=True)
        ]
        best_hv = hypervolume(pooled[0], pooled[1], reference)
        for k, seeds_front, studies, secs in shape_rows:
            seeds_hv = hypervolume(*seeds_front, reference) / best_hv if len(seeds_front[0]) else 0.0
            ratios = [hypervolume(*f, reference) / best_hv for f in studies]
            rows.append((shape, space.num_layers, len(exact.latency), k, seeds_hv, ratios, secs))
            log.info("%s k=%d: seeds alone %.4f, study %s", shape, k, seeds_hv, [f"{r:.4f}" for r in ratios])
    lines = [
        "# Search quality by depth: hypervolume of the study's front / "
        + ("the best front known (measured)" if args.params_fraction else "the exact proxy front (measured)"),
        "",
        f"Command: `{command_line()}`  ",
        f"Date: {started:%Y-%m-%d %H:%M} UTC; {cost_models.cpu_name()}. Random-init models, NViT on random "
        "tokens, gpu_h100 roofline (analytical) at batch 1 x 128; sampler: the default Pareto local search; "
        "every study also holds the dense model and a uniform 50 % plan. `seeds alone` is the ratio the "
        "enqueued exact points reach by themselves (greedy hypervolume subset); `study` is after all trials, "
        "one value per sampler seed."
        + (
            f" Under a latency budget of {args.latency_fraction} x dense: only feasible trials count, and the "
            "reference front is the exact front's points within the budget."
            if args.latency_fraction
            else ""
        )
        + (
            f" Under a parameter budget of {args.params_fraction} x the dense blocks' weights: only feasible "
            "trials count; the exact front's points within the budget are optimal under it but not the whole "
            "constrained optimum, so the reference is the best front known (those points and every study's "
            "feasible front, pooled). A ratio of 1 means "
            "no study found better than the others and the seeds together, not that the optimum is reached."
            if args.params_fraction
            else ""
        ),
        "",
        "| shape | layers | exact front points | exact seeds | seeds alone | study (per seed) | mean | s per study |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for shape, layers, n_exact, k, seeds_hv, ratios, secs in rows:
        lines.append(
            f"| {shape} | {layers} | {n_exact} | {k} | {seeds_hv:.4f} | "
            f"{', '.join(f'{r:.4f}' for r in ratios)} | {np.mean(ratios):.4f} | {secs:.0f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
