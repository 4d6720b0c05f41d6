"""Gates: identity at 1, removable without a trace, per-sample gradients equal g.w."""

from __future__ import annotations

import torch

from hwprune import prunable
from tests.conftest import Case, run


def test_gates_at_one_change_nothing_and_leave_no_trace(case: Case) -> None:
    model = case.build()
    before = run(case, model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with prunable.gated(model) as gates:
        assert len(gates.heads) == len(gates.mlp) == prunable.discover(model).num_layers
        assert torch.equal(run(case, model), before)
        for g in gates.mlp:
            g.zero_()
        assert not torch.allclose(run(case, model), before)
    assert torch.equal(run(case, model), before)  # bit-identical after removal
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_gate_shapes_follow_units(case: Case) -> None:
    model = case.build()
    structure = prunable.discover(model)
    with prunable.gated(model) as gates:
        for layer, h, m in zip(structure.layers, gates.heads, gates.mlp, strict=True):
            assert h.shape == (layer.attention_units,)
            assert m.shape == (layer.mlp_width,)
        gates.reset(batch_size=5, requires_grad=True)
        assert all(
            g.shape == (5, n.attention_units) for g, n in zip(gates.heads, structure.layers, strict=True)
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
        per_sample = [g.grad.clone() for g in gates.heads + gates.mlp]
        gates.reset(requires_grad=True)
        case.output(model(**inputs)).pow(2).sum().backward()
        shared = [g.grad for g in gates.heads + gates.mlp]
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
