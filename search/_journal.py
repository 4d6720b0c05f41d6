"""A journal file checked before Optuna appends to it: a record cut off mid-write is set aside.

Optuna's journal is one JSON record per line. A process killed mid-write (a crash, an OOM kill, a
full disk) leaves a last line without its newline; Optuna still reads the file, but the next append
lands on that partial line, and from then on the study cannot be loaded ("Expecting ',' delimiter").
`repair_journal` runs under Optuna's own journal lock (writers hold it while they append, so a line
without its newline is a dead writer's) and keeps every byte: what it removes goes to a `.torn-*`
file beside the journal. A line already spoiled that way (partial record + whole record) keeps its
whole record.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from optuna.storages.journal import JournalFileSymlinkLock
from optuna.storages.journal._file import get_lock_file

from hwprune.errors import DataError

log = logging.getLogger(__name__)

RECORD_START = b'{"op_code"'  # every record Optuna writes begins so


def repair_journal(path: Path) -> Path | None:
    """Set aside torn records of the journal at `path`; the file they went to, or None if all is whole.

    Raises:
        ValueError: A line that is no record and holds none (not a journal Optuna wrote), naming
            the file and the line.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with get_lock_file(JournalFileSymlinkLock(str(path))):
        data = path.read_bytes()
        lines = data.split(b"\n")  # the last item is b"" when the file ends with its newline
        kept: list[bytes] = []
        torn: list[bytes] = []
        for number, line in enumerate(lines[:-1], start=1):
            if not line:  # an empty line: Optuna never writes one, and cannot read past it
                torn.append(line)
                continue
            whole = _whole_record(line)
            if whole is None:
                raise DataError(
                    f"{path}: line {number} is not an Optuna journal record; the file is damaged beyond "
                    "repair here: move it away to start the study again"
                )
            if len(whole) < len(line):
                torn.append(line[: len(line) - len(whole)])
            kept.append(whole)
        if lines[-1]:  # no newline at the end: a write that was cut off
            torn.append(lines[-1])
        if not torn:
            return None
        aside = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
        aside.write_bytes(b"\n".join(torn) + b"\n")
        path.write_bytes(b"".join(line + b"\n" for line in kept))
    log.warning(
        "%s: %d record(s) were cut off mid-write (a crash, a kill or a full disk); set aside in %s, "
        "the study resumes from its %d whole records",
        path,
        len(torn),
        aside,
        len(kept),
    )
    return aside


def _whole_record(line: bytes) -> bytes | None:
    """`line` if it is a record; else the whole record it ends with (a torn one glued before it)."""
    if _parses(line):
        return line
    start = line.rfind(RECORD_START)
    while start > 0:
        if _parses(line[start:]):
            return line[start:]
        start = line.rfind(RECORD_START, 0, start)
    return None


def _parses(record: bytes) -> bool:
    try:
        json.loads(record)
    except ValueError:
        return False
    return True
