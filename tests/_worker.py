"""One study worker for the multi-worker tests, as its own process.

    python -m tests._worker <storage> <n_trials> <sampler seed> <hang at trial k, 0: never> [go file]

Every worker of a test uses the same sampler seed when asked to: the samplers then propose the same
widths, which is what the duplicate check has to catch. With a hang, the worker stops inside its
k-th trial (printing HANG <trial number>) until it is killed. With a go file, it waits for that
file to exist before it starts, so that several workers start at the same moment.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import optuna

from hwprune.search._space import Widths
from hwprune.search._storage import open_storage
from hwprune.search._study import run_study
from tests.test_search_core import make_objective, structure_and_scores

IDENTITY = {"test": "workers"}


def main() -> None:
    spec, n_trials, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    hang_at = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    objective = make_objective(structure_and_scores())
    score, calls = objective.score, [0]

    def maybe_hang(trial: optuna.Trial, widths: Widths, precisions: object = None) -> tuple[float, float]:
        calls[0] += 1
        if calls[0] == hang_at:
            print(f"HANG {trial.number}", flush=True)
            time.sleep(3600)
        time.sleep(0.05)  # a trial that takes a moment, so that workers started together overlap
        return score(trial, widths)  # no precision axis here

    objective.score = maybe_hang  # type: ignore[method-assign]
    go = Path(sys.argv[5]) if len(sys.argv) > 5 else None
    print("READY", flush=True)
    while go is not None and not go.exists():  # workers start their studies together
        time.sleep(0.05)
    run_study(
        objective,
        sampler=optuna.samplers.RandomSampler(seed=seed),
        storage=open_storage(spec, Path.cwd(), heartbeat_s=1),
        n_trials=n_trials,
        seeds=[(objective.space.dense(), None)],
        identity=IDENTITY,
        poll_s=0.2,
    )
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
