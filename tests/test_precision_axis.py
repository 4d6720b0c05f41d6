"""Precision per block as a search axis: choices per target, additive objectives, the exact front
over width x precision, and a plan's precisions from the search through apply."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import optuna
import pytest

from hwprune import cost_models, hessian, prunable
from hwprune.search import apply_config, run_apply, run_config
from hwprune.search._blocks import block_spec
from hwprune.search._exact import option_tables, pick, pick_precisions
from hwprune.search._pareto import exact_front, pareto_mask
from hwprune.search._precision_axis import PrecisionAxis, Precisions, axis_precisions
from hwprune.search._proxy import SaliencyProxy
from hwprune.search._space import SearchSpace
from hwprune.search._study import Constraints, SearchObjective
from hwprune.search.config import compose, load_hardware, to_object
from tests.conftest import SMALL, app_config
from tests.test_search_core import structure_and_scores


def tiny_axis(
    precisions: tuple[str, ...] = ("bf16", "fp32", "fp16"),
) -> tuple[SearchObjective, PrecisionAxis]:
    """The tiny BERT on gpu_a100 (analytical), with random scores and random precision losses."""
    structure, scores = structure_and_scores()
    spec = block_spec(structure)
    cost = cost_models.mixed_precision_model(
        load_hardware("gpu_a100"), spec, cost_models.Workload(dtype="auto"), precisions[1:]
    )
    rng = np.random.default_rng(7)
    quantised = tuple(p for p in cost.precisions if p != "fp32")
    estimates = {
        "fisher": {
            b: rng.uniform(0, 1e-3, (structure.num_layers, len(quantised))) for b in ("attention", "mlp")
        }
    }
    sensitivity = hessian.PrecisionSensitivity(quantised, estimates, [])
    axis = PrecisionAxis.build(cost, sensitivity, structure)
    space = SearchSpace.build(structure, mlp_step=32)
    return SearchObjective(space, cost, SaliencyProxy(scores, structure), Constraints(), axis), axis


def test_each_target_offers_the_precisions_it_runs_and_torch_deploys_per_block() -> None:
    assert axis_precisions(None, load_hardware("cpu_local"), "fp32") == ("fp32", "bf16")
    assert axis_precisions(None, load_hardware("gpu_h100"), "bf16") == ("bf16", "fp16", "fp32")
    assert axis_precisions(None, load_hardware("npu_hexagon"), "int8") == ("int8",)  # measured whole
    assert axis_precisions(["fp32"], load_hardware("cpu_local"), "fp32") == ("fp32",)  # the axis off
    assert axis_precisions(["bf16"], load_hardware("gpu_h100"), "bf16") == ("bf16",)
    with pytest.raises(
        ValueError,
        match=r"'fp16' cannot be searched per block on cpu_local \(does not run it\); valid choices: \['fp32', 'bf16'\]",
    ):
        axis_precisions(["fp32", "fp16"], load_hardware("cpu_local"), "fp32")
    with pytest.raises(
        ValueError,
        match=r"'int8' cannot be searched per block on gpu_h100 \(measures it as a whole model only\)",
    ):
        axis_precisions(["bf16", "int8"], load_hardware("gpu_h100"), "bf16")
    with pytest.raises(
        ValueError,
        match=r"priced at int8 .* measured as a whole model; valid: set workload\.dtype to one of \['fp16'\]",
    ):
        axis_precisions(["fp16", "fp16"], load_hardware("npu_hexagon"), "int8")


def test_bad_precisions_fail_at_compose_time_naming_the_valid_ones() -> None:
    with pytest.raises(
        Exception,
        match=r"search\.precisions=\['int4'\] is invalid; valid: a non-empty list of \['fp32', 'bf16', 'fp16'\]",
    ):
        to_object(compose("config", ["search.precisions=[int4]"]))
    with pytest.raises(
        Exception,
        match=r"'fp16' cannot be searched per block on cpu_local .*valid choices: \['fp32', 'bf16'\]",
    ):
        to_object(compose("config", ["hardware=cpu_local", "search.precisions=[fp32,fp16]"]))


def test_objectives_stay_additive_over_layers_with_precisions() -> None:
    objective, axis = tiny_axis()
    lats, losses, options, precisions = option_tables(
        objective.space, objective.cost_model, objective.proxy, axis
    )
    assert (
        precisions is not None
        and len(lats[0]) == len(objective.space.unit_choices) * len(objective.space.mlp_choices) * 9
    )
    rng = np.random.default_rng(0)
    study = optuna.create_study(directions=["minimize", "minimize"])
    for _ in range(20):
        choices = rng.integers(0, len(lats[0]), objective.space.num_layers)
        widths, prec = pick(options, choices), pick_precisions(precisions, choices)
        assert prec is not None
        trial = study.ask()
        latency, loss = objective.score(trial, widths, prec)
        layers = range(objective.space.num_layers)
        assert latency == pytest.approx(
            sum(lats[i][c] for i, c in zip(layers, choices, strict=True)) + axis.cost.base_ms
        )
        assert loss == pytest.approx(sum(losses[i][c] for i, c in zip(layers, choices, strict=True)))
        assert loss == pytest.approx(objective.proxy.loss(*widths)[0] + axis.loss(widths, prec)[0])
        assert trial.user_attrs["attention_precision"] == axis.names(axis.canonical(widths, prec))[0]
    # A block keeping nothing rounds nothing: its precision changes neither objective, and a trial
    # names the attention of a layer without any at its block's precision.
    empty = np.zeros(1, dtype=int)
    assert axis.block_loss(0, empty, empty, np.array([2]), np.array([1])) == pytest.approx(0.0)
    widths = objective.space.dense()._replace(units=np.array([0, 4, 4]))
    mixed, canonical = (
        Precisions(np.array([2, 2, 0]), np.array([1, 1, 1])),
        Precisions(np.array([1, 2, 0]), np.array([1, 1, 1])),
    )
    trial = study.ask()
    assert objective.score(trial, widths, mixed) == objective.score(study.ask(), widths, canonical)
    assert trial.user_attrs["attention_precision"] == axis.names(canonical)[0]


def test_the_exact_front_is_exact_over_width_and_precision() -> None:
    objective, axis = tiny_axis(("bf16", "fp32"))
    lats, losses, _, _ = option_tables(objective.space, objective.cost_model, objective.proxy, axis)
    front = exact_front(lats, losses, base=axis.cost.base_ms)
    n = len(lats[0])
    combos = np.array(
        list(itertools.product(range(n), repeat=objective.space.num_layers))
    )  # every configuration
    latency = sum(lats[i][combos[:, i]] for i in range(combos.shape[1])) + axis.cost.base_ms
    loss = sum(losses[i][combos[:, i]] for i in range(combos.shape[1]))
    keep = pareto_mask(latency, loss)
    brute = sorted(zip(latency[keep].round(9), loss[keep].round(9), strict=True))
    assert sorted(zip(front.latency.round(9), front.loss.round(9), strict=True)) == brute
    # Precision pays on the front: its fastest point runs bf16 blocks, its slowest fp32 ones.
    _, _, _, prec = option_tables(objective.space, objective.cost_model, objective.proxy, axis)
    assert prec is not None and len(front.latency) > 1
    assert (prec.mlp[front.choices[0]] == 0).all() and (prec.mlp[front.choices[-1]] == 1).any()


def _native_bf16() -> bool:
    from hwprune.cost_models._cpu_peaks import cpu_flags, native_dtypes

    return "bf16" in native_dtypes(["fp32", "bf16"], cpu_flags())


@pytest.mark.skipif(
    not _native_bf16(),
    reason="this CPU computes bf16 only by emulation (no AVX-512 BF16 or AMX): cpu_local offers no precision "
    "axis here (test_cost_models covers the flags)",
)
def test_a_search_on_this_cpu_chooses_precisions_and_the_plan_keeps_them_through_apply(
    tmp_path: Path,
) -> None:
    overrides = ["hardware=cpu_local", "recovery=none", "search.rescore=2", "search.uniform_baselines=[]"]
    outcome = run_config(app_config(tmp_path, *overrides), tmp_path / "run")
    assert isinstance(outcome.cost_model, cost_models.MixedPrecisionModel)
    assert outcome.cost_model.precisions == ("fp32", "bf16")
    labels = {c.label: c for c in outcome.candidates}
    assert labels["dense"].metric_precision == "fp32" and labels["dense bf16"].metric_precision == "bf16"
    assert labels["dense bf16"].latency_ms < labels["dense"].latency_ms
    assert 99.0 < labels["dense bf16"].metric < 100.0  # fidelity to the fp32 model: a hair off in bf16
    # Every candidate's plan file says its precisions, and the metric was measured with them.
    for c in outcome.candidates:
        plan = prunable.PrunePlan.load(tmp_path / "run" / c.plan_path)
        assert c.precisions is not None
        kept = [lp for lp in plan.layers if not lp.drop]
        assert [lp.precision for lp in kept] == [
            (a, m) for lp, a, m in zip(plan.layers, *c.precisions, strict=True) if not lp.drop
        ]
    plan_path = tmp_path / "run" / labels["dense bf16"].plan_path
    task_cfg = compose("config", SMALL[:3]).task
    result = run_apply(
        apply_config(plan=plan_path, out=tmp_path / "out", task=task_cfg, repeats=1, onnx=False)
    )
    # apply deploys the plan's per-block precisions: the metric the search measured, the same model
    # saved, reloaded with its blocks at their precisions, and timed beside dense fp32.
    assert result["precision"] == "bf16" and result["precisions"] == "attention bf16 x6; mlp bf16 x6"
    # Priced as searched: every block at bf16 (the plan's own prediction, not the fp32 model's).
    assert result["predicted_speedup"] == pytest.approx(
        labels["dense"].latency_ms / labels["dense bf16"].latency_ms
    )
    assert result["predicted_speedup"] > 1.5
    assert result["metric_pruned"] == pytest.approx(labels["dense bf16"].metric, abs=1e-3)
    reloaded = prunable.load_pruned(tmp_path / "out")
    assert prunable.block_precisions(reloaded) == [("bf16", "bf16")] * 6
    assert result["measured_speedup"] > 0 and result["latency_ms_dense_same_precision"] > 0
    assert json.loads((tmp_path / "out" / "apply.json").read_text())["precisions"] == result["precisions"]
    # Precisions a user asks for replace the plan's: the whole model at that precision.
    whole = run_apply(
        apply_config(
            plan=plan_path, out=tmp_path / "out32", task=task_cfg, repeats=1, onnx=False, precision="fp32"
        )
    )
    assert whole["precision"] == "fp32" and "precisions" not in whole
    assert prunable.block_precisions(prunable.load_pruned(tmp_path / "out32")) == [(None, None)] * 6
