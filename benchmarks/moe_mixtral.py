"""MoE benchmark: a random-init Mixtral-like model searched with and without the expert axes.

The model: 4 layers, hidden 256, 8 query / 2 KV heads, 8 routed experts of 896 neurons (Mixtral's
3.5x ratio), top-2, byte-level vocabulary; random weights (seed 0), so the task metric (perplexity
of Python's bundled docs) says little and the proxy loss is reported beside it. For each workload,
`hwprune-search` (task=lm, hardware=cpu_local, 1000 trials, no recovery) runs twice: with the expert
count and expert width per layer as search axes (the default) and with `search.expert_axes=false`
(attention only; every expert stays whole). Reported:

1. The exact proxy fronts of both spaces: their hypervolume against one reference, and the least
   proxy loss each reaches at a few predicted speedups.
2. The re-scored non-dominated plans of both searches, pruned and timed on this CPU in one
   interleaved run with the dense model: predicted against measured speedup.

Usage:
    python benchmarks/moe_mixtral.py --out results/benchmarks/moe_mixtral.md
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
import transformers
from _command import command_line
from omegaconf import OmegaConf

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import interleaved
from hwprune.search import RunOutcome, compose, hypervolume, model_timer, run_config, write_report
from hwprune.search.config import AppConfig

log = logging.getLogger("moe_mixtral")

SHAPE = {
    "hidden_size": 256,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "intermediate_size": 896,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
}


def config(source: Path, workload: str, work: Path, *overrides: str) -> AppConfig:
    cfg = compose(
        "config",
        [
            f"model.source={source}",
            "model.class_name=MixtralForCausalLM",
            "model.name=mixtral_like",
            "task=lm",
            f"workload={workload}",
            "task.build.block_size=128",
            "task.build.calibration_blocks=16",
            "task.build.eval_blocks=16",
            "hardware=cpu_local",
            "recovery=none",
            "search.rescore=6",
            "search.rescore_min_speedup=1.1",
            f"saliency.cache_dir={work / 'cache'}",
            *overrides,
        ],
    )
    app = OmegaConf.to_object(cfg)
    assert isinstance(app, AppConfig)
    return app


def best_loss_at(outcome: RunOutcome, speedup: float) -> float:
    """The least proxy loss on the exact front among points predicted at least `speedup` x faster."""
    assert outcome.exact is not None
    dense = outcome.cost_model.dense_ms()
    ok = outcome.exact.latency <= dense / speedup
    return float(outcome.exact.loss[ok].min()) if ok.any() else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", nargs="+", default=["b8_s128", "decode_b1_kv2048"])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", default="results/benchmarks/moe_mixtral.md")
    parser.add_argument(
        "--analytical",
        action="store_true",
        help="price with cpu_local's analytical model (no tables), as on a CPU that has none",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = datetime.now(timezone.utc)
    fronts, plans_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**SHAPE)).eval()
        model.save_pretrained(work / "model")
        for workload in args.workloads:
            outcomes: dict[str, RunOutcome] = {}
            for axes in ("experts and widths", "attention only"):
                overrides = [] if axes == "experts and widths" else ["search.expert_axes=false"]
                overrides += ["hardware.tables=[]"] if args.analytical else []
                cfg = config(work / "model", workload, work, *overrides)
                outcome = run_config(cfg, work / f"{workload}_{len(outcomes)}")
                write_report(outcome)
                outcomes[axes] = outcome
            reference = (
                max(o.cost_model.dense_ms() for o in outcomes.values()),
                max(float(o.exact.loss.max()) for o in outcomes.values() if o.exact is not None),
            )
            for axes, o in outcomes.items():
                assert o.exact is not None
                fronts.append(
                    {
                        "workload": workload,
                        "search axes": axes,
                        "source": o.cost_model.source,
                        "front points": len(o.exact.latency),
                        "hypervolume": hypervolume(o.exact.latency, o.exact.loss, reference),
                        **{f"least loss at {s}x": best_loss_at(o, s) for s in (1.25, 1.5, 2.0)},
                    }
                )
            # Time the dense model and every re-scored plan of both searches in one interleaved run.
            dense = prunable.load_model(str(work / "model"), "MixtralForCausalLM")
            picked = [
                (axes, c)
                for axes, o in outcomes.items()
                for c in o.candidates
                if c.kind == "search" and not c.dominated
            ]
            runs = {axes: o.run_dir for axes, o in outcomes.items()}
            models = [dense] + [
                prunable.pruned_copy(
                    dense, prunable.PrunePlan.load(runs[axes] / c.plan_path), check_weights=False
                )
                for axes, c in picked
            ]
            wl = cost_models.load_profile("cpu_local").resolve_workload(
                outcomes["attention only"].cost_model.workload
            )
            timers = [model_timer(m, wl, "cpu") for m in models]
            times = [statistics.median(t) for t in interleaved(timers, rounds=args.rounds, warmup=2)]
            dense_ms = outcomes["attention only"].cost_model.dense_ms()
            for (axes, c), ms in zip(picked, times[1:], strict=True):
                plans_rows.append(
                    {
                        "workload": workload,
                        "search axes": axes,
                        "plan": c.label,
                        "units": " ".join(map(str, c.widths.units)),
                        "experts": " ".join(map(str, c.widths.experts))
                        if c.widths.experts is not None
                        else "",
                        "expert width": " ".join(map(str, c.widths.expert_width))
                        if c.widths.expert_width is not None
                        else "",
                        "predicted speedup": dense_ms / c.latency_ms,
                        "measured speedup": times[0] / ms,
                        "proxy loss": c.proxy_loss,
                        "perplexity": c.metric,
                    }
                )
            log.info("%s done", workload)
    write_markdown(args, started, pd.DataFrame(fronts), pd.DataFrame(plans_rows))


# What priced the MoE blocks, by the cost model's source: hwprune profiles dense blocks only.
MOE_PRICING = {
    "analytical": "the datasheet roofline with this CPU's measured peaks",
    "calibrated": "the roofline calibrated to this CPU's dense tables",
}


def write_markdown(
    args: argparse.Namespace, started: datetime, fronts: pd.DataFrame, plans: pd.DataFrame
) -> None:
    sources = sorted(set(fronts.source))
    lines = [
        "# MoE: a Mixtral-like model searched with and without the expert axes (cpu_local)",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {cost_models.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}.  ",
        f"Date: {started:%Y-%m-%d %H:%M} UTC. Predicted latencies: the `{', '.join(sources)}` model of cpu_local "
        f"({MOE_PRICING[sources[0]] if len(sources) == 1 and sources[0] in MOE_PRICING else 'several sources'}); "
        f"measured: medians of {args.rounds} interleaved rounds on this CPU.",
        "",
        "Model: random-init, 4 layers, hidden 256, 8 query / 2 KV heads, 8 routed experts of 896 neurons, "
        "top-2. NViT saliency on the LM loss, 1000 trials of the default sampler, no recovery; "
        "`attention only` is `search.expert_axes=false`.",
        "",
        "## 1. Exact proxy fronts",
        "",
        "Hypervolume against one reference per workload (the dense latency, the worst proxy loss of both "
        "spaces); least proxy loss among front points predicted at least that much faster than dense.",
        "",
        "| workload | search axes | front points | hypervolume | least loss at 1.25x | at 1.5x | at 2x |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in fronts.to_dict("records"):
        lines.append(
            f"| {r['workload']} | {r['search axes']} | {r['front points']} | {r['hypervolume']:.4g} | "
            f"{r['least loss at 1.25x']:.4g} | {r['least loss at 1.5x']:.4g} | {r['least loss at 2.0x']:.4g} |"
        )
    lines += [
        "",
        "## 2. Re-scored plans: predicted against measured speedup",
        "",
        "| workload | search axes | plan | attention units | experts | expert width | predicted | measured | proxy loss | perplexity |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in plans.to_dict("records"):
        lines.append(
            f"| {r['workload']} | {r['search axes']} | {r['plan']} | {r['units']} | {r['experts']} | "
            f"{r['expert width']} | {r['predicted speedup']:.2f}x | {r['measured speedup']:.2f}x | "
            f"{r['proxy loss']:.4g} | {r['perplexity']:.1f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
