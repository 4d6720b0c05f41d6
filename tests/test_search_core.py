"""Search building blocks: space, saliency proxy, exact Pareto front, hypervolume, study storage."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from hwprune import hessian, prunable
from hwprune.cost_models import AnalyticalModel, Workload
from hwprune.search import ParetoLocalSearchSampler
from hwprune.search._blocks import block_spec
from hwprune.search._pareto import exact_front, hypervolume, pareto_mask
from hwprune.search._proxy import SaliencyProxy
from hwprune.search._space import SearchSpace, Widths
from hwprune.search._storage import open_storage
from hwprune.search._study import Constraints, SearchObjective, run_study
from hwprune.search.config import load_hardware
from tests.conftest import CASES


def structure_and_scores() -> tuple[prunable.Structure, hessian.UnitScores]:
    """A tiny BERT's structure and random scores: enough to search over."""
    model = CASES["bert"].build()
    structure = prunable.discover(model)
    scores = hessian.RandomSaliency(seed=3).score(
        model, hessian.Calibration([hessian.Batch({"x": torch.zeros(1)})], None)
    )  # type: ignore[arg-type]
    return structure, scores


@pytest.fixture(scope="module")
def setup() -> tuple[prunable.Structure, hessian.UnitScores]:
    return structure_and_scores()


def test_space_choices_and_validation(setup) -> None:  # type: ignore[no-untyped-def]
    structure, _ = setup
    space = SearchSpace.build(structure, mlp_step=32)
    assert space.unit_choices == (0, 1, 2, 3, 4)
    assert space.mlp_choices == (0, 32, 64, 96)
    units, mlp, _, _ = space.uniform(0.5)
    assert (units.tolist() == [2, 2, 2] and mlp.tolist() == [32, 32, 32]) or mlp.tolist() == [64, 64, 64]
    odd = SearchSpace.build(structure, mlp_step=40)
    assert odd.mlp_choices == (0, 40, 80, 96)  # the dense width is always a choice
    with pytest.raises(ValueError, match="mlp_step must be >= 1, got 0"):
        SearchSpace.build(structure, mlp_step=0)


def test_proxy_is_the_sum_of_removed_scores(setup) -> None:  # type: ignore[no-untyped-def]
    structure, scores = setup
    proxy = SaliencyProxy(scores, structure)
    rng = np.random.default_rng(0)
    units = rng.integers(0, 5, size=(20, 3))
    mlp = rng.integers(0, 97, size=(20, 3))
    expected = np.zeros(20)
    for n in range(20):
        for i in range(3):
            h = np.sort(scores.attention[i].numpy())
            m = np.sort(scores.mlp[i].numpy())
            expected[n] += h[: 4 - units[n, i]].sum() + m[: 96 - mlp[n, i]].sum()
    np.testing.assert_allclose(proxy.loss(units, mlp), expected, rtol=1e-12, atol=1e-12)
    top = proxy.kept("mlp", 1, 5)
    assert set(top) == set(np.argsort(-scores.mlp[1].numpy())[:5].tolist())
    plan = proxy.plan(
        Widths(np.array([4, 0, 2]), np.array([96, 5, 0])),
        prunable.ModelRef("BertModel", structure.fingerprint()),
    )
    assert plan.kept_counts() == [(4, 96), (0, 5), (2, 0)]
    assert list(plan.layers[1].mlp) == top


def test_pareto_mask_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    lat, loss = rng.random(200), rng.random(200)
    lat[:10] = lat[10:20]  # ties
    mask = pareto_mask(lat, loss)
    for i in range(200):
        dominated = np.any((lat <= lat[i]) & (loss <= loss[i]) & ((lat < lat[i]) | (loss < loss[i])))
        assert mask[i] == (not dominated)


@pytest.mark.parametrize("seed", range(20))
def test_exact_front_without_the_excluded_combination_equals_enumeration(seed: int) -> None:
    """Depth pruning: option 0 drops a layer (no latency, its layer score), and dropping every
    layer is no model. The front must be that of every other combination; removing the all-dropped
    point after the DP left out points only it had dominated (13 points instead of 17 on llama_gqa)."""
    rng = np.random.default_rng(seed)
    layers, options = 4, 5
    lats = [np.concatenate([[0.0], 0.2 + rng.random(options - 1)]) for _ in range(layers)]
    losses = [np.concatenate([[rng.random() * 0.3], rng.random(options - 1)]) for _ in range(layers)]
    excluded = [np.arange(options) == 0 for _ in range(layers)]
    front = exact_front(lats, losses, base=0.5, excluded=excluded)
    combos = np.array(list(itertools.product(range(options), repeat=layers)))
    combos = combos[(combos != 0).any(1)]  # every combination but the all-dropped one
    all_lat = 0.5 + sum(lats[i][combos[:, i]] for i in range(layers))
    all_loss = sum(losses[i][combos[:, i]] for i in range(layers))
    mask = pareto_mask(all_lat, all_loss)
    assert len(front.latency) == mask.sum()
    np.testing.assert_allclose(sorted(all_lat[mask]), front.latency)
    assert (front.choices != 0).any(1).all()
    recon_lat = 0.5 + sum(lats[i][front.choices[:, i]] for i in range(layers))
    recon_loss = sum(losses[i][front.choices[:, i]] for i in range(layers))
    np.testing.assert_allclose(recon_lat, front.latency)
    np.testing.assert_allclose(recon_loss, front.loss)


def test_hypervolume_of_a_staircase() -> None:
    # Points (1, 3), (2, 1) against reference (4, 4): 1*(4-3) + 2*(4-1) = 7.
    assert hypervolume(np.array([1.0, 2.0, 3.0]), np.array([3.0, 1.0, 2.0]), (4.0, 4.0)) == pytest.approx(7.0)
    assert hypervolume(np.array([5.0]), np.array([5.0]), (4.0, 4.0)) == 0.0


def test_exact_front_equals_enumeration() -> None:
    rng = np.random.default_rng(2)
    lats = [rng.random(6) for _ in range(3)]
    losses = [rng.random(6) for _ in range(3)]
    front = exact_front(lats, losses, base=0.5)
    combos = np.array(list(itertools.product(range(6), repeat=3)))
    all_lat = 0.5 + sum(lats[i][combos[:, i]] for i in range(3))
    all_loss = sum(losses[i][combos[:, i]] for i in range(3))
    mask = pareto_mask(all_lat, all_loss)
    assert sorted(all_lat[mask]) == pytest.approx(sorted(front.latency))
    # The back-pointers reproduce each point's objectives.
    recon_lat = 0.5 + sum(lats[i][front.choices[:, i]] for i in range(3))
    recon_loss = sum(losses[i][front.choices[:, i]] for i in range(3))
    np.testing.assert_allclose(recon_lat, front.latency)
    np.testing.assert_allclose(recon_loss, front.loss)


def make_objective(setup, constraints: Constraints | None = None) -> SearchObjective:  # type: ignore[no-untyped-def]
    structure, scores = setup
    space = SearchSpace.build(structure, mlp_step=32)
    cost = AnalyticalModel(
        profile=load_hardware("gpu_a100"), spec=block_spec(structure), workload=Workload(dtype="bf16")
    )
    return SearchObjective(space, cost, SaliencyProxy(scores, structure), constraints or Constraints())


def test_study_resumes_without_repeating_trials(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    objective = make_objective(setup)
    seeds = [(objective.space.dense(), None), (objective.space.uniform(0.5), None)]

    def study(n: int) -> optuna.Study:
        return run_study(
            objective,
            sampler=optuna.samplers.RandomSampler(seed=0),
            storage=open_storage(None, tmp_path),
            n_trials=n,
            seeds=seeds,
        )

    first = study(12)
    done = first.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 12 and (tmp_path / "study.journal").is_file()
    assert done[0].user_attrs["units"] == [4, 4, 4]  # the dense seed ran first
    # A killed run leaves a trial RUNNING; resuming marks it failed and tops up to the target.
    first.ask()
    second = study(20)
    states = [t.state for t in second.get_trials()]
    assert states.count(TrialState.COMPLETE) == 20 and states.count(TrialState.FAIL) == 1
    before = {t.number: t.params for t in done}
    assert all(second.trials[n].params == p for n, p in before.items())  # finished trials kept as they were
    seeded = [t for t in second.get_trials() if t.user_attrs.get("units") == [4, 4, 4]]
    assert len(seeded) == 1  # seeds are not enqueued again


def test_constraints_mark_trials_infeasible(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    objective = make_objective(setup, Constraints(latency_fraction=0.5))
    study = run_study(
        objective,
        sampler=optuna.samplers.NSGAIISampler(seed=0, population_size=10),
        storage=open_storage(None, tmp_path),
        n_trials=30,
        seeds=[(objective.space.dense(), None)],
    )
    dense_ms = objective.dense_ms
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        c = t.system_attrs["constraints:latency_fraction"]
        assert c == pytest.approx(t.values[0] / dense_ms - 0.5)
    assert all(t.values[0] <= 0.5 * dense_ms + 1e-9 for t in study.best_trials)
    with pytest.raises(ValueError, match="constraint latency_ms must be positive, got -1"):
        Constraints(latency_ms=-1)


def test_the_latency_limit_is_the_tightest_budget() -> None:
    assert Constraints().latency_limit(10.0) == float("inf")
    assert Constraints(latency_fraction=0.5).latency_limit(10.0) == 5.0
    assert Constraints(latency_ms=3.0, latency_fraction=0.5).latency_limit(10.0) == 3.0
    assert Constraints(latency_ms=8.0, latency_fraction=0.5, params_fraction=0.1).latency_limit(10.0) == 5.0


def test_storage_urls(tmp_path: Path) -> None:
    journal = open_storage(str(tmp_path / "x" / "s.journal"), tmp_path)
    assert journal.kind == "journal" and journal.shared and (tmp_path / "x").is_dir()
    sqlite = open_storage(f"sqlite:///{tmp_path}/s.db", tmp_path)
    assert sqlite.kind == "sqlite" and not sqlite.shared and sqlite.storage.startswith("sqlite:///")
    default = open_storage(None, tmp_path / "run")
    assert default.kind == "run_dir" and not default.shared and (tmp_path / "run").is_dir()
    with pytest.raises(ValueError, match=r"search\.storage='mysql://x/y' is not supported; valid: null"):
        open_storage("mysql://x/y", tmp_path)


@pytest.mark.parametrize(
    "sampler",
    [
        optuna.samplers.TPESampler(seed=0, multivariate=True),
        optuna.samplers.GPSampler(seed=0, n_startup_trials=4),
        optuna.samplers.RandomSampler(seed=0),
        optuna.samplers.NSGAIISampler(seed=0, population_size=4),
        ParetoLocalSearchSampler(seed=0, n_startup_trials=3),
    ],
    ids=["tpe", "gp", "random", "nsga2", "pls"],
)
def test_every_selectable_sampler_runs_multi_objective(setup, tmp_path: Path, sampler) -> None:  # type: ignore[no-untyped-def]
    objective = make_objective(setup)
    study = run_study(objective, sampler=sampler, storage=open_storage(None, tmp_path), n_trials=8, seeds=[])
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 8
    assert all(len(t.values) == 2 for t in study.best_trials)


def test_depth_proxy_charges_a_dropped_layer_its_layer_score(setup) -> None:  # type: ignore[no-untyped-def]
    structure, scores = setup
    plain = SaliencyProxy(scores, structure)
    layer_scores = torch.tensor([0.5, 7.0, 2.0], dtype=torch.float64)
    deep = SaliencyProxy(scores, structure, layer_scores)
    units, mlp = np.array([[4, 0, 0], [0, 0, 3]]), np.array([[96, 0, 5], [0, 0, 96]])
    np.testing.assert_array_equal(deep.dropped(units, mlp), [[False, True, False], [True, True, False]])
    assert not plain.dropped(units, mlp).any()
    # Dropped layers cost their layer score; the rest what their removed units cost.
    per_layer = np.array([[plain.block_loss(i, units[n, i], mlp[n, i]) for i in range(3)] for n in range(2)])
    expected = np.where(deep.dropped(units, mlp), layer_scores.numpy(), per_layer).sum(1)
    np.testing.assert_allclose(deep.loss(units, mlp), expected, rtol=1e-12)
    assert deep.loss(units, mlp)[0] != plain.loss(units, mlp)[0]
    plan = deep.plan(Widths(units[1], mlp[1]), prunable.ModelRef("BertModel", structure.fingerprint()))
    assert plan.dropped() == [0, 1] and plan.kept_counts()[2] == (3, 96)
    with pytest.raises(ValueError, match=r"one layer score per layer \(3\), got shape \(2,\)"):
        SaliencyProxy(scores, structure, layer_scores[:2])


def test_depth_objective_times_dropped_layers_as_nothing_and_prunes_empty_models(setup) -> None:  # type: ignore[no-untyped-def]
    structure, scores = setup
    space = SearchSpace.build(structure, mlp_step=32)
    cost = AnalyticalModel(
        profile=load_hardware("gpu_a100"), spec=block_spec(structure), workload=Workload(dtype="bf16")
    )
    proxy = SaliencyProxy(scores, structure, torch.tensor([0.5, 7.0, 2.0], dtype=torch.float64))
    objective = SearchObjective(space, cost, proxy, Constraints())
    study = optuna.create_study(directions=["minimize", "minimize"])
    trial = study.ask()
    units, mlp = np.array([4, 0, 4]), np.array([96, 0, 96])
    latency, loss = objective.score(trial, Widths(units, mlp))
    dense_block = float(cost.block_latency_ms(np.array(4), np.array(96)))
    assert latency == pytest.approx(cost.base_ms + 2 * dense_block)
    assert loss == pytest.approx(7.0)
    with pytest.raises(optuna.TrialPruned, match="drop every layer"):
        objective.score(study.ask(), Widths(np.zeros(3, int), np.zeros(3, int)))


def test_depth_exact_front_has_shallower_points_and_never_an_empty_model(setup) -> None:  # type: ignore[no-untyped-def]
    from hwprune.search._exact import option_tables

    structure, scores = setup
    space = SearchSpace.build(structure, mlp_step=32)
    cost = AnalyticalModel(
        profile=load_hardware("gpu_a100"), spec=block_spec(structure), workload=Workload(dtype="bf16")
    )
    layer_scores = torch.tensor([1e-4, 1e-4, 1e-4], dtype=torch.float64)  # dropping is nearly free
    proxy = SaliencyProxy(scores, structure, layer_scores)
    lats, losses, options, _ = option_tables(space, cost, proxy)
    drops = proxy.dropped(options.units, options.mlp)
    front = exact_front(lats, losses, base=cost.base_ms, excluded=[drops] * structure.num_layers)
    units, mlp = options.units, options.mlp
    dropped = proxy.dropped(units[front.choices], mlp[front.choices])  # (P, layers)
    assert not dropped.all(-1).any()
    assert dropped.any(-1).any()  # cheap layer scores put shallower models on the front
    # Every point's objectives are what the cost model and the proxy say of its widths.
    u, m = units[front.choices], mlp[front.choices]
    np.testing.assert_allclose(cost.predict(u, m, dropped=dropped).latency_ms, front.latency, rtol=1e-9)
    np.testing.assert_allclose(proxy.loss(u, m), front.loss, rtol=1e-9, atol=1e-12)
