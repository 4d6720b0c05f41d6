"""Several workers on one study, as separate processes: PostgreSQL (the server these machines run,
in a database of the test's own, dropped afterwards) and a journal file shared on one machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from hwprune.search._identity import study_name_for
from hwprune.search._storage import StudyStorage, open_storage, worker_id
from hwprune.search._workers import RESCORED_ATTR, rescoring_turn
from tests._worker import IDENTITY

ROOT = Path(__file__).resolve().parents[1]
SERVER = os.environ.get("HWPRUNE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
KINDS = ["postgresql", "journal"]


@pytest.fixture
def postgres() -> Iterator[str]:
    """The URL of a fresh database on the local PostgreSQL server; dropped after the test."""
    import psycopg

    name = f"hwprune_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(f"{SERVER}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:
        pytest.fail(
            f"PostgreSQL at {SERVER} is unreachable ({err}); these machines run one on 127.0.0.1:5432"
        )
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{SERVER}/{name}"
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=KINDS)
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A shared storage spec of each kind."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres"))
    return str(tmp_path / "study.journal")


class Worker:
    """`python -m tests._worker` in its own process."""

    def __init__(self, spec: str, n_trials: int, *, seed: int = 0, hang_at: int = 0, go: Path | None = None):
        args = [spec, str(n_trials), str(seed), str(hang_at)] + ([str(go)] if go else [])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests._worker", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if hit := next((line for line in self.lines if line.startswith(prefix)), None):
                return hit
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"worker never printed {prefix!r}; its output:\n" + "\n".join(self.lines[-30:]))

    def finish(self, timeout: float = 180) -> None:
        self.wait_for("DONE", timeout)
        assert self.proc.wait(timeout) == 0, "\n".join(self.lines[-30:])


def load(spec: str, tmp_path: Path) -> optuna.Study:
    storage = open_storage(spec, tmp_path, heartbeat_s=1)
    return optuna.load_study(study_name=study_name_for(IDENTITY), storage=storage.storage)


def assert_exactly(study: optuna.Study, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """`n_trials` complete trials, no configuration twice, nothing left running or queued."""
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == n_trials
    assert len({tuple(sorted(t.params.items())) for t in complete}) == n_trials
    assert study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING)) == []
    return complete


def test_workers_started_together_share_one_budget_and_never_repeat(shared: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    # The same sampler seed everywhere: the workers propose the same widths, in the same order.
    workers = [Worker(shared, 40, seed=0, go=go) for _ in range(3)]
    for w in workers:
        w.wait_for("READY")
    go.touch()
    for w in workers:
        w.finish()
    study = load(shared, tmp_path)
    complete = assert_exactly(study, 40)
    assert len({t.user_attrs["worker"] for t in complete}) >= 2  # they did share the work
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert all("duplicate_of" in t.user_attrs or t.user_attrs.get("surplus") for t in pruned)
    assert any("duplicate_of" in t.user_attrs for t in pruned)  # the same proposals were caught
    assert study.user_attrs["hwprune_identity"] == IDENTITY


def test_a_killed_workers_trial_is_failed_and_run_again(shared: str, tmp_path: Path) -> None:
    doomed = Worker(shared, 25, hang_at=5)
    hung = int(doomed.wait_for("HANG").split()[1])
    doomed.proc.send_signal(signal.SIGKILL)
    doomed.proc.wait(30)
    Worker(shared, 25, seed=1).finish()
    study = load(shared, tmp_path)
    assert_exactly(study, 25)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in failed] == [hung]
    rerun = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.params == failed[0].params]
    assert len(rerun) == 1 and rerun[0].number > hung


def test_workers_draw_sampler_seeds_of_their_own() -> None:
    from hwprune.search._storage import worker_seed

    here = worker_seed(0)
    assert here == worker_seed(0) and here != worker_seed(1) and 0 <= here < 2**31
    other = subprocess.run(
        [sys.executable, "-c", "from hwprune.search._storage import worker_seed; print(worker_seed(0))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(other.stdout) != here  # another process, another seed


def test_sqlite_serves_one_worker_and_says_what_to_use(tmp_path: Path) -> None:
    spec = f"sqlite:///{tmp_path / 'study.db'}"
    first = Worker(spec, 20, hang_at=3)
    first.wait_for("HANG")
    try:
        second = open_storage(spec, tmp_path)
        with pytest.raises(
            ValueError, match=r"SQLite serves one worker .* use search\.storage=postgresql://"
        ):
            second.hold_single_worker()
    finally:
        first.proc.kill()
        first.proc.wait(30)
    open_storage(spec, tmp_path).hold_single_worker()  # free again once that worker is gone


def test_a_run_directory_refuses_a_second_process(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from hwprune.search._storage import open_storage; "
            "open_storage(None, Path(sys.argv[1])).hold_single_worker(); print('HELD', flush=True); time.sleep(600)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "HELD"
        with pytest.raises(ValueError, match=r"run directory is in use by another hwprune-search process"):
            open_storage(None, tmp_path).hold_single_worker()
        open_storage(None, tmp_path / "other").hold_single_worker()  # another run directory is free
    finally:
        holder.kill()
        holder.wait(30)


@pytest.mark.parametrize("kind", KINDS)
def test_the_front_is_rescored_once(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    spec = str(request.getfixturevalue("postgres")) if kind == "postgresql" else str(tmp_path / "s.journal")
    storage: StudyStorage = open_storage(spec, tmp_path, heartbeat_s=1)
    study = optuna.create_study(storage=storage.storage, study_name="s", directions=["minimize"] * 2)
    with storage.lock("rescore:s"), rescoring_turn(study, storage, tmp_path / "b") as who:
        assert who == "another worker, re-scoring now"  # while someone holds the turn
    with pytest.raises(RuntimeError), rescoring_turn(study, storage, tmp_path / "a") as who:
        assert who is None
        raise RuntimeError("re-scoring failed")
    assert RESCORED_ATTR not in study.user_attrs  # a failed re-scoring is not recorded: the next one tries
    with rescoring_turn(study, storage, tmp_path / "a") as who:
        assert who is None
    assert study.user_attrs[RESCORED_ATTR]["run_dir"] == str((tmp_path / "a").resolve())
    with rescoring_turn(study, storage, tmp_path / "b") as who:
        assert who is not None and who.endswith(f"into {(tmp_path / 'a').resolve()}")
    single = open_storage(None, tmp_path / "run")
    with rescoring_turn(study, single, tmp_path / "run") as who:
        assert who is None  # one process: always this one


def test_a_trial_whose_worker_died_while_sampling_is_failed_and_not_waited_for(
    shared: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hwprune.search import _workers
    from hwprune.search._workers import _fail_dead_workers, _SharedTrial
    from tests.test_search_core import make_objective, structure_and_scores

    storage = open_storage(shared, tmp_path, heartbeat_s=1)
    study = optuna.create_study(storage=storage.storage, study_name="s", directions=["minimize"] * 2)
    dead = study.ask()  # RUNNING, no worker tag and no heartbeat: as if killed inside the sampler
    dead.suggest_int("units_0", 0, 4)
    later = study.ask()
    later.set_user_attr("worker", worker_id())  # a live worker's trial
    objective = make_objective(structure_and_scores())
    objective.suggest(later)
    guarded = _SharedTrial(objective, 10, "test:1")
    assert guarded._earlier_twin(later, patience_s=0.3) is None  # waited once for the half-suggested trial
    assert guarded.given_up == {dead.number}

    def no_second_wait(seconds: float) -> None:
        raise AssertionError(f"waited again ({seconds} s) for a trial already given up")

    monkeypatch.setattr(_workers, "time", SimpleNamespace(monotonic=time.monotonic, sleep=no_second_wait))
    assert guarded._earlier_twin(later, patience_s=0.3) is None
    monkeypatch.undo()
    assert not _fail_dead_workers(study, storage, study.get_trials())  # too young to call dead
    assert study.get_trials(states=(TrialState.RUNNING,))[0].number == dead.number
    assert _fail_dead_workers(study, storage, study.get_trials(), untagged_s=0)
    assert [t.number for t in study.get_trials(states=(TrialState.FAIL,))] == [dead.number]
    assert study.get_trials(states=(TrialState.WAITING,)) == []  # it never ran: nothing to queue again
