"""The command a benchmark table is made by, as written at its top: this process's own command line.

Written by hand, a header drifted from what ran (flags left out, `--out` missing, so that running
the header overwrote another table); read from `sys.argv`, running it as written makes the same file.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command_line(argv: list[str] | None = None) -> str:
    """`python benchmarks/<script>.py <its arguments>`, shell-quoted, the script relative to the checkout."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return "python " + shlex.join([str(shown), *argv[1:]])
