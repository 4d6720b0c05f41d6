"""Prune -> recover -> quantise: `hwprune-apply precision=bf16` evaluates, saves and times the pruned
model at its deployed precision, beside the dense model as loaded and at the same precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hwprune import prunable
from hwprune.search import apply_config, run_apply
from hwprune.search.config import build_task, compose, to_object
from tests.conftest import SMALL, Case, run
from tests.test_surgery import random_plan


def test_apply_deploys_a_plan_in_bf16(run_dir: Path, tmp_path: Path) -> None:
    task_cfg = compose("config", SMALL[:3]).task
    plan = run_dir / "plans" / "uniform_50pct.yaml"
    result = run_apply(
        apply_config(
            plan=plan,
            out=tmp_path / "out",
            task=task_cfg,
            repeats=2,
            onnx=False,
            precision="bf16",
            workload={
                "dtype": "fp32"
            },  # the plan was searched for a GPU in bf16: time the dense model in fp32
        )
    )
    assert result["precision"] == "bf16"
    # The recovered fp32 metric, then the same model in bf16: a small step, and the one reported.
    assert result["metric_pruned"] == pytest.approx(result["metric_unquantized"], abs=0.5)
    assert result["metric_dense_same_precision"] == pytest.approx(result["metric_dense"], abs=0.5)
    # Three models timed in the same rounds: dense as loaded (fp32), dense bf16, pruned bf16.
    assert result["workload"]["dtype"] == "fp32" and result["measured_speedup"] > 0
    assert result["measured_speedup_same_precision"] == pytest.approx(
        result["latency_ms_dense_same_precision"] / result["latency_ms_pruned"]
    )
    # What is saved is the bf16 model, and it reloads as such with the reported metric.
    reloaded = prunable.load_pruned(tmp_path / "out")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    task = build_task(to_object(compose("config", SMALL[:3])).task, prunable.MINILM)  # type: ignore[attr-defined]
    task.prepare(prunable.load_model(prunable.MINILM, "BertModel"))
    assert task.evaluate(reloaded) == pytest.approx(result["metric_pruned"], abs=1e-3)
    assert json.loads((tmp_path / "out" / "apply.json").read_text())["precision"] == "bf16"


def test_a_precision_apply_cannot_deploy_fails_at_compose_time(run_dir: Path) -> None:
    with pytest.raises(
        Exception,
        match=r"precision='int4' is not supported; valid choices: \['fp32', 'bf16', 'fp16', 'int8'\]",
    ):
        to_object(compose("apply", [f"plan={run_dir / 'plans' / 'dense.yaml'}", "out=x", "precision=int4"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "name", ["bert", "llama_gqa"]
)  # a config that cannot, and one that can, say the shape
def test_a_half_model_saves_and_reloads_in_its_dtype(name: str, dtype: torch.dtype, tmp_path: Path) -> None:
    from tests.conftest import CASES

    case: Case = CASES[name]
    model = case.build()
    plan = random_plan(model, 0) if name == "bert" else None
    pruned = prunable.pruned_copy(model, plan, check_weights=False) if plan else model
    if plan is None:  # a uniform plan: the config can express it
        structure = prunable.discover(model)
        plan = prunable.PrunePlan.from_units(
            structure,
            prunable.model_ref(model),
            attention=[[0] for _ in structure.layers],
            mlp=[list(range(16)) for _ in structure.layers],
        )
        pruned = prunable.pruned_copy(model, plan, check_weights=False)
    prunable.cast(pruned, dtype)  # as hwprune-apply precision=bf16 / fp16 does
    prunable.save_pruned(pruned, plan, tmp_path / "m")
    reloaded = prunable.load_pruned(tmp_path / "m")
    assert {p.dtype for p in reloaded.parameters()} == {dtype}
    assert torch.equal(run(case, reloaded), run(case, pruned))


def test_an_fp32_deployment_of_a_bf16_plan_is_timed_in_fp32(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dense reference is timed at the plan's dtype (bf16, gpu_h100); the pruned model at the
    precision it is deployed at (fp32), with the dense fp32 model beside it for the same-precision
    speedup: no speedup mixes a bf16 model with an fp32 one unsaid."""
    from hwprune.search import _apply

    timed: list[list[str]] = []
    real = _apply.measure

    def spy(models, **kwargs):  # type: ignore[no-untyped-def]
        timed.append([w.dtype for _, w in models])
        return real(models, **kwargs)

    monkeypatch.setattr(_apply, "measure", spy)
    result = run_apply(
        apply_config(
            plan=run_dir / "plans" / "uniform_50pct.yaml",
            out=tmp_path / "out",
            task=compose("config", SMALL[:3]).task,
            repeats=1,
            onnx=False,
            precision="fp32",
        )
    )
    assert timed == [["bf16", "fp32", "fp32"]]  # dense as the plan runs, pruned fp32, dense fp32
    assert result["precision"] == "fp32" and result["workload"]["dtype"] == "bf16"
    assert result["metric_dense_same_precision"] == result["metric_dense"]
    assert prunable.PrunePlan.load(tmp_path / "out" / "hwprune_plan.yaml").metadata["precision"] == "fp32"


def test_a_front_priced_in_fp16_is_measured_in_fp16(tmp_path: Path) -> None:
    """gpu_t4 runs fp16 first: every re-scored plan's metric is the fp16 model's, beside its fp32 one
    (with the precision axis off: one precision, the whole model at it)."""
    from hwprune.search import run_config
    from tests.conftest import app_config

    overrides = [
        "hardware=gpu_t4",
        "recovery=none",
        "search.rescore=1",
        "search.uniform_baselines=[]",
        "search.precisions=[fp16]",
    ]
    outcome = run_config(app_config(tmp_path, *overrides), tmp_path / "run")
    assert outcome.cost_model.workload.dtype == "fp16"
    assert {c.metric_precision for c in outcome.candidates} == {"fp16"}
    dense = outcome.candidates[0]
    # The fidelity metric compares with the dense fp32 model: 100 in fp32, a hair less in fp16.
    assert dense.metric_unquantized == pytest.approx(100.0, abs=1e-3)
    assert 99.0 < dense.metric < dense.metric_unquantized
    plan = prunable.PrunePlan.load(tmp_path / "run" / outcome.candidates[-1].plan_path)
    assert plan.metadata["precision"] == "fp16"
