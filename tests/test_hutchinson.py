"""Hutchinson's v.Hv per parameter (H v reduced slice by slice as autograd makes it) equals the plain
double backward's on every family."""

from __future__ import annotations

import pytest
import torch

from hwprune import prunable
from hwprune.hessian._hutchinson import Probes, eager_attention, quadratic_forms
from tests.conftest import CASES, Case


def _double_backward(
    params: list[torch.nn.Parameter], probes: list[torch.Tensor], loss: torch.Tensor
) -> torch.Tensor:
    """v_i . (H v)_i per parameter the way this method computed it before: H v held whole."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gv = sum((g * v).sum() for g, v in zip(grads, probes, strict=True))
    hv = torch.autograd.grad(gv, params)  # type: ignore[arg-type]
    return torch.stack([(v.double() * h.double()).sum() for v, h in zip(probes, hv, strict=True)])


def test_quadratic_forms_equal_double_backward(case: Case) -> None:
    # float64, where the two ways differ by rounding only; ModernBERT's eager attention gives NaN there
    # (its float32 softmax of float64 masks), so it is checked in float32, where the two ways summed
    # in different orders may differ by float32 rounding (they agreed exactly on an AMD EPYC).
    dtype, tol = (torch.float32, 1e-4) if case.name == "modernbert" else (torch.float64, 1e-5)
    model = case.build().to(dtype)
    if any(la.is_moe for la in prunable.discover(model).layers):
        pytest.skip("hutchinson refuses mixture-of-experts models")
    params = list(
        {
            id(p): p
            for lc in prunable.couplings(model)
            for kind in prunable.UNIT_KINDS
            for c in lc.of(kind)
            for p, _ in c.parameters_and_dims()
        }.values()
    )
    gen = torch.Generator().manual_seed(3)
    probes = [torch.randint(0, 2, p.shape, generator=gen).to(p) * 2 - 1 for p in params]
    inputs = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in case.inputs(torch.Generator().manual_seed(1)).items()
    }

    def loss() -> torch.Tensor:
        return case.output(model(**inputs)).float().pow(2).mean()  # curved in the weights

    with eager_attention(model):
        value, got = quadratic_forms(model, params, probes, loss)
        assert all(p.grad is None and not p.requires_grad for p in params)  # nothing left behind
        for p in params:
            p.requires_grad_(True)
        want = _double_backward(params, probes, loss())
    assert torch.isfinite(value) and value > 0
    assert got.shape == (len(params),) and want.abs().max() > 0
    # Equal to 1e-15 of the largest where the whole model computes in float64 (BERT, GPT-2, Falcon);
    # families that compute rotary angles or norms in float32 whatever the weights reach 5e-6.
    torch.testing.assert_close(got, want, rtol=0, atol=tol * float(want.abs().max()))


def test_probes_are_drawn_again_as_they_were_stored() -> None:
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))]
    gen = torch.Generator().manual_seed(7)
    stored = [torch.randint(0, 2, p.shape, generator=gen).to(p) * 2 - 1 for p in params]
    after = torch.rand(1, generator=gen)  # where the generator stands once every draw is made
    gen = torch.Generator().manual_seed(7)
    probes = Probes(params, gen)
    assert len(probes) == 2 and torch.equal(torch.rand(1, generator=gen), after)
    for i in (1, 0, 1):  # any order, any number of times
        assert torch.equal(probes[i], stored[i]) and probes[i].dtype == params[i].dtype
    assert set(stored[0].unique().tolist()) == {-1.0, 1.0}


def test_quadratic_forms_with_drawn_probes_equal_stored_ones() -> None:
    model = CASES["llama_gqa"].build()
    params = [p for p in model.parameters() if p.dim() == 2][:6]
    inputs = CASES["llama_gqa"].inputs(torch.Generator().manual_seed(1))

    def loss() -> torch.Tensor:
        return CASES["llama_gqa"].output(model(**inputs)).pow(2).mean()

    drawn = Probes(params, torch.Generator().manual_seed(5))
    stored = [drawn[i] for i in range(len(params))]
    with eager_attention(model):
        _, a = quadratic_forms(model, params, drawn, loss)
        _, b = quadratic_forms(model, params, stored, loss)
    assert a.abs().max() > 0 and torch.equal(a, b)
