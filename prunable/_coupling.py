"""Which slices of which weights make up each prunable unit.

One mechanism serves saliency and surgery alike: a `Coupling` says, for one linear layer, which of its
output rows (or input columns) belong to each unit. Removing a unit slices every coupled tensor the
same way; magnitude or Fisher saliency sums over the same slices. Families only describe couplings;
the slicing is written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hwprune.errors import ConfigError
from hwprune.prunable._experts import ExpertCoupling

Side = Literal["out", "in"]


@dataclass(frozen=True)
class Coupling:
    """The rows (side="out") or columns (side="in") of one linear layer that each unit owns.

    Attributes:
        module: An `nn.Linear` or a GPT-2 style `Conv1D` (weight stored transposed).
        side: "out" couples output features (weight rows of a Linear, and the bias);
            "in" couples input features (weight columns; the bias is shared and stays).
        index: (units, per_unit) feature indices owned by each unit.
    """

    module: Any  # nn.Linear | Conv1D
    side: Side
    index: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.module, nn.Linear | Conv1D):
            raise TypeError(f"couplings take nn.Linear or Conv1D, got {type(self.module).__name__}")
        if self.index.dim() != 2:
            raise ValueError(f"index must be (units, per_unit), got shape {tuple(self.index.shape)}")

    @property
    def num_units(self) -> int:
        return int(self.index.shape[0])

    def parameters_and_dims(self) -> list[tuple[Any, int]]:
        """The coupled parameters with the dimension the unit index runs along."""
        is_conv = isinstance(self.module, Conv1D)
        weight = self.module.weight
        if self.side == "out":
            out = [(weight, 1 if is_conv else 0)]
            if self.module.bias is not None:
                out.append((self.module.bias, 0))
            return out
        return [(weight, 0 if is_conv else 1)]

    def per_unit(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Regroup `tensor` (shaped like a coupled parameter) as (units, elements of one unit)."""
        picked = tensor.index_select(dim, self.index.reshape(-1).to(tensor.device))
        picked = picked.movedim(dim, 0)  # (units*per_unit, rest...)
        return picked.reshape(self.num_units, -1)  # (units, per_unit*rest)

    def keep(self, units: torch.Tensor) -> None:
        """Slice the module in place so that only `units` remain, in their original order."""
        # Ascending feature order keeps each fused segment intact: GPT-2's c_attn is [q | k | v],
        # so the kept features must stay [q_a, q_b | k_a, k_b | v_a, v_b], not unit by unit.
        features = self.index[units].reshape(-1).sort().values
        for param, dim in self.parameters_and_dims():
            sliced = param.data.index_select(dim, features.to(param.device)).clone()
            param.data = sliced
            # Optimizers and autograd key on the Parameter object, so replacing .data keeps the
            # module's parameter identity; gradients of the old shape must go.
            param.grad = None
        n = int(features.numel())
        if isinstance(self.module, Conv1D):
            if self.side == "out":
                self.module.nf = n
            else:
                self.module.nx = n
        elif self.side == "out":
            self.module.out_features = n
        else:
            self.module.in_features = n


def contiguous_index(units: int, width: int, offset: int = 0) -> torch.Tensor:
    """(units, width) index where unit u owns features [offset + u*width, offset + (u+1)*width)."""
    return offset + torch.arange(units * width).reshape(units, width)


@dataclass(frozen=True)
class Tap:
    """Where a tensor of the forward pass can be read: a module's first input, or its output."""

    module: nn.Module
    output: bool = False


@dataclass
class LayerCouplings:
    """Everything one block's units are coupled to, plus where their gates act.

    Attributes:
        attention: Couplings of the attention units (Q/K/V rows and output-projection columns).
        mlp: Couplings of the MLP neurons (up/gate rows and down-projection columns).
        attn_gate_site: Module whose input is the per-head context (B, T, heads*head_dim).
        mlp_gate_site: Module whose input is the MLP activation (B, T, width).
        heads_per_unit: Query heads per attention unit (the GQA group size).
        head_dim: Width of one head, to view the gate site's input per head.
        attn_residual: Where the residual stream that the attention output is added to can be read,
            before the attention runs (the input of the norm in front of it, or of the block).
        mlp_residual: The same for the MLP output.
        experts: The routed experts of a mixture-of-experts layer (`mlp` then couples its shared
            expert, if it has one).
    """

    attention: list[Coupling] = field(default_factory=list)
    mlp: list[Coupling] = field(default_factory=list)
    attn_gate_site: nn.Module | None = None
    mlp_gate_site: nn.Module | None = None
    heads_per_unit: int = 1
    head_dim: int = 0
    attn_residual: Tap | None = None
    mlp_residual: Tap | None = None
    experts: ExpertCoupling | None = None

    def couple_mlp(self, inputs: list[Any], output: Any, width: int, residual: Tap | None = None) -> None:
        """Couple an MLP's `width` neurons: neuron n owns row n of every input projection (up, and
        gate in a gated MLP) and column n of `output`, where its gate acts."""
        index = contiguous_index(width, 1)  # (neurons, 1)
        self.mlp = [Coupling(m, "out", index) for m in inputs] + [Coupling(output, "in", index)]
        self.mlp_gate_site = output
        self.mlp_residual = residual

    def of(self, kind: str) -> list[Coupling]:
        if kind == "attention":
            return self.attention
        if kind == "mlp":
            return self.mlp
        raise ConfigError(f"unknown unit kind {kind!r}; valid kinds: ['attention', 'mlp']")
