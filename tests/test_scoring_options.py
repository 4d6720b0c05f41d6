"""Scoring options: calibration batches in parts, another dtype, validation, cache keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hwprune import hessian, prunable
from hwprune.search.config import SaliencyConfig
from tests.test_saliency import calibration, pooled

CHUNKED = [
    hessian.NViTSaliency(seed=1),
    hessian.NViTSaliency(seed=1, first_order=True),
    hessian.TaylorSaliency(),
    hessian.HutchinsonSaliency(max_probes=3, min_probes=3, seed=1),
    hessian.FisherSaliency(seed=1),
]


def flat(scores: hessian.UnitScores) -> torch.Tensor:
    return torch.cat([*scores.attention, *scores.mlp])


@pytest.mark.parametrize("supervised", [True, False], ids=["supervised", "label-free"])
@pytest.mark.parametrize("family", ["bert", "llama_gqa"])
@pytest.mark.parametrize(
    "method", CHUNKED, ids=lambda m: m.name + ("-first-order" if getattr(m, "first_order", False) else "")
)
def test_scores_in_parts_equal_whole_batches(method: hessian.Saliency, family: str, supervised: bool) -> None:
    model, calib = calibration(family, supervised=supervised)  # batches of 3 samples
    if method.gradient_only and not supervised:  # zero gradient at the dense model: refused (test_faults)
        with pytest.raises(ValueError, match="every score would be 0"):
            method.score(model, calib, options=hessian.ScoringOptions(max_samples=1))
        return
    whole = flat(method.score(model, calib))
    for max_samples in (1, 2):
        parts = flat(method.score(model, calib, options=hessian.ScoringOptions(max_samples=max_samples)))
        # Only the order of floating-point sums differs.
        torch.testing.assert_close(parts, whole, rtol=1e-4, atol=max(1e-6 * float(whole.abs().max()), 1e-6))
    assert whole.abs().sum() > 0


def test_parts_keep_sentence_pairs_together_and_know_their_rows() -> None:
    batch = hessian.Batch(
        inputs={"input_ids": torch.arange(12).reshape(6, 2)},
        sample_of_row=torch.tensor([0, 1, 2, 0, 1, 2]),  # three pairs: rows (0, 3), (1, 4), (2, 5)
        targets=torch.tensor([5.0, 6, 7]),
    )
    first, second = batch.chunks(2)
    assert first.origin is batch and second.origin is batch
    assert first.origin_rows.tolist() == [0, 1, 3, 4] and second.origin_rows.tolist() == [2, 5]
    assert first.sample_of_row.tolist() == [0, 1, 0, 1] and second.sample_of_row.tolist() == [0, 0]
    assert first.targets.tolist() == [5.0, 6.0] and second.targets.tolist() == [7.0]
    assert batch.chunks(3) == [batch] and batch.chunks(None) == [batch]
    with pytest.raises(ValueError, match="max_samples must be >= 1 or None, got 0"):
        batch.chunks(0)


def test_output_distance_scores_pairs_in_parts_as_whole() -> None:
    """The label-free objective keys its reference and its random probe on the calibration batch."""
    model, _ = calibration("bert", supervised=True)
    gen = torch.Generator().manual_seed(3)
    batches = [
        hessian.Batch(
            inputs={"input_ids": torch.randint(0, 120, (6, 9), generator=gen)},
            sample_of_row=torch.tensor([0, 1, 2, 0, 1, 2]),
        )
        for _ in range(2)
    ]
    distance = hessian.OutputDistance(output=pooled)
    distance.set_reference(model, batches)
    calib = hessian.Calibration(batches=batches, objective=distance)
    method = hessian.NViTSaliency(seed=4)
    whole = flat(method.score(model, calib))
    parts = flat(method.score(model, calib, options=hessian.ScoringOptions(max_samples=2)))
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=max(1e-6 * float(whole.abs().max()), 1e-6))
    # Losses of a part are measured against the part's own rows of the reference: zero at the dense model.
    for part in batches[0].chunks(1):
        assert float(distance.losses(model, part).detach().abs().max()) < 1e-10


def test_another_dtype_scores_a_copy_and_leaves_the_model_as_it_was() -> None:
    model, calib = calibration("llama_gqa", supervised=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp32 = flat(hessian.NViTSaliency(seed=1).score(model, calib))
    scores = hessian.NViTSaliency(seed=1).score(
        model, calib, options=hessian.ScoringOptions(dtype="bf16", max_samples=2)
    )
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert scores.meta["scoring"] == {"dtype": "bf16", "max_samples": 2}
    bf16 = flat(scores)
    # bf16 keeps 8 bits of mantissa: the values move by under a percent of the largest (0.68 % measured,
    # Pearson 0.99999), so the ranking survives.
    assert not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.02 * float(fp32.abs().max()))
    assert torch.corrcoef(torch.stack([bf16, fp32]))[0, 1] > 0.999


def test_scoring_on_the_models_own_device_moves_nothing() -> None:
    model, calib = calibration("bert", supervised=True)
    options = hessian.ScoringOptions(device="cpu")
    scores = hessian.TaylorSaliency().score(model, calib, options=options)
    scores.check(prunable.discover(model))
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "bf61"}, r"unknown scoring dtype 'bf61'; valid choices: \['fp32', 'bf16', 'fp16', None\]"),
        ({"max_samples": 0}, r"max_samples must be >= 1 or None, got 0"),
        ({"device": "tpu"}, r"unknown scoring device 'tpu'; valid choices: 'cpu', 'cuda\[:i\]', 'mps', None"),
    ],
)
def test_bad_options_name_the_value_and_the_choices(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hessian.ScoringOptions(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="saliency: " + message):
        SaliencyConfig(name="nvit", method=None, **kwargs)  # type: ignore[arg-type]


def test_the_scoring_dtype_keys_the_cache(tmp_path: Path) -> None:
    model, calib = calibration("bert", supervised=True)
    method = hessian.TaylorSaliency()
    key = hessian._cache.cache_key  # the key's recipe, not a file name
    plain = key(method, model, calib)
    assert key(method, model, calib, hessian.ScoringOptions(max_samples=1, device="cpu")) == plain
    assert key(method, model, calib, hessian.ScoringOptions(dtype="bf16")) != plain
    hessian.cached_score(method, model, calib, cache_dir=tmp_path)
    hessian.cached_score(
        method, model, calib, cache_dir=tmp_path, options=hessian.ScoringOptions(dtype="bf16")
    )
    assert len(list(tmp_path.glob("taylor-*.npz"))) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("supervised", [True, False], ids=["supervised", "label-free"])
def test_scoring_on_cuda_matches_the_cpu_and_leaves_the_model_on_the_cpu(supervised: bool) -> None:
    model, calib = calibration("llama_gqa", supervised=supervised)
    cpu = flat(hessian.NViTSaliency(seed=1).score(model, calib))
    cuda = flat(
        hessian.NViTSaliency(seed=1).score(
            model, calib, options=hessian.ScoringOptions(device="cuda", max_samples=2)
        )
    )
    assert next(model.parameters()).device.type == "cpu"
    torch.testing.assert_close(cuda, cpu, rtol=1e-3, atol=1e-5 * float(cpu.abs().max()))
    bf16 = flat(
        hessian.NViTSaliency(seed=1).score(
            model, calib, options=hessian.ScoringOptions(device="cuda", dtype="bf16")
        )
    )
    # On the CPU bf16 scores sit within 0.7 % of the largest fp32 one (Pearson 0.99999); CUDA's bf16
    # GEMMs also accumulate in fp32, but no GPU run has set a tighter bound yet.
    assert torch.corrcoef(torch.stack([bf16, cpu]))[0, 1] > 0.99


@pytest.mark.parametrize(
    ("method", "passes"),
    [
        (hessian.NViTSaliency(seed=1), 2 * 2),  # 2 batches in parts of 2 samples (3 per batch)
        (hessian.FisherSaliency(seed=1), 6),  # one pass per sample
        (
            hessian.HutchinsonSaliency(max_probes=3, min_probes=3, seed=1),
            3 * 2,
        ),  # per probe, its batch's parts
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_scoring_reports_progress_layer_by_layer(
    method: hessian.Saliency, passes: int, caplog: pytest.LogCaptureFixture
) -> None:
    model, calib = calibration("llama_gqa", supervised=True)
    layers = len(prunable.blocks(model))
    with caplog.at_level("INFO", logger="hwprune.hessian"):
        method.score(model, calib, options=hessian.ScoringOptions(max_samples=2))
    lines = [r.getMessage() for r in caplog.records if "layers x passes" in r.getMessage()]
    total = passes * layers
    assert (
        lines and lines[-1].startswith(f"{method.name} saliency") and f": {total}/{total} (100%)" in lines[-1]
    )
    assert all(not block._forward_hooks for block in prunable.blocks(model))  # the counting hooks are gone
