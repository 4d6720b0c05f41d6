"""Multiplicative per-unit gates, attached with forward pre-hooks and removed without a trace.

A gate scales one unit's contribution where it enters the rest of the network: a head's slice of the
context before the output projection, a neuron's activation before the down projection. A gate of 0
is therefore exactly the removal of that unit, and the gate's gradient is the NViT saliency signal:
dL/dgate_S = g_S . w_S. Gates may carry a batch dimension (one gate per sample and unit), which gives
per-sample gradients from the one ordinary backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hwprune.errors import ConfigError
from hwprune.prunable._coupling import LayerCouplings
from hwprune.prunable._experts import ExpertCoupling, gated_experts_forward, masked_routing
from hwprune.prunable._families import family_of
from hwprune.prunable._structure import UNIT_KINDS, Structure

if TYPE_CHECKING:
    from hwprune.prunable._plan import PrunePlan


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, in order (one per layer of its structure)."""
    return family_of(model).blocks(model)


def couplings(model: nn.Module) -> list[LayerCouplings]:
    """Per layer, the weight slices each unit owns and where its gates act."""
    family = family_of(model)
    return [family.couplings(block, model.config) for block in family.blocks(model)]


GATE_KINDS = (*UNIT_KINDS, "experts", "expert_mlp")  # what gates and unit scores hold per layer


class Gates:
    """Gates on every attention unit and MLP neuron of a model.

    `attention[i]` holds layer i's attention-unit gates (one per KV group; one per head without GQA),
    `mlp[i]` its neuron gates. Each is (units,) or, after `per_sample(B)`, (B, units). The hooks read
    the current tensors at call time, so gates can be replaced or edited between forwards. Layers in
    `skipped` pass their input through untouched: the masked equivalent of dropping them. In a
    mixture-of-experts layer, `experts[i]` (experts,) scales each routed expert's output and
    `expert_mlp[i]` (experts, width) each of its neurons (both (0,)-shaped elsewhere), and
    `routable[i]`, when set, is the (experts,) mask of experts the router may choose.

    Use as a context manager, or call `remove()`; either leaves the model exactly as it was.
    """

    def __init__(self, model: nn.Module, structure: Structure) -> None:
        self.structure = structure
        self._couplings = couplings(model)
        param = next(model.parameters())
        self.attention: list[torch.Tensor] = []
        self.mlp: list[torch.Tensor] = []
        self.experts: list[torch.Tensor] = []
        self.expert_mlp: list[torch.Tensor] = []
        self.routable: list[torch.Tensor | None] = [None] * structure.num_layers
        for layer in structure.layers:
            dtype, device = param.dtype, param.device
            self.attention.append(torch.ones(layer.attention_units, dtype=dtype, device=device))
            self.mlp.append(torch.ones(layer.mlp_width, dtype=dtype, device=device))
            self.experts.append(torch.ones(layer.num_experts, dtype=dtype, device=device))
            self.expert_mlp.append(
                torch.ones(layer.num_experts, layer.expert_width, dtype=dtype, device=device)
            )
        self.skipped: set[int] = set()
        # Called as (layer, expert, activations, routing weights, weighted output) for every expert
        # that receives tokens, while set (second-order scores that need each expert's tokens).
        self.expert_observer: Callable[..., None] | None = None
        self._tokens: dict[int, torch.Tensor] = {}  # per MoE layer, the sample of each routed token
        self._handles: list[Any] = []
        for i, block in enumerate(family_of(model).blocks(model)):
            self._handles.append(block.register_forward_hook(self._skip_hook(i), with_kwargs=True))
        for i, lc in enumerate(self._couplings):
            if lc.attn_gate_site is not None:
                self._handles.append(lc.attn_gate_site.register_forward_pre_hook(self._head_hook(i)))
            if lc.mlp_gate_site is not None:
                self._handles.append(lc.mlp_gate_site.register_forward_pre_hook(self._mlp_hook(i)))
            if lc.experts is not None:
                self._attach_experts(i, lc.experts)

    def of(self, kind: str) -> list[torch.Tensor]:
        """The gates of one kind of unit: "attention", "mlp", "experts" or "expert_mlp"."""
        if kind in GATE_KINDS:
            return getattr(self, kind)
        raise ConfigError(f"unknown unit kind {kind!r}; valid kinds: {list(GATE_KINDS)}")

    def reset(self, *, batch_size: int | None = None, requires_grad: bool = False) -> None:
        """Set every gate to 1, shaped (units,) or, with `batch_size`, (batch_size, units)."""
        for gates, dims in ((self.attention, 1), (self.mlp, 1), (self.experts, 1), (self.expert_mlp, 2)):
            for i, g in enumerate(gates):
                unit = tuple(g.shape[-dims:])  # (units,), or (experts, width) for expert neurons
                shape = unit if batch_size is None else (batch_size, *unit)
                gates[i] = torch.ones(shape, dtype=g.dtype, device=g.device, requires_grad=requires_grad)

    def keep_only(self, plan: PrunePlan) -> None:
        """Zero every gate whose unit `plan` removes and skip the layers it drops (the masked
        equivalent of applying it)."""
        plan.check(self.structure)
        for i, (units, mlp) in enumerate(plan.kept_units(self.structure)):
            self.attention[i] = torch.zeros_like(self.attention[i]).index_fill_(-1, units, 1.0)
            self.mlp[i] = torch.zeros_like(self.mlp[i]).index_fill_(-1, mlp, 1.0)
            if self.structure.layers[i].is_moe and not plan.layers[i].drop:
                experts, neurons = plan.layers[i].kept_experts()
                kept = torch.zeros_like(self.expert_mlp[i])  # (experts, width)
                kept[experts[:, None], neurons] = 1.0
                self.expert_mlp[i] = kept
                self.experts[i] = torch.zeros_like(self.experts[i]).index_fill_(-1, experts, 1.0)
                self.routable[i] = self.experts[i] > 0
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
            gate = self.attention[i]
            if lc.heads_per_unit > 1:
                gate = gate.repeat_interleave(lc.heads_per_unit, dim=-1)  # (.., units*rep) = (.., nq)
            lead = x.shape[:-1]
            xh = x.reshape(*lead, -1, lc.head_dim)  # (B, T, nq, hd)
            g = self._broadcast(gate, len(lead)).unsqueeze(-1)  # (B|1, 1, nq, 1)
            return ((xh * g).reshape(x.shape), *rest)  # (B, T, nq*hd)

        return hook

    def _attach_experts(self, i: int, coupling: ExpertCoupling) -> None:
        """Route layer i's experts through the gated forward, and its router through the mask."""

        def record_tokens(module: nn.Module, args: tuple) -> None:
            b, t = args[0].shape[:2]  # the MoE block's input is (B, T, hidden)
            self._tokens[i] = torch.arange(b * t, device=args[0].device) // t  # (B*T,) sample of each token

        def route(module: nn.Module, args: tuple, output: tuple) -> tuple | None:
            allowed = self.routable[i]
            return None if allowed is None else masked_routing(module, output[0], allowed)

        def forward(
            hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
        ) -> torch.Tensor:
            gates = (self.experts[i], self.expert_mlp[i])
            observer = self.expert_observer
            if (
                observer is None
                and not any(g.requires_grad for g in gates)
                and all(bool((g == 1).all()) for g in gates)
            ):
                # Gates that change nothing: the model's own kernel, bit for bit.
                return type(coupling.experts).forward(coupling.experts, hidden, top_k_index, top_k_weights)
            return gated_experts_forward(
                coupling.experts,
                hidden,
                top_k_index,
                top_k_weights,
                expert_gate=self.experts[i],
                neuron_gate=self.expert_mlp[i],
                sample_of_token=self._tokens.get(i),
                observer=None if observer is None else partial(observer, i),
            )

        self._handles.append(coupling.block.register_forward_pre_hook(record_tokens))
        self._handles.append(coupling.router.register_forward_hook(route))
        self._handles.append(_Patched(coupling.experts, forward))

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
            gate = self.mlp[i]
            if gate.dim() == 2 and x.dim() == 2 and i in self._tokens:
                # A shared expert sees the mixture's flattened tokens (B*T, width): one gate row each.
                return (x * gate[self._tokens[i]], *rest)
            return (x * self._broadcast(gate, x.dim() - 1), *rest)  # (B, T, width)

        return hook


class _Patched:
    """An instance-level `forward` replacing the class's until `remove()`: a hook for modules whose
    gate sites are inside one fused computation (the experts' loop)."""

    def __init__(self, module: nn.Module, forward: Any) -> None:
        self.module = module
        module.forward = forward

    def remove(self) -> None:
        if "forward" in vars(self.module):
            del self.module.forward


@contextmanager
def gated(model: nn.Module, structure: Structure | None = None) -> Iterator[Gates]:
    """Attach gates for the duration of a `with` block."""
    from hwprune.prunable._discover import discover

    gates = Gates(model, structure if structure is not None else discover(model))
    try:
        yield gates
    finally:
        gates.remove()
