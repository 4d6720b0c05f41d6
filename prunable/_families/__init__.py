"""Architecture family adapters, looked up by the config's `model_type`."""

from __future__ import annotations

from torch import nn

from hwprune.prunable._families._base import Family, Skipped
from hwprune.prunable._families._bert import BertFamily
from hwprune.prunable._families._gpt2 import GPT2Family
from hwprune.prunable._families._llama import LlamaFamily
from hwprune.prunable._families._vit import ViTFamily

FAMILIES: tuple[Family, ...] = (BertFamily(), ViTFamily(), GPT2Family(), LlamaFamily())


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_of(model: nn.Module) -> Family:
    """The adapter for `model`, or a ValueError naming its class and the supported families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"{type(model).__name__} (model_type={model_type!r}) is not a supported architecture; "
        f"supported model types: {supported_model_types()}"
    )


__all__ = ["FAMILIES", "Family", "Skipped", "family_of", "supported_model_types"]
