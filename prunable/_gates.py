"""Multiplicative per-unit gates, attached with forward pre-hooks and removed without a trace.

A gate scales one unit's contribution where it enters the rest of the network: a head's slice of the
context before the output projection, a neuron's activation before the down projection. A gate of 0
is therefore exactly the removal of that unit, and the gate's gradient is the NViT saliency signal:
dL/dgate_S = g_S . w_S. Gates may carry a batch dimension (one gate per sample and unit), which gives
per-sample gradients from the one ordinary backward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hwprune.prunable._coupling import LayerCouplings
from hwprune.prunable._families import family_of
from hwprune.prunable._structure import Structure, UnitKind

if TYPE_CHECKING:
    from hwprune.prunable._plan import PrunePlan


def couplings(model: nn.Module) -> list[LayerCouplings]:
    """Per layer, the weight slices each unit owns and where its gates act."""
    family = family_of(model)
    return [family.couplings(block, model.config) for block in family.blocks(model)]


class Gates:
    """Gates on every attention unit and MLP neuron of a model.

    `heads[i]` holds layer i's attention-unit gates (one per KV group; one per head without GQA),
    `mlp[i]` its neuron gates. Each is (units,) or, after `per_sample(B)`, (B, units). The hooks read
    the current tensors at call time, so gates can be replaced or edited between forwards. Layers in
    `skipped` pass their input through untouched: the masked equivalent of dropping them.

    Use as a context manager, or call `remove()`; either leaves the model exactly as it was.
    """

    def __init__(self, model: nn.Module, structure: Structure) -> None:
        self.structure = structure
        self._couplings = couplings(model)
        param = next(model.parameters())
        self.heads: list[torch.Tensor] = []
        self.mlp: list[torch.Tensor] = []
        for layer in structure.layers:
            self.heads.append(torch.ones(layer.attention_units, dtype=param.dtype, device=param.device))
            self.mlp.append(torch.ones(layer.mlp_width, dtype=param.dtype, device=param.device))
        self.skipped: set[int] = set()
        self._handles: list[RemovableHandle] = []
        for i, block in enumerate(family_of(model).blocks(model)):
            self._handles.append(block.register_forward_hook(self._skip_hook(i), with_kwargs=True))
        for i, lc in enumerate(self._couplings):
            if lc.attn_gate_site is not None:
                self._handles.append(lc.attn_gate_site.register_forward_pre_hook(self._head_hook(i)))
            if lc.mlp_gate_site is not None:
                self._handles.append(lc.mlp_gate_site.register_forward_pre_hook(self._mlp_hook(i)))

    def of(self, kind: UnitKind) -> list[torch.Tensor]:
        if kind == "heads":
            return self.heads
        if kind == "mlp":
            return self.mlp
        raise ValueError(f"unknown unit kind {kind!r}; valid kinds: ['heads', 'mlp']")

    def reset(self, *, batch_size: int | None = None, requires_grad: bool = False) -> None:
        """Set every gate to 1, shaped (units,) or, with `batch_size`, (batch_size, units)."""
        for gates in (self.heads, self.mlp):
            for i, g in enumerate(gates):
                shape = (g.shape[-1],) if batch_size is None else (batch_size, g.shape[-1])
                gates[i] = torch.ones(shape, dtype=g.dtype, device=g.device, requires_grad=requires_grad)

    def keep_only(self, plan: PrunePlan) -> None:
        """Zero every gate whose unit `plan` removes and skip the layers it drops (the masked
        equivalent of applying it)."""
        plan.check(self.structure)
        for i, (heads, mlp) in enumerate(plan.kept_units(self.structure)):
            self.heads[i] = torch.zeros_like(self.heads[i]).index_fill_(-1, heads, 1.0)
            self.mlp[i] = torch.zeros_like(self.mlp[i]).index_fill_(-1, mlp, 1.0)
        self.skipped = set(plan.dropped())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Gates:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @staticmethod
    def _broadcast(gate: torch.Tensor, lead: int) -> torch.Tensor:
        """View a (units,) or (B, units) gate against an input with `lead` leading dims."""
        if gate.dim() == 1:
            return gate.view(*([1] * lead), -1)  # (1, .., 1, units)
        return gate.view(gate.shape[0], *([1] * (lead - 1)), -1)  # (B, 1, .., units)

    def _head_hook(self, i: int):
        lc = self._couplings[i]

        def hook(module: nn.Module, args: tuple) -> tuple:
            x, *rest = args
            gate = self.heads[i]
            if lc.heads_per_unit > 1:
                gate = gate.repeat_interleave(lc.heads_per_unit, dim=-1)  # (.., units*rep) = (.., nq)
            lead = x.shape[:-1]
            xh = x.reshape(*lead, -1, lc.head_dim)  # (B, T, nq, hd)
            g = self._broadcast(gate, len(lead)).unsqueeze(-1)  # (B|1, 1, nq, 1)
            return ((xh * g).reshape(x.shape), *rest)  # (B, T, nq*hd)

        return hook

    def _skip_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if i not in self.skipped:
                return None  # the block's own output
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _mlp_hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x, *rest = args
            return (x * self._broadcast(self.mlp[i], x.dim() - 1), *rest)  # (B, T, width)

        return hook


@contextmanager
def gated(model: nn.Module, structure: Structure | None = None) -> Iterator[Gates]:
    """Attach gates for the duration of a `with` block."""
    from hwprune.prunable._discover import discover

    gates = Gates(model, structure if structure is not None else discover(model))
    try:
        yield gates
    finally:
        gates.remove()
