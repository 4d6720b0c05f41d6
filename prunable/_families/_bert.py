"""BERT-style encoders (BERT, RoBERTa): post-norm blocks, attention split into `self` and `output`."""

from __future__ import annotations

from typing import Any, ClassVar

from hwprune.prunable._coupling import Coupling, LayerCouplings, Tap, contiguous_index
from hwprune.prunable._families._base import Family, Skipped
from hwprune.prunable._structure import LayerStructure, Structure


class BertFamily(Family):
    name = "bert"
    model_types: ClassVar[tuple[str, ...]] = ("bert", "roberta")
    blocks_path = "encoder.layer"

    def layer_structure(self, block: Any, config: Any) -> LayerStructure:
        attn = block.attention.self
        heads = 0 if isinstance(attn, Skipped) else int(attn.num_attention_heads)
        return LayerStructure(
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=self.head_dim(config),
            mlp_width=int(block.intermediate.dense.out_features),
        )

    def couplings(self, block: Any, config: Any) -> LayerCouplings:
        layer = self.layer_structure(block, config)
        out = LayerCouplings(
            heads_per_unit=1,
            head_dim=layer.head_dim,
        )
        if layer.num_heads:
            proj = block.attention.output.dense
            index = contiguous_index(layer.num_heads, layer.head_dim)  # (heads, hd)
            out.attention = [Coupling(m, "out", index) for m in self.head_projections(block.attention.self)]
            out.attention.append(Coupling(proj, "in", index))
            out.attn_gate_site = proj
            out.attn_residual = self.attention_residual(block)
        if layer.mlp_width:
            dense = block.intermediate.dense
            out.couple_mlp([dense], block.output.dense, layer.mlp_width, Tap(dense))
        return out

    def head_projections(self, attn: Any) -> list[Any]:
        """The projections whose output rows each head owns a slice of."""
        return [attn.query, attn.key, attn.value]

    def attention_residual(self, block: Any) -> Tap:
        """Where the layer's input (what the attention output is added to) can be read."""
        return Tap(block.attention.self.query)

    def set_widths(self, block: Any, config: Any, *, heads: int, kv_heads: int, mlp: int) -> None:
        if heads == 0:
            # The output projection now has zero inputs and yields its bias, which then goes
            # through the residual add and LayerNorm exactly as before; only the context is empty.
            block.attention.self = Skipped(width=0, returns_tuple=True)
            return
        attn = block.attention.self
        attn.num_attention_heads = heads
        attn.all_head_size = heads * attn.attention_head_size

    def config_updates(self, config: Any, structure: Structure) -> dict[str, Any] | None:
        uniform = self.uniform_widths(structure)
        # BERT derives head width as hidden_size / num_attention_heads, so only the MLP width can
        # change in a config that AutoModel still understands.
        if uniform is None or uniform[0] != config.num_attention_heads:
            return None
        return {"intermediate_size": uniform[2]}
