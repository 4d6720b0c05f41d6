"""The search from Python with plain objects (no Hydra), and the public API the benchmarks use."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import optuna
import pandas as pd
import pytest
from torch import nn
from transformers import AutoTokenizer

from hwprune import cost_models, hessian, prunable, search
from hwprune.search.recovery import NoRecovery
from hwprune.search.tasks import FidelityTask

ROOT = Path(__file__).resolve().parents[1]


def job(model: nn.Module, **changes: object) -> search.SearchJob:
    tokenizer = AutoTokenizer.from_pretrained(str(prunable.resolve_source(prunable.MINILM)))
    fields: dict[str, object] = {
        "model": model,
        "source": prunable.MINILM,
        "name": "minilm",
        "task": FidelityTask(tokenizer=tokenizer, calibration_samples=16, eval_samples=16, max_length=32),
        "saliency": hessian.NViTSaliency(),
        "hardware": cost_models.load_profile("gpu_h100"),
        "workload": cost_models.Workload(batch_size=4, seq_len=64),
        "settings": search.SearchSettings(n_trials=25, rescore=1, uniform_baselines=(0.5,), exact_seeds=3),
    }
    return search.SearchJob(**(fields | changes))  # type: ignore[arg-type]


def test_a_search_from_plain_objects_writes_its_outputs_and_its_plan_applies(
    minilm: nn.Module, tmp_path: Path
) -> None:
    sampler = functools.partial(optuna.samplers.NSGAIISampler, population_size=8)
    outcome = search.run_search(job(minilm, sampler=sampler), tmp_path / "run")
    assert isinstance(outcome.study.sampler, optuna.samplers.NSGAIISampler)
    assert len(outcome.study.trials) == 25 and outcome.cost_model.source == "analytical"
    pareto = search.write_report(outcome)
    assert set(pareto.kind) == {"dense", "uniform", "search"}
    report = (tmp_path / "run" / "report.md").read_text()
    assert report.startswith("# hwprune run: minilm / fidelity on gpu_h100")
    assert "sampler `NSGAIISampler(population_size=8)`" in report and "`none`" in report
    plan = outcome.run_dir / next(c for c in outcome.candidates if c.kind == "search").plan_path
    out = tmp_path / "deploy" / "out"  # its parent is made too
    result = search.apply_and_measure(plan, out, task=outcome.job.task, repeats=1, onnx=False)
    assert (out / "apply.json").is_file() and result["measured_speedup"] > 0
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no staging directory left beside it
    assert result["params_pruned"] < result["params_dense"] and result["recovery"] is None
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert len(trials) == 25


def test_settings_and_jobs_refuse_bad_values_naming_them(minilm: nn.Module) -> None:
    for bad, message in (
        ({"n_trials": 0}, r"search\.n_trials=0 is invalid; valid: >= 1"),
        ({"uniform_baselines": (0.5, 1.5)}, r"search\.uniform_baselines=\[0\.5, 1\.5\] is invalid"),
        ({"params_budget_fraction": 2.0}, r"search\.params_budget_fraction=2\.0 is invalid"),
        ({"storage": "mysql://x"}, r"search\.storage='mysql://x' is not supported"),
    ):
        with pytest.raises(ValueError, match=message):
            search.SearchSettings(**bad)  # type: ignore[arg-type]
    assert search.SearchSettings(uniform_baselines=[0.25]).uniform_baselines == (0.25,)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"search\.depth=true needs saliency that estimates the loss"):
        job(minilm, saliency=hessian.MagnitudeSaliency(), settings=search.SearchSettings(depth=True))
    with pytest.raises(ValueError, match=r"recovery\.samples=0 is invalid; valid: >= 1"):
        job(minilm, recovery=NoRecovery(), recovery_samples=0)


def test_benchmarks_use_the_public_api_only() -> None:
    private = re.compile(r"hwprune\.(\w+)\._\w+")
    offenders = [
        f"{path.name}: {m.group(0)}"
        for path in sorted((ROOT / "benchmarks").glob("*.py"))
        for m in private.finditer(path.read_text())
        if m.group(0) != "hwprune.hessian._hutchinson"  # saliency_scale swaps in the old HVP to compare
    ]
    assert offenders == []


def test_a_parameter_budget_is_seeded_with_the_exact_front_points_within_it(
    minilm: nn.Module, tmp_path: Path
) -> None:
    settings = search.SearchSettings(
        n_trials=12, rescore=0, uniform_baselines=(0.5,), exact_seeds=5, params_budget_fraction=0.4
    )
    outcome = search.run_search(job(minilm, settings=settings), tmp_path / "run")
    trials = outcome.study.trials
    # After dense, uniform 50 % and (precision axis) the dense model at each other precision.
    at_precisions = len(getattr(outcome.cost_model, "precisions", ("one",))) - 1
    seeded = [t for t in trials if "fixed_params" in t.system_attrs][2 + at_precisions :]
    assert len(seeded) == 5 and outcome.hv_ratio is None  # no exact bound under a parameter budget
    assert outcome.exact is not None
    on_front = set(zip(outcome.exact.latency.round(9), outcome.exact.loss.round(9), strict=True))
    dense = trials[0].user_attrs["block_params"]
    for t in seeded:
        assert t.user_attrs["block_params"] <= 0.4 * dense  # within the budget: feasible
        assert (round(t.values[0], 9), round(t.values[1], 9)) in on_front  # and optimal under it
