"""Every supported family, checked end to end on a small random-init model: the README's family table.

For each family of the test suite (`tests/conftest.py`, 3 layers, hidden 64): discovery, the largest
difference between the pruned model and the gated dense model for a random plan with one empty
layer (exact surgery), the same after `save_pruned` / `load_pruned`, whether a uniform plan's config
loads with `AutoModel.from_pretrained` (and its difference), the largest difference between cached and
uncached decoding with layer 0 emptied (decoders), the same three with layer 1 dropped (depth pruning,
against the dense model with that layer skipped), and a CLI-equivalent `hwprune-search` + `hwprune-apply`
run (decoders: `task=lm` on byte-level ids; encoders: `task=fidelity` with the bundled MiniLM's
tokenizer; image models: `task=classification`, the family's classifier at the digits' 8 x 8 x 1). The same checks are unit tests (test_surgery, test_io, test_kv_cache); this table runs
them all in one place with their numbers (test_depth for the dropped layer). Output: results/benchmarks/families.md.

Usage:
    python benchmarks/families.py
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _command import command_line

from hwprune import cost_models, prunable
from hwprune.search import apply_config, run_apply, run_config, write_report
from hwprune.search.config import AppConfig, compose, to_object
from tests.conftest import CASES, Case, run
from tests.test_depth import depth_plan
from tests.test_kv_cache import DECODERS, cached_and_uncached, plan_with_empty_attention
from tests.test_surgery import random_plan

log = logging.getLogger("families")

SEARCH = [
    "search.n_trials=30",
    "search.rescore=1",
    "search.uniform_baselines=[0.5]",
    "search.exact_seeds=3",
    "recovery=none",
    "hardware=gpu_h100",
]
ENCODER_TASK = [
    "task=fidelity",
    "task.build.max_length=32",
    "task.build.calibration_samples=16",
    "task.build.eval_samples=16",
    "task.build.batch_size=8",
]
IMAGE_TASK = ["task=classification", "workload.seq_len=17"]
DECODER_TASK = [
    "task=lm",
    "workload.seq_len=32",
    "task.build.block_size=32",
    "task.build.calibration_blocks=8",
    "task.build.eval_blocks=8",
]


def exact_error(case: Case) -> tuple[float, float]:
    """Largest |pruned - gated| for a random plan with layer 1 empty, and after save + load."""
    model = case.build()
    plan = random_plan(model, 0, empty_layer=1)
    with prunable.gated(model) as gates:
        gates.keep_only(plan)
        gated = run(case, model)
    prunable.apply_plan(model, plan)
    pruned = run(case, model)
    with tempfile.TemporaryDirectory() as tmp:
        prunable.save_pruned(model, plan, tmp)
        reloaded = run(case, prunable.load_pruned(tmp))
    return float((pruned - gated).abs().max()), float((reloaded - pruned).abs().max())


def automodel(case: Case) -> str:
    """Whether a uniform plan (first unit of every layer, every other neuron) reloads with from_pretrained."""
    model = case.build()
    structure = prunable.discover(model)
    n = structure.layers[0].mlp_width
    plan = prunable.PrunePlan.from_units(
        structure, prunable.model_ref(model), attention=[[0]] * 3, mlp=[list(range(0, n, 2))] * 3
    )
    prunable.apply_plan(model, plan)
    expected = run(case, model)
    with tempfile.TemporaryDirectory() as tmp:
        prunable.save_pruned(model, plan, tmp)
        if not json.loads((Path(tmp) / "hwprune.json").read_text())["config_expresses_shape"]:
            return "no: the config cannot describe it (load_pruned does)"
        auto = getattr(transformers, type(model).__name__).from_pretrained(tmp).eval()
        return f"yes, {float((run(case, auto) - expected).abs().max()):.0e}"


def cached_error(case: Case) -> str:
    if case.name not in DECODERS:
        return "n/a (encoder)"
    model = case.build()
    pruned = prunable.pruned_copy(model, plan_with_empty_attention(model, 0, seed=3))
    cached, uncached, _ = cached_and_uncached(case, pruned)
    return f"{float((cached - uncached).abs().max()):.0e}"


def depth_error(case: Case) -> str:
    """Dropping layer 1: largest |pruned - skipped| and after save + load; decoders: cached - uncached."""
    model = case.build()
    plan = depth_plan(model, {1}, seed=2)
    with prunable.gated(model) as gates:
        gates.keep_only(plan)
        skipped = run(case, model)
    prunable.apply_plan(model, plan)
    pruned = run(case, model)
    with tempfile.TemporaryDirectory() as tmp:
        prunable.save_pruned(model, plan, tmp)
        reloaded = run(case, prunable.load_pruned(tmp))
    out = f"{float((pruned - skipped).abs().max()):.0e}, reload {float((reloaded - pruned).abs().max()):.0e}"
    if case.name in DECODERS:
        cached, uncached, _ = cached_and_uncached(case, model)
        out += f", cached {float((cached - uncached).abs().max()):.0e}"
    return out


def search_and_apply(case: Case, tmp: Path) -> str:
    """Search and apply the best plan through the apps' own code paths; 'ok, <speedup>' or the error."""
    model = case.build()
    source = tmp / case.name / "model"
    if getattr(model, "main_input_name", "") == "pixel_values":
        # The digits task: the family's classifier at 8 x 8 x 1 with 10 labels.
        config = type(model.config)(
            image_size=8,
            patch_size=2,
            num_channels=1,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=10,
        )
        name = type(model).__name__.removesuffix("Model").removesuffix("ForImageClassification")
        model = getattr(transformers, f"{name}ForImageClassification")(config)
        task = IMAGE_TASK
    elif case.name in DECODERS:
        model.resize_token_embeddings(256)  # byte-level ids
        task = DECODER_TASK
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(prunable.resolve_source(prunable.MINILM)))
        model.resize_token_embeddings(len(tokenizer))
        tokenizer.save_pretrained(source)
        task = ENCODER_TASK
    model.save_pretrained(source)
    # A decoder without its LM head (LlamaModel) is searched as the causal LM of that config.
    class_name = type(model).__name__
    if case.name in DECODERS and class_name.endswith("Model") and "LMHead" not in class_name:
        class_name = class_name.removesuffix("Model") + "ForCausalLM"
    overrides = [*SEARCH, *task, f"model.source={source}", f"model.class_name={class_name}"]
    overrides += [f"model.name={case.name}", f"saliency.cache_dir={tmp / 'cache'}"]
    try:
        cfg = to_object(compose("config", overrides))
        assert isinstance(cfg, AppConfig)
        run_dir = tmp / case.name / "run"
        write_report(run_config(cfg, run_dir))
        pareto = pd.read_csv(run_dir / "pareto.csv")
        pruned = pareto[pareto.kind != "dense"]
        best = pruned.loc[pruned.latency_ms.idxmin()]  # the fastest re-scored plan
        applied = run_apply(
            apply_config(
                plan=run_dir / best.plan_path,
                out=tmp / case.name / "apply",
                task=cfg.task,
                repeats=3,
            )
        )
    except ValueError as err:  # a refusal with its reason (hwprune's one-line errors)
        return f"refused: {str(err).splitlines()[0][:110]}"
    except Exception as err:  # the table reports any failure instead of stopping
        log.exception("%s: search + apply failed", case.name)
        return f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
    # Timing a 3-layer, 64-wide model measures Python overhead, not the plan: only the prediction is shown.
    assert applied["measured_speedup"] > 0 and applied["params_pruned"] < applied["params_dense"]
    kept = applied["params_pruned"] / applied["params_dense"]
    onnx = applied["onnx"]
    exported = (
        f"ONNX Runtime max diff {onnx['max_abs_diff']:.0e}"
        if onnx["exported"]
        else f"ONNX skipped: {onnx['reason'][:60]}"
    )
    return f"ok ({applied['predicted_speedup']:.2f}x predicted, {kept:.0%} of the parameters, {exported})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/families.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    started = datetime.now(timezone.utc)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in CASES.items():
            t0 = time.perf_counter()
            layer = prunable.discover(case.build()).layers[0]
            exact, reload = exact_error(case)
            rows.append(
                {
                    "family": name,
                    "model": type(case.build()).__name__,
                    "discover": f"{layer.num_heads} heads / {layer.attention_units} units, {layer.mlp_width} neurons"
                    + (
                        f", {layer.num_experts} experts (top-{layer.top_k}) of {layer.expert_width}"
                        if layer.is_moe
                        else ""
                    ),
                    "exact max error": f"{exact:.0e}",
                    "save/reload": f"{reload:.0e}",
                    "AutoModel reload (uniform plan)": automodel(case),
                    "cached generation": cached_error(case),
                    "layer 1 dropped": depth_error(case),
                    "search + apply": search_and_apply(case, Path(tmp)),
                }
            )
            log.info("%s done in %.0f s: %s", name, time.perf_counter() - t0, rows[-1])
    columns = list(rows[0])
    lines = [
        "# Families: discovery, exact surgery, reload, cached generation, search + apply (measured)",
        "",
        f"Command: `{command_line()}`  ",
        f"Date: {started:%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"machine: {cost_models.cpu_name()} x {torch.get_num_threads()} threads. Random-init models of `tests/conftest.py` (3 layers, hidden 64, GQA 8 query / 2 KV heads for "
        "the decoders). Errors are the largest absolute difference of outputs (hidden states or logits). "
        "Search + apply: 30 trials against the gpu_h100 roofline, recovery none, the fastest re-scored plan "
        "applied by `hwprune-apply`'s defaults (pruned, saved, its metric measured, exported to ONNX and run "
        "in ONNX Runtime in a fresh process against the pruned torch model, timed on this CPU); a 64-wide model's "
        "timing is Python overhead, so the table shows the predicted speedup and the parameters kept.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + " --- |" * len(columns),
        *("| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows),
    ]
    args.out.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
