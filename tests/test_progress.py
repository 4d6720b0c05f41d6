"""Progress lines: readable in any log, with or without a terminal."""

from __future__ import annotations

import logging

import pytest

from hwprune._progress import Progress, progress


def test_progress_logs_every_interval_and_always_the_end(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.progress")
    with caplog.at_level("INFO", logger="test.progress"):
        assert list(progress(range(5), "items", logger=log, every=3600.0)) == [0, 1, 2, 3, 4]
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["items: 5/5 (100%)"]  # only the end
    caplog.clear()
    with caplog.at_level("INFO", logger="test.progress"):
        tracker = Progress("trials", 4, logger=log, every=0.0)
        for _ in range(4):
            tracker.advance()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and lines[1].startswith("trials: 2/4 (50%), ") and "s left" in lines[1]
