"""KV caches of pruned decoders, whose layers may keep no attention heads at all."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from hwprune.errors import PlanError


def append_kv(cache: Any, keys: torch.Tensor, values: torch.Tensor, layer_idx: int) -> None:
    """Append (B, kv heads, T, hd) `keys` and `values` to layer `layer_idx` of a dynamic KV cache.

    Unlike `cache.update`, a layer of zero heads still counts its tokens: the cache's length, which
    sets the positions and the causal mask of the next step, is read from its layer 0, and a plain
    dynamic layer reports 0 tokens when it stores no elements.

    Raises:
        ValueError: A layer of zero heads in a cache that preallocates heads (static caches).
    """
    headless = keys.shape[1] == 0
    layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
    if headless and layer is not None and not isinstance(layer, DynamicLayer):
        raise PlanError(
            f"layer {layer_idx} keeps no attention heads, which a {type(layer).__name__} KV cache "
            "cannot hold; generate with the default dynamic cache"
        )
    cache.update(keys, values, layer_idx)
    layer = cache.layers[layer_idx]
    if headless and type(layer).get_seq_length is DynamicLayer.get_seq_length:
        layer.__class__ = _counting(type(layer))


_COUNTING: dict[type, type] = {}


def _counting(layer_class: type) -> type:
    """`layer_class` reporting the tokens of its zero-head entries (one subclass per class)."""

    def get_seq_length(self: Any) -> int:
        return int(self.keys.shape[-2]) if self.is_initialized else 0

    if layer_class not in _COUNTING:
        name = f"Headless{layer_class.__name__}"
        _COUNTING[layer_class] = type(name, (layer_class,), {"get_seq_length": get_seq_length})
    return _COUNTING[layer_class]
