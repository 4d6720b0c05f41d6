"""`hwprune-apply`'s output directory: checked before any work, written whole or not at all.

The result is staged in a hidden directory beside `out` and renamed into place when complete. A
marker file names it as `hwprune-apply`'s output: `overwrite=true` replaces such a directory and
nothing else (not a search run, not a directory of the user's, never the model's, the plan's or the
working directory). Files get the modes the user's umask gives new files, not the private ones of
a temporary directory, so a model server running as another user can read them. A staging
directory left by a process that was killed is removed by the next apply to the same `out`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hwprune.errors import ConfigError
from hwprune.search._storage import process_is_gone, worker_id

log = logging.getLogger("hwprune.apply")

MARKER = ".hwprune-apply"
VALID_OUT = "a new or empty directory, or an earlier hwprune-apply output with overwrite=true"


def check_out(out_arg: str | Path, *, model_dir: Path, plan: Path, overwrite: bool) -> Path:
    """The output directory, resolved; refused where writing it would lose something.

    What a killed apply left beside `out` is tidied first: its staging directories are removed, and
    an earlier output it had moved aside is put back (then checked like any other).

    Args:
        out_arg: What the user passed as `out`.
        model_dir: The model's own directory: `out` may not be it, hold it, or lie inside it.
        plan: The plan file being applied: `out` may not hold it.
        overwrite: Whether a non-empty `out` may be replaced (only an earlier apply's output).

    Raises:
        ValueError: One line naming `out`, what it would destroy or why it cannot be written.
    """
    if not str(out_arg).strip():
        raise ConfigError(f"out={str(out_arg)!r} is empty; valid: {VALID_OUT}")
    out = Path(out_arg).expanduser().resolve()
    if out.parent.is_dir():
        _tidy_abandoned(out)
    model_dir = model_dir.resolve()
    held = {
        "the model's own directory": model_dir,
        "the plan": plan.resolve(),
        "the working directory": Path.cwd(),
    }
    for what, path in held.items():
        if out == path or out in path.parents:
            raise ConfigError(f"out={out_arg} would write over {what} {path}; valid: {VALID_OUT}")
    if model_dir in out.parents:
        raise ConfigError(
            f"out={out_arg} would write into the model's own directory {model_dir}; valid: {VALID_OUT}"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out_arg} is a file; valid: {VALID_OUT}")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"out={out_arg} exists and is not empty; pass overwrite=true to replace an earlier "
                f"hwprune-apply output, or choose another directory"
            )
        if not (out / MARKER).is_file():
            raise ConfigError(
                f"out={out_arg} is not an earlier hwprune-apply output (it has no {MARKER} file), so "
                f"overwrite=true will not delete it; valid: {VALID_OUT}"
            )
    existing = next(p for p in (out, *out.parents) if p.exists())
    try:  # a real probe: permissions, a read-only file system and immutable directories all answer it
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"out={out_arg} cannot be written: {existing}: {err.strerror}") from None
    return out


@contextlib.contextmanager
def staged(out: Path, *, marker: dict[str, Any]) -> Iterator[Path]:
    """A staging directory to write the result into; on success it becomes `out`, else it is removed.

    An earlier output at `out` is replaced only once the new one is complete (rename aside, rename
    in, delete the old), so a failure at any point leaves `out` as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.staging.{worker_id()}."
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    try:
        yield staging
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _public_modes(staging)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced.{worker_id()}.", dir=out.parent))
            old.rmdir()
            out.rename(old)
        staging.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _public_modes(root: Path) -> None:
    """Give `root` and everything in it the modes new files get under the user's umask."""
    umask = os.umask(0)
    os.umask(umask)  # read it; the process keeps its own
    for path in (root, *root.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _tidy_abandoned(out: Path) -> None:
    """Remove the staging directories beside `out` of applies that were killed; put back an output one
    of them had moved aside."""
    for kind in ("staging", "replaced"):
        for path in out.parent.glob(f".{out.name}.{kind}.*"):
            worker = path.name.removeprefix(f".{out.name}.{kind}.").rpartition(".")[0]
            if not path.is_dir() or not process_is_gone(worker):
                continue
            if kind == "replaced" and not out.exists():  # killed between its two renames
                log.warning("restoring %s from %s, left by an apply that was killed (%s)", out, path, worker)
                path.rename(out)
                continue
            log.warning("removing %s, left by an apply that was killed (%s)", path, worker)
            shutil.rmtree(path, ignore_errors=True)
