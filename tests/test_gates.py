"""Gates: identity at 1, removable without a trace, per-sample gradients equal g.w."""

from __future__ import annotations

import torch

from hwprune import prunable
from tests.conftest import CASES, Case, run


def test_gates_at_one_change_nothing_and_leave_no_trace(case: Case) -> None:
    model = case.build()
    before = run(case, model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with prunable.gated(model) as gates:
        assert len(gates.attention) == len(gates.mlp) == prunable.discover(model).num_layers
        assert torch.equal(run(case, model), before)
        for g in gates.mlp + gates.expert_mlp:
            g.zero_()
        assert not torch.allclose(run(case, model), before)
    assert torch.equal(run(case, model), before)  # bit-identical after removal
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all("forward" not in vars(m) for m in model.modules())  # no patched forward left
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_gate_shapes_follow_units(case: Case) -> None:
    model = case.build()
    structure = prunable.discover(model)
    with prunable.gated(model) as gates:
        for layer, h, m in zip(structure.layers, gates.attention, gates.mlp, strict=True):
            assert h.shape == (layer.attention_units,)
            assert m.shape == (layer.mlp_width,)
        gates.reset(batch_size=5, requires_grad=True)
        assert all(
            g.shape == (5, n.attention_units) for g, n in zip(gates.attention, structure.layers, strict=True)
        )


def test_per_sample_gate_gradients_sum_to_shared_gate_gradient(case: Case) -> None:
    """One gate per sample gives per-sample gradients whose sum is the shared gate's gradient."""
    model = case.build()
    gen = torch.Generator().manual_seed(3)
    inputs = case.inputs(gen)
    batch = next(iter(inputs.values())).shape[0]
    with prunable.gated(model) as gates:
        gates.reset(batch_size=batch, requires_grad=True)
        case.output(model(**inputs)).pow(2).sum().backward()
        every = gates.attention + gates.mlp + gates.experts + gates.expert_mlp
        per_sample = [g.grad.clone() for g in every if g.shape[-1]]  # (0,)-shaped gates gate nothing
        gates.reset(requires_grad=True)
        case.output(model(**inputs)).pow(2).sum().backward()
        every = gates.attention + gates.mlp + gates.experts + gates.expert_mlp
        shared = [g.grad for g in every if g.shape[-1]]
    for ps, sh in zip(per_sample, shared, strict=True):
        assert ps.shape[0] == batch
        torch.testing.assert_close(ps.sum(0), sh, rtol=1e-4, atol=1e-4)
    assert any(ps.abs().sum() > 0 for ps in per_sample)


def test_mlp_gate_gradient_equals_gradient_dot_weight() -> None:
    """The identity NViT rests on: dL/dgate_S = sum over S's weights of g_i * w_i (down-proj side)."""
    from tests.conftest import CASES

    case = CASES["bert"]
    model = case.build()
    inputs = case.inputs(torch.Generator().manual_seed(4))
    block = model.encoder.layer[1]
    with prunable.gated(model) as gates:
        gates.reset(requires_grad=True)
        model.zero_grad()
        case.output(model(**inputs)).pow(2).sum().backward()
        gate_grad = gates.mlp[1].grad
    # The down projection's input columns carry exactly the neuron's contribution.
    w, g = block.output.dense.weight, block.output.dense.weight.grad
    torch.testing.assert_close(gate_grad, (w * g).sum(0), rtol=1e-4, atol=1e-5)


def test_expert_gate_gradient_equals_gradient_dot_weight() -> None:
    """The same identity inside fused experts: an expert neuron's gate gradient is the sum of g * w
    over its down-projection column; an expert's is that over all of its down projection."""
    case = CASES["mixtral"]
    model = case.build()
    inputs = case.inputs(torch.Generator().manual_seed(4))
    experts = model.model.layers[1].mlp.experts
    with prunable.gated(model) as gates:
        gates.reset(requires_grad=True)
        model.zero_grad()
        case.output(model(**inputs)).pow(2).sum().backward()
        neuron_grad, expert_grad = gates.expert_mlp[1].grad, gates.experts[1].grad
    w, g = experts.down_proj, experts.down_proj.grad  # (experts, hidden, width)
    torch.testing.assert_close(neuron_grad, (w * g).sum(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(expert_grad, (w * g).sum((1, 2)), rtol=1e-4, atol=1e-6)
    assert (expert_grad != 0).any()
