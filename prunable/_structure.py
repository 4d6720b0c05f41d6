"""Plain-data description of a model's prunable structure.

A `Structure` is what every other part of hwprune reasons about: saliency scores one number per unit
of it, cost models read its widths as plain integers, and plans say which of its units to keep. It
holds no tensors, so it is cheap to hash, compare and serialise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

from hwprune.errors import ConfigError

UnitKind = Literal["attention", "mlp"]
UNIT_KINDS: tuple[UnitKind, ...] = ("attention", "mlp")
MOE_FIELDS = ("num_experts", "expert_width", "top_k")


@dataclass(frozen=True)
class LayerStructure:
    """Prunable widths of one transformer block.

    Attributes:
        num_heads: Query heads currently in the block (0 when the attention sub-layer is skipped).
        num_kv_heads: Key/value heads. Equal to `num_heads` for multi-head attention; fewer for
            grouped-query (GQA) and multi-query (MQA) attention.
        head_dim: Width of one head.
        mlp_width: Hidden neurons of the MLP (0 when the MLP sub-layer is skipped); in a
            mixture-of-experts layer, of its shared expert (0 without one).
        gated_mlp: Whether the MLP is gated (SwiGLU: gate and up rows are pruned together).
        num_experts: Routed experts of a mixture-of-experts layer (0 for a dense MLP).
        expert_width: Hidden neurons of each routed expert (the same for all of a layer's experts).
        top_k: Experts each token is routed to.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_width: int
    gated_mlp: bool = False
    num_experts: int = 0
    expert_width: int = 0
    top_k: int = 0

    @property
    def is_moe(self) -> bool:
        """Whether the layer's MLP is a mixture of routed experts."""
        return self.num_experts > 0

    @property
    def heads_per_unit(self) -> int:
        """Query heads sharing one key/value head (1 for multi-head attention)."""
        if self.num_kv_heads == 0:
            return 1
        return self.num_heads // self.num_kv_heads

    @property
    def attention_units(self) -> int:
        """Prunable attention units: KV groups, which are single heads for multi-head attention.

        Pruning a KV group removes its key/value head and every query head that reads it, so the
        grouping of the remaining heads is untouched.
        """
        return self.num_kv_heads

    def units(self, kind: UnitKind) -> int:
        """Number of prunable units of `kind` ("attention": attention units, i.e. KV groups)."""
        if kind == "attention":
            return self.attention_units
        if kind == "mlp":
            return self.mlp_width
        raise ConfigError(f"unknown unit kind {kind!r}; valid kinds: {list(UNIT_KINDS)}")


@dataclass(frozen=True)
class Structure:
    """The prunable structure of a whole model.

    Attributes:
        family: Architecture family adapter that found it ("bert", "vit", "gpt2", "llama").
        model_class: Class name of the model object it was discovered on.
        model_type: The `transformers` config's `model_type`.
        hidden_size: Width of the residual stream.
        layers: One entry per transformer block, in order.
        norm: The blocks' normalisation, "layernorm" or "rmsnorm" (read from their modules): what a
            cost model prices per norm. Not part of the fingerprint (it prunes nothing).
    """

    family: str
    model_class: str
    model_type: str
    hidden_size: int
    layers: tuple[LayerStructure, ...]
    norm: str = "layernorm"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def total_units(self, kind: UnitKind) -> int:
        return sum(layer.units(kind) for layer in self.layers)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def fingerprint(self) -> str:
        """A short stable hash of the prunable architecture (not the weights, not the task head).

        The model class is left out so that a plan made on `BertModel` applies to the same backbone
        loaded as `BertForSequenceClassification`; so is the norm, which no unit owns.
        """
        fields = {k: v for k, v in self.to_dict().items() if k not in ("model_class", "norm")}
        # Dense layers leave the expert fields out, so fingerprints from before they existed hold.
        fields["layers"] = [
            {k: v for k, v in layer.items() if k not in MOE_FIELDS or layer["num_experts"]}
            for layer in fields["layers"]  # type: ignore[attr-defined]
        ]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> str:
        widths = {
            (la.num_heads, la.num_kv_heads, la.mlp_width, la.num_experts, la.expert_width)
            for la in self.layers
        }
        if len(widths) == 1:
            nh, nkv, w, e, ew = widths.pop()
            per_layer = f"{nh} heads ({nkv} KV), MLP {w}"
            if e:
                per_layer += f", {e} experts (top-{self.layers[0].top_k}) of {ew}"
        else:
            per_layer = "non-uniform widths"
        return f"{self.model_class} [{self.family}]: {self.num_layers} layers, hidden {self.hidden_size}, {per_layer}"
