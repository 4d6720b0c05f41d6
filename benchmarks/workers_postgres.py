"""Several `hwprune-search` workers on one study: PostgreSQL against a shared journal file.

For each storage, the embedded default model and task, `search.n_trials` trials in total:

1. one worker alone;
2. `--workers` workers started together; when the study is half done, one of them is killed with
   SIGKILL (mid-trial, as a preempted machine would be) and started again.

Each row: trials complete (must be exactly n_trials), configurations run twice among them (must be
0), trials left RUNNING / WAITING (must be 0), FAIL and PRUNED trials (killed trial, surplus and
duplicate proposals), who re-scored the front (must be one worker), the study's own span (first
trial start to last trial end) and trials/s over it, and the wall time with the workers' start-up.

Usage (the local PostgreSQL server, trust auth; each run gets a fresh database, dropped after):
    python benchmarks/workers_postgres.py --trials 2000 --workers 4
Output: results/benchmarks/workers_postgres.md
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import psycopg
import torch
from _command import command_line
from optuna.trial import TrialState

from hwprune import cost_models
from hwprune.search.app import markdown_table

log = logging.getLogger("workers_benchmark")
SERVER = "postgresql://postgres@127.0.0.1:5432"


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new database on the local server, dropped afterwards."""
    name = f"hwprune_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{SERVER}/{name}"
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def worker(storage: str, run_dir: Path, trials: int, log_path: Path) -> subprocess.Popen[bytes]:
    args = [
        "hwprune-search",
        f"search.storage={storage}",
        f"search.n_trials={trials}",
        "search.rescore=2",
        "search.uniform_baselines=[0.5]",
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.Popen(args, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)


def only_study(storage: Any) -> optuna.Study | None:
    names = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=names[0], storage=storage) if names else None


def run(kind: str, storage_spec: str, workers: int, trials: int, work: Path, kill: bool) -> dict[str, Any]:
    """Start `workers` workers on one study; optionally SIGKILL one halfway and restart it."""
    work.mkdir(parents=True)
    optuna_storage: Any = storage_spec
    if kind == "journal":
        optuna_storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(storage_spec)
        )
    else:
        optuna_storage = storage_spec.replace("postgresql://", "postgresql+psycopg://")
    started = time.perf_counter()
    procs = [worker(storage_spec, work / f"w{i}", trials, work / f"w{i}.log") for i in range(workers)]
    killed = None
    while kill and killed is None:
        time.sleep(0.5)
        study = only_study(optuna_storage)
        if (
            study is not None
            and len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= trials // 2
        ):
            procs[-1].send_signal(signal.SIGKILL)
            procs[-1].wait()
            killed = time.perf_counter() - started
            log.info("%s: killed worker %d at %.0f s; starting it again", kind, workers - 1, killed)
            procs.append(worker(storage_spec, work / "restarted", trials, work / "restarted.log"))
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - started
    study = only_study(optuna_storage)
    assert study is not None
    all_trials = study.get_trials(deepcopy=False)
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    span = (
        max(t.datetime_complete for t in complete) - min(t.datetime_start for t in complete)
    ).total_seconds()
    rescored = [p.parent.name for p in work.glob("*/pareto.csv")]
    done = {tuple(sorted(t.params.items())) for t in complete}
    return {
        "storage": kind,
        "workers": workers,
        "killed + restarted": "yes" if kill else "no",
        "exit codes": " ".join(str(c) for c in codes if c is not None) if kill else " ".join(map(str, codes)),
        "complete": len(complete),
        "run twice": len(complete) - len({tuple(sorted(t.params.items())) for t in complete}),
        "RUNNING/WAITING left": sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in all_trials),
        "FAIL": sum(t.state == TrialState.FAIL for t in all_trials),
        "FAIL run again": sum(  # the killed trial's widths, completed by a worker after it
            t.state == TrialState.FAIL and tuple(sorted(t.params.items())) in done for t in all_trials
        ),
        "PRUNED (surplus/duplicate)": sum(t.state == TrialState.PRUNED for t in all_trials),
        "re-scored by": " ".join(rescored) or "nobody",
        "study span s": round(span, 1),
        "trials/s": round(len(complete) / span, 1),
        "wall s": round(wall, 1),
        "trials by worker": " ".join(
            str(n) for n in pd.Series([t.user_attrs.get("worker", "-") for t in complete]).value_counts()
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--work", default="results/benchmarks/workers_postgres_runs")
    parser.add_argument("--out", default="results/benchmarks/workers_postgres.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    date = datetime.now(timezone.utc)
    rows = []
    for kind in ("postgresql", "journal"):
        for workers, kill in ((1, False), (args.workers, True)):
            name = f"{kind}_{workers}"
            if kind == "postgresql":
                with fresh_database() as url:
                    rows.append(run(kind, url, workers, args.trials, work / name, kill))
            else:
                rows.append(
                    run(
                        kind,
                        str((work / name / "study.journal").resolve()),
                        workers,
                        args.trials,
                        work / name,
                        kill,
                    )
                )
            log.info("%s", rows[-1])
    frame = pd.DataFrame(rows)
    text = [
        "# Several workers on one study (measured)",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {cost_models.cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"optuna {optuna.__version__}, PostgreSQL on 127.0.0.1; date {date:%Y-%m-%d %H:%M} UTC.  ",
        "Each worker is `hwprune-search` on the embedded default (MiniLM, label-free fidelity task, cpu_local at "
        "its default workload), `search.rescore=2`; the workers share the machine's cores. With a kill, the last "
        "worker gets SIGKILL once half the trials are complete and is started again.",
        "",
        markdown_table(frame),
        "",
        "`run twice`: complete trials whose widths another complete trial has. `FAIL`: trials failed "
        "(a killed worker's, by heartbeat on PostgreSQL, by its dead process id on the journal); `FAIL run "
        "again`: those whose widths a complete trial has. `PRUNED`: proposals dropped unrun because the budget was handed out or another "
        "trial has the same widths. `study span`: first trial start to last trial end.",
    ]
    Path(args.out).write_text("\n".join(text) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
