"""Architecture family adapters, looked up by the config's `model_type`."""

from __future__ import annotations

from torch import nn

from hwprune.errors import UnsupportedModelError
from hwprune.prunable._families._base import Family, Skipped
from hwprune.prunable._families._bert import BertFamily
from hwprune.prunable._families._deberta import DebertaV2Family
from hwprune.prunable._families._distilbert import DistilBertFamily
from hwprune.prunable._families._falcon import FalconFamily
from hwprune.prunable._families._gpt2 import GPT2Family
from hwprune.prunable._families._gpt_neox import GPTNeoXFamily
from hwprune.prunable._families._llama import LlamaFamily
from hwprune.prunable._families._modernbert import ModernBertFamily
from hwprune.prunable._families._phi3 import Phi3Family
from hwprune.prunable._families._vit import ViTFamily

FAMILIES: tuple[Family, ...] = (
    BertFamily(),
    DebertaV2Family(),
    DistilBertFamily(),
    ModernBertFamily(),
    ViTFamily(),
    GPT2Family(),
    GPTNeoXFamily(),
    FalconFamily(),
    LlamaFamily(),
    Phi3Family(),
)

# Families whose layout no adapter can prune exactly (yet), and why: the error says so.
REFUSED: dict[str, str] = {
    "olmo2": "its q/k norms normalise over all heads together, so removing a head changes the others' "
    "outputs: no plan can be exact",
}


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_of(model: nn.Module) -> Family:
    """The adapter for `model`, or a ValueError naming its class and the supported families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if model_type in REFUSED:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) is not supported: {REFUSED[model_type]}"
        )
    raise UnsupportedModelError(
        f"{type(model).__name__} (model_type={model_type!r}) is not a supported architecture; "
        f"supported model types: {supported_model_types()}"
    )


__all__ = ["FAMILIES", "REFUSED", "Family", "Skipped", "family_of", "supported_model_types"]
