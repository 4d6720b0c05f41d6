"""Layer scores for depth pruning: the measured loss of the pruned model, in pieces or whole."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from hwprune import hessian, prunable
from tests.test_saliency import calibration


def dropped_loss(model: torch.nn.Module, calib: hessian.Calibration, layer: int) -> float:
    """Mean calibration loss of a physically pruned copy without `layer`."""
    structure = prunable.discover(model)
    n = structure.num_layers
    plan = prunable.PrunePlan.from_units(
        structure,
        prunable.model_ref(model),
        attention=[[] if i == layer else range(la.attention_units) for i, la in enumerate(structure.layers)],
        mlp=[[] if i == layer else range(la.mlp_width) for i, la in enumerate(structure.layers)],
        drop=[i == layer for i in range(n)],
    )
    pruned = prunable.apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        return sum(float(calib.objective.losses(pruned, b).sum()) for b in calib.batches) / calib.n_samples


@pytest.mark.parametrize("supervised", [True, False], ids=["supervised", "label-free"])
@pytest.mark.parametrize("family", ["bert", "llama_gqa", "gpt2"])
def test_layer_scores_are_the_measured_loss_increase_of_the_pruned_model(
    family: str, supervised: bool
) -> None:
    model, calib = calibration(family, supervised=supervised)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = hessian.layer_scores(model, calib)
    with torch.no_grad():
        dense = sum(float(calib.objective.losses(model, b).sum()) for b in calib.batches) / calib.n_samples
    expected = [max(dropped_loss(model, calib, i) - dense, 0.0) for i in range(len(scores))]
    assert scores.dtype == torch.float64 and scores.shape == (3,)
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-7)
    assert (scores > 0).any()  # dropping a random layer changes the outputs
    # The model is left as it was, hooks and weights.
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_layer_scores_in_pieces_equal_whole_batches() -> None:
    model, calib = calibration("llama_gqa", supervised=False)
    whole = hessian.layer_scores(model, calib)
    pieces = hessian.layer_scores(model, calib, options=hessian.ScoringOptions(max_samples=1))
    torch.testing.assert_close(pieces, whole, rtol=1e-6, atol=1e-9)


def test_layer_scores_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, calib = calibration("bert", supervised=True)
    first = hessian.cached_layer_scores(model, calib, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("layers-*.npy"))) == 1

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr("hwprune.hessian._cache.layer_scores", boom)
    assert torch.equal(hessian.cached_layer_scores(model, calib, cache_dir=tmp_path), first)
    _, other = calibration("bert", supervised=True, n_batches=1)
    with pytest.raises(AssertionError, match="recomputed"):
        hessian.cached_layer_scores(model, other, cache_dir=tmp_path)
