"""Plug-ins a user would write, one class each: importing this module registers them (the tests in
test_plugins.py import it, then forget the plug-ins again)."""

from __future__ import annotations

import torch

from hwprune import hessian
from hwprune.search import tasks


class WeightCount(hessian.Saliency):
    """Scores every unit `scale` (a toy criterion with two settings)."""

    name = "weight_count"
    estimates_loss = False

    def __init__(self, *, scale: float = 1.0, per_layer: bool = False) -> None:
        self.scale, self.per_layer = scale, per_layer

    def _score(self, model, structure, calibration, options):  # type: ignore[no-untyped-def]
        return [torch.full((la.attention_units,), self.scale) for la in structure.layers], [
            torch.full((la.mlp_width,), self.scale) for la in structure.layers
        ]


class Countdown(tasks.Task):
    """A lower-is-better toy task with one setting."""

    name = "countdown"
    metric_name = "countdown_error"
    higher_is_better = False

    def __init__(self, *, tokenizer: object = None, start: int = 10) -> None:
        self.start = start

    def calibration(self, model):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def evaluate(self, model):  # type: ignore[no-untyped-def]
        return float(self.start)

    def recovery_data(self, *, samples, seed=0):  # type: ignore[no-untyped-def]
        raise NotImplementedError
