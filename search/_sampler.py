"""A Pareto local search sampler for ordinal structure choices.

The additive proxy makes neighbouring configurations on the Pareto front differ in one layer's width
by one step, so the cheapest way to fill a front is to step from its points: take a point of the
current non-dominated archive (favouring sparse stretches of the front), move one or a few integer
parameters by one step, and skip anything already tried. NSGA-II spends most of 1,000 trials
re-sampling whole genes at random and rarely lands next to the front it has found.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState


class ParetoLocalSearchSampler(BaseSampler):
    """Multi-objective local search over integer and categorical parameters.

    After `n_startup_trials` finished trials (enqueued seeds count), each trial copies a point of the
    feasible non-dominated archive of all finished trials and moves 1 + Geometric(p) of its
    parameters: integers by one step up or down, categoricals to another choice. Parents are drawn
    by crowding distance half of the time and uniformly otherwise, so both gaps and dense stretches
    of the front are refined. A configuration already tried is never proposed twice while an untried
    neighbour is found within `max_retries` draws. Other distributions are sampled at random.

    It refines fronts rather than discovering them: started from a few good points (the search
    enqueues the dense model, uniform ratios and exact-front points) it fills the front between them
    much faster than NSGA-II; from random points alone NSGA-II's crossover spreads out sooner.

    Args:
        seed: Seed of the sampler's random state.
        n_startup_trials: Finished trials sampled at random before local search starts.
        move_p: Success probability of the geometric number of extra moves per child.
        max_retries: Draws per trial to find an untried configuration before accepting a repeat.
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        n_startup_trials: int = 10,
        move_p: float = 0.8,
        max_retries: int = 50,
    ) -> None:
        if n_startup_trials < 1:
            raise ValueError(f"n_startup_trials must be >= 1, got {n_startup_trials}")
        if not 0.0 < move_p <= 1.0:
            raise ValueError(f"move_p must be in (0, 1], got {move_p}")
        if max_retries < 1:
            raise ValueError(f"max_retries must be >= 1, got {max_retries}")
        self._rng = np.random.RandomState(seed)
        self._random = RandomSampler(seed=seed)
        self._n_startup, self._move_p, self._max_retries = n_startup_trials, move_p, max_retries
        self._space = IntersectionSearchSpace()

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._random.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        space = self._space.calculate(study)
        return {
            name: d
            for name, d in space.items()
            if isinstance(d, CategoricalDistribution) or (isinstance(d, IntDistribution) and not d.log)
        }

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        usable = [t for t in done if all(name in t.params for name in search_space)]
        if len(done) < self._n_startup or not usable:
            return {}
        archive = _archive(usable, study.directions)
        tried = {_key(t.params, search_space) for t in study.get_trials(deepcopy=False)}
        crowding = _crowding(archive, study.directions)
        child: dict[str, Any] = {}
        for _ in range(self._max_retries):
            if self._rng.rand() < 0.5:
                parent = archive[self._rng.choice(len(archive), p=crowding)]
            else:
                parent = archive[self._rng.randint(len(archive))]
            child = self._move(parent.params, search_space)
            if _key(child, search_space) not in tried:
                break
        return child

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def _move(self, params: dict[str, Any], space: dict[str, BaseDistribution]) -> dict[str, Any]:
        child = {name: params[name] for name in space}
        names = list(space)
        moves = min(int(self._rng.geometric(self._move_p)), len(names))
        for name in self._rng.choice(names, size=moves, replace=False):
            dist = space[name]
            if isinstance(dist, IntDistribution):
                up = self._rng.rand() < 0.5
                value = child[name] + (dist.step if up else -dist.step)
                if not dist.low <= value <= dist.high:  # at a bound: the only move is the other way
                    value = child[name] + (-dist.step if up else dist.step)
                child[name] = int(min(max(value, dist.low), dist.high))
            else:
                assert isinstance(dist, CategoricalDistribution)
                others = [c for c in dist.choices if c != child[name]]
                if others:
                    child[name] = others[self._rng.randint(len(others))]
        return child


def _key(params: dict[str, Any], space: dict[str, BaseDistribution]) -> tuple[Any, ...]:
    return tuple(params.get(name) for name in space)


def _signed(trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection]) -> np.ndarray:
    """(N, objectives) values, negated where maximised, so every objective is minimised."""
    sign = np.array([1.0 if d == StudyDirection.MINIMIZE else -1.0 for d in directions])
    return np.array([t.values for t in trials], dtype=np.float64) * sign


def _archive(trials: list[FrozenTrial], directions: Sequence[StudyDirection]) -> list[FrozenTrial]:
    """Non-dominated feasible trials; when none is feasible, the least-violating ones."""
    violation = np.array([sum(max(v, 0.0) for v in t.constraints.values()) for t in trials])
    if (violation > 0).all():
        least = violation.min()
        return [t for t, v in zip(trials, violation, strict=True) if v == least]
    feasible = [t for t, v in zip(trials, violation, strict=True) if v == 0]
    values = _signed(feasible, directions)
    # In lexicographic order a point can only be dominated by earlier ones, so each point still
    # kept when reached is on the front and the loop does one vector pass per front point.
    order = np.lexsort(values.T[::-1])
    values, feasible = values[order], [feasible[i] for i in order]
    keep = np.ones(len(feasible), dtype=bool)
    for i in range(len(feasible)):
        if keep[i]:
            # i dominates j when it is no worse everywhere and better somewhere.
            dominated = (values[i] <= values).all(1) & (values[i] < values).any(1)
            keep &= ~dominated
    return [t for t, k in zip(feasible, keep, strict=True) if k]


def _crowding(archive: list[FrozenTrial], directions: Sequence[StudyDirection]) -> np.ndarray:
    """Selection probabilities from NSGA-II's crowding distance; boundary points get the largest."""
    values = _signed(archive, directions)
    n = len(archive)
    if n <= 2:
        return np.full(n, 1.0 / n)
    distance = np.zeros(n)
    for column in values.T:
        order = np.argsort(column)
        span = column[order[-1]] - column[order[0]]
        if span > 0:
            distance[order[1:-1]] += (column[order[2:]] - column[order[:-2]]) / span
    interior_max = distance.max() if distance.max() > 0 else 1.0
    for column in values.T:
        distance[np.argmin(column)] = distance[np.argmax(column)] = interior_max
    return distance / distance.sum()
