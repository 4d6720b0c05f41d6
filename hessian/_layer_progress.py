"""Progress of the scoring passes layer by layer: a log line every few seconds, however long a pass."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from hwprune import prunable
from hwprune._progress import Progress


@contextmanager
def layer_progress(
    model: nn.Module, label: str, *, passes: int, logger: logging.Logger
) -> Iterator[Progress]:
    """Count every block's forward in every pass, and log the count with its rate and the time left.

    A pass of a large model on a CPU takes minutes, so progress counted by pass would sit still that
    long. Each block's forward advances the count; the pass's backward follows before the next
    pass's forwards, so the rate and the time left include it.

    Args:
        model: The model being scored.
        label: What is being done ("nvit saliency").
        passes: Forward passes through the whole model that the scoring will run (an upper bound).
        logger: Where the lines go.
    """
    blocks = prunable.blocks(model)
    tracker = Progress(f"{label}, layers x passes", passes * len(blocks), logger=logger)

    def advance(*_: object) -> None:
        if tracker.done < tracker.total:  # a method that stops early, or a skipped layer: never past 100 %
            tracker.advance()

    handles = [block.register_forward_hook(advance) for block in blocks]
    try:
        yield tracker
    finally:
        for handle in handles:
            handle.remove()
