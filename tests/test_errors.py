"""A user's mistake is an `hwprune.errors` error (one line on the command line); a bug keeps its traceback."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from hwprune import cost_models, errors, prunable
from hwprune.search._cli import one_line_errors
from hwprune.search.tasks import read_sts

ROOT = Path(__file__).resolve().parents[1]

# The only bare ValueErrors left in the library: invariants whose failure is a bug, not bad input.
INTERNAL = {
    "search/_timing.py": "measure needs the dense and the pruned model",
    "search/_proxy.py": "need one layer score per layer",
    "search/recovery/_reconstruct.py": "batches of different lengths without an attention mask",
    "prunable/_coupling.py": "index must be (units, per_unit)",
    "cost_models/_skill.py": "speedups",
    "cost_models/_spec.py": "workload dtype 'auto' must be resolved",
    "hessian/_base.py": "non-finite scores",
}


def test_every_error_is_a_value_error_and_an_hwprune_error() -> None:
    for cls in (errors.ConfigError, errors.DataError, errors.PlanError, errors.UnsupportedModelError):
        assert issubclass(cls, errors.HwpruneError) and issubclass(cls, ValueError)
    assert prunable.PlanError is errors.PlanError  # one class, re-exported where plans live


def test_user_mistakes_raise_the_class_they_are(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="unknown hardware profile 'nope'; valid choices"):
        cost_models.load_profile("nope")
    with pytest.raises(errors.ConfigError, match="unknown phase 'sideways'"):
        cost_models.Workload(phase="sideways")
    with pytest.raises(errors.PlanError, match="does not exist"):
        prunable.PrunePlan.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.tsv").write_text("a\tb\n")
    with pytest.raises(errors.DataError, match=r"bad.tsv:1: 2 columns, expected at least 7"):
        read_sts(tmp_path / "bad.tsv")
    with pytest.raises(errors.UnsupportedModelError, match="is not a supported architecture"):
        prunable.discover(torch.nn.Linear(2, 2))


def test_no_bare_value_error_is_raised_for_user_input() -> None:
    """New code that raises a bare ValueError for bad input would show users a traceback."""
    found = {}
    for package in ("search", "prunable", "cost_models", "hessian"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            for match in re.finditer(r"raise ValueError\(\s*f?\"([^\"]*)", text):
                found.setdefault(str(path.relative_to(ROOT)), []).append(match.group(1))
    assert set(found) == set(INTERNAL), sorted(set(found) ^ set(INTERNAL))
    for path, messages in found.items():
        assert all(INTERNAL[path] in m for m in messages), (path, messages)


def test_the_cli_shows_user_errors_in_one_line_and_bugs_with_their_traceback(caplog) -> None:  # type: ignore[no-untyped-def]
    def app(error: Exception) -> None:
        raise error

    wrapped = one_line_errors(interrupted=lambda: "nothing kept")(app)
    with caplog.at_level(logging.ERROR, logger="hwprune"), pytest.raises(SystemExit) as exit_:
        wrapped(errors.ConfigError("search.n_trials=0 is invalid;\n valid: >= 1"))
    assert exit_.value.code == 2 and caplog.messages == ["search.n_trials=0 is invalid; valid: >= 1"]
    for bug in (ValueError("an internal invariant"), KeyError("x"), RuntimeError("boom")):
        with pytest.raises(type(bug)):  # raised as it is: Hydra prints it with its traceback
            wrapped(bug)
    with pytest.raises(SystemExit) as exit_:
        wrapped(FileNotFoundError("plan file p.yaml does not exist"))
    assert exit_.value.code == 2
