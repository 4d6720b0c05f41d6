"""Ctrl-C: during a study a stop between trials, so that every finished trial is kept; elsewhere a
stop at once that a library cannot swallow."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import optuna

log = logging.getLogger("hwprune.search._study")


class Interrupt:
    """Whether Ctrl-C was pressed during the study, which then stops after the running trial."""

    requested = False

    def stop_study(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.requested:
            study.stop()


@contextlib.contextmanager
def between_trials() -> Iterator[Interrupt]:
    """Turn Ctrl-C into a stop between trials for the block; a second Ctrl-C stops at once.

    A KeyboardInterrupt raised inside Optuna while it records a trial leaves the trial half
    written and Optuna itself fails on it (UnboundLocalError in `_run_trial`); stopping between
    trials keeps every finished one. Outside the main thread signals cannot be caught: nothing
    changes there. The previous handler is restored on exit.
    """
    interrupt = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return

    def handler(signum: int, frame: object) -> None:
        if interrupt.requested:
            raise KeyboardInterrupt
        interrupt.requested = True
        log.warning("Ctrl-C: the search stops after the running trial (press it again to stop at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield interrupt
    finally:
        signal.signal(signal.SIGINT, previous)


class _Pressed:
    """Whether Ctrl-C was pressed inside a `stop_at_once` block (signals are per process: one state)."""

    pressed = False


_CTRL_C = _Pressed()


@contextlib.contextmanager
def stop_at_once() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt at once, as Python's own handler does, and is remembered, so that
    `raise_if_pressed()` raises it again where the first one was lost.

    Python drops an exception raised while it runs a finalizer or a callback it cannot propagate
    from ("Exception ignored in ..."): a Ctrl-C landing there is gone, and an `hwprune-apply` timing
    100000 rounds went on for minutes after one. Long loops call `raise_if_pressed()` between steps.
    Outside the main thread nothing changes; the previous handler is restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        _CTRL_C.pressed = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _CTRL_C.pressed = False


def raise_if_pressed() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed inside the running `stop_at_once` block."""
    if _CTRL_C.pressed:
        raise KeyboardInterrupt
