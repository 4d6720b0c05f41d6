"""A model as graph exporters can trace it: the same outputs, dispatch without data-dependent Python."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

from torch import nn

from hwprune.prunable._experts import exportable_experts_forward
from hwprune.prunable._gates import couplings


@contextlib.contextmanager
def exportable(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every routed-experts forward replaced by a traceable one, for the block.

    Dense models are yielded as they are. The replacement is an instance attribute, removed on
    exit, so the model is exactly as it was afterwards (also on an error).
    """
    swapped: list[nn.Module] = []
    try:
        for layer in couplings(model):
            if layer.experts is not None:
                experts = layer.experts.experts
                experts.forward = types.MethodType(exportable_experts_forward, experts)
                swapped.append(experts)
        yield model
    finally:
        for experts in swapped:
            del experts.forward
