"""Every committed benchmark table reproduces from the command written at its top, and names the
machine and date that made it: the command runs a script of this checkout with flags it defines."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLES = sorted((ROOT / "results" / "benchmarks").glob("*.md"))
APPS = ("hwprune-search", "hwprune-apply", "hwprune-profile")
HEADER_LINES = 8  # the command, date and machine sit above the table


def header(path: Path) -> str:
    return "\n".join(path.read_text().splitlines()[:HEADER_LINES])


def commands(text: str) -> list[str]:
    """The backticked commands after `Command:` (a table may name several runs; other backticked
    names on the line, its CSV say, are not commands)."""
    found = re.findall(r"Commands?: (.*)", text)
    assert found, "no 'Command:' line"
    quoted = [c for line in found for c in re.findall(r"`([^`]+)`", line)]
    return [c for c in quoted if c.split()[0] in ("python", "bash", *APPS)]


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.name)
def test_a_table_names_its_command_machine_and_date(path: Path) -> None:
    text = header(path)
    runs = commands(text)
    assert runs, f"{path.name}: its Command line holds no backticked command"
    for run in runs:
        argv = shlex.split(run)
        if argv[0] in APPS:
            assert all("=" in a for a in argv[1:]), f"{path.name}: {run!r} passes a non-override argument"
            continue
        script = ROOT / argv[1]
        assert script.is_file(), f"{path.name}: {argv[1]} is not in this checkout"
        source = script.read_text()
        for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{path.name}: {script.name} defines no {flag}"
    assert re.search(r"20\d\d-\d\d-\d\d", text), f"{path.name}: no date in its header"
    assert re.search(r"(?i)machine|AMD EPYC|Intel|NVIDIA", text), f"{path.name}: no machine in its header"


def test_every_table_is_checked() -> None:
    assert len(TABLES) >= 20  # the glob finds the committed tables (a moved folder would pass vacuously)
