"""Where a study lives, and how the workers sharing it take turns.

Four kinds of storage, chosen by `search.storage`:

- none (the default): `<run dir>/study.journal`, one process. A second process on the same run
  directory is refused (it would mark the first one's running trial failed).
- a path ending in `.journal`/`.log`: a journal file several workers on one machine can share.
- `sqlite:///...`: one worker only: SQLite has no row locking for concurrent Optuna writers (they
  crash creating the tables and count the budget twice), so a second worker is refused.
- `postgresql://...`: any number of workers on any number of machines; trials carry a heartbeat,
  so a killed worker's trial is failed and retried by the others.

Creating a study (tables, identity, seed trials) and re-scoring its front happen under a lock of the
storage (a PostgreSQL advisory lock, or a file lock beside a journal / SQLite file), so workers that
start together never race and the front is re-scored once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

from hwprune.errors import ConfigError
from hwprune.search._journal import repair_journal

log = logging.getLogger(__name__)

StorageKind = Literal["run_dir", "journal", "sqlite", "postgresql"]
VALID_STORAGE = (
    "null (a journal in the run directory), a path ending in .journal, sqlite:///<file>, postgresql://..."
)
STALE_RETRIES = 3
# Single-worker claims this process holds (flock is per open file: a second open would block us).
_HELD: dict[str, IO[str]] = {}  # a trial whose worker died is run again at most this often


@dataclass
class StudyStorage:
    """An Optuna storage and the locks its workers coordinate with.

    Attributes:
        kind: Which of the four storages this is.
        spec: The `search.storage` value (a path or URL), or the run directory's journal path.
        storage: What `optuna.create_study(storage=...)` takes.
    """

    kind: StorageKind
    spec: str
    storage: Any

    @property
    def shared(self) -> bool:
        """Whether several workers may join this storage's studies."""
        return self.kind in ("journal", "postgresql")

    @property
    def heartbeat(self) -> bool:
        """Whether running trials carry a heartbeat (dead workers' trials are found by it)."""
        return self.kind == "postgresql"

    @contextlib.contextmanager
    def lock(self, name: str, *, wait: bool = True) -> Iterator[bool]:
        """Hold the storage-wide lock `name` for the block; yields False if `wait` is off and it is taken."""
        if self.kind == "postgresql":
            with _advisory_lock(self.spec, name, wait=wait) as got:
                yield got
        else:
            with _file_lock(self._lock_path(name), wait=wait) as got:
                yield got

    def hold_single_worker(self) -> None:
        """Claim this storage for this process (run directory, SQLite); raise if another has it.

        Raises:
            ValueError: Another process is working on it, naming what to use for several workers.
        """
        path = str(self._lock_path("worker").resolve())
        if self.shared or path in _HELD:
            return
        handle = open(path, "a")  # noqa: SIM115 (held open until the process exits)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            where = "run directory" if self.kind == "run_dir" else f"search.storage={self.spec}"
            raise ConfigError(
                f"{where} is in use by another hwprune-search process; "
                + (
                    "SQLite serves one worker (concurrent writers crash creating the study and count its "
                    "trials twice): for several workers use search.storage=postgresql://... or a .journal file"
                    if self.kind == "sqlite"
                    else "give this run another hydra.run.dir, or share a study with search.storage="
                    "postgresql://... or a .journal file"
                )
            ) from None
        _HELD[path] = handle

    def _lock_path(self, name: str) -> Path:
        """A hidden lock file beside the study file (`.study.journal.create.lock`)."""
        study_file = Path(self.spec.removeprefix("sqlite:///")).expanduser()
        return study_file.parent / f".{study_file.name}.{name.replace(':', '_').replace('/', '_')}.lock"


def open_storage(spec: str | None, run_dir: Path, *, heartbeat_s: int = 10) -> StudyStorage:
    """The study storage `search.storage` names (see the module docstring).

    Args:
        spec: None for `<run_dir>/study.journal`; a `.journal`/`.log` path; `sqlite:///<file>`;
            `postgresql://...` (driver psycopg 3 unless the URL names one).
        run_dir: The run's output directory.
        heartbeat_s: Heartbeat interval of running trials on PostgreSQL; a trial without a beat for
            three intervals is failed and retried.

    Raises:
        ValueError: An unsupported storage, or PostgreSQL without a driver; names the valid choices.
    """
    check_storage(spec)
    if spec is None or spec.endswith((".journal", ".log")):
        path = run_dir / "study.journal" if spec is None else Path(spec).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_journal(path)  # before Optuna appends to a record a crash cut off
        kind: StorageKind = "run_dir" if spec is None else "journal"
        return StudyStorage(kind, str(path), JournalStorage(JournalFileBackend(str(path))))
    if spec.startswith("sqlite:///"):
        Path(spec.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return StudyStorage("sqlite", spec, spec)
    assert spec.startswith(("postgresql://", "postgresql+"))
    import sqlalchemy

    url = postgres_url(spec)
    storage = StudyStorage("postgresql", url, None)
    try:
        # Creating the tables is not safe for two processes at once: only under the lock.
        with storage.lock("create"), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat API
            storage.storage = RDBStorage(
                url,
                engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=heartbeat_s,
                grace_period=3 * heartbeat_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=STALE_RETRIES),
            )
    except sqlalchemy.exc.DBAPIError as err:  # no server, no such database, refused login
        shown = sqlalchemy.engine.make_url(spec).render_as_string(hide_password=True)
        reason = next(
            (line.strip() for line in str(err.orig).splitlines() if line.strip()), type(err).__name__
        )
        raise ConfigError(f"search.storage={shown}: cannot connect to PostgreSQL: {reason}") from None
    return storage


def check_storage(spec: str | None) -> None:
    """Raise for a `search.storage` hwprune cannot use (no file is opened, no server contacted).

    Raises:
        ValueError: An unsupported scheme, or PostgreSQL without a driver; names the valid choices.
    """
    if spec is None or spec.endswith((".journal", ".log")) or spec.startswith("sqlite:///"):
        return
    if spec.startswith(("postgresql://", "postgresql+")):
        postgres_url(spec)
        return
    raise ConfigError(f"search.storage={spec!r} is not supported; valid: {VALID_STORAGE}")


def postgres_url(spec: str) -> str:
    """`spec` with a driver SQLAlchemy can load: psycopg 3 (hwprune's `postgres` extra) unless named."""
    if not spec.startswith("postgresql://"):
        return spec  # the user named a driver
    for module, scheme in (("psycopg", "postgresql+psycopg://"), ("psycopg2", "postgresql://")):
        with contextlib.suppress(ImportError):
            __import__(module)
            return scheme + spec.removeprefix("postgresql://")
    raise ConfigError(
        f"search.storage={spec!r} needs a PostgreSQL driver: pip install 'hwprune[postgres]' (psycopg 3)"
    )


def lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for `name` (stable across processes and machines)."""
    return int.from_bytes(hashlib.sha256(f"hwprune:{name}".encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def _advisory_lock(url: str, name: str, *, wait: bool) -> Iterator[bool]:
    """A PostgreSQL session advisory lock: released with the block, or when the process dies."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    key = lock_key(name)
    try:
        with engine.connect() as conn:
            call = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
            got = conn.execute(sqlalchemy.text(f"SELECT {call}(:k)"), {"k": key}).scalar()
            got = True if wait else bool(got)
            try:
                yield got
            finally:
                if got:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


@contextlib.contextmanager
def _file_lock(path: Path, *, wait: bool) -> Iterator[bool]:
    """An exclusive flock on `path` (created beside the study file): released with the block or the process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def worker_id() -> str:
    """This process as `<host>:<pid>`: recorded on every trial it runs."""
    return f"{os.uname().nodename}:{os.getpid()}"


def worker_seed(seed: int) -> int:
    """A sampler seed of this worker's own, derived from `seed`: workers of one study that share a
    seed propose the same widths, and all but the first of each are pruned as duplicates."""
    digest = hashlib.sha256(f"{seed}:{worker_id()}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 2**31


def process_is_gone(worker: str) -> bool:
    """Whether `worker` (`<host>:<pid>`) is a process of this machine that no longer exists."""
    host, _, pid = worker.rpartition(":")
    if host != os.uname().nodename or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
