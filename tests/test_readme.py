"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    pred = namespace["pred"]
    assert pred.source == "analytical" and pred.profile == "tpu_v5e"  # type: ignore[attr-defined]
    assert pred.latency_ms[1] < pred.latency_ms[0]  # type: ignore[attr-defined]
    assert (tmp_path / "plan.yaml").is_file() and (tmp_path / "pruned" / "hwprune.json").is_file()
