"""A run's memory: re-scoring is flat in the number of candidates, and the report says each phase's peak."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hwprune.search import _rescore, run_config, write_report
from hwprune.search._memory import MemoryLog, live_tensor_bytes, release
from tests.conftest import app_config

MIB = 1024**2


def test_tensors_of_each_candidate_are_gone_before_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After each re-scored candidate (pruned, recovered by reconstruction, evaluated), the tensors
    Python holds are back where they were after the first: nothing of a candidate outlives it."""
    after: list[int] = []

    def counted() -> None:
        release()
        after.append(live_tensor_bytes())

    monkeypatch.setattr(_rescore, "release", counted)
    overrides = [
        "hardware=gpu_h100",
        "recovery=reconstruct",
        "search.rescore=3",
        "search.uniform_baselines=[0.5]",
    ]
    outcome = run_config(app_config(tmp_path, *overrides), tmp_path / "run")
    assert len(after) == len(outcome.candidates) >= 4  # dense, a uniform baseline, front plans
    assert all(b <= after[0] + MIB for b in after[1:]), [round(b / MIB, 1) for b in after]
    write_report(outcome)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Memory (resident set of this process, GiB)" in report
    assert "| re-score dense |" in report and "| saliency |" in report and "| study |" in report


def test_a_phase_peak_is_its_own() -> None:
    memory = MemoryLog()
    memory.start()
    big = torch.ones(64 * MIB // 4)  # 64 MiB touched
    memory.end("big")
    del big
    release()
    memory.start()  # what went before is not this phase's
    memory.end("small")
    (_, peak_big, _), (_, peak_small, _) = memory.phases
    if peak_big is None or peak_small is None:
        pytest.skip("no /proc on this system")
    assert peak_small <= peak_big - 60 / 1024  # the next phase did not inherit the 64 MiB peak
