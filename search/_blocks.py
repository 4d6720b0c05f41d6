"""Bridges from the model side to plain-number cost models: block specs and real-layer factories."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hwprune import cost_models, prunable


def head_width(model: nn.Module) -> int:
    """Output columns of the model's head after the last block (an LM's vocabulary), 0 without one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return int(head.out_features) if isinstance(head, nn.Linear) else 0


def block_spec(structure: prunable.Structure, *, head_width: int = 0) -> cost_models.BlockSpec:
    """The dense block shape of a (uniform) structure, as the cost models see it.

    Args:
        structure: The model's (dense, uniform) structure.
        head_width: Output columns of its head (`head_width(model)`), priced outside the blocks.
    """
    first = structure.layers[0]
    if any(layer != first for layer in structure.layers):
        raise ValueError(f"cost models need the dense, uniform structure; got {structure.describe()}")
    return cost_models.BlockSpec(
        hidden=structure.hidden_size,
        head_dim=first.head_dim,
        heads=first.num_heads,
        kv_heads=first.num_kv_heads,
        mlp=first.mlp_width,
        num_layers=structure.num_layers,
        gated_mlp=first.gated_mlp,
        norm="rmsnorm" if structure.family == "llama" else "layernorm",
        head_width=head_width,
    )


class RealBlock(nn.Module):
    """One of the model's own layers at reduced width, callable on hidden states alone."""

    def __init__(self, model: nn.Module, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.rotary = getattr(getattr(model, "base_model", model), "rotary_emb", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if self.rotary is not None:  # LLaMA-family layers take their rotary embeddings as input
            positions = torch.arange(x.shape[1], device=x.device)[None]
            kwargs["position_embeddings"] = self.rotary(x, positions)
        out = self.block(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def real_block_factory(
    model: nn.Module, layer: int = 0
) -> Callable[[cost_models.BlockSpec, int, int], nn.Module]:
    """A `TorchProfiler` block factory timing pruned copies of `model`'s layer `layer`."""

    def factory(spec: cost_models.BlockSpec, units: int, mlp: int) -> nn.Module:
        return RealBlock(model, prunable.pruned_block(model, layer, units=units, neurons=mlp))

    factory.__name__ = f"{type(model).__name__}.layer{layer}"
    return factory
