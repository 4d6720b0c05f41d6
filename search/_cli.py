"""What the command-line apps share: a user's mistake is one line on stderr, not a traceback."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("hwprune")

T = TypeVar("T")

# What hwprune raises for bad input: a wrong value, a missing file, an output it will not overwrite.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def one_line_errors(app: Callable[[T], None]) -> Callable[[T], None]:
    """Run `app`; on a user error log its message as one line and exit with status 2.

    `HYDRA_FULL_ERROR=1` (Hydra's own switch) shows the traceback instead.
    """

    @functools.wraps(app)
    def run(cfg: T) -> None:
        try:
            app(cfg)
        except USER_ERRORS as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.error("%s", " ".join(str(err).split()))
            raise SystemExit(2) from None

    return run
