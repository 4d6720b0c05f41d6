"""Phi-3: LLaMA's block with fused projections, qkv_proj = [q | k | v] and gate_up_proj = [gate | up].

Its attention splits the fused output at `config.num_attention_heads * head_dim`, read from the
config the whole model shares; a layer pruned to other head counts gets a view of that config which
says its own count (`LayerConfig`), so layers can differ. A neuron owns row n of the gate half and
row n of the up half; slicing keeps both halves in order, so `chunk(2)` still splits them.
"""

from __future__ import annotations

from typing import Any

import torch

from hwprune.prunable._coupling import Coupling, LayerCouplings, Tap, contiguous_index
from hwprune.prunable._families._base import Family, Skipped
from hwprune.prunable._structure import LayerStructure, Structure


class LayerConfig:
    """The model's config as one layer sees it: the shared config, with some fields overridden.

    Reads fall through to the shared config at call time, so later changes to it (the attention
    implementation, say) still reach the layer.
    """

    shared: Any
    overrides: dict[str, Any]

    def __init__(self, config: Any, **overrides: Any) -> None:
        if isinstance(config, LayerConfig):
            overrides = {**config.overrides, **overrides}
            config = config.shared
        self.shared, self.overrides = config, overrides

    def __getattr__(self, name: str) -> Any:
        if name in ("shared", "overrides") or name.startswith("__"):
            raise AttributeError(name)  # not set yet (copying, unpickling): no fall-through
        if name in self.overrides:
            return self.overrides[name]
        return getattr(self.shared, name)


class Phi3Family(Family):
    name = "phi3"
    decoder = True
    model_types = ("phi3",)
    blocks_path = "layers"

    def layer_structure(self, block: Any, config: Any) -> LayerStructure:
        head_dim = self.head_dim(config)
        attn = block.self_attn
        heads = kv = 0
        if not isinstance(attn, Skipped):
            rep = attn.num_key_value_groups
            kv = attn.qkv_proj.out_features // (
                (rep + 2) * head_dim
            )  # rows: rep q + 1 k + 1 v heads per group
            heads = kv * rep
        return LayerStructure(
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            mlp_width=int(block.mlp.down_proj.in_features),
            gated_mlp=True,
        )

    def couplings(self, block: Any, config: Any) -> LayerCouplings:
        layer = self.layer_structure(block, config)
        out = LayerCouplings(heads_per_unit=layer.heads_per_unit, head_dim=layer.head_dim)
        if layer.num_heads:
            a, hd, kv, rep = block.self_attn, layer.head_dim, layer.num_kv_heads, layer.heads_per_unit
            q = contiguous_index(kv, rep * hd)  # (groups, rep*hd)
            k = contiguous_index(kv, hd, offset=kv * rep * hd)  # (groups, hd)
            v = contiguous_index(kv, hd, offset=kv * (rep + 1) * hd)
            out.attention = [
                Coupling(a.qkv_proj, "out", torch.cat([q, k, v], dim=1)),  # (groups, (rep+2)*hd)
                Coupling(a.o_proj, "in", q),
            ]
            out.attn_gate_site = a.o_proj
            out.attn_residual = Tap(block.input_layernorm)
        if layer.mlp_width:
            m, n = block.mlp, layer.mlp_width
            gate_up = torch.stack([torch.arange(n), torch.arange(n) + n], dim=1)  # (neurons, 2)
            out.mlp = [Coupling(m.gate_up_proj, "out", gate_up), Coupling(m.down_proj, "in", gate_up[:, :1])]
            out.mlp_gate_site = m.down_proj
            out.mlp_residual = Tap(block.post_attention_layernorm)
        return out

    def set_widths(self, block: Any, config: Any, *, heads: int, kv_heads: int, mlp: int) -> None:
        attn = block.self_attn
        if heads == 0:
            if not isinstance(attn, Skipped):
                block.self_attn = Skipped(
                    width=config.hidden_size,
                    bias=None,
                    returns_tuple=True,
                    cache_layer=attn.layer_idx,
                    head_dim=self.head_dim(config),
                )
            return
        attn.num_key_value_heads = kv_heads
        attn.config = LayerConfig(config, num_attention_heads=heads, num_key_value_heads=kv_heads)

    def config_updates(self, config: Any, structure: Structure) -> dict[str, Any] | None:
        uniform = self.uniform_widths(structure)
        if uniform is None:
            return None
        heads, kv, mlp = uniform
        return {
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": self.head_dim(config),  # read by the attention and the rotary embedding
            "intermediate_size": mlp,
        }
