"""Conformance suite every saliency method passes, plus checks specific to NViT's estimator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hwprune import hessian, prunable
from tests.conftest import CASES

FAMILIES = ["bert", "llama_gqa", "gpt2"]


def pooled(model: torch.nn.Module, batch: hessian.Batch) -> torch.Tensor:
    out = model(**batch.inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
    return hidden.mean(1)  # (rows, D)


class SupervisedToy(hessian.Objective):
    """MSE of the pooled output's first coordinate to per-sample targets: a real supervised loss."""

    name = "toy-mse"

    def losses(self, model: torch.nn.Module, batch: hessian.Batch) -> torch.Tensor:
        assert batch.targets is not None
        pred = batch.per_sample(pooled(model, batch)[:, 0])
        return (pred - batch.targets).pow(2)


def calibration(
    name: str, *, supervised: bool, n_batches: int = 2
) -> tuple[torch.nn.Module, hessian.Calibration]:
    case = CASES[name]
    model = case.build()
    gen = torch.Generator().manual_seed(11)
    batches = []
    for _ in range(n_batches):
        inputs = case.inputs(gen)
        rows = next(iter(inputs.values())).shape[0]
        batches.append(hessian.Batch(inputs=inputs, targets=torch.randn(rows, generator=gen)))
    if supervised:
        objective: hessian.Objective = SupervisedToy()
    else:
        distance = hessian.OutputDistance(output=pooled)
        distance.set_reference(model, batches)
        objective = distance
    return model, hessian.Calibration(batches=batches, objective=objective, description=f"toy {name}")


def methods() -> list[hessian.Saliency]:
    return [
        hessian.NViTSaliency(seed=1),
        hessian.NViTSaliency(seed=1, first_order=True),
        hessian.FisherSaliency(seed=1),
        hessian.HutchinsonSaliency(max_probes=6, min_probes=2, seed=1),
        hessian.TaylorSaliency(),
        hessian.MagnitudeSaliency(),
        hessian.RandomSaliency(seed=1),
    ]


def method_id(method: hessian.Saliency) -> str:
    return method.name + ("-first-order" if getattr(method, "first_order", False) else "")


@pytest.mark.parametrize("supervised", [True, False], ids=["supervised", "label-free"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", methods(), ids=method_id)
def test_conformance(method: hessian.Saliency, family: str, supervised: bool) -> None:
    model, calib = calibration(family, supervised=supervised)
    structure = prunable.discover(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if method.gradient_only and not supervised:  # the gradient is zero at the dense model: refused
        with pytest.raises(ValueError, match=r"uses the loss gradient alone.*every score would be 0"):
            method.score(model, calib)
        return

    scores = method.score(model, calib)

    # One finite score per unit, shaped like the structure; non-negative unless signed by design.
    scores.check(structure)
    assert scores.method == method.name
    if not getattr(method, "first_order", False):
        for kind in prunable.UNIT_KINDS:
            for layer_scores in scores.of(kind):
                assert bool((layer_scores >= 0).all())
    # Scoring leaves the model as it was: same weights, no hooks, gradients off where they were.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    # Deterministic under its seed.
    again = method.score(model, calib)
    for kind in prunable.UNIT_KINDS:
        for a, b in zip(scores.of(kind), again.of(kind), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)
    frame = scores.to_frame()
    assert len(frame) == structure.total_units("attention") + structure.total_units("mlp")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", [m for m in methods() if m.name != "random"], ids=method_id)
def test_unit_with_zeroed_weights_scores_zero(method: hessian.Saliency, family: str) -> None:
    model, calib = calibration(family, supervised=True)
    lc = prunable.couplings(model)[1]
    with torch.no_grad():
        for kind, unit in (("attention", 0), ("mlp", 3)):
            for coupling in lc.of(kind):
                for param, dim in coupling.parameters_and_dims():
                    param.index_fill_(dim, coupling.index[unit], 0.0)
    scores = method.score(model, calib)
    for kind, unit in (("attention", 0), ("mlp", 3)):
        layer_scores = scores.of(kind)[1].abs()
        assert layer_scores[unit].item() <= 1e-9 * max(layer_scores.max().item(), 1e-30) + 1e-12
        assert layer_scores.max().item() > 0


def test_nvit_equals_brute_force_per_sample_fisher() -> None:
    """I_S = 1/2 mean over samples of (dL_s/dgate_S)^2, each sample differentiated on its own."""
    model, calib = calibration("llama_gqa", supervised=True, n_batches=1)
    scores = hessian.NViTSaliency().score(model, calib)
    batch = calib.batches[0]
    expected = {kind: [torch.zeros_like(h) for h in scores.of(kind)] for kind in prunable.UNIT_KINDS}
    with prunable.gated(model) as gates:
        for s in range(batch.n_samples):
            gates.reset(requires_grad=True)
            calib.objective.losses(model, batch.select([s])).sum().backward()
            for kind in prunable.UNIT_KINDS:  # KV groups and MLP neurons alike
                for acc, g in zip(expected[kind], gates.of(kind), strict=True):
                    acc += g.grad.double().pow(2)
    for kind in prunable.UNIT_KINDS:
        assert any(float(w.max()) > 0 for w in expected[kind]), kind
        for got, want in zip(scores.of(kind), expected[kind], strict=True):
            torch.testing.assert_close(got, 0.5 * want / batch.n_samples, rtol=1e-4, atol=1e-12)


class ToyGaussNewton(SupervisedToy):
    """SupervisedToy with its Gauss-Newton probe sqrt(2) pred and the chain-rule slope of the loss."""

    name = "toy-mse-gn"

    def curvature_losses(
        self, model: torch.nn.Module, batch: hessian.Batch, generator: torch.Generator
    ) -> torch.Tensor:
        return 2**0.5 * batch.per_sample(pooled(model, batch)[:, 0])

    def loss_slope(self, probes: torch.Tensor, batch: hessian.Batch) -> torch.Tensor | None:
        assert batch.targets is not None
        return 2**0.5 * (probes / 2**0.5 - batch.targets)


class ToyGaussNewtonNoSlope(ToyGaussNewton):
    """The same probe, but the loss gradient has to come from a second backward pass."""

    def loss_slope(self, probes: torch.Tensor, batch: hessian.Batch) -> torch.Tensor | None:
        return None


@pytest.mark.parametrize("objective", [SupervisedToy(), ToyGaussNewton(), ToyGaussNewtonNoSlope()], ids=type)
def test_nvit_first_order_is_the_per_sample_second_order_taylor(objective: hessian.Objective) -> None:
    """first_order=True: mean over samples of -dL_s/dgate + 1/2 (dprobe_s/dgate)^2, each sample alone."""
    model, calib = calibration("bert", supervised=True, n_batches=2)
    calib = hessian.Calibration(calib.batches, objective)
    scores = hessian.NViTSaliency(first_order=True).score(model, calib)
    plain = hessian.NViTSaliency().score(model, calib)
    expected = {kind: [torch.zeros_like(h) for h in scores.of(kind)] for kind in prunable.UNIT_KINDS}
    with prunable.gated(model) as gates:
        for batch in calib.batches:
            for s in range(batch.n_samples):
                one = batch.select([s])
                for sign, fn in ((-1.0, objective.losses), (0.5, None)):
                    gates.reset(requires_grad=True)
                    out = fn(model, one) if fn else objective.curvature_losses(model, one, torch.Generator())
                    out.sum().backward()
                    for kind in prunable.UNIT_KINDS:
                        for acc, g in zip(expected[kind], gates.of(kind), strict=True):
                            acc += sign * (g.grad.double() if fn else g.grad.double().pow(2))
    n = calib.n_samples
    for kind in prunable.UNIT_KINDS:
        for got, want, second in zip(scores.of(kind), expected[kind], plain.of(kind), strict=True):
            torch.testing.assert_close(got, want / n, rtol=1e-4, atol=1e-10)
            assert not torch.allclose(got, second)  # the first-order term is really there
    assert scores.meta["params"] == {"seed": 0, "first_order": True}
    with pytest.raises(ValueError, match="first_order must be True or False, got 'yes'"):
        hessian.NViTSaliency(first_order="yes")  # type: ignore[arg-type]


def test_sentence_pairs_are_one_sample_over_two_rows() -> None:
    ids = torch.arange(12).reshape(6, 2)
    batch = hessian.Batch(
        inputs={"input_ids": ids},
        sample_of_row=torch.tensor([0, 1, 2, 0, 1, 2]),
        targets=torch.tensor([5.0, 6, 7]),
    )
    assert batch.rows == 6 and batch.n_samples == 3
    sub = batch.select([2, 0])
    assert sub.inputs["input_ids"].tolist() == [[0, 1], [4, 5], [6, 7], [10, 11]]
    assert sub.sample_of_row.tolist() == [1, 0, 1, 0]
    assert sub.targets.tolist() == [7.0, 5.0]
    assert batch.per_sample(torch.ones(6)).tolist() == [2.0, 2.0, 2.0]


class NaNOnSecondBatch(SupervisedToy):
    name = "nan"

    def __init__(self) -> None:
        self.calls = 0

    def losses(self, model: torch.nn.Module, batch: hessian.Batch) -> torch.Tensor:
        self.calls += 1
        loss = super().losses(model, batch)
        return loss * float("nan") if self.calls == 2 else loss


@pytest.mark.parametrize("method", [hessian.NViTSaliency(), hessian.TaylorSaliency()], ids=lambda m: m.name)
def test_non_finite_loss_names_the_batch(method: hessian.Saliency) -> None:
    model, calib = calibration("bert", supervised=True, n_batches=3)
    calib.objective = NaNOnSecondBatch()
    with pytest.raises(
        FloatingPointError, match=rf"{method.name}: .* non-finite .* loss of calibration batch 1"
    ):
        method.score(model, calib)


def test_cache_reuses_scores_and_keys_on_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, calib = calibration("bert", supervised=True)
    method = hessian.NViTSaliency()
    first = hessian.cached_score(method, model, calib, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("nvit-*.npz"))) == 1

    def boom(*args: object) -> None:
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(method, "_score", boom)
    second = hessian.cached_score(method, model, calib, cache_dir=tmp_path)
    assert "cache" in second.meta
    for a, b in zip(first.mlp, second.mlp, strict=True):
        assert torch.equal(a, b)
    _, other = calibration("bert", supervised=True, n_batches=1)
    with pytest.raises(AssertionError, match="recomputed"):
        hessian.cached_score(method, model, other, cache_dir=tmp_path)


def test_hutchinson_validates_and_stops_early() -> None:
    with pytest.raises(ValueError, match="min_probes=5, max_probes=2"):
        hessian.HutchinsonSaliency(min_probes=5, max_probes=2)
    with pytest.raises(ValueError, match="tol must be positive, got 0"):
        hessian.HutchinsonSaliency(tol=0)
    model, calib = calibration("bert", supervised=True, n_batches=1)
    method = hessian.HutchinsonSaliency(max_probes=200, min_probes=2, tol=0.5, patience=1)
    method.score(model, calib)
    assert 2 <= method.probes_used < 200


def test_scores_save_and_load(tmp_path: Path) -> None:
    model, calib = calibration("gpt2", supervised=False)
    scores = hessian.MagnitudeSaliency().score(model, calib)
    loaded = hessian.UnitScores.load(scores.save(tmp_path / "s.npz"))
    assert loaded.method == "magnitude" and loaded.meta == scores.meta
    for a, b in zip(scores.attention + scores.mlp, loaded.attention + loaded.mlp, strict=True):
        assert torch.equal(a, b)
    # Caches written before the attention units had their name stored them as "heads_<layer>".
    with np.load(tmp_path / "s.npz") as data:
        old = {k.replace("attention_", "heads_"): data[k] for k in data.files}
    np.savez(tmp_path / "old.npz", **old)
    legacy = hessian.UnitScores.load(tmp_path / "old.npz")
    assert len(legacy.attention) == len(scores.attention) > 0
    for a, b in zip(scores.attention, legacy.attention, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["bert", "llama_gqa"])
def test_fisher_is_obd_with_the_per_sample_fisher_diagonal(family: str) -> None:
    """1/2 sum over a unit's weights of mean_s(g_s^2) w^2, computed here the direct way."""
    from hwprune.hessian._base import unit_sums

    model, calib = calibration(family, supervised=True)
    scores = hessian.FisherSaliency(seed=1).score(model, calib)
    layers = prunable.couplings(model)
    params = list(
        {
            id(p): p for lc in layers for c in lc.attention + lc.mlp for p, _ in c.parameters_and_dims()
        }.values()
    )
    squares = {id(p): torch.zeros_like(p) for p in params}
    for batch in calib.batches:
        for s in range(batch.n_samples):
            loss = calib.objective.losses(model, batch.select([s])).sum()
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
                if g is not None:
                    squares[id(p)] += g.pow(2)
    obd = {id(p): 0.5 * squares[id(p)] / calib.n_samples * p.detach().pow(2) for p in params}
    structure = prunable.discover(model)
    for i, (lc, la) in enumerate(zip(layers, structure.layers, strict=True)):
        torch.testing.assert_close(
            scores.attention[i], unit_sums(lc.attention, obd, la.attention_units), rtol=1e-4, atol=0
        )
        torch.testing.assert_close(scores.mlp[i], unit_sums(lc.mlp, obd, la.mlp_width), rtol=1e-4, atol=0)
