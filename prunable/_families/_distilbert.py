"""DistilBERT: post-norm encoder blocks like BERT's, with the output projection inside the attention."""

from __future__ import annotations

from typing import Any

from hwprune.prunable._coupling import Coupling, LayerCouplings, Tap, contiguous_index
from hwprune.prunable._families._base import Family, Skipped
from hwprune.prunable._structure import LayerStructure, Structure


class DistilBertFamily(Family):
    name = "distilbert"
    model_types = ("distilbert",)
    blocks_path = "transformer.layer"

    def layer_structure(self, block: Any, config: Any) -> LayerStructure:
        head_dim = self.head_dim(config)
        attn = block.attention
        heads = 0 if isinstance(attn, Skipped) else attn.q_lin.out_features // head_dim
        return LayerStructure(
            num_heads=heads, num_kv_heads=heads, head_dim=head_dim, mlp_width=int(block.ffn.lin1.out_features)
        )

    def couplings(self, block: Any, config: Any) -> LayerCouplings:
        layer = self.layer_structure(block, config)
        out = LayerCouplings(heads_per_unit=1, head_dim=layer.head_dim)
        if layer.num_heads:
            attn = block.attention
            index = contiguous_index(layer.num_heads, layer.head_dim)  # (heads, hd)
            out.attention = [Coupling(m, "out", index) for m in (attn.q_lin, attn.k_lin, attn.v_lin)]
            out.attention.append(Coupling(attn.out_lin, "in", index))
            out.attn_gate_site = attn.out_lin
            out.attn_residual = Tap(attn.q_lin)  # the block's input, which the attention output joins
        if layer.mlp_width:
            out.couple_mlp([block.ffn.lin1], block.ffn.lin2, layer.mlp_width, Tap(block.ffn.lin1))
        return out

    def set_widths(self, block: Any, config: Any, *, heads: int, kv_heads: int, mlp: int) -> None:
        if heads == 0:
            # The attention then yields its output bias, added to the residual and normalised as before.
            block.attention = Skipped(width=config.dim, bias=block.attention.out_lin.bias, returns_tuple=True)
            return
        block.attention.n_heads = heads  # the forward reshapes by head width; this keeps repr honest

    def config_updates(self, config: Any, structure: Structure) -> dict[str, Any] | None:
        uniform = self.uniform_widths(structure)
        # The head width is dim / n_heads: only the MLP width can change in a config.
        if uniform is None or uniform[0] != config.n_heads:
            return None
        return {"hidden_dim": uniform[2]}
