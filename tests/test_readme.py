"""The README's Python example runs as written, against the installed `hwprune` alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
REPO = README.parent
# The card's folders are importable from the checkout root; users only ever have `hwprune`.
TOP_LEVEL = r"(cost_models|prunable|hessian|search|conf)"


def test_python_api_example_runs(tmp_path: Path) -> None:
    text = README.read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    report = "\nimport json\nprint(json.dumps({'source': pred.source, 'hardware': pred.hardware, 'lat': pred.latency_ms.tolist()}))\n"
    # Run from an empty directory so that nothing but the installed package can be imported.
    done = subprocess.run(
        [sys.executable, "-c", code.group(1) + report], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pred = json.loads(done.stdout.strip().splitlines()[-1])
    assert pred["source"] == "analytical" and pred["hardware"] == "tpu_v5e"
    assert pred["lat"][1] < pred["lat"][0]
    assert (tmp_path / "plan.yaml").is_file() and (tmp_path / "pruned" / "hwprune.json").is_file()


def test_nothing_imports_the_folders_by_their_bare_names() -> None:
    """`import search` works only from the checkout root (pytest's path); installed, it is `hwprune.search`."""
    bare = re.compile(rf"^\s*(import {TOP_LEVEL}\b|from {TOP_LEVEL}[. ])", re.M)
    tracked = subprocess.run(["git", "ls-files", "*.py", "*.md"], cwd=REPO, capture_output=True, text=True)
    offenders = [
        f"{path}: {match.group(0).strip()}"
        for path in tracked.stdout.split()
        for match in bare.finditer((REPO / path).read_text())
    ]
    assert offenders == []


def test_python_search_example_runs(tmp_path: Path) -> None:
    """The README's second Python example (the whole job from plain objects) runs as written."""
    text = README.read_text()
    section = text[text.index("The whole job from Python takes plain objects") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    done = subprocess.run([sys.executable, "-c", code.group(1)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    speedup, metric = map(float, done.stdout.strip().splitlines()[-1].split())
    assert speedup > 0 and 0 < metric <= 100
    assert (tmp_path / "runs" / "minilm-h100" / "report.md").is_file()
    assert (tmp_path / "deploy" / "minilm" / "apply.json").is_file()


# What each package may import of hwprune (README "Layout"): the leaf modules `errors` and
# `_progress` import nothing of ours and anyone may use them; `_registry` serves plug-in kinds.
MAY_IMPORT = {
    "cost_models": {"cost_models", "errors", "_progress"},
    "prunable": {"prunable", "errors", "_progress"},
    "hessian": {"hessian", "prunable", "errors", "_progress", "_registry"},
}


def test_imports_run_one_way() -> None:
    import ast

    root = Path(__file__).resolve().parents[1]
    wrong = []
    for package, allowed in MAY_IMPORT.items():
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names: list[str] = []
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hwprune"):
                    parts = node.module.split(".")
                    names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name.split(".")[1] for a in node.names if a.name.startswith("hwprune.")]
                wrong += [f"{path.relative_to(root)} imports hwprune.{n}" for n in names if n not in allowed]
    assert not wrong, wrong
