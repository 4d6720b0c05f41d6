"""The default sampler (Pareto local search) and the hypervolume-greedy seed selection."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import optuna
import pytest
from optuna.samplers import BaseSampler
from optuna.testing.pytest_samplers import BasicSamplerTestCase, MultiObjectiveSamplerTestCase
from optuna.trial import TrialState

from hwprune.search import ParetoLocalSearchSampler
from hwprune.search._pareto import exact_front, hypervolume, hypervolume_subset

optuna.logging.set_verbosity(optuna.logging.WARNING)
LAYERS, OPTIONS = 5, 9


def knapsack() -> tuple[np.ndarray, np.ndarray]:
    """Per layer, monotone latency (rising with width) and loss (falling with width) of each option."""
    rng = np.random.default_rng(7)
    latency = np.cumsum(rng.uniform(0.5, 2.0, (LAYERS, OPTIONS)), axis=1)
    loss = np.cumsum(rng.uniform(0.1, 1.0, (LAYERS, OPTIONS))[:, ::-1], axis=1)[:, ::-1]
    return latency, loss


def objective(trial: optuna.Trial) -> tuple[float, float]:
    latency, loss = knapsack()
    picks = [trial.suggest_int(f"w{i}", 0, OPTIONS - 1) for i in range(LAYERS)]
    return float(sum(latency[i, p] for i, p in enumerate(picks))), float(
        sum(loss[i, p] for i, p in enumerate(picks))
    )


def hv_ratio(study: optuna.Study) -> float:
    latency, loss = knapsack()
    exact = exact_front(list(latency), list(loss))
    reference = (latency[:, -1].sum(), loss[:, 0].sum())
    front = study.best_trials
    found = hypervolume(
        np.array([t.values[0] for t in front]), np.array([t.values[1] for t in front]), reference
    )
    return found / hypervolume(exact.latency, exact.loss, reference)


def optimize(sampler: optuna.samplers.BaseSampler, n: int, seeds: int = 0) -> optuna.Study:
    """`n` trials, the first `seeds` of them the hypervolume-greedy exact-front points (as the app)."""
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    if seeds:
        latency, loss = knapsack()
        exact = exact_front(list(latency), list(loss))
        reference = (latency[:, -1].sum(), loss[:, 0].sum())
        for p in hypervolume_subset(exact.latency, exact.loss, reference, seeds):
            study.enqueue_trial({f"w{i}": int(c) for i, c in enumerate(exact.choices[p])})
    study.optimize(objective, n_trials=n)
    return study


def test_seeded_local_search_beats_random_and_nsga2_at_equal_trials() -> None:
    def mean_ratio(make: Callable[..., optuna.samplers.BaseSampler], **kwargs: int) -> float:
        return float(np.mean([hv_ratio(optimize(make(seed=s, **kwargs), 200, seeds=5)) for s in range(2)]))

    pls = mean_ratio(ParetoLocalSearchSampler)
    assert pls > mean_ratio(optuna.samplers.RandomSampler) + 0.03
    assert pls > mean_ratio(optuna.samplers.NSGAIISampler, population_size=20) + 0.01
    assert pls > 0.95


def test_deterministic_under_a_seed_and_never_repeats_a_configuration() -> None:
    first = optimize(ParetoLocalSearchSampler(seed=3), 120)
    second = optimize(ParetoLocalSearchSampler(seed=3), 120)
    assert [t.params for t in first.trials] == [t.params for t in second.trials]
    keys = [tuple(sorted(t.params.items())) for t in first.trials]
    assert len(set(keys)) == len(keys)
    assert all(0 <= v < OPTIONS for t in first.trials for v in t.params.values())


def test_children_are_one_or_few_steps_from_the_front() -> None:
    study = optimize(ParetoLocalSearchSampler(seed=0, n_startup_trials=5, move_p=1.0), 40)
    for n in range(5, 40):
        child = study.trials[n].params
        earlier = [t.params for t in study.trials[:n]]
        # move_p=1 makes exactly one move of one step, from some earlier trial.
        assert any(sum(abs(child[k] - p[k]) for k in child) == 1 for p in earlier)


def test_categorical_and_constrained_trials() -> None:
    def constrained(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_int("x", 0, 20)
        act = trial.suggest_categorical("act", ["relu", "gelu", "silu"])
        trial.set_constraint("x_at_most_10", x - 10)
        bonus = {"relu": 0.0, "gelu": 0.5, "silu": 1.0}[act]
        return float(x), float(20 - x + bonus)

    study = optuna.create_study(directions=["minimize", "minimize"], sampler=ParetoLocalSearchSampler(seed=1))
    study.optimize(constrained, n_trials=60)
    assert {t.params["act"] for t in study.trials} == {"relu", "gelu", "silu"}
    best = study.best_trials
    assert best and all(t.params["x"] <= 10 for t in best)
    assert {t.params["x"] for t in best if t.params["act"] == "relu"} >= {8, 9, 10}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_startup_trials": 0}, "n_startup_trials must be >= 1, got 0"),
        ({"move_p": 0.0}, r"move_p must be in \(0, 1\], got 0.0"),
        ({"max_retries": 0}, "max_retries must be >= 1, got 0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ParetoLocalSearchSampler(**kwargs)  # type: ignore[arg-type]


def test_runs_inside_a_resumed_study_with_waiting_seeds() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=ParetoLocalSearchSampler(seed=0))
    study.enqueue_trial({f"w{i}": OPTIONS - 1 for i in range(LAYERS)})
    study.optimize(objective, n_trials=15)
    assert study.trials[0].params == {f"w{i}": OPTIONS - 1 for i in range(LAYERS)}
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 15


def test_hypervolume_subset_is_the_greedy_optimum() -> None:
    latency, loss = knapsack()
    exact = exact_front(list(latency[:3]), list(loss[:3]))
    reference = (float(exact.latency.max()) + 1, float(exact.loss.max()) + 1)
    picked: list[int] = []
    for k in (1, 2, 3):
        picked = hypervolume_subset(exact.latency, exact.loss, reference, k)
        assert len(set(picked)) == k
        best_extension = max(
            hypervolume(exact.latency[[*picked[:-1], i]], exact.loss[[*picked[:-1], i]], reference)
            for i in range(len(exact.latency))
        )
        got = hypervolume(exact.latency[picked], exact.loss[picked], reference)
        assert got == pytest.approx(best_extension)
    # The first pick alone is the single best point.
    single = max(
        hypervolume(exact.latency[[i]], exact.loss[[i]], reference) for i in range(len(exact.latency))
    )
    first = picked[0]
    assert hypervolume(exact.latency[[first]], exact.loss[[first]], reference) == pytest.approx(single)
    every = hypervolume_subset(exact.latency, exact.loss, reference, len(exact.latency) + 5)
    assert sorted(every) == list(range(len(exact.latency)))
    assert list(itertools.islice(every, 1)) == [first]


class TestOptunaBasicSamplerSuite(BasicSamplerTestCase):
    """Optuna's own conformance suite for samplers, run against ours."""

    @pytest.fixture
    def sampler(self) -> Callable[[], BaseSampler]:
        return lambda: ParetoLocalSearchSampler(seed=0, n_startup_trials=3)


class TestOptunaMultiObjectiveSamplerSuite(MultiObjectiveSamplerTestCase):
    @pytest.fixture
    def sampler(self) -> Callable[[], BaseSampler]:
        return lambda: ParetoLocalSearchSampler(seed=0, n_startup_trials=3)
