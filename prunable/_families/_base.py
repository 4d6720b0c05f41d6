"""The contract one architecture family fulfils, and the stand-in for a fully pruned sub-layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from operator import attrgetter
from typing import Any, ClassVar

import torch
from torch import nn

from hwprune.errors import UnsupportedModelError
from hwprune.prunable._coupling import LayerCouplings
from hwprune.prunable._kv_cache import append_kv
from hwprune.prunable._structure import LayerStructure, Structure


class Skipped(nn.Module):
    """Stands in for a sub-layer whose every unit was pruned.

    The sub-layer's output is then a constant: its output bias, or zero where it has none. Returning
    exactly that keeps the pruned model equal to the gated model with all units of the sub-layer
    zeroed, and lets the residual stream pass through untouched where there is no bias.

    Args:
        width: Features of the output (the hidden size, or 0 for a context that feeds a
            zero-width output projection).
        bias: Output bias to add, or None.
        returns_tuple: Whether the replaced module returned `(output, attention_weights)`.
        cache_layer: For a decoder's self-attention, its layer index in the KV cache: each step is
            then recorded there with zero KV heads. The cache's length (which sets the positions and
            the causal mask of the next step) is read from its layer 0, so a layer that stored
            nothing would make cached generation differ from uncached.
        head_dim: Width of one head of that cache's (empty) entries.
    """

    num_heads = 0

    def __init__(
        self,
        *,
        width: int,
        bias: torch.Tensor | None = None,
        returns_tuple: bool,
        cache_layer: int | None = None,
        head_dim: int = 0,
    ) -> None:
        super().__init__()
        self.width = width
        self.returns_tuple = returns_tuple
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.cache_layer, self.head_dim = cache_layer, head_dim

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = hidden_states.new_zeros(*hidden_states.shape[:-1], self.width)  # (B, T, width)
        if self.bias is not None:
            out = out + self.bias
        if self.cache_layer is not None:
            self._record_step(hidden_states, kwargs, self.cache_layer)
        return (out, None) if self.returns_tuple else out

    def _record_step(self, hidden_states: torch.Tensor, kwargs: dict[str, Any], layer: int) -> None:
        cache = next(
            (kwargs[k] for k in ("cache", "past_key_values", "layer_past") if kwargs.get(k) is not None), None
        )
        if cache is None:
            return
        cache = getattr(cache, "self_attention_cache", cache)  # GPT-2 may wrap it with cross-attention's
        b, t = hidden_states.shape[:2]
        empty = hidden_states.new_zeros(b, 0, t, self.head_dim)  # (B, 0 KV heads, T new tokens, hd)
        append_kv(cache, empty, empty, layer)


class Family(ABC):
    """Adapter that reads and reshapes the blocks of one `transformers` architecture family.

    Subclasses describe where units live (`couplings`) and how a block's forward learns of its new
    width (`set_widths`); slicing itself is generic (`Coupling.keep`).
    """

    name: ClassVar[str]
    # Whether the family's models generate token by token with a KV cache (decode workloads).
    decoder: ClassVar[bool] = False
    model_types: ClassVar[tuple[str, ...]]
    blocks_path: ClassVar[str]

    def blocks(self, model: Any) -> list[Any]:
        """The transformer blocks in order."""
        base = getattr(model, "base_model", model)
        return list(attrgetter(self.blocks_path)(base))

    def drop_blocks(self, model: Any, keep: list[int]) -> None:
        """Remove every block not in `keep` (ascending) and tell the model and its config.

        The kept blocks are renumbered where they carry their index (a KV cache is indexed by it),
        and the config's layer count and per-layer lists (`layer_types`) shrink to match, so the
        model's own loop, its cache and `save_pretrained` all see the shallower model.
        """
        base = getattr(model, "base_model", model)
        owner_path, _, attr = self.blocks_path.rpartition(".")
        owner = attrgetter(owner_path)(base) if owner_path else base
        blocks = getattr(owner, attr)
        dense = len(blocks)
        kept = [blocks[i] for i in keep]
        setattr(owner, attr, nn.ModuleList(kept))
        for new, block in enumerate(kept):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new
                if isinstance(module, Skipped) and module.cache_layer is not None:
                    module.cache_layer = new
        config = model.config
        config.num_hidden_layers = len(keep)  # attribute maps route it to n_layer, n_layers, ...
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list | tuple) and len(layer_types) == dense:
            config.layer_types = [layer_types[i] for i in keep]

    def drop_problem(self, model: Any, dropped: list[int]) -> str | None:
        """Why the model cannot lose the `dropped` layers, or None where it can."""
        return None

    def check_config(self, config: Any) -> None:
        """Reject configurations whose layout the adapter does not handle."""
        if getattr(config, "add_cross_attention", False):
            raise UnsupportedModelError(
                f"{type(config).__name__} with add_cross_attention=True is not supported: "
                "hwprune prunes self-attention blocks only"
            )

    def head_dim(self, config: Any) -> int:
        explicit = getattr(config, "head_dim", None)
        return int(explicit) if explicit else config.hidden_size // config.num_attention_heads

    def structure(self, model: Any) -> Structure:
        config = model.config
        self.check_config(config)
        layers = tuple(self.layer_structure(block, config) for block in self.blocks(model))
        return Structure(
            family=self.name,
            model_class=type(model).__name__,
            model_type=config.model_type,
            hidden_size=int(config.hidden_size),
            layers=layers,
            norm=self.norm(self.blocks(model)[0]),
        )

    def norm(self, block: Any) -> str:
        """The block's normalisation: "rmsnorm" where its norm modules are RMSNorms (LLaMA, Gemma,
        Phi-3, Qwen), else "layernorm" (BERT, GPT-2, OLMo's parameter-free LayerNorm, StableLM)."""
        names = [type(m).__name__ for m in block.modules()]
        return "rmsnorm" if any(n.endswith("RMSNorm") for n in names) else "layernorm"

    @abstractmethod
    def layer_structure(self, block: Any, config: Any) -> LayerStructure:
        """Read the current widths of one block from its modules (not from the config)."""

    @abstractmethod
    def couplings(self, block: Any, config: Any) -> LayerCouplings:
        """Which weight slices each unit of the block owns, and where its gates act."""

    @abstractmethod
    def set_widths(self, block: Any, config: Any, *, heads: int, kv_heads: int, mlp: int) -> None:
        """Tell the block's forward about widths that `Coupling.keep` just sliced to."""

    def config_updates(self, config: Any, structure: Structure) -> dict[str, Any] | None:
        """Config fields that express a pruned structure, or None where the config cannot.

        Only uniform widths with no skipped sub-layer can be expressed; what else is expressible
        depends on how the family derives its head width.
        """
        return None

    @staticmethod
    def uniform_widths(structure: Structure) -> tuple[int, int, int] | None:
        """(heads, kv_heads, mlp) if every layer has the same non-zero widths, else None."""
        widths = {(la.num_heads, la.num_kv_heads, la.mlp_width) for la in structure.layers}
        if len(widths) != 1:
            return None
        heads, kv, mlp = widths.pop()
        # An MLP of no neurons is an empty sub-layer, except beside routed experts (no shared expert).
        return (heads, kv, mlp) if heads > 0 and (mlp > 0 or structure.layers[0].is_moe) else None


def qkvo_couplings(
    q: nn.Module, k: nn.Module, v: nn.Module, o: nn.Module, *, kv_heads: int, rep: int, head_dim: int
) -> list:
    """Couplings of attention with separate Q/K/V/O projections, one unit per KV group.

    Query head h reads key/value head h // rep (the layout `repeat_kv` assumes), so group g owns
    query rows [g*rep*hd, (g+1)*rep*hd) and key/value rows [g*hd, (g+1)*hd).
    """
    from hwprune.prunable._coupling import Coupling, contiguous_index

    q_index = contiguous_index(kv_heads, rep * head_dim)  # (groups, rep*hd)
    kv_index = contiguous_index(kv_heads, head_dim)  # (groups, hd)
    return [
        Coupling(q, "out", q_index),
        Coupling(k, "out", kv_index),
        Coupling(v, "out", kv_index),
        Coupling(o, "in", q_index),
    ]
