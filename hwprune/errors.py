"""What hwprune raises for a mistake in what it was asked to do, apart from a bug of its own.

A leaf module (it imports nothing) that every package may import. Each error is also a
`ValueError`, so callers that catch ValueError keep working. The command-line apps show these, and
missing or existing files, as one line (exit status 2); anything else raises with its traceback, so
a bug in hwprune never passes for a bad setting.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "HwpruneError", "PlanError", "UnsupportedModelError"]


class HwpruneError(ValueError):
    """A mistake the user can fix; the message says what to change."""


class ConfigError(HwpruneError):
    """A setting, option or argument with a bad value; the message names the valid ones."""


class DataError(HwpruneError):
    """An input file or dataset that cannot be used as given (format, size, content)."""


class PlanError(HwpruneError):
    """A plan is malformed or does not fit the model it is applied to."""


class UnsupportedModelError(HwpruneError):
    """A model (architecture, family, layer type) that this operation does not handle."""
