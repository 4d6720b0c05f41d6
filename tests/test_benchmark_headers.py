"""Every committed benchmark table reproduces from the command written at its top, and names the
machine and date that made it: the command runs a script of this checkout with flags it defines."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

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


_PARSE_ARGS = argparse.ArgumentParser.parse_args  # argparse's own, before any test patches it


class _Parsed(Exception):
    def __init__(self, args: argparse.Namespace) -> None:
        self.namespace = args


def parsed(
    script: Path, argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[ModuleType, argparse.Namespace]:
    """The script's own parser applied to `argv`: its `main()` runs until it parses its arguments.

    Unknown flags, bad values and missing required ones end in argparse's SystemExit(2), as they would
    on the command line; the namespace is what the script would have run with, defaults filled in.
    """
    monkeypatch.syspath_prepend(str(script.parent))  # scripts import their siblings (cost_models_check)
    spec = importlib.util.spec_from_file_location(f"_bench_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def capture(parser: argparse.ArgumentParser, args: object = None, namespace: object = None) -> None:
        raise _Parsed(_PARSE_ARGS(parser, argv))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    with pytest.raises(_Parsed) as caught:
        module.main()
    return module, caught.value.namespace


def written_path(module: ModuleType, args: argparse.Namespace) -> Path:
    """Where the script writes its table: `--out`, or its `default_out(args)` where that depends on others."""
    out = args.out if args.out is not None else module.default_out(args)
    return (ROOT / out).resolve()


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.name)
def test_a_table_names_its_command_machine_and_date(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
        module, args = parsed(script, argv[2:], monkeypatch)  # SystemExit(2): flags it does not take
        assert written_path(module, args) == path, f"{path.name}: {run!r} writes {args.out}, not this table"
    assert re.search(r"20\d\d-\d\d-\d\d", text), f"{path.name}: no date in its header"
    assert re.search(r"(?i)machine|AMD EPYC|Intel|NVIDIA", text), f"{path.name}: no machine in its header"


def test_every_table_is_checked() -> None:
    assert len(TABLES) >= 20  # the glob finds the committed tables (a moved folder would pass vacuously)


def test_the_check_refuses_a_flag_the_script_lacks_and_sees_where_it_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script = ROOT / "benchmarks" / "saliency_scale.py"
    with pytest.raises(SystemExit):  # argparse: unrecognized arguments
        parsed(script, ["--shapes", "llama_1b", "--no-such-flag"], monkeypatch)
    module, args = parsed(script, ["--shapes", "llama_1b"], monkeypatch)  # no --out: its default
    assert written_path(module, args) == ROOT / "results" / "benchmarks" / "saliency_scale.md"
    module, args = parsed(
        ROOT / "benchmarks" / "cost_models_unseen.py", ["--hardware", "gpu_h200"], monkeypatch
    )
    assert written_path(module, args) == ROOT / "results" / "benchmarks" / "cost_models_unseen_gpu_h200.md"
