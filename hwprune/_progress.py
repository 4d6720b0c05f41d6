"""Progress a person can follow with or without a terminal: a log line every few seconds.

Transient terminal bars print nothing when output goes to a file or a CI log, which is where long
runs usually are; log lines show up everywhere a log goes, with the rate and the time left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Progress:
    """Counts work done and logs `label: done/total (pct), rate/s, about N s left` every `every` s.

    Args:
        label: What is being done.
        total: Units of work in all.
        logger: Where the lines go.
        every: Seconds between lines (the last unit always logs).
    """

    def __init__(self, label: str, total: int, *, logger: logging.Logger, every: float = 10.0) -> None:
        self.label, self.total, self.logger, self.every = label, max(total, 0), logger, every
        self.done = 0
        self.started = self.last = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        self.logger.info(
            "%s: %d/%d (%.0f%%), %.3g/s, about %.0f s left",
            self.label,
            self.done,
            self.total,
            pct,
            rate,
            left,
        )


def progress(
    items: Iterable[T], label: str, *, logger: logging.Logger, total: int | None = None, every: float = 10.0
) -> Iterator[T]:
    """Yield `items`, logging progress as `Progress` does."""
    count = total if total is not None else len(items)  # type: ignore[arg-type]
    tracker = Progress(label, count, logger=logger, every=every)
    for item in items:
        yield item
        tracker.advance()
